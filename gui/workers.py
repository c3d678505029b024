"""Work off the UI thread. Workers hold no widgets; windows hold no inference logic.

`InferenceWorker` lives on one QThread for the app's lifetime and owns the loaded model, so
calls into it never overlap. Thumbnails decode on a QThreadPool as QImages; the window turns
them into pixmaps on the GUI thread.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import threading
import uuid
from pathlib import Path

from PySide6.QtCore import QObject, QRunnable, QSize, Qt, Signal, Slot
from PySide6.QtGui import QImage, QImageReader, QPainter

from shared.files import cache_folder, not_readable
from shared.messages import BadInput
from shared.onnx_model import NO_HEATMAP
from shared.registry import EmptyRegistry, RegistryError, list_versions
from shared.store import StoreBroken, use_store


def explainer_of(classifier) -> tuple[object | None, str]:
    """The Grad-CAM explainer of a pt2 model, or None and why there is none. An ONNX model has
    none, and PyTorch is not imported for it."""
    if classifier.runtime != "pt2":
        return None, NO_HEATMAP
    from shared.heatmap import Explainer, NoHeatmap

    try:
        return Explainer(classifier.module), ""
    except NoHeatmap as exc:
        return None, str(exc)


class InferenceWorker(QObject):
    models_listed = Signal(list)  # [ModelVersionInfo]
    models_failed = Signal(str)
    loaded = Signal(str, str, list, str)  # uri, runtime, class names, why no heatmap ("": it has)
    load_failed = Signal(str, str, str)  # uri, runtime, message
    progress = Signal(int, int, int)  # job, done, total
    results = Signal(int, object)  # job, [Prediction]
    finished = Signal(int, bool)  # job, cancelled
    failed = Signal(int, str)  # job, message: classifying stopped on an unexpected error
    heatmap_ready = Signal(object, int, QImage)  # path, preview side, photo with heatmap
    heatmap_failed = Signal(object, str)  # path, message

    def __init__(self, tracking_uri: str, batch_size: int = 32):
        super().__init__()
        self.tracking_uri, self.batch_size = tracking_uri, batch_size
        self.classifier = None
        self.explainer = None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Thread-safe: called directly from the GUI thread while a job runs."""
        self._cancel.set()

    @Slot()
    def list_models(self) -> None:
        try:
            use_store(self.tracking_uri)
            self.models_listed.emit(list_versions(self.tracking_uri))
        except EmptyRegistry as exc:
            self.models_failed.emit(f"{exc}\n\nOr train one here, on a folder of your photos: "
                                    "New model from a folder… (Ctrl+N).")
        except RegistryError as exc:
            self.models_failed.emit(str(exc))
        except StoreBroken as exc:
            self.models_failed.emit(f"{exc}. Point the app at your store with "
                                    "MLFLOW_TRACKING_URI (or --tracking-uri).")
        except BadInput as exc:  # a server that does not answer or refuses the account
            self.models_failed.emit(str(exc))

    @Slot(str, str, bool)
    def load(self, uri: str, runtime: str, kept: bool = False) -> None:
        """The version `uri`, run by `runtime`: pt2, or its checked onnx or onnx-int8 export.
        With `kept` (at launch) the files kept from its last load are opened, checked as
        always, without asking the store: MLflow is not even imported."""
        # the model code (PyTorch for pt2, MLflow for the store) is imported here, on this
        # thread, so the window shows at once
        self.classifier = self.explainer = None
        try:
            self.classifier = self._open(uri, runtime, kept)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the window, not hang it
            self.load_failed.emit(uri, runtime, str(exc) if isinstance(exc, BadInput)
                                  else f"cannot load {uri}: {type(exc).__name__}: {exc}")
            return
        self.explainer, no_heatmap = explainer_of(self.classifier)
        self.loaded.emit(uri, runtime, self.classifier.classes, no_heatmap)

    def _open(self, uri: str, runtime: str, kept: bool):
        from shared.inference import ModelLoadError, load_classifier, open_model_dir

        folder = kept_model(self.tracking_uri, uri, runtime)
        if kept and (folder / "MLmodel").is_file():
            try:
                classifier = open_model_dir(folder, uri)
                if classifier.runtime == runtime:
                    return classifier
            except ModelLoadError:
                pass  # damaged or changed since: the store's own files are fetched and checked
        use_store(self.tracking_uri)
        fresh = folder.parent / f".loading-{uuid.uuid4().hex}"
        try:
            fresh.mkdir(parents=True)
        except OSError:
            return load_classifier(uri, runtime)  # nothing kept: the next launch asks the store
        try:
            classifier = load_classifier(uri, runtime, keep_in=fresh)
            keep_only(fresh, folder)
            return classifier
        finally:
            shutil.rmtree(fresh, ignore_errors=True)

    @Slot(object, int)
    def heatmap(self, path: str, side: int) -> None:
        """The photo's centre square (what the model sees) at `side` pixels, with the heatmap
        of the predicted class over it."""
        from shared.heatmap import photo_with_heatmap
        from shared.inference import describe_error

        if self.explainer is None:
            self.heatmap_failed.emit(path, "no heatmap for this model")
            return
        try:
            heat = self.explainer.heatmaps(self.classifier.load_images([path]))[0]
            picture = photo_with_heatmap(path, heat, side)
        except Exception as exc:  # noqa: BLE001 - unreadable files, model errors
            self.heatmap_failed.emit(path, describe_error(exc))
            return
        image = QImage(picture.tobytes(), side, side, 3 * side, QImage.Format.Format_RGB888)
        self.heatmap_ready.emit(path, side, image.copy())  # copy: the bytes are freed on return

    @Slot(int, object)
    def classify(self, job: int, paths: list) -> None:
        from shared.inference import classify_files

        self._cancel.clear()
        if self.classifier is None:
            self.finished.emit(job, True)
            return
        done = 0
        try:
            for batch in classify_files(self.classifier, paths, self.batch_size,
                                        cancelled=self._cancel.is_set):
                done += len(batch)
                self.results.emit(job, batch)
                self.progress.emit(job, done, len(paths))
        except Exception as exc:  # noqa: BLE001 - e.g. a model that fails on real input
            self.failed.emit(job, f"classifying stopped after {done} of {len(paths)} file(s): "
                                  f"{type(exc).__name__}: {exc}")
            return
        self.finished.emit(job, self._cancel.is_set() or done < len(paths))


def kept_model(tracking_uri: str, uri: str, runtime: str) -> Path:
    """Where the files of the model last loaded from this store are kept, for the next launch
    (one model per store; the store named by a hash: its URI may hold a password)."""
    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{uri.removeprefix('models:/')}-{runtime}")
    return cache_folder() / "models" / store / name


def keep_only(fresh: Path, folder: Path) -> None:
    """`fresh` (a downloaded model) becomes `folder`, the only one kept for its store. Keeping
    is a convenience: a failure leaves nothing half-written and is not reported."""
    try:
        local = next(fresh.rglob("MLmodel")).parent
        for old in folder.parent.iterdir():
            if old != fresh:
                shutil.rmtree(old, ignore_errors=True)
        local.rename(folder)
    except (OSError, StopIteration):
        shutil.rmtree(folder, ignore_errors=True)


class ThumbnailSignals(QObject):
    ready = Signal(object, QImage)  # path (as a Python str: see MainWindow.request_classify)
    failed = Signal(object, str)


class ThumbnailTask(QRunnable):
    """Decode one image, upright by its EXIF orientation, scaled down to `size`."""

    def __init__(self, path: str, size: int, signals: ThumbnailSignals):
        super().__init__()
        self.path, self.size, self.signals = path, size, signals

    def run(self) -> None:
        image = thumbnail(self.path, self.size)
        if image.isNull():
            self.signals.failed.emit(self.path, "cannot be shown")
        else:
            self.signals.ready.emit(self.path, image)


def read_scaled(path: str, size: int) -> QImage:
    """A QImage no larger than size x size (a null image if unreadable). Pipes and devices are
    never opened: reading one would block the thread."""
    if not_readable(path):
        return QImage()
    reader = QImageReader(path)
    reader.setAutoTransform(True)
    original = reader.size()
    if original.isValid() and max(original.width(), original.height()) > size:
        reader.setScaledSize(original.scaled(QSize(size, size), Qt.AspectRatioMode.KeepAspectRatio))
    return reader.read()


def preview(path: str, side: int) -> QImage:
    """The image fitted into side x side: large photos scaled down, small ones (CIFAR's
    32 x 32) scaled up to fill the preview."""
    image = read_scaled(path, side)
    if image.isNull() or max(image.width(), image.height()) >= side:
        return image
    return image.scaled(side, side, Qt.AspectRatioMode.KeepAspectRatio,
                        Qt.TransformationMode.SmoothTransformation)


def thumbnail(path: str, size: int) -> QImage:
    """The image fitted into a size x size square (small images scaled up), centered on a
    transparent canvas, so every cell of the grid lines up."""
    image = read_scaled(path, size)
    if image.isNull():
        return image
    image = image.scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                         Qt.TransformationMode.SmoothTransformation)
    canvas = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    canvas.fill(Qt.GlobalColor.transparent)
    painter = QPainter(canvas)
    painter.drawImage((size - image.width()) // 2, (size - image.height()) // 2, image)
    painter.end()
    return canvas
