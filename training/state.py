"""The stateful objects of a run, held together: one object steps them, saves and restores them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shared.batches import DeviceLoader
from training.averaging import Lookahead
from training.loop import EarlyStopping


@dataclass
class TrainingState:
    """Everything a run changes as it trains. `state_dict()` / `load_state_dict()` follow the
    protocol torch.distributed.checkpoint calls Stateful, and give the keys of the checkpoint
    format 2, so a new stateful option is one field and one line in each."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DeviceLoader  # the training loader: its epoch and shuffling position
    stopper: EarlyStopping = field(default_factory=lambda: EarlyStopping(patience=0))
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    averager: Lookahead | None = None

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
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": _state_of(self.scheduler), "scaler": _state_of(self.scaler),
            "stopper": self.stopper.state_dict(), "averager": _state_of(self.averager),
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name in ("scheduler", "scaler", "averager"):
            part = getattr(self, name)
            if part is not None and state.get(name) is not None:
                part.load_state_dict(state[name])
        self.stopper.load_state_dict(state["stopper"])
        torch.set_rng_state(state["rng"]["torch"])
        self.loader.load_state_dict(state["loader"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _state_of(part) -> dict | None:
    return part.state_dict() if part is not None else None
