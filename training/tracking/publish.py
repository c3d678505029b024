"""Experiments, logged models and the registry, as training writes them."""
from __future__ import annotations

import copy
import math
import random
import re
import time

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from shared import serving
from shared.calibration import Calibration
from shared.network import Classifier
from shared.preprocess import Preprocessing
from shared.store import CHAMPION, SCORE_TAG, creation_lock, sqlite_path, store_folder

SETTLED_TAG = "champion_checked"  # set once a version was compared with the champion
# MLflow's UI opens an experiment without this tag on its GenAI overview (traces), not its runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it if needed, tagged as model training for the UI. With a
    SQLite store its artifacts live beside the database file, so a store is one self-contained
    folder wherever it was created from."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:  # made by an older version, or by hand
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if sqlite_path(uri) is not None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        location = (store_folder(uri) / "artifacts" / slug).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def log_dataset(name: str, source: str, digest: str, context: str) -> None:
    """The dataset the active run used, in its Datasets panel: name, where it lives and the
    fingerprint of its images (mlflow.log_input)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    mlflow.log_input(MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest),
                     context=context)


def log_classifier(net: nn.Module, prep: Preprocessing, classes: list[str],
                   examples: torch.Tensor, extra: dict | None = None,
                   calibration: Calibration = Calibration()) -> mlflow.models.model.ModelInfo:
    """Log `net` with its preprocessing in front and its calibration temperature behind, in
    the pt2 (torch.export) format: no pickle.

    The logged model takes float32 RGB images in [0, 1], shape (N, 3, image_size, image_size),
    and returns one score per class (softmax gives calibrated probabilities). Its metadata
    holds the class names, preprocessing and unsure rule, so a consumer needs nothing else.
    """
    model = Classifier(copy.deepcopy(net), prep, calibration.temperature)
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    example = examples[:2].cpu().float().div(255).numpy()  # batch > 1 keeps the batch dim dynamic
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    metadata = {"class_names": list(classes), "preprocessing": prep.to_dict(),
                "calibration": calibration.to_dict(),
                "input": "float32 RGB in [0, 1], shape (N, 3, image_size, image_size)",
                "output": "one score per class; softmax gives probabilities", **(extra or {})}
    # flavor: MLflow's pytorch flavor plus a python_function served by shared.serving
    return mlflow.models.Model.log(
        artifact_path=None, name="model", flavor=serving, pytorch_model=model, input_example=example,
        signature=infer_signature(example, output), metadata=metadata,
        serialization_format="pt2", validate_serving_input=False,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}",
                          f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
    )


def version_score(version) -> float:
    """The version's validation accuracy; -inf when missing or not a number, so such a
    version never becomes champion."""
    try:
        score = float(version.tags.get(SCORE_TAG, "-inf"))
    except ValueError:
        return float("-inf")
    return score if math.isfinite(score) else float("-inf")


def register_version(model_uri: str, name: str, score: float,
                     tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Register a new version; the champion alias moves to it only if it beats the champion's
    validation accuracy (a tie keeps the champion). Returns (version, promoted)."""
    client = MlflowClient()
    version = mlflow.register_model(model_uri, name, tags={SCORE_TAG: f"{score:.6f}", **(tags or {})})
    # on a local store, one registration settles at a time: an alias write decided on a
    # stale read could otherwise replace a champion that had just settled (seen in CI)
    with creation_lock(mlflow.get_registry_uri(), "champion.lock"):
        champion = settle_champion(client, name)
        client.set_model_version_tag(name, version.version, SETTLED_TAG, "true")
    return str(version.version), champion == str(version.version)


def settle_champion(client: MlflowClient, name: str) -> str | None:
    """Point the champion alias at the best of the champion and every version not yet compared
    with it (the older wins a tie). Runs registering at the same moment all re-read after each
    move until the alias and the best agree, so they end on the same, right champion."""
    for _ in range(50):
        try:
            champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            champion = None
        candidates = [v for v in client.search_model_versions(f"name='{name}'")
                      if str(v.version) == champion or SETTLED_TAG not in v.tags]
        best = max(candidates, key=lambda v: (version_score(v), -int(v.version)), default=None)
        if best is None or str(best.version) == champion or version_score(best) == float("-inf"):
            return champion
        try:
            client.set_registered_model_alias(name, CHAMPION, best.version)
        except MlflowException:  # another registration wrote the alias at the same moment
            time.sleep(random.uniform(0.01, 0.1))
    return champion
