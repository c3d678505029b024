"""Train a classifier: python -m training.train --model cnn --data-dir ~/data/cifar10

config -> data -> model -> fit -> test -> MLflow (params, per-epoch metrics, report, model,
registry). `train(cfg)` is the importable entry; `main()` adds the CLI and its error handling.
"""
from __future__ import annotations

import math
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import torch
from mlflow.exceptions import MlflowException
from torch import nn
from tqdm import tqdm

from shared.batches import DeviceLoader
from shared.data import DatasetError, ImageData, channel_stats, load_dataset, split_indices
from shared.device import DeviceError, describe_device, resolve_device
from shared.models import (ModelError, build_model, count_parameters, describe_models, get_spec,
                           input_size_for, is_convolutional)
from shared.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputTransform, Preprocessing
from shared.store import StoreBroken, mask_secrets, tracking_uri, ui_command, use_store
from shared.tracking import ensure_experiment, log_classifier, register_version
from training import tracking
from training.averaging import Lookahead
from training.optim import make_optimizer, make_scheduler
from training.writer import BackgroundWriter
from training.config import ConfigError, TrainConfig, parse_args
from training import checkpoint
from training.loop import (EarlyStopping, NonFiniteLossError, StopRequested, StopTraining,
                           autocast_for, evaluate, fit, never, warm_up)
from training.report import model_summary
from training.whiten import whiten_first_conv


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the run was marked KILLED with what it had logged."""


class StoreUnavailable(Exception):
    """The tracking store stopped answering and did not come back before the run ended."""


@dataclass
class TrainResult:
    run_id: str
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    stopped_epoch: int | None  # None: ran every requested epoch
    history: list[dict[str, float]]
    model: nn.Module  # the trained network, best weights restored
    prep: Preprocessing
    test_acc: float = float("nan")  # the test set is evaluated by full runs only, not trials
    test_loss: float = float("nan")
    train_seconds: float = 0.0  # every epoch, validation included; compilation excluded
    test_seconds: float = 0.0  # the test pass (with test-time augmentation)
    compile_seconds: float = 0.0
    tracking_seconds: float = 0.0  # the training thread's time on checkpoints and MLflow
    model_uri: str | None = None
    registered_name: str | None = None
    version: str | None = None
    promoted: bool = False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("fp16 training needs a GPU; use --precision bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def random_rows(total: int, n: int, seed: int) -> torch.Tensor:
    """n of range(total) at random, with a fixed seed: the splits are in folder order (one
    class after another), so the first n would hold only a class or two."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def whitening_sample(images: torch.Tensor, seed: int, n: int = 5000) -> torch.Tensor:
    """n training images at random, on the [0, 1] scale, for an unbiased patch covariance."""
    return images[random_rows(len(images), n, seed).to(images.device)].float() / 255


def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.compile == "auto":
        return "default" if device.type == "cuda" else "none"
    return cfg.compile


def default_model_name(dataset: str, model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{dataset}-{model}")


def epoch_line(epoch: int, epochs: int, m: dict[str, float]) -> str:
    val = f"  val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}" if "val_acc" in m else ""
    return (f"epoch {epoch:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
            f"{val}  lr {m['lr']:.3g}  {m['epoch_seconds']:.1f} s  "
            f"{m['images_per_second']:,.0f} img/s")


@dataclass
class Prepared:
    """A dataset, split and moved to the training device once; the trials of a study share it."""

    data: ImageData
    device: torch.device
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    scratch_stats: tuple[tuple[float, ...], tuple[float, ...]]  # mean, std of the train split

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def subset(self, n_train: int | None, n_val: int | None = None) -> "Prepared":
        """n_train training and n_val validation images (None: all), drawn at random with a
        fixed seed: benchmarks measure on a subset."""
        def draw(pair, n):
            if n is None or n >= len(pair[1]):
                return pair
            pick = random_rows(len(pair[1]), n, seed=0).sort().values.to(pair[1].device)
            return pair[0][pick], pair[1][pick]
        return Prepared(self.data, self.device, draw(self.train, n_train), draw(self.val, n_val),
                        self.test, self.scratch_stats)


def prepare(cfg: TrainConfig, log=print) -> Prepared:
    """Device, dataset, split. Raises DeviceError / DatasetError on bad input."""
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data_dir, image_size=cfg.image_size, cache_dir=cfg.cache_dir, log=log)
    train_idx, val_idx = split_indices(len(data.train_labels), cfg.val_fraction, cfg.split_seed)
    if int(data.train_labels.max()) >= len(data.classes):
        raise DatasetError(f"{data.root}: labels exceed the {len(data.classes)} classes found")
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    train_idx_d, val_idx_d = train_idx.to(device), val_idx.to(device)
    return Prepared(data, device, (images[train_idx_d], labels[train_idx_d]),
                    (images[val_idx_d], labels[val_idx_d]),
                    (data.test_images.to(device), data.test_labels.to(device)),
                    channel_stats(data.train_images[train_idx]))


def train(cfg: TrainConfig, log=print, *, prepared: Prepared | None = None,
          epoch_hook: Callable[[int, dict[str, float]], None] | None = None,
          trial: bool = False, parent_run_id: str | None = None,
          tags: dict[str, str] | None = None,
          on_run_start: Callable[[str], None] | None = None,
          resume_from: dict | None = None, run_id: str | None = None,
          stop_requested: Callable[[], bool] = never) -> TrainResult:
    """Run one tracked training run. Bad input raises before any MLflow run is created.

    `epoch_hook(epoch, metrics)` runs after each logged epoch and may raise StopTraining (the
    tuner prunes this way). A `trial` run is a child of `parent_run_id` and stops after
    validation: no test set, no model, no registry, as tuning must never see the test set.
    `resume_from` (a checkpoint) with `run_id` continues that run where the checkpoint ends.
    Once `stop_requested()` is true, the step in progress finishes and the run ends KILLED.
    """
    prepared = prepared or prepare(cfg, log)
    device, data, num_classes = prepared.device, prepared.data, prepared.num_classes
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    spec = get_spec(cfg.model)
    model = build_model(cfg.model, num_classes, data.image_size, weights=cfg.weights,
                        freeze=cfg.freeze)
    # pretrained features expect the inputs they were trained on
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.weights != "none" else prepared.scratch_stats
    prep = Preprocessing(data.image_size, cfg.input_size or input_size_for(cfg.model, data.image_size),
                         mean, std, cfg.tta)
    conv = is_convolutional(model)
    channels_last = cfg.channels_last and conv
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    common = {"transform": InputTransform(prep), "channels_last": channels_last}
    n_train = len(prepared.train[1])
    train_loader = DeviceLoader(*prepared.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                crop_padding=cfg.crop_padding if cfg.augment else 0,
                                crop_fill=cfg.crop_fill, flip=cfg.flip if cfg.augment else "none",
                                drop_last=n_train > cfg.batch_size, **common)
    val_loader = DeviceLoader(*prepared.val, cfg.eval_batch_size, **common)
    test_loader = DeviceLoader(*prepared.test, cfg.eval_batch_size, **common)
    if cfg.whiten_init:
        whiten_first_conv(model, common["transform"](whitening_sample(prepared.train[0], cfg.seed)))

    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    stopper = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    averager = Lookahead(model, cfg.epochs * len(train_loader)) if cfg.lookahead else None
    start = None
    if resume_from is not None:
        start = checkpoint.restore(resume_from, model, optimizer, scheduler, scaler, stopper,
                                   train_loader, averager)
    mode = compile_mode(cfg, device)
    # the compiled module shares its parameters with `model`, which is what gets saved and
    # evaluated (eager evaluation: no recompiling for each evaluation batch shape)
    network = model if mode == "none" else torch.compile(model, mode=mode)
    compile_seconds = 0.0
    if network is not model:
        try:
            compile_seconds = warm_up(network, model, optimizer, train_loader, loss_fn,
                                      autocast=autocast_for(device, precision))
        except Exception as exc:  # noqa: BLE001 - no compiler toolchain, an unsupported op...
            log(f"warning: torch.compile ({mode}) failed, training without it: "
                f"{tracking.brief(exc)}")
            network, mode = model, "none"
    trainable, total = count_parameters(model)
    info = describe_device(device)

    uri = tracking_uri(cfg.tracking_uri)
    weights_source = ("scratch" if cfg.weights == "none" else cfg.weights if cfg.weights == "imagenet"
                      else f"checkpoint:{cfg.weights}")
    run_name = cfg.run_name or f"{cfg.model}-{'scratch' if cfg.weights == 'none' else 'finetuned'}"
    run_id = open_run(cfg, uri, run_name, run_id, parent_run_id)
    ckpt_path = checkpoint.checkpoint_path(uri, run_id)
    if on_run_start is not None:
        on_run_start(run_id)
    log(f"MLflow run {run_id} ({run_name}) in experiment '{cfg.experiment}' at {mask_secrets(uri)}")
    log(f"{data.name}: {n_train} train / {len(prepared.val[1])} val / {len(prepared.test[1])} test, "
        f"{num_classes} classes; {cfg.model} ({trainable:,} trainable of {total:,} params) on "
        f"{info['device_name']}, {precision}")
    status = "FAILED"
    epochs_done: list[int] = []
    history = list(start.history) if start else []
    epoch_log = tracking.EpochLog(run_id, log)
    saver = checkpoint.Saver(ckpt_path, cfg.checkpoint_every, start.epochs_run if start else 0, log)
    writer = BackgroundWriter(cfg.async_logging)
    overhead = 0.0  # seconds the training thread spent on checkpoints and tracking
    try:
        if start is not None:
            log(f"resumed after epoch {start.epochs_run} from {ckpt_path}")
            tracking.log_missing_epochs(run_id, start.history)
        else:
            mlflow.set_tags({**tracking.run_tags(data), **(tags or {}),
                             **({checkpoint.CHECKPOINT_TAG: str(ckpt_path)} if cfg.checkpoint_every else {})})
            tracking.log_params({
                **cfg.public_dict(),
                "weights_source": weights_source, "fine_tuned": cfg.weights != "none",
                "frozen_layers": "none" if cfg.freeze == "none" else f"all but {spec.head}",
                **info, "precision_resolved": precision, "compile_resolved": mode,
                "epochs_requested": cfg.epochs,
                "early_stopping": (f"patience={cfg.patience},min_delta={cfg.min_delta},"
                                   f"monitor={cfg.monitor}") if cfg.patience else "off",
                "train_size": n_train, "val_size": len(prepared.val[1]),
                "test_size": len(prepared.test[1]), "num_classes": num_classes,
                "classes": ",".join(data.classes), "image_size_resolved": prep.image_size,
                "input_size_resolved": prep.input_size, "normalize_mean": list(mean),
                "normalize_std": list(std), "trainable_params": trainable, "total_params": total,
            })

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            nonlocal overhead
            started = time.perf_counter()
            epochs_done.append(epoch)
            history.append(metrics)
            state = None
            if saver.due(epoch, last=epoch == cfg.epochs or stopper.stopped_epoch == epoch):
                # a copy taken now: training goes on changing the weights while it is written
                state = checkpoint.snapshot(checkpoint.state(
                    cfg, epoch, history, model, optimizer, scheduler, scaler, stopper,
                    train_loader, averager))

            def write() -> None:
                # checkpoint first, then log: after a crash, MLflow never holds an epoch that
                # the checkpoint lacks, so a resumed run logs no epoch twice
                epoch_log.add(epoch, metrics)
                if state is not None:
                    saver.save(epoch, state)
                if saver.covers(epoch):
                    epoch_log.flush()

            writer.submit(write)
            log(epoch_line(epoch, cfg.epochs, metrics))
            overhead += time.perf_counter() - started
            if epoch_hook is not None:
                epoch_hook(epoch, metrics)

        def progress(batches, desc):
            # disable=None: no bar when the output is not a terminal (logs, CI)
            return tqdm(batches, desc=desc, leave=False, disable=None if cfg.progress else True,
                        unit="batch", dynamic_ncols=True)

        result = fit(network, train_loader, val_loader, optimizer, loss_fn, cfg.epochs, num_classes,
                     scheduler=scheduler, stopper=stopper, precision=precision, on_epoch=on_epoch,
                     progress=progress, scaler=scaler, start=start, stop_requested=stop_requested,
                     after_step=averager.step if averager else None, tta=cfg.tta)
        writer.drain()
        resume_hint = (f"once it does, `python -m training.train --resume {run_id}` goes on "
                       f"after epoch {saver.saved}, the last one in {ckpt_path}")
        if not saver.covers(result.epochs_run):
            raise StoreUnavailable(f"the checkpoint still cannot be written (is the disk full or "
                                   f"read-only?); {resume_hint}")
        if not epoch_log.flush():
            kept = resume_hint if cfg.checkpoint_every else "they are lost (checkpoints were off)"
            raise StoreUnavailable(f"the tracking store still does not take metrics: "
                                   f"{len(epoch_log.pending)} epoch(s) are not logged; {kept}")
        stop_note = (f"stopped early at epoch {result.stopped_epoch} (best epoch {result.best_epoch})"
                     if result.stopped_epoch else "ran every requested epoch")
        log(f"{stop_note}; best weights from epoch {result.best_epoch} restored")
        tracking.log_params({"epochs_run": result.epochs_run,
                             "stopped_early": result.stopped_epoch is not None,
                             "stop_epoch": result.stopped_epoch or "none",
                             "best_epoch": result.best_epoch})
        best_val_acc = max((h["val_acc"] for h in result.history if "val_acc" in h),
                           default=float("nan"))
        mlflow.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.train_seconds,
                            "compile_seconds": compile_seconds, "tracking_seconds": overhead,
                            "tracking_share": overhead / max(1e-9, overhead + result.train_seconds),
                            **({} if math.isnan(best_val_acc) else {"best_val_acc": best_val_acc})})
        outcome = TrainResult(run_id, best_val_acc, result.best_epoch, result.epochs_run,
                              result.stopped_epoch, result.history, model, prep,
                              train_seconds=result.train_seconds, compile_seconds=compile_seconds,
                              tracking_seconds=overhead)
        if not trial:
            try:
                finish(cfg, outcome, test_loader, loss_fn, precision, data, weights_source)
            except (OSError, MlflowException) as exc:  # disk, database and HTTP errors
                if not saver.covers(result.epochs_run):
                    raise
                raise StoreUnavailable(f"training ended but its results could not be stored "
                                       f"({tracking.brief(exc)}); fix the store (space, "
                                       f"permissions, server); {resume_hint}") from exc
        status = "FINISHED"
        shutil.rmtree(ckpt_path.parent, ignore_errors=True)  # nothing left to resume
        return outcome
    except StopTraining as exc:
        _quietly(writer.drain)
        status = "KILLED"
        _quietly(mlflow.set_tags, {"stop_reason": str(exc), "epochs_run": len(epochs_done)})
        raise
    except (KeyboardInterrupt, StopRequested):
        _quietly(writer.drain)  # what was submitted before the stop is written
        status = "KILLED"
        how = (f"resume after epoch {saver.saved}: python -m training.train --resume {run_id}"
               if saver.saved else "no checkpoint was saved yet, so it cannot be resumed")
        _quietly(mlflow.set_tags, {"stop_reason": f"interrupted; {how}",
                                   "epochs_run": len(epochs_done)})
        raise TrainingInterrupted(f"interrupted: run {run_id} marked KILLED, the epochs it "
                                  f"logged are kept; {how}") from None
    except Exception as exc:
        _quietly(writer.drain)
        reason = str(exc) if isinstance(exc, NonFiniteLossError) else f"{type(exc).__name__}: {exc}"
        _quietly(mlflow.set_tags, {"failure_reason": reason, "epochs_run": len(epochs_done)})
        raise
    finally:
        writer.close()
        _quietly(mlflow.end_run, status)


class StoreError(Exception):
    """The tracking store cannot take a new run (unreachable, full, read-only); nothing started."""


def open_run(cfg: TrainConfig, uri: str, run_name: str, run_id: str | None,
             parent_run_id: str | None) -> str:
    """Start a new MLflow run, or reopen `run_id` (its status goes back to RUNNING)."""
    try:
        use_store(uri)
        experiment_id = ensure_experiment(cfg.experiment, uri)
        if run_id is not None:
            return mlflow.start_run(run_id=run_id, log_system_metrics=cfg.system_metrics).info.run_id
        return mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                parent_run_id=parent_run_id, nested=parent_run_id is not None,
                                log_system_metrics=cfg.system_metrics).info.run_id
    except Exception as exc:  # noqa: BLE001 - HTTP, database and disk errors alike
        raise StoreError(f"the tracking store {mask_secrets(uri)} cannot take the run "
                         f"({mask_secrets(tracking.brief(exc))});"
                         f" check that it is reachable and writable (disk space, "
                         f"permissions, server), or pass another --tracking-uri") from exc


def _quietly(call: Callable, *args) -> None:
    """Record an ending on a best-effort basis: the store may be the very thing that failed."""
    try:
        call(*args)
    except Exception:  # noqa: BLE001
        pass


def finish(cfg: TrainConfig, outcome: TrainResult, test_loader: DeviceLoader, loss_fn: nn.Module,
           precision: str, data: ImageData, weights_source: str) -> None:
    """The end of a full run: test set once, report, model, registry. Fills `outcome`."""
    model, prep = outcome.model, outcome.prep
    start = time.perf_counter()
    test = evaluate(model, test_loader, loss_fn, len(data.classes),
                    autocast=autocast_for(test_loader.device, precision), tta=prep.tta)
    outcome.test_seconds = time.perf_counter() - start
    outcome.test_acc, outcome.test_loss = test["acc"], test["loss"]
    mlflow.log_metrics({"test_loss": test["loss"], "test_acc": test["acc"],
                        "test_seconds": outcome.test_seconds})
    summary = model_summary(model, (1, 3, prep.input_size, prep.input_size))
    tracking.log_final_report(outcome.history, outcome.best_epoch, test, data.classes, summary,
                              {**cfg.public_dict(), "resolved_precision": precision})
    model_info = log_classifier(model, prep, data.classes, data.test_images[:2],
                                extra={"model": cfg.model, "weights_source": weights_source,
                                       "dataset": data.name})
    outcome.model_uri = model_info.model_uri
    if not cfg.no_register:
        outcome.registered_name = cfg.register or default_model_name(data.name, cfg.model)
        # without a validation split (val_fraction 0) the champion rule compares test accuracy
        validated = not math.isnan(outcome.best_val_acc)
        outcome.version, outcome.promoted = register_version(
            model_info.model_uri, outcome.registered_name,
            outcome.best_val_acc if validated else test["acc"],
            tags={"test_acc": f"{test['acc']:.6f}", "model": cfg.model, "run_id": outcome.run_id,
                  "score_source": "validation" if validated else "test (no validation split)"})


BAD_INPUT = (ConfigError, DatasetError, DeviceError, ModelError, checkpoint.ResumeError, StoreError,
             StoreBroken)
RUN_FAILED = (NonFiniteLossError, StoreUnavailable)


def run_command(body: Callable[[], int]) -> int:
    """Run a command, turning its known failures into one message and an exit status:
    2 bad input (nothing was started), 1 a run that failed, 130 interrupted."""
    try:
        return body()
    except BAD_INPUT as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RUN_FAILED as exc:
        print(f"error: {exc}. The run was marked FAILED (if the store could be told).",
              file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130


class StopSignals:
    """SIGINT/SIGTERM: the first asks training to stop after the step in progress; a second
    exits at once. Installed by the command, never by the importable `train()`."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self) -> "StopSignals":
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.received is not None


def resume_config(cfg: TrainConfig) -> tuple[TrainConfig, dict, str]:
    """The resumed run's own config, its checkpoint and its id. The checkpoint's settings are
    checked like a new run's: a damaged or edited checkpoint is refused, not trained on."""
    uri = tracking_uri(cfg.tracking_uri)
    run_id = checkpoint.find_resumable(uri, cfg.resume)
    path = checkpoint.checkpoint_path(uri, run_id)
    ckpt = checkpoint.load(path)
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise checkpoint.ResumeError(f"the checkpoint {path} holds no settings; it is not one "
                                     "this project wrote")
    fields = set(TrainConfig.__dataclass_fields__)
    unknown, missing = sorted(set(saved) - fields), sorted(fields - set(saved))
    if unknown or missing:
        raise checkpoint.ResumeError(
            f"the checkpoint {path} has settings this version does not know ({', '.join(unknown) or 'none'}) "
            f"or lacks some it needs ({', '.join(missing) or 'none'}); it was written by another "
            "version or edited, so it cannot be resumed: start a new run")
    # the store that held the run, as named now: the checkpoint keeps no password
    settings = {**saved, "resume": None, "tracking_uri": cfg.tracking_uri}
    try:
        resumed = TrainConfig(**settings).validate()
    except ConfigError as exc:
        raise checkpoint.ResumeError(f"the checkpoint {path} holds a bad setting: {exc}") from None
    return resumed, ckpt, run_id


def main(argv: list[str] | None = None) -> int:
    signals = StopSignals()

    def body() -> int:
        cfg, _ = parse_args(argv)
        if cfg is None:
            print(describe_models())
            return 0
        resume_from = run_id = None
        if cfg.resume:
            cfg, resume_from, run_id = resume_config(cfg)
            print(f"resuming run {run_id} after epoch {resume_from['epoch']}")
        print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.public_dict().items()))
        start = time.perf_counter()
        with signals:
            result = train(cfg, resume_from=resume_from, run_id=run_id,
                           stop_requested=signals.requested)
        val = (f"best val {result.best_val_acc:.4f}, " if not math.isnan(result.best_val_acc)
               else "no validation split, ")
        print(f"\nrun {result.run_id}: test accuracy {result.test_acc:.4f} "
              f"({val}{result.epochs_run} epochs, "
              f"{time.perf_counter() - start:.0f} s)")
        if result.registered_name:
            champion = "now champion" if result.promoted else "champion unchanged (it scores higher)"
            print(f"registered {result.registered_name} version {result.version}: {champion}")
        print(f"see it: {ui_command(tracking_uri(cfg.tracking_uri))}")
        return 0

    code = run_command(body)
    return 128 + signals.received if code == 130 and signals.received else code


if __name__ == "__main__":
    sys.exit(main())
