"""Epoch functions and the fit loop. No tracking, printing or files in here: `fit` hands each
epoch's metrics to a callback, so the training command, the tuner and tests share it."""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from shared.messages import RunFailed
from shared.network import tta_logits
from training.engine import distributed
from training.engine.batches import DeviceLoader
from training.engine.state import EpochSums, FitResult, TrainingState

Progress = Callable[[Iterable, str], Iterable]


class NonFiniteLossError(RunFailed, RuntimeError):
    """The training loss became NaN or infinite."""


class StopTraining(Exception):
    """Raised from an epoch callback to end training on purpose (the tuner's pruning)."""


class StopRequested(Exception):
    """`stop_requested()` became true (SIGINT/SIGTERM): raised after the step in progress."""


def never() -> bool:
    return False


def no_progress(batches: Iterable, desc: str) -> Iterable:
    return batches


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for bf16/fp16, or of null contexts for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class Callbacks:
    """What the loop tells its caller, and asks it: the loop itself knows nothing of tracking."""

    on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, metrics: None
    progress: Progress = no_progress
    stop_requested: Callable[[], bool] = never
    on_step: Callable[[int], None] = lambda epoch: None  # every `checkpoint_steps` global batches
    checkpoint_steps: int = 0


def train_epoch(network: nn.Module, state: TrainingState, loss_fn: nn.Module, *,
                autocast=contextlib.nullcontext, progress: Progress = no_progress,
                desc: str = "train", stop_requested: Callable[[], bool] = never,
                checkpoint_steps: int = 0, on_step: Callable[[], None] = lambda: None
                ) -> dict[str, float]:
    """One pass over the state's loader through `network` (its model, or the compiled form).
    Sums stay on the device; the host reads them once, at the end, summed over processes.
    Every `checkpoint_steps` global batches the sums so far are added up over processes and
    `on_step()` is told: a checkpoint taken then holds the epoch's place and its sums, and a
    pass restored from one goes on from there."""
    network.train()
    loader = state.loader
    sums = state.sums = state.sums or EpochSums()
    if loader.resume_at is None or sums.loss is None:
        sums.reset(loader.device)
    else:
        sums.to(loader.device)
    for x, y in progress(loader, desc):
        with autocast():
            out = network(x)
            loss = loss_fn(out, y)
        state.step(loss)
        sums.add(loss.detach().float() * y.shape[0], (out.detach().argmax(1) == y).sum(), y.shape[0])
        if checkpoint_steps and loader.current["done"] % checkpoint_steps == 0:
            sums.carried = distributed.all_sum(sums.stacked())
            on_step()
        if stop_requested():
            raise StopRequested
    loss_sum, correct, seen = distributed.all_sum(sums.stacked()).tolist()
    sums.carried = None
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen}


def warm_up(network: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
            loader: DeviceLoader, loss_fn: nn.Module, *, autocast=contextlib.nullcontext,
            steps: int = 3) -> float:
    """Compile before the clock starts: run `steps` training steps on one batch through
    `network` (the compiled `model`), then put back the weights, BatchNorm statistics and
    optimizer state, so training starts as if they never ran. Returns the seconds spent."""
    start = time.perf_counter()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    n = loader.batch_size // loader.shard.world_size  # the batch one process trains on
    x = loader.transform(loader.images[:n].float() / 255)
    if loader.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = loader.labels[:n]
    network.train()
    try:
        for _ in range(steps):
            with autocast():
                loss = loss_fn(network(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        float(loss.detach())  # waits for the device
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(state)
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, loss_fn: nn.Module, num_classes: int, *,
             autocast=contextlib.nullcontext, tta: str = "none") -> dict:
    """Loss, accuracy and the confusion matrix (rows: true class, columns: predicted), with
    scores averaged over the `tta` views. Under torchrun each process scores its share of the
    images and the sums are added up: the figures of one process scoring them all."""
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    for x, y in loader:
        with autocast():
            out = tta_logits(model, x, tta)
            loss_sum += loss_fn(out, y).float() * y.shape[0]
        confusion += torch.bincount(y * num_classes + out.argmax(1), minlength=num_classes ** 2)
    distributed.all_sum(loss_sum)
    confusion = distributed.all_sum(confusion).view(num_classes, num_classes).cpu()
    seen = int(confusion.sum())
    return {"loss": loss_sum.item() / seen, "acc": confusion.diag().sum().item() / seen,
            "confusion": confusion}


@torch.no_grad()
def collect_logits(model: nn.Module, loader: DeviceLoader, *, autocast=contextlib.nullcontext,
                   tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's scores (float32, on the CPU) and label; under torchrun each process's
    share, gathered on every process."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with autocast():
            logits.append(tta_logits(model, x, tta).float().cpu())
        labels.append(y.cpu())
    shares = distributed.gather((torch.cat(logits), torch.cat(labels)))
    return torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])


@dataclass
class Validation:
    """What fit scores after each epoch: the held-out images (none: no validation), the
    number of classes, the test-time augmentation views."""

    loader: DeviceLoader
    num_classes: int
    tta: str = "none"


def fit(network: nn.Module, state: TrainingState, loss_fn: nn.Module, validation: Validation,
        *, epochs: int, precision: str = "fp32", callbacks: Callbacks = Callbacks(),
        start: FitResult | None = None) -> FitResult:
    """Train for up to `epochs`, validating after each; restores the best weights at the end.

    `start` continues a resumed run after the epochs in its history. `on_epoch` runs once the
    epoch is recorded everywhere, early stopping included, so a checkpoint taken there is whole.
    """
    autocast = autocast_for(state.loader.device, precision)
    result = start or FitResult()
    first = result.epochs_run + 1 if result.stopped_epoch is None else epochs + 1
    for epoch in range(first, epochs + 1):
        state.begin_epoch(epoch)
        lr = state.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        left = 1 - (state.loader.resume_at or {"done": 0})["done"] / max(1, len(state.loader))
        metrics = train_epoch(network, state, loss_fn, autocast=autocast,
                              progress=callbacks.progress, desc=f"epoch {epoch}/{epochs}",
                              stop_requested=callbacks.stop_requested,
                              checkpoint_steps=callbacks.checkpoint_steps,
                              on_step=functools.partial(callbacks.on_step, epoch))
        train_seconds = time.perf_counter() - started
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(f"the training loss became {metrics['train_loss']} in epoch "
                                     f"{epoch} (lr {lr:g}); lower the learning rate")
        if validation.loader.num_images:
            distributed.sync_buffers(state.model)
            val = evaluate(state.model, validation.loader, loss_fn, validation.num_classes,
                           autocast=autocast, tta=validation.tta)
            metrics.update(val_loss=val["loss"], val_acc=val["acc"])
        seconds = time.perf_counter() - started
        metrics.update(lr=lr, epoch_seconds=seconds,
                       images_per_second=state.loader.num_images * left / train_seconds)
        metrics = distributed.from_main(metrics)  # rank 0's figures decide for every process
        result.history.append(metrics)
        result.train_seconds += seconds
        stop = state.stopper.step(epoch, metrics, state.model)
        if stop:
            result.stopped_epoch = epoch
        callbacks.on_epoch(epoch, metrics)
        if stop:
            break
    state.stopper.restore(state.model)
    result.best_epoch, result.best_value = state.stopper.best_epoch, state.stopper.best_value
    return result
