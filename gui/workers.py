"""Work off the UI thread. Workers hold no widgets; windows hold no inference logic.

`InferenceWorker` lives on one QThread for the app's lifetime and owns the loaded model, so
calls into it never overlap. Thumbnails decode on a QThreadPool as QImages; the window turns
them into pixmaps on the GUI thread.
"""
from __future__ import annotations

import threading

from PySide6.QtCore import QObject, QRunnable, QSize, Qt, Signal, Slot
from PySide6.QtGui import QImage, QImageReader, QPainter

from shared.files import not_readable
from shared.registry import RegistryError, list_versions
from shared.store import StoreBroken, use_store


class InferenceWorker(QObject):
    models_listed = Signal(list)  # [ModelVersionInfo]
    models_failed = Signal(str)
    loaded = Signal(str, list)  # uri, class names
    load_failed = Signal(str, str)  # uri, message
    progress = Signal(int, int, int)  # job, done, total
    results = Signal(int, object)  # job, [Prediction]
    finished = Signal(int, bool)  # job, cancelled
    failed = Signal(int, str)  # job, message: classifying stopped on an unexpected error

    def __init__(self, tracking_uri: str, batch_size: int = 32):
        super().__init__()
        self.tracking_uri, self.batch_size = tracking_uri, batch_size
        self.classifier = None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Thread-safe: called directly from the GUI thread while a job runs."""
        self._cancel.set()

    @Slot()
    def list_models(self) -> None:
        try:
            use_store(self.tracking_uri)
            self.models_listed.emit(list_versions(self.tracking_uri))
        except RegistryError as exc:
            self.models_failed.emit(str(exc))
        except StoreBroken as exc:
            self.models_failed.emit(f"{exc}. Point the app at your store with "
                                    "MLFLOW_TRACKING_URI (or --tracking-uri).")

    @Slot(str)
    def load(self, uri: str) -> None:
        # torch and MLflow are imported here, on this thread, so the window shows at once
        from shared.inference import ModelLoadError, load_classifier

        self.classifier = None
        try:
            use_store(self.tracking_uri)
            self.classifier = load_classifier(uri)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the window, not hang it
            self.load_failed.emit(uri, str(exc) if isinstance(exc, ModelLoadError)
                                  else f"cannot load {uri}: {type(exc).__name__}: {exc}")
            return
        self.loaded.emit(uri, self.classifier.classes)

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
