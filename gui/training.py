"""Training from the window: the command a request becomes, and the process that runs it.

The app never trains in its own process: `TrainingJob` runs `python -m training.train` (or
`training.label_issues`) as a child, reads its console output line by line and its progress
events (shared/progress.py) from a file, and stops it the way a terminal would (SIGTERM: the
run finishes its step and ends KILLED, resumable; a second SIGTERM stops it at once).
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal, Slot

from shared.progress import VARIABLE, EventReader


@dataclass(frozen=True)
class Start:
    """Where a new model starts: training flags, or a registered version's recipe."""

    label: str
    flags: tuple[str, ...] = ()
    version: str | None = None  # models:/NAME/VERSION whose config.yaml is the recipe
    needs_name: bool = False  # a timm/NAME model: the user names it


BUILT_IN = (
    Start("EfficientNet-Lite0, ImageNet weights, frozen backbone (recommended)",
          ("--model", "efficientnet_lite0", "--weights", "imagenet", "--freeze", "backbone")),
    Start("EfficientNet-Lite0, ImageNet weights, all layers fine-tuned (slower)",
          ("--model", "efficientnet_lite0", "--weights", "imagenet")),
    Start("ResNet18, ImageNet weights, frozen backbone",
          ("--model", "resnet18", "--weights", "imagenet", "--freeze", "backbone")),
    Start("Small CNN from scratch (small images, fast)", ("--model", "cnn")),
    Start("timm model, ImageNet weights, frozen backbone…",
          ("--weights", "imagenet", "--freeze", "backbone"), needs_name=True),
)


@dataclass
class TrainingRequest:
    folder: Path
    start: Start
    register: str
    tracking_uri: str
    timm_name: str = ""
    recipe: Path | None = None  # the start version's config.yaml, fetched by the caller
    improves_on: str | None = None  # NAME/VERSION this run retrains
    extra: list[str] = field(default_factory=list)

    def arguments(self) -> list[str]:
        args = ["-m", "training.train", "--data-dir", str(self.folder), "--register", self.register,
                "--tracking-uri", self.tracking_uri, "--no-progress"]
        if self.recipe is not None:
            args += ["--config", str(self.recipe)]
        args += list(self.start.flags)
        if self.start.needs_name:
            args += ["--model", f"timm/{self.timm_name.removeprefix('timm/')}"]
        if self.improves_on:
            args += ["--improves-on", self.improves_on]
        return args + self.extra


def resume_arguments(run_id: str, tracking_uri: str) -> list[str]:
    return ["-m", "training.train", "--resume", run_id, "--tracking-uri", tracking_uri]


class TrainingJob(QObject):
    """One child process at a time; its output and events as signals."""

    output = Signal(str)  # a line the command printed
    event = Signal(dict)  # a progress event (shared/progress.py)
    ended = Signal(int, str)  # exit code (-1: it crashed or was killed), its one-line error or ""

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.process: QProcess | None = None
        self.folder = tempfile.TemporaryDirectory(prefix="cifarlab-job-")
        self.reader: EventReader | None = None
        self.error, self.partial, self.stops = "", b"", 0
        self.timer = QTimer(self, interval=200, timeout=self._read_events)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def start(self, arguments: list[str]) -> None:
        if self.running:
            raise RuntimeError("a training job is already running")
        events = Path(self.folder.name) / f"events-{os.getpid()}-{id(arguments)}.jsonl"
        events.unlink(missing_ok=True)
        self.reader, self.error, self.partial, self.stops = EventReader(events), "", b"", 0
        env = QProcessEnvironment.systemEnvironment()
        env.insert(VARIABLE, str(events))
        env.insert("PYTHONUNBUFFERED", "1")
        self.process = QProcess(self)
        self.process.setProcessEnvironment(env)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.process.setWorkingDirectory(os.getcwd())
        self.process.readyReadStandardOutput.connect(self._read_output)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._failed_to_start)
        self.process.start(sys.executable, arguments)
        self.timer.start()

    def stop(self) -> None:
        """First: stop after the step in progress (resumable). Again: stop at once."""
        if self.running:
            self.stops += 1
            self.process.terminate()

    def wait(self, msecs: int) -> bool:
        """Block until the process ends (closing the window); killed after `msecs`."""
        if not self.running:
            return True
        if self.process.waitForFinished(msecs):
            return True
        self.process.terminate()  # the second signal: stop at once
        if self.process.waitForFinished(3000):
            return True
        self.process.kill()
        return self.process.waitForFinished(3000)

    @Slot()
    def _read_output(self) -> None:
        *lines, self.partial = (self.partial + bytes(self.process.readAllStandardOutput())).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.startswith("error: "):
                self.error = line.removeprefix("error: ")
            self.output.emit(line)

    @Slot()
    def _read_events(self) -> None:
        for event in self.reader.read() if self.reader else []:
            self.event.emit(event)

    @Slot(int, QProcess.ExitStatus)
    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self.timer.stop()
        self._read_output()
        if self.partial:
            self.output.emit(self.partial.decode("utf-8", "replace"))
            self.partial = b""
        self._read_events()
        crashed = status == QProcess.ExitStatus.CrashExit
        self.ended.emit(-1 if crashed else code, self.error)

    @Slot(QProcess.ProcessError)
    def _failed_to_start(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.timer.stop()
            self.ended.emit(-1, f"cannot start {sys.executable}: {self.process.errorString()}")
