"""Weight averaging beside the optimizer: airbench's lookahead."""
from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    """Every `every` steps the running average of the weights moves toward the model, and the
    model is set back onto the average; the average's memory grows with the cube of progress
    (0 at the start, `decay` at the end) and training ends on the average. BatchNorm statistics
    are averaged with the weights. Calls to `step` come after each optimizer step."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5,
                 decay: float = 0.95 ** 5):
        self.model = model
        self.total_steps, self.every, self.decay = total_steps, every, decay
        self.steps = 0
        self.average = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                        if v.is_floating_point()}

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.steps >= self.total_steps:
            self._pull(1.0)  # the end: the model takes the average as it is
        elif self.steps % self.every == 0:
            self._pull(self.decay * (self.steps / self.total_steps) ** 3)

    def _pull(self, decay: float) -> None:
        state = self.model.state_dict()
        for name, avg in self.average.items():
            avg.lerp_(state[name].detach(), 1 - decay)
            state[name].copy_(avg)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for name, value in state["average"].items():
            self.average[name].copy_(value)
