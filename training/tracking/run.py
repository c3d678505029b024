"""One tracked MLflow run, from opening to its final status, and the epochs it records."""
from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from torch import nn
from tqdm import tqdm

from shared.calibration import KEEP, RULE, Calibration
from shared.messages import BadInput, Interrupted, RunFailed, brief, mask_secrets
from shared.preprocess import Preprocessing
from shared.progress import counted, report
from shared.store import (
    DriverMissing,
    StoreUnreachable,
    refused_write,
    tracking_uri,
    ui_command,
    ui_page,
    use_store,
)
from training.engine import distributed
from training.engine.build import DeviceSplits
from training.engine.config import TrainConfig
from training.engine.loop import NonFiniteLossError, StopRequested, StopTraining
from training.engine.state import FitResult, TrainingState, checkpoint_state, snapshot
from training.tracking import checkpoint, run_log
from training.tracking.publish import ensure_experiment, log_classifier, log_dataset, register_version
from training.tracking.writer import BackgroundWriter


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training; the run was marked KILLED with what it had logged."""


class StoreUnavailable(RunFailed):
    """The tracking store stopped answering and did not come back before the run ended."""


class StoreError(BadInput):
    """The tracking store cannot take a new run (unreachable, full, read-only); nothing started."""


@dataclass
class RunOptions:
    """Where a run sits among others and who hears of it: the tuner's trials and final run."""

    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    trial: bool = False  # stops after validation: no test set, no model, no registry
    epoch_hook: Callable[[int, dict[str, float]], None] | None = None  # may raise StopTraining
    on_run_start: Callable[[str], None] | None = None  # told the run id once it exists


@dataclass
class Resume:
    """A run to continue: its id and the checkpoint it ends on."""

    run_id: str
    checkpoint: dict


def open_run(cfg: TrainConfig, uri: str, run_name: str, run_id: str | None,
             options: RunOptions) -> tuple[str, str]:
    """Start a new MLflow run with the caller's tags, or reopen `run_id` (its status goes
    back to RUNNING). A run is born tagged: one whose process dies at once is still found.
    Returns (run id, experiment id)."""
    try:
        use_store(uri)
        experiment_id = ensure_experiment(cfg.experiment, uri)
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=cfg.system_metrics)
        else:
            parent = options.parent_run_id
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                   parent_run_id=parent, nested=parent is not None,
                                   tags=options.tags or None,
                                   log_system_metrics=cfg.system_metrics)
        return run.info.run_id, run.info.experiment_id
    except (DriverMissing, StoreUnreachable):
        raise
    except Exception as exc:  # noqa: BLE001 - HTTP, database and disk errors alike
        refusal = refused_write(exc)
        if refusal:
            raise StoreError(refusal) from exc
        raise StoreError(f"the tracking store {mask_secrets(uri)} cannot take the run "
                         f"({mask_secrets(brief(exc))});"
                         f" check that it is reachable and writable (disk space, "
                         f"permissions, server), or pass another --tracking-uri") from exc


def _quietly(call: Callable, *args) -> None:
    """Record an ending on a best-effort basis: the store may be the very thing that failed."""
    try:
        call(*args)
    except Exception:  # noqa: BLE001
        pass


class TrackedRun:
    """An MLflow run as a context: entering opens it (or reopens a resumed one); leaving gives
    it its final status. A body that returns ends FINISHED (its checkpoint removed: nothing left
    to resume); StopTraining ends KILLED with `stop_reason`; a stop request or Ctrl-C ends KILLED
    with the resume command and becomes TrainingInterrupted; anything else ends FAILED with
    `failure_reason`. Epochs go to the checkpoint and MLflow on a background writer.

    It is the one writer of the run's record: params, tags, the dataset, per-epoch metrics, how
    fitting ended, calibration, test figures, the report, the model and its registry version
    all go through its methods. FollowerRun has the same methods and writes nothing."""

    def __init__(self, cfg: TrainConfig, options: RunOptions, resume: Resume | None = None,
                 log=print):
        self.cfg, self.options, self.resume, self.log = cfg, options, resume, log
        self.uri = tracking_uri(cfg.tracking_uri)
        self.epochs_done = 0  # in this session, resumed epochs not counted

    @property
    def name(self) -> str:
        return self.cfg.run_name or (f"{self.cfg.model}-"
                                     f"{'scratch' if self.cfg.weights == 'none' else 'finetuned'}")

    def __enter__(self) -> TrackedRun:
        resumed_id = self.resume.run_id if self.resume else None
        self.run_id, self.experiment_id = open_run(self.cfg, self.uri, self.name, resumed_id,
                                                   self.options)
        self.ckpt_path = checkpoint.checkpoint_path(self.uri, self.run_id)
        saved = len(self.resume.checkpoint["history"]) if self.resume else 0
        self.saver = checkpoint.Saver(self.ckpt_path, self.cfg.checkpoint_every, saved, self.log)
        self.epoch_log = run_log.EpochLog(self.run_id, self.log)
        self.writer = BackgroundWriter(self.cfg.async_logging)
        if self.options.on_run_start is not None:
            self.options.on_run_start(self.run_id)
        self.log(f"MLflow run {self.run_id} ({self.name}) in experiment '{self.cfg.experiment}' "
                 f"at {mask_secrets(self.uri)}")
        report("run", run_id=self.run_id, experiment_id=self.experiment_id,
               ui=ui_command(self.uri, ui_page(self.experiment_id, self.run_id)),
               history=self.resume.checkpoint["history"] if self.resume else [])
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc is None else "FAILED"
        try:
            if exc is None:
                shutil.rmtree(self.ckpt_path.parent, ignore_errors=True)
            else:
                _quietly(self.writer.drain)  # what was submitted before the end is written
                status, tags = self._ending(exc)
                _quietly(mlflow.set_tags, {**tags, "epochs_run": self.epochs_done})
        finally:
            self.writer.close()
            _quietly(mlflow.end_run, status)
        if isinstance(exc, (KeyboardInterrupt, StopRequested)):
            raise TrainingInterrupted(f"interrupted: run {self.run_id} marked KILLED, the epochs "
                                      f"it logged are kept; {self._resume_how()}") from None

    def _ending(self, exc: BaseException) -> tuple[str, dict[str, str]]:
        if isinstance(exc, StopTraining):
            return "KILLED", {"stop_reason": str(exc)}
        if isinstance(exc, (KeyboardInterrupt, StopRequested)):
            return "KILLED", {"stop_reason": f"interrupted; {self._resume_how()}"}
        if distributed.lost_peer(exc):
            return "FAILED", {"failure_reason": f"another process of this training stopped "
                                                f"({brief(exc)}); {self._resume_how()}"}
        reason = str(exc) if isinstance(exc, NonFiniteLossError) else f"{type(exc).__name__}: {exc}"
        return "FAILED", {"failure_reason": reason}

    def _resume_how(self) -> str:
        if not self.saver.saved:
            return "no checkpoint was saved yet, so it cannot be resumed"
        return f"resume after epoch {self.saver.saved}: {distributed.resume_command(self.run_id)}"

    def _resume_hint(self) -> str:
        return (f"once it does, `{distributed.resume_command(self.run_id)}` goes on "
                f"after epoch {self.saver.saved}, the last one in {self.ckpt_path}")

    def start(self, tags: dict[str, str], params: dict, splits: DeviceSplits) -> None:
        """A new run's tags, params and dataset with its record (a trial's dataset is its
        parent's); a resumed
        run logs the epochs its checkpoint holds and MLflow lacks (a crash between checkpoint
        and log)."""
        if self.resume is not None:
            self.log(f"resumed after epoch {self.saver.saved} from {self.ckpt_path}")
            run_log.log_missing_epochs(self.run_id, self.resume.checkpoint["history"])
            return
        checkpoint_tag = ({checkpoint.CHECKPOINT_TAG: str(self.ckpt_path)}
                          if self.cfg.checkpoint_every else {})
        mlflow.set_tags({**tags, **checkpoint_tag})
        run_log.log_params(params)
        if not self.options.trial:
            data = splits.data
            log_dataset(data.name, str(data.root), data.fingerprint, "training")
            run_log.log_data(splits)

    def end_fit(self, result: FitResult, compile_seconds: float, tracking_seconds: float) -> None:
        run_log.log_fit_end(result, compile_seconds, tracking_seconds)

    def log_calibration(self, calibration: Calibration, figures: dict[str, float]) -> None:
        """The temperature and unsure rule chosen on the validation split, and its figures
        (none without a validation split: the calibration then says why in its source)."""
        if not figures:
            mlflow.log_params({"temperature": 1.0, "unsure_rule": calibration.source})
            return
        mlflow.log_params({"temperature": f"{calibration.temperature:.4f}",
                           "unsure_rule": f"{RULE} < {calibration.unsure_below:.4f} "
                                          f"({KEEP:.0%} of validation images above)"})
        mlflow.log_metrics(figures)

    def log_test(self, test: dict, seconds: float) -> None:
        mlflow.log_metrics({"test_loss": test["loss"], "test_acc": test["acc"],
                            "test_seconds": seconds})

    def log_report(self, history: list[dict[str, float]], best_epoch: int, test: dict,
                   classes: list[str], summary: Callable[[], str], config: dict) -> None:
        """Curves, confusion matrix, per-class scores, the model summary (`summary()`, made
        only by the writer) and the config, as artifacts."""
        run_log.log_final_report(history, best_epoch, test, classes, summary(), config)

    def log_model(self, model: nn.Module, prep: Preprocessing, classes: list[str],
                  examples: torch.Tensor, extra: dict, calibration: Calibration) -> str | None:
        """The logged model's URI."""
        return log_classifier(model, prep, classes, examples, extra=extra,
                              calibration=calibration).model_uri

    def register(self, model_uri: str, name: str, score: float,
                 tags: dict[str, str]) -> tuple[str | None, bool]:
        """(version, promoted to champion)."""
        return register_version(model_uri, name, score, tags=tags)

    def record(self, epoch: int, metrics: dict[str, float], state: dict | None) -> None:
        """One epoch, written off the training thread: the checkpoint `state` (when due) first,
        then the metrics. After a crash MLflow never holds an epoch that the checkpoint lacks,
        so a resumed run logs no epoch twice."""
        self.epochs_done += 1

        def write() -> None:
            self.epoch_log.add(epoch, metrics)
            if state is not None:
                self.saver.save(epoch, state)
            if self.saver.covers(epoch):
                self.epoch_log.flush()

        self.writer.submit(write)

    def save_within(self, epochs_done: int, state: dict) -> None:
        """A mid-epoch checkpoint, written off the training thread like the others."""
        self.writer.submit(lambda: self.saver.save(epochs_done, state))

    def ensure_stored(self, epochs_run: int) -> None:
        """Every epoch checkpointed and logged, or StoreUnavailable with the way to resume."""
        self.writer.drain()
        if not self.saver.covers(epochs_run):
            raise StoreUnavailable(f"the checkpoint still cannot be written (is the disk full or "
                                   f"read-only?); {self._resume_hint()}")
        if not self.epoch_log.flush():
            kept = (self._resume_hint() if self.cfg.checkpoint_every
                    else "they are lost (checkpoints were off)")
            raise StoreUnavailable(f"the tracking store still does not take metrics: "
                                   f"{len(self.epoch_log.pending)} epoch(s) are not logged; {kept}")

    @contextlib.contextmanager
    def storing_results(self, epochs_run: int) -> Iterator[None]:
        """Disk, database and HTTP errors while storing the results of a run whose every epoch
        is checkpointed become StoreUnavailable: the run resumes to store them."""
        try:
            yield
        except (OSError, MlflowException) as exc:
            if not self.saver.covers(epochs_run):
                raise
            raise StoreUnavailable(f"training ended but its results could not be stored "
                                   f"({brief(exc)}); fix the store (space, "
                                   f"permissions, server); {self._resume_hint()}") from exc


class FollowerRun:
    """The run as every process but rank 0 of a distributed training holds it: rank 0 writes
    it to MLflow and the checkpoint; the others train and stay silent."""

    run_id = experiment_id = ""

    def __init__(self, cfg: TrainConfig, options: RunOptions):
        self.cfg, self.options = cfg, options
        self.saver = checkpoint.Saver(Path(), every=0)  # never due

    def __enter__(self) -> FollowerRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, (KeyboardInterrupt, StopRequested)):
            raise TrainingInterrupted("interrupted; rank 0 marked the run KILLED") from None

    def log(self, *_) -> None:
        pass

    def start(self, tags: dict[str, str], params: dict, splits: DeviceSplits) -> None:
        pass

    def end_fit(self, result: FitResult, compile_seconds: float, tracking_seconds: float) -> None:
        pass

    def log_calibration(self, calibration: Calibration, figures: dict[str, float]) -> None:
        pass

    def log_test(self, test: dict, seconds: float) -> None:
        pass

    def log_report(self, history: list[dict[str, float]], best_epoch: int, test: dict,
                   classes: list[str], summary: Callable[[], str], config: dict) -> None:
        pass

    def log_model(self, model: nn.Module, prep: Preprocessing, classes: list[str],
                  examples: torch.Tensor, extra: dict, calibration: Calibration) -> str | None:
        return None

    def register(self, model_uri: str, name: str, score: float,
                 tags: dict[str, str]) -> tuple[str | None, bool]:
        return None, False

    def record(self, epoch: int, metrics: dict[str, float], state: dict | None) -> None:
        pass

    def ensure_stored(self, epochs_run: int) -> None:
        pass

    def storing_results(self, epochs_run: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def open_tracked(cfg: TrainConfig, options: RunOptions, resume: Resume | None,
                 log=print) -> TrackedRun | FollowerRun:
    """Rank 0 (the only process, outside torchrun) tracks the run; the others follow."""
    if distributed.world().is_main:
        return TrackedRun(cfg, options, resume, log)
    return FollowerRun(cfg, options)


def epoch_line(epoch: int, epochs: int, m: dict[str, float]) -> str:
    val = f"  val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}" if "val_acc" in m else ""
    return (f"epoch {epoch:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
            f"{val}  lr {m['lr']:.3g}  {m['epoch_seconds']:.1f} s  "
            f"{m['images_per_second']:,.0f} img/s")


class EpochRecorder:
    """fit's `on_epoch` for a tracked run: a checkpoint copy when one is due, the epoch handed to
    the run's writer, the console line, then the caller's hook. Counts the seconds it takes
    from the training thread."""

    def __init__(self, run: TrackedRun, state: TrainingState, history: list[dict[str, float]]):
        self.run, self.state, self.history = run, state, list(history)
        self.seconds = 0.0

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        cfg = self.run.cfg
        self.history.append(metrics)
        last = epoch == cfg.epochs or self.state.stopper.stopped_epoch == epoch
        copy = None
        if self.run.saver.due(epoch, last=last):
            # a copy taken now: training goes on changing the weights while it is written
            copy = snapshot(checkpoint_state(cfg, epoch, self.history, self.state))
        self.run.record(epoch, metrics, copy)
        self.run.log(epoch_line(epoch, cfg.epochs, metrics))
        report("epoch", epoch=epoch, epochs=cfg.epochs, metrics=metrics)
        self.seconds += time.perf_counter() - started
        if self.run.options.epoch_hook is not None:
            self.run.options.epoch_hook(epoch, metrics)


    def step(self, epoch: int) -> None:
        """fit's `on_step` (every --checkpoint-steps batches): a checkpoint of the epochs done
        and of this one's place in its pass, so a run killed now resumes here."""
        if not self.run.saver.every:  # checkpoints off, or a process that never writes them
            return
        started = time.perf_counter()
        self.run.save_within(epoch - 1, snapshot(checkpoint_state(self.run.cfg, epoch - 1,
                                                                  self.history, self.state)))
        self.seconds += time.perf_counter() - started


def progress_bar(enabled: bool) -> Callable:
    def progress(batches, desc):
        # disable=None: no bar when the output is not a terminal (logs, CI)
        total = len(batches) if hasattr(batches, "__len__") else None
        return tqdm(counted(batches, desc), total=total, desc=desc, leave=False,
                    disable=None if enabled else True, unit="batch", dynamic_ncols=True)
    return progress
