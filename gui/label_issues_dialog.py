"""Find mislabelled training images: `training.label_issues` runs in its own process, then the
images it flags (the likeliest wrong label first) are shown as a gallery with Keep / Relabel /
Exclude. Nothing in the folder changes until Apply is confirmed (shared/curation.py)."""
from __future__ import annotations

import csv
import html
import tempfile
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QThreadPool, Signal, Slot
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QGridLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from gui.training import TrainingJob
from gui.workers import ThumbnailSignals, ThumbnailTask
from shared import curation
from shared.messages import BadInput
from shared.registry import ModelVersionInfo, log_to_run

SHOWN = 48  # flagged images in the gallery, the likeliest mislabelled first
COLUMNS = 4
THUMB = 112


def read_ranked(path: Path) -> list[dict]:
    with Path(path).open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


class LabelIssuesDialog(QDialog):
    retrain = Signal(object)  # the dataset folder, after decisions were applied

    def __init__(self, tracking_uri: str, version: ModelVersionInfo, dataset: Path,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(f"Mislabelled training images — {version.label}")
        self.tracking_uri, self.version, self.dataset = tracking_uri, version, Path(dataset)
        self.work = tempfile.TemporaryDirectory(prefix="cifarlab-issues-")
        self.ranked_csv = Path(self.work.name) / "label_issues.csv"
        self.rows: list[dict] = []
        self.choices: dict[str, QComboBox] = {}
        self.cells: dict[str, QLabel] = {}
        self.applied = False
        self.job = TrainingJob(self)
        self.job.output.connect(lambda line: self.log.appendPlainText(line))
        self.job.event.connect(self._event)
        self.job.ended.connect(self._ended)
        self.thumbnails = QThreadPool(self)
        self.signals = ThumbnailSignals()
        self.signals.ready.connect(self._thumbnail)
        self._build()
        self.resize(900, 760)

    def _build(self) -> None:
        self.stage = QLabel(f"Scoring every training image of {self.dataset} out of fold…")
        self.stage.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, 0)
        self.log = QPlainTextEdit(readOnly=True, maximumBlockCount=2000)
        self.log.setMaximumHeight(110)
        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.grid_host)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.apply_button = QPushButton("Apply to the folder…", clicked=self.confirm_apply)
        self.retrain_button = QPushButton("Retrain", clicked=lambda: self.retrain.emit(self.dataset))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        buttons.addButton(self.apply_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.retrain_button, QDialogButtonBox.ButtonRole.ActionRole)
        layout = QVBoxLayout(self)
        for widget in (self.stage, self.bar, self.log):
            layout.addWidget(widget)
        layout.addWidget(scroll, 1)
        layout.addWidget(self.summary)
        layout.addWidget(buttons)
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.apply_button.setEnabled(bool(self.rows) and not self.job.running and not self.applied)
        self.retrain_button.setEnabled(self.applied)

    def find(self) -> None:
        """Run `training.label_issues` on the version and the dataset."""
        self.job.start(["-m", "training.label_issues", "--model",
                        f"{self.version.name}/{self.version.version}", "--data-dir",
                        str(self.dataset), "--out", str(self.ranked_csv), "--tracking-uri",
                        self.tracking_uri])
        self._update_buttons()

    @Slot(dict)
    def _event(self, event: dict) -> None:
        if event.get("event") == "stage":
            total = int(event.get("total", 0))
            self.bar.setRange(0, total)
            self.bar.setValue(int(event.get("done", 0)))
            self.stage.setText(f"{event.get('stage')}: {event.get('done')} of {total}" if total
                               else str(event.get("stage")))

    @Slot(int, str)
    def _ended(self, code: int, error: str) -> None:
        self.bar.setRange(0, 1)
        self.bar.setValue(1)
        if code != 0:
            message = error or "finding label issues failed; see the output above"
            self.stage.setText(f'<span style="color:#b00020">{html.escape(message)}</span>')
            return
        ranked = read_ranked(self.ranked_csv)
        flagged = [r for r in ranked if r["flagged"] == "True"]
        self.classes = sorted({r["given"] for r in ranked})
        self.rows = flagged[:SHOWN]
        self.stage.setText(f"{len(flagged)} of {len(ranked)} training images are probably "
                           f"mislabelled; the {len(self.rows)} likeliest are shown. Choose for "
                           "each, then Apply (nothing changes before you confirm).")
        self._fill()
        self._update_buttons()

    def _fill(self) -> None:
        for n, row in enumerate(self.rows):
            cell = QWidget()
            box = QVBoxLayout(cell)
            picture = QLabel()
            picture.setFixedSize(QSize(THUMB, THUMB))
            picture.setAlignment(Qt.AlignmentFlag.AlignCenter)
            self.cells[row["file"]] = picture
            caption = QLabel(f"{Path(row['file']).name}\nlabelled {row['given']} "
                             f"({float(row['given_probability']):.0%})\nlooks like "
                             f"{row['suggested']} ({float(row['suggested_probability']):.0%})")
            choice = QComboBox()
            choice.addItem("Keep", "keep:")
            others = [c for c in self.classes if c not in (row["suggested"], row["given"])]
            for label in [row["suggested"], *others]:
                choice.addItem(f"Relabel → {label}", f"relabel:{label}")
            choice.addItem("Exclude", "exclude:")
            self.choices[row["file"]] = choice
            for widget in (picture, caption, choice):
                box.addWidget(widget)
            self.grid.addWidget(cell, n // COLUMNS, n % COLUMNS)
            self.thumbnails.start(ThumbnailTask(str(self.dataset / row["file"]), THUMB, self.signals))

    @Slot(object, QImage)
    def _thumbnail(self, path: str, image: QImage) -> None:
        relative = str(Path(path).relative_to(self.dataset))
        if relative in self.cells:
            self.cells[relative].setPixmap(QPixmap.fromImage(image))

    def decisions(self) -> list[curation.Decision]:
        return [curation.Decision(r["file"], r["given"], *self.choices[r["file"]].currentData().split(":", 1))
                for r in self.rows]

    def choose(self, file: str, decision: str, label: str = "") -> None:
        """Set one image's decision (as a click on its menu would)."""
        box = self.choices[file]
        box.setCurrentIndex(box.findData(f"{decision}:{label}"))

    @Slot()
    def confirm_apply(self) -> None:
        decisions = self.decisions()
        relabel = sum(d.decision == "relabel" for d in decisions)
        exclude = sum(d.decision == "exclude" for d in decisions)
        if not relabel and not exclude:
            self.summary.setText("Every image is kept: nothing to apply.")
            return
        answer = QMessageBox.question(
            self, "Apply to the folder",
            f"{relabel} image(s) will be copied to their new class folder and {exclude + relabel} "
            f"original(s) moved to {curation.excluded_folder(self.dataset)} (nothing is "
            "deleted). Apply?")
        if answer == QMessageBox.StandardButton.Yes:
            self.apply(decisions)

    def apply(self, decisions: list[curation.Decision]) -> None:
        try:
            rows = curation.apply(self.dataset, decisions)
        except BadInput as exc:
            self.summary.setText(f'<span style="color:#b00020">{html.escape(str(exc))}</span>')
            return
        self.applied = True
        note = ""
        saved = curation.write_decisions(Path(self.work.name) / "label_decisions.csv", decisions)
        try:
            log_to_run(self.tracking_uri, self.version.uri, saved, "label_decisions")
        except BadInput as exc:
            note = f" The decisions were not stored with the run: {exc}"
        changed = sum(r["decision"] != "keep" for r in rows)
        self.summary.setText(f"{changed} change(s) made; logged in "
                             f"{curation.decisions_log(self.dataset)}.{note} Retrain to train a "
                             "version on the cleaned folder.")
        self._update_buttons()

    def closeEvent(self, event) -> None:
        if self.job.running:
            self.job.stop()
            self.job.wait(5000)
        self.thumbnails.clear()
        self.thumbnails.waitForDone(2000)
        super().closeEvent(event)
