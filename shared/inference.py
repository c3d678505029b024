"""Loading a logged classifier and running it on image files, without unpickling anything.

A model run by ONNX Runtime (a checked export) is opened and run without importing PyTorch:
the app is usable that much sooner after launch, and PyTorch is imported only for pt2 models.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.calibration import Calibration
from shared.files import not_readable
from shared.messages import BadInput
from shared.onnx_model import ONNX_ARCHIVE, OnnxModule, UnsafeOnnx, check_onnx, open_session
from shared.preprocess import Preprocessing, decode_image
from shared.registry import runtime_uri
from shared.safe_model import (
    UnsafeModel,
    check_archive,
    check_calibration,
    check_metadata,
    check_model_dir,
    check_outputs,
    open_archive,
)

if TYPE_CHECKING:
    import torch

# a model is fetched from a local or tracking-server store on every load; no progress bars
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class ModelLoadError(BadInput):
    """A model that cannot be found, read or used; the message says which and why."""


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most likely first; empty on error
    error: str | None = None
    unsure: bool = False  # under the model's unsure threshold: maybe none of its classes

    @property
    def label(self) -> str:
        return self.top[0][0] if self.top else ""

    @property
    def confidence(self) -> float:
        return self.top[0][1] if self.top else 0.0


@dataclass
class LoadedClassifier:
    uri: str
    module: torch.nn.Module | OnnxModule  # an exported (torch.export) module, or an ONNX graph
    classes: list[str]
    prep: Preprocessing
    calibration: Calibration = Calibration()
    runtime: str = "pt2"  # what runs the network: pt2 (PyTorch), onnx or onnx-int8

    def scores(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, 3, S, S) images at the model's stored size -> (N, classes) float32 scores,
        calibrated (the module divides them by the temperature), `batch_size` at a time."""
        import torch

        with torch.no_grad():
            return torch.cat([self.module(chunk.float().div(255)).float()
                              for chunk in images.split(batch_size)])

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) images at the model's stored size -> (N, classes) probabilities."""
        return self.scores(images).softmax(dim=1)

    def array_probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The same for a uint8 array, without PyTorch when ONNX Runtime runs the model."""
        if not isinstance(self.module, OnnxModule):
            import torch

            return self.probabilities(torch.from_numpy(images)).numpy()
        scores = np.concatenate([self.module.run(images[start:start + batch_size] / np.float32(255))
                                 for start in range(0, len(images), batch_size)])
        exp = np.exp(scores - scores.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, paths: Sequence[str], images: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """One Prediction per decoded uint8 (N, 3, S, S) image: its top classes and the unsure
        flag."""
        probs = self.array_probabilities(images)
        indices = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, len(self.classes))]
        values = np.take_along_axis(probs, indices, axis=1)
        return [Prediction(path, [(self.classes[i], v) for i, v in zip(idxs, vals)],
                           unsure=self.calibration.unsure(vals[0]))
                for path, vals, idxs in zip(paths, values.tolist(), indices.tolist())]

    def load_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Decode files exactly as the training data was decoded."""
        import torch

        size = self.prep.image_size
        return torch.from_numpy(np.stack([decode_image(p, size) for p in paths]))


def load_classifier(model_uri: str, runtime: str = "pt2", keep_in: Path | None = None
                    ) -> LoadedClassifier:
    """Load `models:/name@alias`, `models:/name/version` or `runs:/id/model`, run by `runtime`:
    pt2 (PyTorch), or the version's checked `onnx` or `onnx-int8` export. The files are
    checked before anything in them is deserialised (shared/safe_model.py,
    shared/onnx_model.py): a model that is not what this project logs is refused, and nothing
    of it runs. With `keep_in` (an empty folder) the files are kept there."""
    import mlflow  # here: a model opened from kept files (the app's launch) needs no MLflow

    source = runtime_uri(model_uri, runtime)
    with tempfile.TemporaryDirectory(prefix="cifarlab-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source,
                                                             dst_path=str(keep_in or tmp)))
        except Exception as exc:  # noqa: BLE001 - missing artifacts, bad URIs, store errors
            raise ModelLoadError(f"cannot read the model {source}: it does not exist, or its "
                                 f"artifacts are missing or unreachable ({exc})") from exc
        clf = open_model_dir(local, model_uri if runtime == "pt2" else f"{model_uri} ({runtime})")
    if clf.runtime != runtime:
        raise ModelLoadError(f"refused to load {model_uri} ({runtime}): the export its tag links "
                             f"to is a {clf.runtime} model. Export it again with training.export")
    return clf


def open_model_dir(local: Path, model_uri: str) -> LoadedClassifier:
    """A downloaded model folder, checked, then opened (see load_classifier)."""
    if not (local / "MLmodel").is_file():
        raise ModelLoadError(f"cannot read the model {model_uri}: its artifacts are missing "
                             "(no MLmodel file where the registry points)")
    onnx = False
    try:
        metadata, archive = check_model_dir(local)
        classes, prep = check_metadata(metadata)
        calibration = check_calibration(metadata)
        onnx = archive == ONNX_ARCHIVE
        check_onnx(local / archive) if onnx else check_archive(local / archive)
    except (UnsafeModel, UnsafeOnnx) as exc:
        remedy = "export it again with training.export" if onnx else "retrain it with training.train"
        raise ModelLoadError(f"refused to load {model_uri}: {exc}. Nothing of it was run; "
                             f"{remedy}, or ask who changed its artifacts.") from None
    try:
        module = OnnxModule(open_session(local / archive)) if onnx else open_archive(local / archive)
    except Exception as exc:  # noqa: BLE001 - broken files, incompatible torch versions
        made_by = "ONNX Runtime" if onnx else "PyTorch"
        raise ModelLoadError(f"cannot load the model {model_uri} (damaged, or made by an "
                             f"incompatible {made_by}): {exc}") from exc
    try:
        check_outputs(module, classes, prep)
    except UnsafeModel as exc:
        raise ModelLoadError(f"cannot use the model {model_uri}: {exc}") from None
    return LoadedClassifier(model_uri, module, classes, prep, calibration,
                            metadata["runtime"] if onnx else "pt2")


def describe_error(exc: BaseException) -> str:
    """A short, human reason why a file could not be classified."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (or a format Pillow cannot read)"
    if isinstance(exc, Image.DecompressionBombError) or isinstance(exc, ValueError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return f"truncated image: {exc}"
    return f"unreadable image: {exc}"


def classify_files(clf: LoadedClassifier, paths: Sequence[str | Path], batch_size: int = 64,
                   top_k: int = 5, cancelled: Callable[[], bool] = lambda: False
                   ) -> Iterator[list[Prediction]]:
    """Classify files batch by batch, one Prediction per file in order. A file that cannot be
    read gets its reason, never stops the batch. Stops between batches once `cancelled()`."""
    for start in range(0, len(paths), batch_size):
        if cancelled():
            return
        chunk = [str(p) for p in paths[start:start + batch_size]]
        images, readable, results = [], [], {}
        for path in chunk:
            skipped = not_readable(path)
            if skipped:
                results[path] = Prediction(path, [], skipped)
                continue
            try:
                images.append(decode_image(path, clf.prep.image_size))
                readable.append(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                results[path] = Prediction(path, [], describe_error(exc))
        if images:
            for p in clf.predict(readable, np.stack(images), top_k):
                results[p.path] = p
        yield [results[p] for p in chunk]
