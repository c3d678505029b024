"""Checkpoints tied to MLflow runs: where they live, written atomically, found for --resume."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from shared.messages import BadInput, mask_secrets
from shared.store import store_folder

CHECKPOINT_TAG = "checkpoint"


class ResumeError(BadInput):
    """A run that cannot be resumed; the message says why."""


def checkpoint_path(uri: str, run_id: str) -> Path:
    """<store folder>/checkpoints/<run id>/last.pt: beside the SQLite database, else ./mlruns."""
    return store_folder(uri) / "checkpoints" / run_id / "last.pt"


def save(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash mid-write never breaks the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".last-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as exc:  # torch's zip writer reports a failed write this way
                raise OSError(f"writing {path} failed: {exc}") from exc
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Saver:
    """A run's checkpoints, written every `every` epochs and at the last one. A write that fails
    (disk full, read-only) is reported once and retried after every epoch while training goes
    on; until one succeeds, a stop resumes from the last checkpoint that was written."""

    def __init__(self, path: Path, every: int, saved: int = 0, log=print):
        self.path, self.every, self.saved, self.log = path, every, saved, log
        self.failing = False

    def due(self, epoch: int, last: bool) -> bool:
        return bool(self.every) and (epoch % self.every == 0 or last or self.failing)

    def save(self, epoch: int, state: dict) -> bool:
        try:
            save(self.path, state)
        except OSError as exc:
            if not self.failing:
                self.log(f"warning: cannot write the checkpoint {self.path} ({exc}); training goes "
                         f"on and retries after every epoch; until then a stopped run resumes "
                         f"after epoch {self.saved}")
            self.failing = True
            return False
        if self.failing:
            self.log(f"the checkpoint is written again (epoch {epoch})")
        self.saved, self.failing = epoch, False
        return True

    def covers(self, epoch: int) -> bool:
        """Whether `epoch`'s metrics may go to MLflow: only epochs a checkpoint holds, so a
        resumed run never logs an epoch twice."""
        return not self.every or self.saved >= epoch


def load(path: Path) -> dict:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ResumeError(f"no checkpoint at {path}; the run saved none (was it started with "
                          "--checkpoint-every 0, or did it fail before its first epoch ended?)") from None
    if size == 0:
        raise ResumeError(f"the checkpoint {path} is empty (0 bytes): it was cut off while being "
                          "written (a full disk, or a copy that failed), so the run cannot be "
                          "resumed from it; start a new run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file
        raise ResumeError(f"the checkpoint {path} cannot be read: {exc}") from exc


def find_resumable(uri: str, spec: str) -> str:
    """The run id to resume: `spec` itself, or for "last" the newest unfinished run with a
    checkpoint in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if spec != "last":
        try:
            run = client.get_run(spec)
        except Exception as exc:  # noqa: BLE001 - unknown id
            raise ResumeError(f"no run {spec!r} in {mask_secrets(uri)}: {exc}") from exc
        if run.info.status == "FINISHED":
            raise ResumeError(f"run {spec} already finished; nothing to resume")
        return spec
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.{CHECKPOINT_TAG} != '' and "
                                           "attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ResumeError(f"no unfinished run with a checkpoint in {mask_secrets(uri)}")
    return runs[0].info.run_id
