"""Tune the learning rate and the epoch count with Optuna; every trial is an MLflow run.

    python -m training.tune --model cnn --trials 30 --data-dir ~/data/cifar10

One parent MLflow run per study holds the study's settings, best values and plots; each trial is
a child run with its own per-epoch metrics. The study lives in an Optuna storage (default: a
SQLite file beside the MLflow store), so running the same command again resumes it, and worker
processes started with --worker on this or other machines share it.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from shared.command import run_command
from shared.messages import mask_secrets
from shared.store import check_driver, creation_lock, store_folder, tracking_uri, ui_command, use_store
from training.engine import distributed
from training.engine.build import prepare
from training.engine.config import ConfigError, TrainConfig, build_parser, opt, parse_args
from training.engine.loop import NonFiniteLossError, StopTraining
from training.engine.models import describe_models
from training.tracking.publish import ensure_experiment
from training.tracking.run import RunOptions, TrainingInterrupted
from training.train import train


def rate_bounds(name: str) -> Callable[[TuneConfig], tuple]:
    """A learning rate's (low, high): its --NAME-range, else the recipe's value / 10 to x 10."""
    def bounds(cfg: TuneConfig) -> tuple:
        value, given = getattr(cfg, name), getattr(cfg, f"{name}_range")
        return parse_range(given or f"{value / 10:g},{value * 10:g}", f"{name}_range", float,
                           positive=True)
    return bounds


def muon_lr_bounds(cfg: TuneConfig) -> tuple:
    if cfg.optimizer != "muon":
        raise ConfigError("--search muon_lr needs --optimizer muon (the rate of its hidden-layer "
                          f"steps); this study uses {cfg.optimizer}")
    return rate_bounds("muon_lr")(cfg)


def epochs_bounds(cfg: TuneConfig) -> tuple:
    text = cfg.epochs_range or f"{max(1, cfg.epochs // 6)},{cfg.epochs}"
    return parse_range(text, "epochs_range", int, positive=True)


def batch_size_choices(cfg: TuneConfig) -> tuple:
    try:
        choices = tuple(sorted({int(v) for v in cfg.batch_sizes.split(",")}))
    except ValueError:
        raise ConfigError(f"batch_sizes {cfg.batch_sizes!r} must be integers separated by "
                          "commas") from None
    if not choices or min(choices) < 1:
        raise ConfigError(f"batch_sizes {cfg.batch_sizes!r} must be positive")
    return choices


@dataclass(frozen=True)
class Searchable:
    """A setting the tuner can search: its bounds (low, high) or choices, read from the
    config, and how a trial draws it."""

    bounds: Callable[[TuneConfig], tuple]
    suggest: Callable[[optuna.Trial, str, tuple], Any]


def log_scale(trial: optuna.Trial, name: str, bounds: tuple) -> float:
    return trial.suggest_float(name, *bounds, log=True)


SEARCHABLE: dict[str, Searchable] = {
    "lr": Searchable(rate_bounds("lr"), log_scale),
    "epochs": Searchable(epochs_bounds, lambda trial, name, bounds: trial.suggest_int(name, *bounds)),
    "weight_decay": Searchable(
        lambda cfg: parse_range(cfg.weight_decay_range, "weight_decay_range", float, positive=True),
        log_scale),
    "batch_size": Searchable(batch_size_choices,
                             lambda trial, name, bounds: trial.suggest_categorical(name, list(bounds))),
    "muon_lr": Searchable(muon_lr_bounds, log_scale),
}

# pruners by name, each given the most epochs a trial may train
PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda epochs: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    "hyperband": lambda epochs: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs),
    "none": lambda epochs: optuna.pruners.NopPruner(),
}
PARENT_ATTR = "mlflow_parent_run_id"
WORKER_WAIT_SECONDS = 120
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class TuneConfig(TrainConfig):
    trials: int = opt(20, "trials the study must finish (complete or pruned), counting earlier "
                          "runs of the same study and every worker", min=1)
    timeout: float | None = opt(None, "seconds after which no new trial starts")
    epoch_budget: int | None = opt(None, "epochs, summed over all trials, after which no new "
                                         "trial starts (compare recipes at equal cost)", min=1)
    search: str = opt("lr,epochs", f"parameters to search, from: {', '.join(SEARCHABLE)}")
    lr_range: str | None = opt(None, "LOW,HIGH of the log-scale learning-rate search "
                                     "(default: the recipe's lr / 10 to x 10)")
    muon_lr_range: str | None = opt(None, "LOW,HIGH of the log-scale search of --muon-lr "
                                          "(default: the recipe's muon_lr / 10 to x 10)")
    epochs_range: str | None = opt(None, "LOW,HIGH of the epoch count (default: a sixth of the "
                                         "recipe's epochs to all of them)")
    weight_decay_range: str = opt("1e-6,1e-2", "LOW,HIGH of the log-scale weight-decay search")
    batch_sizes: str = opt("64,128,256,512", "batch sizes to choose from")
    objective: str = opt("val_acc", "what the study optimises (never the test set)",
                         ("val_acc", "val_loss"))
    pruner: str = opt("median", "prunes hopeless trials from their per-epoch values",
                      tuple(PRUNERS))
    study_name: str | None = opt(None, "Optuna study name (default: <model>-<objective>)")
    storage: str | None = opt(None, "Optuna storage URL: sqlite:///..., postgresql://..., "
                                    "mysql://... (default: sqlite beside the MLflow store)")
    worker: bool = opt(False, "only run trials of a study that another tuner process leads")
    final: bool = opt(True, "retrain with the best settings, test once and register")
    heartbeat: int = opt(30, "seconds between a running trial's heartbeats; a trial silent "
                             "for 3 of them (its process died) is marked failed", min=1)

    def validate(self) -> TuneConfig:
        super().validate()
        if self.val_fraction == 0:
            raise ConfigError("tuning scores trials on the validation split (never the test set), "
                              "and val_fraction 0 leaves none: pass --val-fraction 0.1")
        unknown = sorted(set(self.search_names()) - set(SEARCHABLE))
        if unknown or not self.search_names():
            raise ConfigError(f"--search {self.search!r}: unknown parameter(s) {unknown}; "
                              f"choose from {', '.join(SEARCHABLE)}")
        self.space()
        return self

    def search_names(self) -> list[str]:
        return [n.strip() for n in self.search.split(",") if n.strip()]

    def space(self) -> dict[str, tuple]:
        """Each searched parameter's (low, high), or its choices for batch_size."""
        return {name: SEARCHABLE[name].bounds(self) for name in self.search_names()}


def training_settings(cfg: TuneConfig, **changes) -> TrainConfig:
    """The plain training config of one trial (or of the final run)."""
    cfg = replace(cfg, **changes)
    return TrainConfig(**{k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__})


def parse_range(text: str, name: str, kind: type, positive: bool = False) -> tuple:
    parts = text.split(",")
    try:
        low, high = (kind(float(p)) if kind is int else kind(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{name} {text!r} must be two numbers: LOW,HIGH") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{name} {text!r} must be two finite numbers: LOW,HIGH")
    if positive and low <= 0:
        raise ConfigError(f"{name} {text!r}: LOW must be positive")
    if low >= high:
        raise ConfigError(f"{name} {text!r} is empty or inverted: LOW must be below HIGH")
    return low, high


def default_storage(mlflow_uri: str) -> str:
    """An SQLite file beside the MLflow store's database, else in ./mlruns."""
    folder = store_folder(mlflow_uri)
    folder.mkdir(exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def mark_run_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna found `trial` stale (its process stopped sending heartbeats): its MLflow run,
    left RUNNING by a process that could not close it, ends FAILED with the reason."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id is None:
        return
    client = MlflowClient()
    client.set_tag(run_id, "failure_reason", "its tuner process stopped sending heartbeats "
                                             "(killed, or its machine went away)")
    client.set_tag(run_id, "optuna_state", "FAIL")
    client.set_terminated(run_id, "FAILED")


def open_storage(url: str, heartbeat: int = 30) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so a trial whose process died is marked failed (by the
    next trial started, or by the lead before it reports)."""
    check_driver(url)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(4):  # processes started together race to create the schema: retry
        try:
            with warnings.catch_warnings(), creation_lock(url):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                    grace_period=3 * heartbeat, failed_trial_callback=mark_run_failed)
        except Exception as exc:  # noqa: BLE001 - drivers raise many types
            error = exc
            if isinstance(exc, ImportError):
                break
            time.sleep(0.5 + attempt)
    raise ConfigError(f"cannot open the Optuna storage {mask_secrets(url)!r}: "
                      f"{mask_secrets(str(error))}. Check the URL, that the "
                      "database server is reachable, and that its driver is installed "
                      "(pip install 'cifarlab[server]' for PostgreSQL).") from error


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    return PRUNERS[cfg.pruner](cfg.space().get("epochs", (1, cfg.epochs))[1])


def suggest(trial: optuna.Trial, space: dict[str, tuple]) -> dict:
    return {name: SEARCHABLE[name].suggest(trial, name, bounds) for name, bounds in space.items()}


def objective_value(history: list[dict[str, float]], objective: str) -> float:
    values = [h[objective] for h in history]
    return max(values) if objective == "val_acc" else min(values)


class Objective:
    """One trial: sample, train as a child run, report each epoch to the pruner."""

    def __init__(self, cfg: TuneConfig, splits, parent_run_id: str, study_name: str, log):
        self.cfg, self.splits, self.parent_run_id = cfg, splits, parent_run_id
        self.study_name, self.log, self.space = study_name, log, cfg.space()

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.space)
        # a trial is short and the study itself resumes: no checkpoints
        trial_cfg = training_settings(self.cfg, **params, run_name=f"trial-{trial.number}",
                                      no_register=True, checkpoint_every=0)
        self.log(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                       else f"{k}={v}" for k, v in params.items()))

        def report(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[self.cfg.objective], epoch)
            if trial.should_prune():
                raise StopTraining(f"pruned by the {self.cfg.pruner} pruner after epoch {epoch}")

        tags = {"optuna_study": self.study_name, "optuna_trial": str(trial.number)}
        try:
            result = train(trial_cfg, log=lambda *_: None, splits=self.splits,
                           options=RunOptions(
                               parent_run_id=self.parent_run_id, tags=tags, trial=True,
                               epoch_hook=report,
                               on_run_start=lambda run_id: trial.set_user_attr("mlflow_run_id",
                                                                               run_id)))
        except StopTraining as exc:
            self._record(trial, "PRUNED")
            self.log(f"trial {trial.number}: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        except BaseException as exc:
            self._record(trial, "FAIL")
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        self._record(trial, "COMPLETE")
        trial.set_user_attr("epochs_run", result.epochs_run)
        value = objective_value(result.history, self.cfg.objective)
        self.log(f"trial {trial.number}: {self.cfg.objective} {value:.4f} after "
                 f"{result.epochs_run} epochs")
        return value

    @staticmethod
    def _record(trial: optuna.Trial, state: str) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")  # absent if train() failed before its run
        if run_id is not None:
            MlflowClient().set_tag(run_id, "optuna_state", state)


def open_study(cfg: TuneConfig, storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Workers only load the study; the lead creates or resumes it."""
    direction = "maximize" if cfg.objective == "val_acc" else "minimize"
    sampler = optuna.samplers.TPESampler(seed=None if cfg.worker else cfg.seed)
    if cfg.worker:  # the lead may be starting at the same moment: give it time
        deadline = time.monotonic() + WORKER_WAIT_SECONDS
        while True:
            try:
                return optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                         pruner=make_pruner(cfg))
            except KeyError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"--worker: no study {name!r} appeared in the storage within "
                                      f"{WORKER_WAIT_SECONDS} s; start the lead tuner (without "
                                      "--worker) first") from None
                time.sleep(1)
    try:
        return optuna.create_study(study_name=name, storage=storage, direction=direction,
                                   sampler=sampler, pruner=make_pruner(cfg))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=make_pruner(cfg))
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} {study.direction.name.lower()}s; --objective "
                          f"{cfg.objective} would {direction} it. Use another --study-name.")
    return study


def settle(study: optuna.Study, log=print) -> None:
    """Wait until no trial is running: other workers' trials end, and a trial whose process
    died is marked failed once its heartbeat is overdue. The best trial is then final."""
    said = False
    while running := study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not said:
            log(f"waiting for {len(running)} running trial(s) of other tuner processes")
            said = True
        optuna.storages.fail_stale_trials(study)
        time.sleep(1)


def wait_for_parent(study: optuna.Study, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while (parent := study.user_attrs.get(PARENT_ATTR)) is None:
        if time.monotonic() > deadline:
            raise ConfigError(f"study {study.study_name!r} has no MLflow parent run after "
                              f"{seconds:.0f} s; is its lead tuner running?")
        time.sleep(1)
    return parent


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def epochs_spent(study: optuna.Study) -> int:
    """Epochs trained by every trial so far: the steps each reported to the pruner."""
    return sum(max(t.intermediate_values, default=0) for t in study.get_trials(deepcopy=False))


def stop_callbacks(cfg: TuneConfig) -> list:
    callbacks = [optuna.study.MaxTrialsCallback(cfg.trials, states=FINISHED)]
    if cfg.epoch_budget is not None:
        def budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if epochs_spent(study) >= cfg.epoch_budget:
                study.stop()
        callbacks.append(budget)
    return callbacks


def pruning_savings(study: optuna.Study) -> int:
    """Epochs that pruned trials would have trained had they run to their requested count."""
    saved = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)):
        requested = t.params.get("epochs")
        if requested is not None and t.intermediate_values:
            saved += requested - max(t.intermediate_values)
    return saved


def log_study_plots(study: optuna.Study, space: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
             "intermediate_values": lambda: ovm.plot_intermediate_values(study),
             "param_importances": lambda: ovm.plot_param_importances(study),
             "slice": lambda: ovm.plot_slice(study)}
    if {"lr", "epochs"} <= set(space):
        plots["contour_lr_epochs"] = lambda: ovm.plot_contour(study, params=["lr", "epochs"])
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials for it
            mlflow.log_text(f"not drawn: {exc}\n", f"optuna/{name}.txt")
            continue
        ax = axes.flat[0] if hasattr(axes, "flat") else axes
        ax.figure.set_size_inches(max(8, ax.figure.get_figwidth()), max(5, ax.figure.get_figheight()))
        mlflow.log_figure(ax.figure, f"optuna/{name}.png")
        plt.close(ax.figure)


def summarize(study: optuna.Study) -> dict[str, float]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    count = {s: states.count(s) for s in optuna.trial.TrialState}
    return {"trials_complete": count[optuna.trial.TrialState.COMPLETE],
            "trials_pruned": count[optuna.trial.TrialState.PRUNED],
            "trials_failed": count[optuna.trial.TrialState.FAIL],
            "epochs_trained": epochs_spent(study),
            "epochs_saved_by_pruning": pruning_savings(study)}


def tune(cfg: TuneConfig, log=print) -> dict:
    """Run (or resume, or join) a study. Returns a summary of the study."""
    uri = tracking_uri(cfg.tracking_uri)
    storage_url = cfg.storage or default_storage(uri)
    storage = open_storage(storage_url, cfg.heartbeat)
    name = cfg.study_name or f"{cfg.model}-{cfg.objective}"
    splits = prepare(cfg, log)
    use_store(uri)
    experiment_id = ensure_experiment(cfg.experiment, uri)
    study = open_study(cfg, storage, name)
    log(f"study {name!r} in {mask_secrets(storage_url)}: {finished_count(study)} of {cfg.trials} "
        "trials finished")

    if cfg.worker:
        parent_id = wait_for_parent(study)
        objective = Objective(cfg, splits, parent_id, name, log)
        study.optimize(objective, timeout=cfg.timeout, callbacks=stop_callbacks(cfg),
                       catch=(NonFiniteLossError, RuntimeError))
        return summarize(study)

    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is None:
        parent = mlflow.start_run(experiment_id=experiment_id, run_name=f"study-{name}",
                                  tags={"optuna_study": name,
                                        "optuna_storage": mask_secrets(storage_url)})
        study.set_user_attr(PARENT_ATTR, parent.info.run_id)
        mlflow.log_params({"search": cfg.search, "objective": cfg.objective, "pruner": cfg.pruner,
                           "trials": cfg.trials, "model": cfg.model,
                           "storage": mask_secrets(storage_url),
                           **{f"range_{k}": str(v) for k, v in cfg.space().items()}})
    else:
        log(f"resuming: MLflow parent run {parent_id}")
        parent = mlflow.start_run(run_id=parent_id)
    status = "FAILED"
    try:
        budget_left = cfg.epoch_budget is None or epochs_spent(study) < cfg.epoch_budget
        if finished_count(study) < cfg.trials and budget_left:
            objective = Objective(cfg, splits, parent.info.run_id, name, log)
            study.optimize(objective, timeout=cfg.timeout, callbacks=stop_callbacks(cfg),
                           catch=(NonFiniteLossError, RuntimeError))
        settle(study, log)
        summary = summarize(study)
        mlflow.log_metrics(summary)
        if summary["trials_complete"] == 0:
            raise ConfigError(f"study {name!r} has no completed trial; see the failed trials' "
                              "failure_reason tags in MLflow")
        best = study.best_trial
        mlflow.log_metric(f"best_{cfg.objective}", best.value)
        mlflow.set_tags({f"best_{k}": str(v) for k, v in best.params.items()} |
                        {"best_trial": str(best.number),
                         "best_trial_run_id": best.user_attrs.get("mlflow_run_id", "")})
        log_study_plots(study, cfg.space())
        summary.update(best_value=best.value, best_params=best.params, parent_run_id=parent.info.run_id)
        log(f"best trial {best.number}: {cfg.objective} {best.value:.4f} with " +
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in best.params.items()))
        if cfg.final:
            final_cfg = training_settings(cfg, **best.params, run_name=f"study-{name}-best")
            final = RunOptions(parent_run_id=parent.info.run_id,
                               tags={"optuna_study": name, "optuna_final": "true"})
            result = train(final_cfg, log=log, splits=splits, options=final)
            mlflow.log_metric("final_test_acc", result.test_acc)
            summary.update(final_run_id=result.run_id, test_acc=result.test_acc,
                           registered=(result.registered_name, result.version, result.promoted))
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, TrainingInterrupted):
        status = "KILLED"
        mlflow.set_tag("stop_reason", "interrupted; run the same command again to resume the study")
        raise TrainingInterrupted(f"interrupted: study {name!r} keeps its finished trials; run the "
                                  "same command again to resume it") from None
    finally:
        mlflow.end_run(status)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        if distributed.launched_by_torchrun():
            raise ConfigError("the tuner runs one process per trial: start it with python (or "
                              "cifarlab-tune), not torchrun; to fill a machine with GPUs, start "
                              "one --worker per GPU, each with --device cuda:N")
        parser = build_parser(TuneConfig, "python -m training.tune", __doc__.split("\n\n")[0])
        cfg, _ = parse_args(argv, parser, TuneConfig)
        if cfg is None:
            print(describe_models())
            return 0
        print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.public_dict().items()))
        summary = tune(cfg)
        print(f"\ntrials: {summary['trials_complete']} complete, {summary['trials_pruned']} "
              f"pruned, {summary['trials_failed']} failed; {summary['epochs_trained']} epochs "
              f"trained, {summary['epochs_saved_by_pruning']} saved by pruning")
        if "test_acc" in summary:
            name, version, promoted = summary["registered"]
            print(f"best settings retrained: test accuracy {summary['test_acc']:.4f}"
                  + (f"; registered {name} version {version}"
                     f"{' (now champion)' if promoted else ''}" if name else ""))
        print(f"see it: {ui_command(tracking_uri(cfg.tracking_uri))}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
