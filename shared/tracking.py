"""Experiments, logged models and the registry, as training writes them."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from shared.preprocess import Classifier, Preprocessing
from shared.store import CHAMPION, SCORE_TAG


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it if needed. With a SQLite store its artifacts live beside
    the database file, so a store is one self-contained folder wherever it was created from."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / slug).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def log_classifier(net: nn.Module, prep: Preprocessing, classes: list[str],
                   examples: torch.Tensor, extra: dict | None = None) -> mlflow.models.model.ModelInfo:
    """Log `net` with its preprocessing in front, in the pt2 (torch.export) format: no pickle.

    The logged model takes float32 RGB images in [0, 1], shape (N, 3, image_size, image_size),
    and returns one score per class (softmax gives probabilities). Its metadata holds the class
    names and preprocessing, so a consumer needs nothing else.
    """
    model = Classifier(copy.deepcopy(net), prep).cpu().to(memory_format=torch.contiguous_format).eval()
    example = examples[:2].cpu().float().div(255).numpy()  # batch > 1 keeps the batch dim dynamic
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    metadata = {"class_names": list(classes), "preprocessing": prep.to_dict(),
                "input": "float32 RGB in [0, 1], shape (N, 3, image_size, image_size)",
                "output": "one score per class; softmax gives probabilities", **(extra or {})}
    return mlflow.pytorch.log_model(
        model, name="model", input_example=example, signature=infer_signature(example, output),
        metadata=metadata, serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}",
                          f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
    )


def champion_score(name: str, client: MlflowClient | None = None) -> float | None:
    """The champion version's validation accuracy, or None if the model has no champion."""
    client = client or MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return float(version.tags.get(SCORE_TAG, "-inf"))


def register_version(model_uri: str, name: str, score: float,
                     tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Register a new version; move the champion alias to it only if it beats the champion's
    validation accuracy. Returns (version, promoted)."""
    client = MlflowClient()
    version = mlflow.register_model(model_uri, name, tags={SCORE_TAG: f"{score:.6f}", **(tags or {})})
    previous = champion_score(name, client)
    promoted = previous is None or score > previous
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return str(version.version), promoted
