"""What a training run writes to MLflow: params, tags, per-epoch metrics and the final report."""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import torch
import torchvision

from shared.messages import brief
from training.engine.data import ImageData
from training.engine.device import describe_device
from training.engine.models import count_parameters
from training.tracking import report

if TYPE_CHECKING:
    from training.engine.build import DeviceSplits, Setup
    from training.engine.config import TrainConfig
    from training.engine.state import FitResult

# MLflow retries a failing HTTP call 7 times with doubling waits (minutes per call); a training
# run retries its epoch metrics itself after every epoch, so a gone server should cost seconds
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def run_tags(data: ImageData) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "cuda_version": torch.version.cuda or "none",
        "dataset": data.name,
        "dataset_form": data.form,
        "dataset_root": str(data.root),
        "dataset_fingerprint": data.fingerprint,
    }


def weights_source(weights: str) -> str:
    if weights == "none":
        return "scratch"
    return weights if weights == "imagenet" else f"checkpoint:{weights}"


def run_params(cfg: TrainConfig, splits: DeviceSplits, setup: Setup) -> dict:
    """Every setting of a new run, and what it resolved to on this machine and data."""
    trainable, total = count_parameters(setup.model)
    prep = setup.prep
    return {
        **cfg.public_dict(),
        "weights_source": weights_source(cfg.weights), "fine_tuned": cfg.weights != "none",
        "frozen_layers": frozen_layers(cfg, setup.spec.head),
        "head_lr": cfg.lr, "backbone_lr": cfg.lr * cfg.backbone_lr_scale,
        **describe_device(splits.device), "precision_resolved": setup.precision,
        "compile_resolved": setup.compile_mode, "epochs_requested": cfg.epochs,
        "early_stopping": (f"patience={cfg.patience},min_delta={cfg.min_delta},"
                           f"monitor={cfg.monitor}") if cfg.patience else "off",
        **splits.sizes(), "num_classes": splits.num_classes, **data_params(splits),
        "classes": ",".join(splits.data.classes), "image_size_resolved": prep.image_size,
        "input_size_resolved": prep.input_size,
        "photo_size_resolved": cfg.photo_size or prep.image_size, "normalize_mean": list(prep.mean),
        "normalize_std": list(prep.std), "trainable_params": trainable, "total_params": total,
        **setup.world_params, **setup.feature_params,
    }


def data_params(splits: DeviceSplits) -> dict:
    """How the data was read: its layout, why its images have their size, where validation
    came from, where the images were held and why, what was skipped, and how uneven the
    classes are."""
    data = splits.data
    train = splits.class_counts()["train"].values()
    return {"data_layout": data.layout, "data_root": str(data.root),
            "image_size_reason": splits.image_size_reason,
            "val_source": splits.val_source,
            "data_placement": ("streamed from shards" if splits.stream else
                               "device" if splits.on_device else "memory-mapped cache"),
            "data_placement_reason": splits.placement_reason, "skipped_files": len(data.skipped),
            "duplicate_images": len(data.duplicates),
            "class_balance": round(min(train) / max(1, max(train)), 4)}


def log_data(splits: DeviceSplits) -> None:
    """The dataset's record: each split's files (so a later evaluation scores exactly the
    held-out ones), the skipped files with why, the same image twice, images per class."""
    import matplotlib.pyplot as plt

    data = splits.data
    for split, names in splits.files.items():
        mlflow.log_text("".join(f"{name}\n" for name in names), f"data/files_{split}.txt")
    if data.skipped:
        mlflow.log_text(report.skipped_csv(data.skipped), "data/skipped_files.csv")
    if data.duplicates:
        mlflow.log_text("".join(f"{line}\n" for line in data.duplicates), "data/duplicates.txt")
    counts = splits.class_counts()
    mlflow.log_text(report.class_counts_csv(counts), "data/class_counts.csv")
    fig = report.class_counts_figure(counts)
    mlflow.log_figure(fig, "data/class_counts.png")
    plt.close(fig)


def frozen_layers(cfg: TrainConfig, head: str | None) -> str:
    if cfg.freeze == "none":
        return "none"
    frozen = f"all but {head}"
    return f"{frozen} for {cfg.unfreeze_after} epoch(s)" if cfg.unfreeze_after else frozen


def log_params(params: dict) -> None:
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})


def log_fit_end(result: FitResult, compile_seconds: float, tracking_seconds: float) -> None:
    """How fitting ended: epochs run, early stop, best epoch; the time it took and the share
    of it the training thread spent on tracking."""
    log_params({"epochs_run": result.epochs_run, "stopped_early": result.stopped_epoch is not None,
                "stop_epoch": result.stopped_epoch or "none", "best_epoch": result.best_epoch})
    share = tracking_seconds / max(1e-9, tracking_seconds + result.train_seconds)
    best = result.best_val_acc
    mlflow.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.train_seconds,
                        "compile_seconds": compile_seconds, "tracking_seconds": tracking_seconds,
                        "tracking_share": share, **({} if math.isnan(best) else {"best_val_acc": best})})


def log_epoch(run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    """One epoch's metrics at step = epoch, by run id: the background writer has no active run."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, epoch)
                                              for k, v in metrics.items()], synchronous=True)


class EpochLog:
    """Per-epoch metrics on their way to MLflow. When the store does not take them (a tracking
    server gone, a full or read-only disk) training goes on, and every later flush retries."""

    def __init__(self, run_id: str, log=print):
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.run_id, self.log, self.failing = run_id, log, False

    def add(self, epoch: int, metrics: dict[str, float]) -> None:
        self.pending.append((epoch, metrics))

    def flush(self) -> bool:
        """Log what is pending, oldest first; False if the store still refuses."""
        while self.pending:
            epoch, metrics = self.pending[0]
            try:
                log_epoch(self.run_id, epoch, metrics)
            except Exception as exc:  # noqa: BLE001 - HTTP, database and disk errors alike
                if not self.failing:
                    self.log(f"warning: the tracking store did not take epoch {epoch}'s metrics "
                             f"({brief(exc)}); training goes on and retries "
                             "after every epoch")
                self.failing = True
                return False
            self.pending.pop(0)
        if self.failing:
            self.log("the tracking store answers again; every epoch so far is logged")
            self.failing = False
        return True


def log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    """Log the epochs of `history` that the run lacks (a crash between checkpoint and log)."""
    from mlflow.tracking import MlflowClient

    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")}
    for epoch, metrics in enumerate(history, start=1):
        if epoch not in logged:
            log_epoch(run_id, epoch, metrics)


def log_final_report(history: list[dict[str, float]], best_epoch: int, test: dict,
                     classes: list[str], summary: str, config: dict) -> list[dict]:
    """Curves, confusion matrix, per-class scores, model summary and config as artifacts.
    Returns the per-class scores."""
    import matplotlib.pyplot as plt

    for name, fig in (("curves.png", report.curves_figure(history, best_epoch)),
                      ("confusion_matrix.png", report.confusion_figure(test["confusion"], classes))):
        mlflow.log_figure(fig, name)
        plt.close(fig)
    mlflow.log_text(report.confusion_csv(test["confusion"], classes), "confusion_matrix.csv")
    scores = report.per_class_scores(test["confusion"], classes)
    mlflow.log_text(report.scores_csv(scores), "per_class_metrics.csv")
    mlflow.log_text(summary, "model_summary.txt")
    mlflow.log_dict(config, "config.yaml")
    return scores
