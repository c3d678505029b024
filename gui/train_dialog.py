"""New model from a folder: a training run started, followed and stopped from the window.

The run is `python -m training.train` in its own process (gui/training.py): the window stays
responsive, Stop (or closing the dialog) ends it the way Ctrl+C would, and Resume continues it.
When it ends the new version is announced with `registered`, for the main window to select.
"""
from __future__ import annotations

import html
import json
import re
import shlex
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, Signal, Slot
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from gui.curves import Curves
from gui.training import BUILT_IN, Start, TrainingJob, TrainingRequest, resume_arguments
from shared.messages import BadInput
from shared.registry import ModelVersionInfo, version_recipe

STOPPED_KEY = "training/stopped"  # the run a closed window stopped: {"run_id", "arguments", ...}
STOP_WAIT_MS = 15_000  # closing: time the step in progress gets before the run stops at once


def default_name(folder: Path, start: Start, versions: dict[str, ModelVersionInfo]) -> str:
    if start.version:
        return versions[start.version].name
    model = start.flags[start.flags.index("--model") + 1] if "--model" in start.flags else "timm"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{folder.name or 'photos'}-{model}").strip("-.")
    return name or "my-model"


class TrainDialog(QDialog):
    registered = Signal(str)  # models:/NAME/VERSION of the new version

    def __init__(self, tracking_uri: str, versions: list[ModelVersionInfo], settings: QSettings,
                 parent: QWidget | None = None, folder: Path | None = None,
                 improves: ModelVersionInfo | None = None):
        super().__init__(parent)
        self.setWindowTitle("New model from a folder")
        self.tracking_uri, self.settings = tracking_uri, settings
        self.versions = {v.uri: v for v in versions}
        self.improves = improves
        self.recipes = tempfile.TemporaryDirectory(prefix="cifarlab-recipe-")
        self.run_id, self.ui, self.epochs_seen, self.arguments = "", "", 0, []
        self.new_version = ""
        self.state = "idle"  # idle, running, stopping, stopped, done, failed
        self.job = TrainingJob(self)
        self.job.output.connect(self._output)
        self.job.event.connect(self._event)
        self.job.ended.connect(self._ended)
        self._build(folder)
        self._offer_stopped_run()
        self._update_buttons()
        self.resize(860, 720)

    # --- layout -------------------------------------------------------------------------

    def _build(self, folder: Path | None) -> None:
        self.folder_edit = QLineEdit(str(folder or self.settings.value("training/folder", "")))
        self.folder_edit.setPlaceholderText("a folder of class folders, train/ and test/, or a CSV")
        browse = QPushButton("Browse…", clicked=self._browse)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(browse)
        self.start_box = QComboBox()
        for start in BUILT_IN:
            self.start_box.addItem(start.label, start)
        for uri, version in self.versions.items():
            self.start_box.addItem(f"The recipe of {version.label} ({version.facts.get('model', '?')})",
                                   Start(f"recipe of {version.label}", version=uri))
        if self.improves is not None:
            self.start_box.setCurrentIndex(self.start_box.findText(
                f"The recipe of {self.improves.label}", Qt.MatchFlag.MatchStartsWith))
        self.start_box.currentIndexChanged.connect(self._start_chosen)
        self.timm_edit = QLineEdit()
        self.timm_edit.setPlaceholderText("timm model name, e.g. resnet50 or convnext_nano")
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("the registered model's name")
        self.more_edit = QLineEdit(self.settings.value("training/more", ""))
        self.more_edit.setPlaceholderText("more training flags, e.g. --epochs 5 --lr 0.003 "
                                          "(python -m training.train --help lists them)")
        self.lineage = QLabel()
        form = QFormLayout()
        form.addRow("Folder", folder_row)
        form.addRow("Start from", self.start_box)
        form.addRow("timm model", self.timm_edit)
        form.addRow("Register as", self.name_edit)
        form.addRow("More settings", self.more_edit)
        form.addRow("", self.lineage)

        self.stage = QLabel("Choose a folder, then Train.")
        self.bar = QProgressBar()
        self.curves = Curves()
        self.log = QPlainTextEdit(readOnly=True, maximumBlockCount=5000)
        self.log.setPlaceholderText("The training command's output")
        self.result = QLabel()
        self.result.setWordWrap(True)
        self.result.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.result.setOpenExternalLinks(True)

        self.train_button = QPushButton("Train", clicked=self.train)
        self.stop_button = QPushButton("Stop", clicked=self.stop)
        self.resume_button = QPushButton("Resume", clicked=self.resume)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        for button in (self.train_button, self.stop_button, self.resume_button):
            buttons.addButton(button, QDialogButtonBox.ButtonRole.ActionRole)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.stage)
        layout.addWidget(self.bar)
        layout.addWidget(self.curves, 2)
        layout.addWidget(self.log, 1)
        layout.addWidget(self.result)
        layout.addWidget(buttons)
        self._start_chosen()

    def _update_buttons(self) -> None:
        """Every control's enabled state, decided in one place."""
        busy = self.state in ("running", "stopping")
        for widget in (self.folder_edit, self.start_box, self.timm_edit, self.name_edit,
                       self.more_edit):
            widget.setEnabled(not busy)
        self.timm_edit.setVisible(self.start_box.currentData().needs_name)
        self.train_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.stop_button.setText("Stop at once" if self.state == "stopping" else "Stop")
        self.resume_button.setEnabled(self.state == "stopped" and bool(self.arguments))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Training folder", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)
            self._start_chosen()

    @Slot()
    def _start_chosen(self) -> None:
        start = self.start_box.currentData()
        folder = Path(self.folder_edit.text() or "photos")
        self.name_edit.setText(default_name(folder, start, self.versions))
        version = self.versions.get(start.version)
        self.lineage.setText(f"lineage: improves on {version.name}/{version.version}" if version else "")
        self._update_buttons()

    # --- running ------------------------------------------------------------------------

    def request(self) -> TrainingRequest:
        """The form as a request; BadInput says what to fix."""
        folder = Path(self.folder_edit.text()).expanduser()
        if not self.folder_edit.text() or not folder.is_dir():
            raise BadInput(f"{folder} is not a folder: choose the folder that holds your labelled "
                           "photos (one folder per class)")
        start = self.start_box.currentData()
        if start.needs_name and not self.timm_edit.text().strip():
            raise BadInput("name the timm model to start from (e.g. resnet50)")
        try:
            extra = shlex.split(self.more_edit.text())
        except ValueError as exc:
            raise BadInput(f"more settings: {exc} (quote a value with spaces)") from None
        version = self.versions.get(start.version)
        recipe = version_recipe(self.tracking_uri, start.version, Path(self.recipes.name)) \
            if version else None
        return TrainingRequest(folder, start, self.name_edit.text().strip(), self.tracking_uri,
                               timm_name=self.timm_edit.text().strip(), recipe=recipe,
                               improves_on=f"{version.name}/{version.version}" if version else None,
                               extra=extra)

    @Slot()
    def train(self) -> None:
        try:
            request = self.request()
        except BadInput as exc:
            self._show_error(str(exc))
            return
        self.settings.setValue("training/folder", str(request.folder))
        self.settings.setValue("training/more", self.more_edit.text())
        self.curves.clear()
        self.log.clear()
        self.run_id, self.ui, self.epochs_seen = "", "", 0
        self._run(request.arguments())

    @Slot()
    def resume(self) -> None:
        """The stopped run from its last checkpoint; a run stopped before its first epoch ended
        is started again (its decoded images and features are cached)."""
        arguments = resume_arguments(self.run_id, self.tracking_uri) if self.epochs_seen \
            else self.arguments
        self.settings.remove(STOPPED_KEY)
        self._run(arguments, keep=self.epochs_seen > 0)

    def _run(self, arguments: list[str], keep: bool = False) -> None:
        if not keep:
            self.curves.clear()
        self.arguments = arguments if not keep else self.arguments
        self.state = "running"
        self.new_version = ""
        self.result.setText("")
        self.stage.setText("Starting the training command…")
        self.bar.setRange(0, 0)
        self.log.appendPlainText("$ python " + " ".join(arguments))
        self._update_buttons()
        self.job.start(arguments)

    @Slot()
    def stop(self) -> None:
        if self.state == "running":
            self.state = "stopping"
            self.stage.setText("Stopping after the step in progress (Stop at once to end now)…")
        self.job.stop()
        self._update_buttons()

    @Slot(str)
    def _output(self, line: str) -> None:
        self.log.appendPlainText(line)

    @Slot(dict)
    def _event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "stage":
            done, total = int(event.get("done", 0)), int(event.get("total", 0))
            self.bar.setRange(0, max(total, 0))
            self.bar.setValue(done)
            count = f": {done:,} of {total:,}" if total else ""
            if self.state == "running":
                self.stage.setText(f"{event.get('stage', '')}{count}")
        elif kind == "run":
            self.run_id, self.ui = event.get("run_id", ""), event.get("ui", "")
            history = event.get("history") or []  # a resumed run's epochs, from its checkpoint
            if history:
                self.curves.clear()
            for metrics in history:
                self.curves.add(metrics, len(history))
            self.epochs_seen = len(history)
        elif kind == "epoch":
            self.epochs_seen = int(event.get("epoch", 0))
            self.curves.add(event.get("metrics", {}), int(event.get("epochs", 0)))
        elif kind == "finished":
            self._finished(event)

    def _finished(self, event: dict) -> None:
        acc = event.get("test_acc")
        lines = [f"Test accuracy <b>{acc:.1%}</b>." if isinstance(acc, float) else ""]
        if event.get("version"):
            uri = f"models:/{event['name']}/{event['version']}"
            lines.append(f"Registered <b>{event['name']} version {event['version']}</b>"
                         + (" (now champion)." if event.get("promoted") else "."))
            if self.improves is not None:
                before = self.improves.facts.get("test accuracy", "?")
                lines.append(f"Side by side: {self.improves.name} v{self.improves.version} "
                             f"{before} → v{event['version']} {acc:.1%} (each on its own "
                             "folder's test split).")
            self.new_version = uri
        if self.ui:
            link = self.ui.removeprefix("open ").removesuffix(" in a browser")
            lines.append(f'MLflow UI: <a href="{link}">{link}</a>' if link.startswith("http")
                         else f"MLflow UI: {self.ui}")
        self.result.setText("<br>".join(line for line in lines if line))

    @Slot(int, str)
    def _ended(self, code: int, error: str) -> None:
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if code == 0 else 0)
        if code == 0:
            self.state = "done"
            self.stage.setText("Done.")
            if self.new_version:
                self.registered.emit(self.new_version)
        elif self.job.stops:
            self.state = "stopped"
            self.stage.setText(f"Stopped after epoch {self.epochs_seen}: Resume goes on from there."
                               if self.epochs_seen else "Stopped before the first epoch ended: "
                               "Resume starts it again (what was decoded and computed is kept).")
            self._remember_stopped()
        else:
            self.state = "failed"
            self.stage.setText("Training stopped on an error.")
            self._show_error(error or f"the training command ended with code {code}; see its "
                                      "output above")
        self._update_buttons()

    def _show_error(self, message: str) -> None:
        self.result.setText(f'<span style="color:#b00020">{html.escape(message)}</span>')

    # --- a run a closed window stopped -------------------------------------------------

    def _remember_stopped(self) -> None:
        self.settings.setValue(STOPPED_KEY, json.dumps({
            "run_id": self.run_id, "arguments": self.arguments, "epochs": self.epochs_seen}))

    def _offer_stopped_run(self) -> None:
        try:
            stopped = json.loads(self.settings.value(STOPPED_KEY, "") or "null")
        except ValueError:
            stopped = None
        if not isinstance(stopped, dict) or not stopped.get("arguments"):
            return
        self.state = "stopped"
        self.run_id, self.arguments = stopped.get("run_id", ""), stopped["arguments"]
        self.epochs_seen = int(stopped.get("epochs", 0))
        self.stage.setText(f"A run stopped when the window closed (after epoch {self.epochs_seen}): "
                           "Resume goes on with it, or start a new one.")

    def reject(self) -> None:
        """Every way of closing (Close, Esc, the title bar, the main window closing): a run in
        progress is stopped first, resumable."""
        if self.job.running:
            self.stop()
            QGuiApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
            try:
                self.job.wait(STOP_WAIT_MS)
            finally:
                QGuiApplication.restoreOverrideCursor()
            self._remember_stopped()
        super().reject()
