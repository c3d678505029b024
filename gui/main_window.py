"""The main window: model picker, thumbnail grid, detail panel. No inference happens here:
requests go to the InferenceWorker by signal, results come back by signal."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from pathlib import Path

from PySide6.QtCore import QSettings, QSize, Qt, QThread, QThreadPool, Signal, Slot
from PySide6.QtGui import QAction, QImage, QImageReader, QKeySequence, QPixmap
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QInputDialog,
    QLabel,
    QListView,
    QMainWindow,
    QMenu,
    QMessageBox,
    QProgressBar,
    QSplitter,
    QToolBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from gui.export import write_csv
from gui.image_list import ImageListModel, ItemRole
from gui.label_issues_dialog import LabelIssuesDialog
from gui.train_dialog import TrainDialog
from gui.workers import InferenceWorker, ThumbnailSignals, ThumbnailTask, preview
from shared import curation
from shared.files import display_name, image_files, pasted_folder
from shared.messages import BadInput
from shared.registry import ModelVersionInfo, find_version, newest_champion

THUMBNAIL = 128
UNSURE_TEXT = "unsure — maybe none of these classes"
FACTS = ["model", "training", "weights", "dataset", "device", "epochs run", "test accuracy",
         "registered", "improves on", "runtime"]
RUNTIME_NAMES = {"pt2": "PyTorch (pt2)", "onnx": "ONNX", "onnx-int8": "ONNX int8"}


def store_key(tracking_uri: str) -> str:
    return hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]  # the URI may hold a password


def keep_listing(settings: QSettings, tracking_uri: str, versions: list) -> None:
    """The registry as listed, for the next launch to show at once."""
    settings.setValue("launch/listing", json.dumps(
        {"store": store_key(tracking_uri), "versions": [dataclasses.asdict(v) for v in versions]}))


def kept_listing(settings: QSettings, tracking_uri: str) -> list[ModelVersionInfo]:
    try:
        kept = json.loads(settings.value("launch/listing", "") or "{}")
        if kept.get("store") != store_key(tracking_uri):
            return []
        return [ModelVersionInfo(**v) for v in kept["versions"]]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []  # an older or damaged entry: the registry is asked as on a first launch


class MainWindow(QMainWindow):
    request_models = Signal()
    request_load = Signal(str, str, bool)  # version URI, runtime, from the files kept
    # file paths travel as Python objects: Qt would re-encode names that are not UTF-8
    request_classify = Signal(int, object)
    request_heatmap = Signal(object, int)  # path, side

    def __init__(self, tracking_uri: str, settings: QSettings, folder: Path | None = None,
                 model: str | None = None):
        super().__init__()
        self.tracking_uri, self.settings = tracking_uri, settings
        self.setWindowTitle("cifarlab — classify photos")
        self.setAcceptDrops(True)
        self.versions = []
        self.model_uri: str | None = None
        self.runtime = settings.value("runtime", "pt2")  # kept where the next version has it
        self.wanted_model = model or settings.value("model", "")  # else the newest champion
        self.loading = self.launching = False
        self.no_heatmap = "no model loaded"  # why the loaded model has no heatmap ("": it has)
        self.job, self.running = 0, False
        self.folder: Path | None = None
        self.classes: list[str] = []
        self.corrections: list[curation.Correction] = []  # the undo stack
        self.select_next: str | None = None  # a version just trained: selected once listed
        self.dialogs: list = []

        self.images = ImageListModel(THUMBNAIL, self)
        self._build_widgets()
        self._create_actions()
        self._start_workers()
        if not self.restoreGeometry(settings.value("geometry", b"")):
            self.resize(1200, 760)
        start = folder or Path(settings.value("folder", "inputs"))
        if start.is_dir():
            self.open_folder(start)
        self.launching = True  # the first load opens the files kept from the last session
        listed = kept_listing(settings, tracking_uri)
        if listed:
            self._models_listed(listed)  # the registry as last seen; asked anew just after
        self.launching = False
        self.refresh_models()

    # --- layout -------------------------------------------------------------------------

    def _build_widgets(self) -> None:
        self.model_box = QComboBox()
        self.model_box.setMinimumContentsLength(28)
        self.model_box.currentIndexChanged.connect(self._model_chosen)
        self.runtime_box = QComboBox()
        self.runtime_box.currentIndexChanged.connect(self._runtime_chosen)

        self.grid = QListView()
        self.grid.setViewMode(QListView.ViewMode.IconMode)
        self.grid.setResizeMode(QListView.ResizeMode.Adjust)
        self.grid.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
        self.grid.setGridSize(QSize(THUMBNAIL + 56, THUMBNAIL + 2 * self.fontMetrics().height() + 24))
        self.grid.setSpacing(8)
        self.grid.setWordWrap(True)
        self.grid.setModel(self.images)
        self.grid.selectionModel().currentChanged.connect(self._show_detail)

        self.facts = {name: QLabel("—") for name in FACTS}
        facts_box = QGroupBox("Model")
        form = QFormLayout(facts_box)
        for name, label in self.facts.items():
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(name == "runtime")
            form.addRow(name, label)

        self.preview = QLabel("Select an image")
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setMinimumSize(256, 256)
        self.heatmap_box = QCheckBox("Show where it looked (heatmap)")
        self.heatmap_box.toggled.connect(self._show_preview)
        self.heatmap_note = QLabel()
        self.heatmap_note.setWordWrap(True)
        self.detail_title = QLabel()
        self.detail_title.setWordWrap(True)
        self.bars = []
        bars_box = QGroupBox("Top 5")
        bars_layout = QFormLayout(bars_box)
        for _ in range(5):
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setTextVisible(True)
            name = QLabel()
            bars_layout.addRow(name, bar)
            self.bars.append((name, bar))

        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.addWidget(facts_box)
        side_layout.addWidget(self.preview, 1)
        side_layout.addWidget(self.heatmap_box)
        side_layout.addWidget(self.heatmap_note)
        side_layout.addWidget(self.detail_title)
        self.correct_button = QToolButton()
        self.correct_button.setText("This is…")
        self.correct_button.setToolTip("A wrong answer? Add this photo to the right class of "
                                       "your training folder (a copy), then Retrain")
        self.correct_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.correct_menu = QMenu(self.correct_button)
        self.correct_button.setMenu(self.correct_menu)
        side_layout.addWidget(self.correct_button)
        side_layout.addWidget(bars_box)

        splitter = QSplitter()
        splitter.addWidget(self.grid)
        splitter.addWidget(side)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        self.setCentralWidget(splitter)

        self.message = QLabel()
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(240)
        self.progress.hide()
        self.statusBar().addWidget(self.message, 1)
        self.statusBar().addPermanentWidget(self.progress)

    def _create_actions(self) -> None:
        self.refresh_action = QAction("&Refresh models", self, shortcut=QKeySequence.StandardKey.Refresh,
                                      triggered=self.refresh_models)
        self.open_action = QAction("&Open folder…", self, shortcut=QKeySequence.StandardKey.Open,
                                   triggered=self._choose_folder)
        self.add_action = QAction("&Add files…", self, triggered=self._choose_files)
        self.paste_action = QAction("&Paste image", self, shortcut=QKeySequence.StandardKey.Paste,
                                    triggered=self.paste)
        self.classify_action = QAction("&Classify", self, shortcut="Ctrl+R",
                                       triggered=self.classify)
        self.cancel_action = QAction("&Cancel", self, shortcut="Esc", triggered=self.cancel)
        self.export_action = QAction("&Export CSV…", self, shortcut=QKeySequence.StandardKey.Save,
                                     triggered=self._choose_export)
        self.new_model_action = QAction("&New model from a folder…", self,
                                        shortcut=QKeySequence.StandardKey.New,
                                        triggered=lambda: self.open_training())
        self.undo_action = QAction("&Undo correction", self, shortcut=QKeySequence.StandardKey.Undo,
                                   triggered=self.undo_correction)
        self.retrain_action = QAction("&Retrain…", self, triggered=self.retrain)
        self.issues_action = QAction("Find &mislabelled images…", self,
                                     triggered=self.find_label_issues)
        toolbar = QToolBar("Main")
        toolbar.setObjectName("main-toolbar")
        self.addToolBar(toolbar)
        toolbar.addWidget(QLabel(" Model: "))
        toolbar.addWidget(self.model_box)
        toolbar.addWidget(QLabel(" Runtime: "))
        toolbar.addWidget(self.runtime_box)
        for action in (self.refresh_action, None, self.open_action, self.add_action,
                       self.paste_action, None,
                       self.classify_action, self.cancel_action, self.export_action, None,
                       self.new_model_action, self.undo_action, self.retrain_action,
                       self.issues_action):
            toolbar.addSeparator() if action is None else toolbar.addAction(action)
        menus = {"&File": (self.open_action, self.add_action, self.paste_action, self.export_action),
                 "&Model": (self.refresh_action, self.classify_action, self.cancel_action),
                 "&Learn": (self.new_model_action, self.undo_action, self.retrain_action,
                            self.issues_action)}
        for title, actions in menus.items():
            self.menuBar().addMenu(title).addActions(list(actions))
        self._update_actions()

    def _update_actions(self) -> None:
        """Every action's enabled state, decided in one place."""
        ready = self.model_uri is not None and not self.loading
        has_images = self.images.rowCount() > 0
        self.classify_action.setEnabled(ready and has_images and not self.running)
        self.cancel_action.setEnabled(self.running)
        self.export_action.setEnabled(bool(self.images.predictions()) and not self.running)
        self.model_box.setEnabled(not self.loading)
        self.runtime_box.setEnabled(not self.loading and self.runtime_box.count() > 1)
        self.refresh_action.setEnabled(not self.loading)
        self.heatmap_box.setEnabled(ready and not self.no_heatmap)
        version = self.current_version()
        self.correct_button.setEnabled(ready and bool(self.classes) and self._selected_path() is not None)
        self.undo_action.setEnabled(bool(self.corrections))
        self.retrain_action.setEnabled(version is not None)
        self.issues_action.setEnabled(version is not None
                                      and version.facts.get("frozen pretrained") == "yes")
        self.issues_action.setToolTip("" if self.issues_action.isEnabled() else
                                      "needs a version trained with a frozen pretrained backbone")
        self.heatmap_box.setToolTip(self.no_heatmap or "Grad-CAM: red where the evidence for the "
                                                       "predicted class was strongest")

    # --- workers ------------------------------------------------------------------------

    def _start_workers(self) -> None:
        self.thread = QThread(self)
        self.worker = InferenceWorker(self.tracking_uri)
        self.worker.moveToThread(self.thread)
        self.request_models.connect(self.worker.list_models)
        self.request_load.connect(self.worker.load)
        self.request_classify.connect(self.worker.classify)
        self.request_heatmap.connect(self.worker.heatmap)
        self.worker.models_listed.connect(self._models_listed)
        self.worker.models_failed.connect(self._models_failed)
        self.worker.loaded.connect(self._loaded)
        self.worker.load_failed.connect(self._load_failed)
        self.worker.progress.connect(self._progress)
        self.worker.results.connect(self._results)
        self.worker.finished.connect(self._finished)
        self.worker.failed.connect(self._classify_failed)
        self.worker.heatmap_ready.connect(self._heatmap_ready)
        self.worker.heatmap_failed.connect(self._heatmap_failed)
        self.thread.start()
        # image plugins loaded here, on the GUI thread, before pool threads first read at once
        # (one test run crashed with two pool threads inside QImageReader at their first use)
        QImageReader.supportedImageFormats()
        self.thumbnails = QThreadPool(self)
        self.thumbnail_signals = ThumbnailSignals()
        self.thumbnail_signals.ready.connect(self.images.set_thumbnail)
        self.thumbnail_signals.failed.connect(self.images.set_display_error)

    def closeEvent(self, event) -> None:
        for dialog in list(self.dialogs):  # a training run among them stops, resumable
            dialog.close()
        self.settings.setValue("geometry", self.saveGeometry())
        if self.folder:
            self.settings.setValue("folder", str(self.folder))
        if self.model_uri:
            self.settings.setValue("model", self.model_uri)
            self.settings.setValue("runtime", self.runtime)
        self.worker.cancel()
        self.thumbnails.clear()
        self.thumbnails.waitForDone(2000)
        self.thread.quit()
        self.thread.wait(5000)
        super().closeEvent(event)

    # --- models -------------------------------------------------------------------------

    @Slot()
    def refresh_models(self) -> None:
        self.message.setText("Reading the model registry…")
        self.request_models.emit()

    @Slot(list)
    def _models_listed(self, versions: list) -> None:
        if not self.launching:
            keep_listing(self.settings, self.tracking_uri, versions)
        self.versions = versions
        self.model_box.blockSignals(True)
        self.model_box.clear()
        for v in versions:
            self.model_box.addItem(v.label, v.uri)
        index = self._default_index(versions)
        self.model_box.setCurrentIndex(index)
        self.model_box.blockSignals(False)
        self.select_next = None
        self.message.setText(f"{len(versions)} model version(s) in the registry")
        if versions[index].uri != self.model_uri:
            self._model_chosen(index)
        else:  # the same version: exports made since are offered
            self._fill_runtimes(versions[index])

    def _default_index(self, versions: list) -> int:
        """The model in use, else the one asked for or last used, else the newest champion."""
        for wanted in (self.select_next, self.model_uri, self.wanted_model):
            if wanted and (index := find_version(versions, wanted)) is not None:
                return index
        return versions.index(newest_champion(versions))

    @Slot(str)
    def _models_failed(self, message: str) -> None:
        self.versions = []
        self.model_box.clear()
        self.message.setText("No model available — see the message")
        QMessageBox.information(self, "No model", message)

    @Slot(int)
    def _model_chosen(self, index: int) -> None:
        if not 0 <= index < len(self.versions):
            return
        version = self.versions[index]
        for name, label in self.facts.items():
            label.setText(version.facts.get(name, "—"))
        self._fill_runtimes(version)
        self._load(self.runtime_box.currentData())

    def _fill_runtimes(self, version) -> None:
        """pt2 and each checked export of `version`, its figures as the tooltip; the runtime
        in use stays chosen where the version has it."""
        self.runtime_box.blockSignals(True)
        self.runtime_box.clear()
        for runtime in version.runtimes:
            self.runtime_box.addItem(RUNTIME_NAMES[runtime], runtime)
            checks = version.exports.get(runtime, "the logged network itself")
            self.runtime_box.setItemData(self.runtime_box.count() - 1, checks,
                                         Qt.ItemDataRole.ToolTipRole)
        self.runtime_box.setCurrentIndex(max(self.runtime_box.findData(self.runtime), 0))
        self.runtime_box.blockSignals(False)
        self._update_actions()

    @Slot(int)
    def _runtime_chosen(self, index: int) -> None:
        if index >= 0 and 0 <= self.model_box.currentIndex() < len(self.versions):
            self._load(self.runtime_box.itemData(index))

    def _load(self, runtime: str) -> None:
        """Load the chosen version, run by `runtime`; its checked figures shown beside it."""
        version = self.versions[self.model_box.currentIndex()]
        self.model_uri, self.runtime, self.loading = version.uri, runtime, True
        checks = version.exports.get(runtime)
        self.facts["runtime"].setText(RUNTIME_NAMES[runtime] + (f": {checks}" if checks else ""))
        self.no_heatmap = "the model is loading"
        self.cancel()
        self.images.clear_predictions()
        self.message.setText(f"Loading {version.label} ({RUNTIME_NAMES[runtime]})…")
        self.progress.setRange(0, 0)  # busy indicator
        self.progress.show()
        self._update_actions()
        self.request_load.emit(version.uri, runtime, self.launching)

    @Slot(str, str, list, str)
    def _loaded(self, uri: str, runtime: str, classes: list, no_heatmap: str) -> None:
        if (uri, runtime) != (self.model_uri, self.runtime):
            return
        self.loading, self.no_heatmap, self.classes = False, no_heatmap, classes
        self._fill_corrections()
        self.progress.hide()
        self.message.setText(f"Ready: {uri} ({len(classes)} classes, {RUNTIME_NAMES[runtime]})")
        self._update_actions()
        self.classify()

    @Slot(str, str, str)
    def _load_failed(self, uri: str, runtime: str, message: str) -> None:
        if (uri, runtime) != (self.model_uri, self.runtime):
            return
        self.loading, self.model_uri, self.no_heatmap = False, None, "no model loaded"
        self.progress.hide()
        self.message.setText("The model could not be loaded — choose another")
        self._update_actions()
        QMessageBox.warning(self, "Model not loaded", message)

    # --- images -------------------------------------------------------------------------

    def open_folder(self, folder: Path) -> None:
        self.cancel()
        self.folder = Path(folder)
        self.settings.setValue("folder", str(self.folder))
        paths = [str(p) for p in image_files(self.folder)]
        self.images.set_paths(paths)
        self._load_thumbnails(paths)
        self.setWindowTitle(f"cifarlab — {display_name(self.folder)}")
        self.message.setText(f"{len(paths)} file(s) in {display_name(self.folder)}")
        self._update_actions()
        self.classify()

    def add_paths(self, paths: list[Path]) -> None:
        files = []
        for p in paths:
            files += [str(f) for f in image_files(p)] if p.is_dir() else [str(p)] if p.is_file() else []
        new = self.images.add_paths(files)
        self._load_thumbnails(new)
        self._update_actions()
        if new and not self.running:
            self.classify(new)

    def _load_thumbnails(self, paths: list[str]) -> None:
        for path in paths:
            self.thumbnails.start(ThumbnailTask(path, THUMBNAIL, self.thumbnail_signals))

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open folder", str(self.folder or "."))
        if folder:
            self.open_folder(Path(folder))

    def _choose_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Add images", str(self.folder or "."))
        self.add_paths([Path(f) for f in files])

    def paste(self) -> None:
        """The clipboard's image files, or its image (saved as a PNG in `pasted_folder()`),
        added and classified."""
        clipboard = QApplication.clipboard()
        urls = [u for u in clipboard.mimeData().urls() if u.isLocalFile()]
        if urls:
            self.add_paths([Path(u.toLocalFile()) for u in urls])
            return
        image = clipboard.image()
        if image.isNull():
            self.message.setText("The clipboard holds no image: copy an image (or image files), "
                                 "then paste")
            return
        folder = pasted_folder()
        path = folder / f"pasted-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.png"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.message.setText(f"The pasted image cannot be kept in {folder}: {exc.strerror}")
            return
        if not image.save(str(path), "PNG"):
            self.message.setText(f"The pasted image cannot be saved in {folder}")
            return
        self.add_paths([path])

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        self.add_paths([Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()])

    # --- classification -----------------------------------------------------------------

    @Slot()
    def classify(self, paths: list[str] | None = None) -> None:
        if self.model_uri is None or self.loading or self.running:
            return
        paths = self.images.paths() if not paths else paths
        if not paths:
            return
        self.job += 1
        self.running = True
        self.progress.setRange(0, len(paths))
        self.progress.setValue(0)
        self.progress.show()
        self.message.setText(f"Classifying {len(paths)} file(s)…")
        self._update_actions()
        self.request_classify.emit(self.job, paths)

    @Slot()
    def cancel(self) -> None:
        if self.running:
            self.worker.cancel()
            self.job += 1  # results of the cancelled job are ignored from now on
            self.running = False
            self.progress.hide()
            self.message.setText("Cancelled")
            self._update_actions()

    @Slot(int, int, int)
    def _progress(self, job: int, done: int, total: int) -> None:
        if job == self.job:
            self.progress.setValue(done)

    @Slot(int, object)
    def _results(self, job: int, predictions: list) -> None:
        if job != self.job:
            return
        for p in predictions:
            self.images.set_prediction(p)
        current = self.images.data(self.grid.currentIndex(), ItemRole)
        if current is not None and current.path in {p.path for p in predictions}:
            self._show_prediction(current)  # the preview image itself is unchanged

    @Slot(int, bool)
    def _finished(self, job: int, cancelled: bool) -> None:
        if job != self.job:
            return
        self.running = False
        self.progress.hide()
        predictions = self.images.predictions()
        failed = sum(p.error is not None for p in predictions)
        self.message.setText(f"{len(predictions) - failed} classified"
                             + (f", {failed} unreadable (marked ⚠)" if failed else "")
                             + (" — cancelled" if cancelled else ""))
        self._update_actions()

    @Slot(int, str)
    def _classify_failed(self, job: int, message: str) -> None:
        if job != self.job:
            return
        self.running = False
        self.progress.hide()
        self.message.setText("Classifying failed — see the message")
        self._update_actions()
        QMessageBox.warning(self, "Classifying failed", message)

    # --- detail and export --------------------------------------------------------------

    @Slot()
    def _show_detail(self, index) -> None:
        """A newly selected image: decode its preview, then show its prediction."""
        item = self.images.data(index, ItemRole) if index is not None and index.isValid() else None
        if item is None:
            return
        self._show_preview()
        self._show_prediction(item)
        self._update_actions()

    def _selected_path(self) -> str | None:
        item = self.images.data(self.grid.currentIndex(), ItemRole)
        return item.path if item is not None else None

    def _preview_side(self) -> int:
        """The largest square the preview holds (a larger picture would push the widgets
        below it aside)."""
        return max(min(self.preview.width(), self.preview.height()), 256)

    @Slot()
    def _show_preview(self) -> None:
        """The selected image fitted to the preview; with the heatmap box ticked, its heatmap
        is asked of the worker and replaces the image when it arrives."""
        path = self._selected_path()
        if path is None:
            return
        image = preview(path, self._preview_side())
        if image.isNull():
            self.preview.setText("(cannot be shown)")
        else:
            self.preview.setPixmap(QPixmap.fromImage(image))
        self.heatmap_note.setText(self.no_heatmap if self.heatmap_box.isChecked() else "")
        if self.heatmap_box.isChecked() and self.heatmap_box.isEnabled():
            self.heatmap_note.setText("Computing the heatmap…")
            self.request_heatmap.emit(path, self._preview_side())

    @Slot(object, int, QImage)
    def _heatmap_ready(self, path: str, side: int, image: QImage) -> None:
        if path == self._selected_path() and self.heatmap_box.isChecked():
            self.preview.setPixmap(QPixmap.fromImage(image))
            self.heatmap_note.setText("Heatmap (Grad-CAM): red where the evidence for its "
                                      "answer was strongest")

    @Slot(object, str)
    def _heatmap_failed(self, path: str, message: str) -> None:
        if path == self._selected_path() and self.heatmap_box.isChecked():
            self.heatmap_note.setText(f"No heatmap: {message}")

    def _show_prediction(self, item) -> None:
        prediction = item.prediction
        note = (f" — {prediction.error}" if prediction and prediction.error
                else f" — {UNSURE_TEXT}" if prediction and prediction.unsure else "")
        self.detail_title.setText(display_name(Path(item.path).name) + note)
        top = prediction.top if prediction else []
        for i, (name, bar) in enumerate(self.bars):
            label, probability = top[i] if i < len(top) else ("", 0.0)
            name.setText(label)
            bar.setValue(round(probability * 1000))
            bar.setFormat(f"{probability:.1%}" if label else "")

    def _choose_export(self) -> None:
        default = str((self.folder or Path(".")) / "predictions.csv")
        path, _ = QFileDialog.getSaveFileName(self, "Export CSV", default, "CSV files (*.csv)")
        if path:
            self.export_csv(Path(path))

    def export_csv(self, path: Path) -> None:
        try:
            with open(path, "w", newline="", encoding="utf-8") as out:
                count = write_csv(self.images.predictions(), out)
        except OSError as exc:
            QMessageBox.warning(self, "Export failed", f"Cannot write {path}: {exc.strerror}")
            return
        self.message.setText(f"Exported {count} row(s) to {path}")

    # --- learning: train, correct, retrain, clean labels --------------------------------

    def current_version(self):
        index = self.model_box.currentIndex()
        return self.versions[index] if 0 <= index < len(self.versions) else None

    def training_folder(self, ask: bool = True) -> Path | None:
        """The folder corrections go to and retraining reads: the last one used, else asked."""
        folder = self.settings.value("training/folder", "")
        if folder and Path(folder).is_dir():
            return Path(folder)
        if not ask:
            return None
        chosen = QFileDialog.getExistingDirectory(self, "Your training folder (one folder per class)",
                                                  str(self.folder or "."))
        if not chosen:
            return None
        self.settings.setValue("training/folder", chosen)
        return Path(chosen)

    def open_training(self, folder: Path | None = None, improves=None) -> TrainDialog:
        dialog = TrainDialog(self.tracking_uri, self.versions, self.settings, self, folder, improves)
        dialog.registered.connect(self._trained)
        self._keep(dialog)
        return dialog

    def _keep(self, dialog) -> None:
        self.dialogs.append(dialog)
        dialog.finished.connect(lambda *_: self.dialogs.remove(dialog) if dialog in self.dialogs else None)
        dialog.show()

    @Slot(str)
    def _trained(self, uri: str) -> None:
        """A version registered from the window: listed, selected, and the folder classified."""
        self.select_next = uri
        self.refresh_models()

    def _fill_corrections(self) -> None:
        self.correct_menu.clear()
        for name in self.classes:
            self.correct_menu.addAction(name, lambda n=name: self.correct(n))
        self.correct_menu.addSeparator()
        self.correct_menu.addAction("New class…", self._correct_new_class)

    def _correct_new_class(self) -> None:
        name, ok = QInputDialog.getText(self, "New class", "Class name (a folder of that name is made):")
        if ok and name.strip():
            self.correct(name)

    def correct(self, label: str, path: str | None = None) -> None:
        """Copy the selected photo (or `path`) into `label`'s folder of the training folder."""
        path = path or self._selected_path()
        folder = self.training_folder()
        if path is None or folder is None:
            return
        try:
            correction = curation.add_to_class(Path(path), folder, label)
        except BadInput as exc:
            QMessageBox.warning(self, "Not added", str(exc))
            return
        self.corrections.append(correction)
        self.message.setText(f"Added {display_name(Path(path).name)} to {correction.label} in "
                             f"{display_name(folder)} ({len(self.corrections)} correction(s); "
                             "Undo takes it back, Retrain learns from it)")
        self._update_actions()

    @Slot()
    def undo_correction(self) -> None:
        if not self.corrections:
            return
        correction = self.corrections.pop()
        try:
            curation.undo(correction)
        except BadInput as exc:
            QMessageBox.warning(self, "Not undone", str(exc))
        else:
            self.message.setText(f"Undone: {display_name(correction.copy.name)} no longer in "
                                 f"{correction.label}")
        self._update_actions()

    @Slot()
    def retrain(self) -> TrainDialog | None:
        """A new version of the selected one, from its recipe, on the training folder."""
        version = self.current_version()
        folder = self.training_folder()
        if version is None or folder is None:
            return None
        return self.open_training(folder, version)

    @Slot()
    def find_label_issues(self) -> LabelIssuesDialog | None:
        version = self.current_version()
        if version is None:
            return None
        folder = version.facts.get("data folder")
        dataset = Path(folder).expanduser() if folder and Path(folder).expanduser().is_dir() \
            else self.training_folder()
        if dataset is None:
            return None
        dialog = LabelIssuesDialog(self.tracking_uri, version, dataset, self)
        dialog.retrain.connect(lambda data: self.open_training(data, version))
        self._keep(dialog)
        dialog.find()
        return dialog
