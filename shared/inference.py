"""Loading a logged classifier and running it on image files, without unpickling anything."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch

from shared.preprocess import Preprocessing, decode_image


@dataclass
class LoadedClassifier:
    uri: str
    module: torch.nn.Module  # an exported (torch.export) module, fixed in eval mode
    classes: list[str]
    prep: Preprocessing

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) images at the model's stored size -> (N, classes) probabilities."""
        scores = self.module(images.float().div(255))
        return torch.softmax(scores.float(), dim=1)

    def load_images(self, paths: list[str | Path]) -> torch.Tensor:
        """Decode files exactly as the training data was decoded."""
        size = self.prep.image_size
        return torch.from_numpy(np.stack([decode_image(p, size) for p in paths]))


def load_classifier(model_uri: str) -> LoadedClassifier:
    """Load `models:/name@alias`, `models:/name/version` or `runs:/id/model`."""
    info = mlflow.models.get_model_info(model_uri)
    meta = info.metadata or {}
    if "class_names" not in meta or "preprocessing" not in meta:
        raise ValueError(f"{model_uri} was not logged by this project's training: its metadata "
                         "lacks class names and preprocessing")
    module = mlflow.pytorch.load_model(model_uri)
    return LoadedClassifier(model_uri, module, list(meta["class_names"]),
                            Preprocessing.from_dict(meta["preprocessing"]))
