"""Train a classifier: python -m training.train --model cnn --data-dir ~/data/cifar10

config -> data -> model -> fit -> test -> MLflow (params, per-epoch metrics, report, model,
registry). `train(cfg)` is the importable entry; `main()` adds the CLI and its error handling.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from shared.calibration import Calibration, calibrate
from shared.command import run_command
from shared.network import resize_batch
from shared.preprocess import Preprocessing
from shared.progress import report
from shared.store import tracking_uri, ui_command, ui_page
from training.cli import StopSignals, resume_config
from training.engine import distributed
from training.engine.build import DeviceSplits, Setup, build, prepare
from training.engine.config import RESOLVED_PRECISION, TrainConfig, parse_args
from training.engine.data import ImageData
from training.engine.device import describe_device
from training.engine.loop import (
    Callbacks,
    FitResult,
    Validation,
    autocast_for,
    collect_logits,
    evaluate,
    fit,
    never,
)
from training.engine.models import count_parameters, describe_models
from training.tracking import run_log
from training.tracking.report import model_summary
from training.tracking.run import (
    EpochRecorder,
    FollowerRun,
    Resume,
    RunOptions,
    TrackedRun,
    open_tracked,
    progress_bar,
)


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
    calibration: Calibration = Calibration()  # chosen on the validation split after training
    experiment_id: str = ""


def train(cfg: TrainConfig, log=print, *, splits: DeviceSplits | None = None,
          options: RunOptions | None = None, resume: Resume | None = None,
          stop_requested: Callable[[], bool] = never) -> TrainResult:
    """Run one tracked training run. Bad input raises before any MLflow run is created.

    `options` ties the run to others (the tuner's trials: no test set, no model, no registry,
    as tuning must never see the test set). `resume` continues a run where its checkpoint ends.
    Once `stop_requested()` is true, the step in progress finishes and the run ends KILLED.
    """
    options = options or RunOptions()
    if not distributed.world().is_main:
        log = quiet
    splits = splits or prepare(cfg, log)
    setup = build(cfg, splits, resume.checkpoint if resume else None, log)
    with open_tracked(cfg, options, resume, log) as run:
        log(describe(cfg, splits, setup))
        run.start(run_log.run_tags(splits.data), run_log.run_params(cfg, splits, setup), splits)
        recorder = EpochRecorder(run, setup.state, setup.start.history if setup.start else [])
        steps = cfg.checkpoint_steps if cfg.checkpoint_every else 0
        result = fit(setup.network, setup.state, setup.loss_fn,
                     Validation(setup.loaders.val, splits.num_classes, cfg.tta),
                     epochs=cfg.epochs, precision=setup.precision, start=setup.start,
                     callbacks=Callbacks(recorder, progress_bar(cfg.progress and distributed.world().is_main),
                                         distributed.agreed(stop_requested), on_step=recorder.step,
                                         checkpoint_steps=steps))
        run.ensure_stored(result.epochs_run)
        skipped = sorted(getattr(setup.loaders.train, "skipped", ()))
        if skipped:
            log(f"warning: {len(skipped)} streamed image(s) could not be decoded and were left "
                f"out of their batches: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        outcome = record_fit(run, result, setup, recorder.seconds, log)
        if not options.trial:
            with run.storing_results(result.epochs_run):
                test_and_store(cfg, outcome, setup, splits.data, run)
    return outcome


def quiet(*_) -> None:
    pass


def describe(cfg: TrainConfig, splits: DeviceSplits, setup: Setup) -> str:
    trainable, total = count_parameters(setup.model)
    sizes = splits.sizes()
    world = distributed.world()
    processes = (f" x {world.size} processes ({world.backend}, {world.nodes} node(s))"
                 if world.launched else "")
    return (f"{splits.data.name}: {sizes['train_size']} train / {sizes['val_size']} val / "
            f"{sizes['test_size']} test, {splits.num_classes} classes; {cfg.model} "
            f"({trainable:,} trainable of {total:,} params) on "
            f"{describe_device(splits.device)['device_name']}{processes}, {setup.precision}")


def record_fit(run: TrackedRun | FollowerRun, result: FitResult, setup: Setup,
               tracking_seconds: float, log=print) -> TrainResult:
    """How fitting ended, on the console and in the run; the outcome so far."""
    stop_note = (f"stopped early at epoch {result.stopped_epoch} (best epoch {result.best_epoch})"
                 if result.stopped_epoch else "ran every requested epoch")
    log(f"{stop_note}; best weights from epoch {result.best_epoch} restored")
    run.end_fit(result, setup.compile_seconds, tracking_seconds)
    return TrainResult(run.run_id, result.best_val_acc, result.best_epoch, result.epochs_run,
                       result.stopped_epoch, result.history, setup.model, setup.prep,
                       train_seconds=result.train_seconds, compile_seconds=setup.compile_seconds,
                       tracking_seconds=tracking_seconds, experiment_id=run.experiment_id)


def default_model_name(dataset: str, model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{dataset}-{model}")


def test_and_store(cfg: TrainConfig, outcome: TrainResult, setup: Setup, data: ImageData,
                   run: TrackedRun | FollowerRun) -> None:
    """The end of a full run: test set once (every process its share), then the run records
    the report, the model and its registry version (a follower records nothing). Fills
    `outcome`."""
    model, prep = outcome.model, outcome.prep
    report("stage", stage="testing, then storing the model", done=0, total=0)
    start = time.perf_counter()
    distributed.sync_buffers(setup.state.model)
    # the network the loop trained: with cached features, the head on the test images' outputs
    test = evaluate(setup.state.model, setup.loaders.test, setup.loss_fn, len(data.classes),
                    autocast=autocast_for(setup.loaders.test.device, setup.precision),
                    tta=prep.tta)
    outcome.test_seconds = time.perf_counter() - start
    outcome.test_acc, outcome.test_loss = test["acc"], test["loss"]
    calibration = outcome.calibration = calibrate_on_validation(setup, prep.tta, run)
    run.log_test(test, outcome.test_seconds)
    run.log_report(outcome.history, outcome.best_epoch, test, data.classes,
                   lambda: model_summary(model, (1, 3, prep.input_size, prep.input_size)),
                   {**cfg.public_dict(), RESOLVED_PRECISION: setup.precision})
    served = dataclasses.replace(prep, image_size=cfg.photo_size or prep.image_size)
    outcome.model_uri = run.log_model(model, served, data.classes,
                                      resize_batch(data.test_images[:2], served.image_size),
                                      {"model": cfg.model, "dataset": data.name,
                                       "weights_source": run_log.weights_source(cfg.weights)},
                                      calibration)
    if outcome.model_uri is not None and not cfg.no_register:
        outcome.registered_name = cfg.register or default_model_name(data.name, cfg.model)
        # without a validation split (val_fraction 0) the champion rule compares test accuracy
        validated = not math.isnan(outcome.best_val_acc)
        outcome.version, outcome.promoted = run.register(
            outcome.model_uri, outcome.registered_name,
            outcome.best_val_acc if validated else test["acc"],
            tags={"test_acc": f"{test['acc']:.6f}", "model": cfg.model, "run_id": outcome.run_id,
                  "score_source": "validation" if validated else "test (no validation split)",
                  **({"improves_on": cfg.improves_on} if cfg.improves_on else {})})


def calibrate_on_validation(setup: Setup, tta: str, run: TrackedRun | FollowerRun) -> Calibration:
    """Temperature and unsure threshold from the validation split, logged; none without one."""
    loader = setup.loaders.val
    if len(loader.labels) == 0:
        calibration, figures = Calibration(source="none (no validation split)"), {}
    else:
        logits, labels = collect_logits(setup.state.model, loader, tta=tta,
                                        autocast=autocast_for(loader.device, setup.precision))
        calibration, figures = calibrate(logits, labels)
    run.log_calibration(calibration, figures)
    return calibration


def main(argv: list[str] | None = None) -> int:
    signals = StopSignals()

    def body() -> int:
        cfg, _ = parse_args(argv)
        if cfg is None:
            print(describe_models())
            return 0
        say = print if distributed.join(cfg.device).is_main else quiet
        cfg, resume = distributed.from_main(resumed(cfg) if cfg.resume else (cfg, None))
        say("config: " + ", ".join(f"{k}={v}" for k, v in cfg.public_dict().items()))
        start = time.perf_counter()
        with signals:
            result = train(cfg, resume=resume, stop_requested=signals.requested)
        if distributed.world().is_main:
            print_outcome(result, time.perf_counter() - start)
            report("finished", run_id=result.run_id, test_acc=result.test_acc,
                   name=result.registered_name, version=result.version, promoted=result.promoted)
            page = ui_page(result.experiment_id, result.run_id)
            print(f"see it: {ui_command(tracking_uri(cfg.tracking_uri), page)}")
        return 0

    try:
        code = run_command(body)
    finally:
        distributed.leave()
    return 128 + signals.received if code == 130 and signals.received else code


def resumed(cfg: TrainConfig) -> tuple[TrainConfig, Resume | None]:
    """The run to continue, found and read by rank 0 (the store may be local to its machine)."""
    if not distributed.world().is_main:
        return cfg, None  # replaced by rank 0's
    cfg, resume = resume_config(cfg)
    print(f"resuming run {resume.run_id} after epoch {resume.checkpoint['epoch']}")
    return cfg, resume


def print_outcome(result: TrainResult, seconds: float) -> None:
    val = (f"best val {result.best_val_acc:.4f}, " if not math.isnan(result.best_val_acc)
           else "no validation split, ")
    print(f"\nrun {result.run_id}: test accuracy {result.test_acc:.4f} "
          f"({val}{result.epochs_run} epochs, {seconds:.0f} s)")
    if result.registered_name:
        champion = "now champion" if result.promoted else "champion unchanged (it scores higher)"
        print(f"registered {result.registered_name} version {result.version}: {champion}")


if __name__ == "__main__":
    sys.exit(main())
