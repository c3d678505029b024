"""The stateful objects of a run, held together: one object steps them, saves and restores them.
The checkpoint format is defined here (`checkpoint_state`, `restore`); where checkpoints live
and how they are written is training.tracking.checkpoint's concern."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from training.engine import distributed
from training.engine.averaging import Lookahead
from training.engine.batches import DeviceLoader
from training.engine.features import FeatureLoader


class EarlyStopping:
    """Stops after `patience` epochs without improvement of `monitor` by more than `min_delta`,
    keeping a copy of the best weights to restore. patience=0 never stops, but still keeps the
    best weights."""

    def __init__(self, monitor: str = "val_acc", patience: int = 10, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.sign = -1.0 if monitor.endswith("loss") else 1.0
        self.best_value: float | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_epoch: int | None = None

    def step(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Record an epoch; True when training should stop. Without validation metrics the
        last epoch counts as the best."""
        value = metrics.get(self.monitor)
        if value is None:
            self.best_epoch, self.best_state = epoch, None
            return False
        if self.best_value is None or self.sign * (value - self.best_value) > self.min_delta:
            self.best_value, self.best_epoch = value, epoch
            self.best_state = copy.deepcopy(model.state_dict())
        elif self.patience and epoch - self.best_epoch >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.best_state, self.stopped_epoch = state["best_state"], state["stopped_epoch"]


@dataclass
class FitResult:
    """How fitting went (fit returns it), or where a resumed run goes on (restore)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    stopped_epoch: int | None = None  # None: ran every requested epoch
    train_seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def best_val_acc(self) -> float:
        """NaN without a validation split."""
        return max((h["val_acc"] for h in self.history if "val_acc" in h), default=float("nan"))


class Unfreezer:
    """The frozen backbone's parameters, set to train once `after` epochs have run (the
    optimizer holds them from the start: without gradients, no step changes them)."""

    def __init__(self, params: list[nn.Parameter], after: int):
        self.params, self.after = params, after

    @classmethod
    def of(cls, model: nn.Module, after: int) -> Unfreezer | None:
        if not after:
            return None
        return cls([p for p in model.parameters() if not p.requires_grad], after)

    def begin(self, epoch: int) -> None:
        if epoch > self.after:
            for p in self.params:
                p.requires_grad_(True)

    def state_dict(self) -> dict:
        return {"after": self.after}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the epoch alone says whether the backbone trains."""


class EpochSums:
    """The training loss, correct answers and images of the epoch in progress (on the
    device, this process's), and `carried`: all processes' totals as of the last mid-epoch
    checkpoint, which is what one saves. Restored, the first process starts from the totals
    and the others from zero, so the epoch's sums still add up to each image once."""

    def __init__(self):
        self.loss = self.correct = None
        self.seen = 0
        self.carried: torch.Tensor | None = None

    def reset(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.seen += seen

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.loss.double(), self.correct.double(),
                            torch.tensor(self.seen, dtype=torch.double, device=self.loss.device)])

    def state_dict(self) -> dict:
        return {"carried": None if self.carried is None else self.carried.cpu()}

    def to(self, device: torch.device) -> None:
        self.loss, self.correct = self.loss.to(device), self.correct.to(device)

    def load_state_dict(self, state: dict) -> None:
        carried = state["carried"]
        if carried is None:
            return
        if distributed.world().rank != 0:
            carried = torch.zeros_like(carried)
        loss, correct, seen = carried.tolist()
        self.loss = torch.tensor(loss, dtype=torch.float32)
        self.correct = torch.tensor(int(correct), dtype=torch.long)
        self.seen = int(seen)


@dataclass
class TrainingState:
    """Everything a run changes as it trains. `state_dict()` / `load_state_dict()` follow the
    protocol torch.distributed.checkpoint calls Stateful and give the keys of checkpoint
    format 2: each part under its field's name, plus the RNG. Every part has a state_dict, so
    a new stateful option is one field here (and where build.py makes it)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DeviceLoader | FeatureLoader  # the training loader: its epoch and shuffling position
    stopper: EarlyStopping = field(default_factory=lambda: EarlyStopping(patience=0))
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    averager: Lookahead | None = None
    unfreezer: Unfreezer | None = None
    sums: EpochSums | None = None  # the epoch in progress (a mid-epoch checkpoint's)

    def begin_epoch(self, epoch: int) -> None:
        if self.unfreezer is not None:
            self.unfreezer.begin(epoch)

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss`, then the schedule and the weight averaging."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.averager is not None:
            self.averager.step()

    def state_dict(self) -> dict:
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**{name: None if part is None else part.state_dict()
                   for name, part in parts.items()},
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def load_state_dict(self, state: dict) -> None:
        """Parts that are optional (None by default) may be absent from `state`; the others
        must be there."""
        for f in fields(self):
            part = getattr(self, f.name)
            if part is None or (f.default is None and state.get(f.name) is None):
                continue
            part.load_state_dict(state[f.name])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def checkpoint_state(cfg, epoch: int, history: list[dict], training: TrainingState) -> dict:
    """Everything a resumed run needs to go on as if it had not stopped: one dict."""
    return {"format": 2, "epoch": epoch, "config": cfg.public_dict(), "history": list(history),
            **training.state_dict()}


def snapshot(obj):
    """A copy of a state whose tensors are on the CPU and no longer shared with training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def restore(ckpt: dict, training: TrainingState) -> FitResult:
    """Load a checkpoint into freshly built training objects; returns the FitResult to start from."""
    training.load_state_dict(ckpt)
    history = list(ckpt["history"])
    return FitResult(history=history, train_seconds=sum(h["epoch_seconds"] for h in history),
                     stopped_epoch=training.stopper.stopped_epoch)
