"""Optimizers and learning-rate schedules by name, registered as data. Each takes what it uses:
an optimizer the model and an OptimizerSettings, a schedule the optimizer and its step count.
`config.py` derives its `--optimizer` and `--schedule` choices from these registries, and
`build.optimizer_for` / `build.schedule_for` adapt a TrainConfig to them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.engine.muon import Muon, muon_groups


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizers read. `head` names the head module: with backbone_lr_scale k the
    rest trains at k times the rate. `include_frozen` adds the parameters frozen now, which
    train later (--unfreeze-after)."""

    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    bias_lr_scale: float = 1.0
    backbone_lr_scale: float = 1.0
    head: str | None = None
    include_frozen: bool = False
    muon_lr: float = 0.02
    muon_momentum: float = 0.95


def param_groups(s: OptimizerSettings, params: list[nn.Parameter]) -> list[dict]:
    """Weights at the base rate; with bias_lr_scale k, biases and normalization parameters
    (every 1-D tensor) at k times the rate and 1/k the weight decay, so the decay per step
    stays the same (airbench trains its BatchNorm biases this way)."""
    if s.bias_lr_scale == 1:
        return [{"params": params, "lr": s.lr, "weight_decay": s.weight_decay}]
    groups = [{"params": [p for p in params if p.dim() > 1], "lr": s.lr,
               "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "lr": s.lr * s.bias_lr_scale,
               "weight_decay": s.weight_decay / s.bias_lr_scale}]
    return [g for g in groups if g["params"]]


def trainable_groups(s: OptimizerSettings, model: nn.Module) -> list[dict]:
    """The trainable parameters' groups (and, with --unfreeze-after, the frozen backbone's,
    which train later). With --backbone-lr-scale k, the backbone's at k times the head's rate."""
    params = [p for p in model.parameters() if p.requires_grad or s.include_frozen]
    if s.backbone_lr_scale == 1 or s.head is None:  # TrainConfig.validate refuses the latter
        return param_groups(s, params)
    # with cached features the optimizer gets the head alone
    modules = dict(model.named_modules())
    in_head = {id(p) for p in modules.get(s.head, model).parameters()}
    backbone = param_groups(s, [p for p in params if id(p) not in in_head])
    for group in backbone:
        group["lr"] *= s.backbone_lr_scale
    return param_groups(s, [p for p in params if id(p) in in_head]) + backbone


def sgd(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(trainable_groups(s, model), lr=s.lr, momentum=s.momentum,
                           nesterov=s.nesterov and s.momentum > 0)


def adam(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(trainable_groups(s, model), lr=s.lr)


def adamw(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_groups(s, model), lr=s.lr)


def muon(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    hidden, rest = muon_groups(model, s.muon_lr, s.muon_momentum, s.weight_decay)
    return Muon(hidden + param_groups(s, rest), lr=s.lr, momentum=s.momentum,
                nesterov=s.nesterov)


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimizerSettings], torch.optim.Optimizer]] = {
    "sgd": sgd, "adam": adam, "adamw": adamw, "muon": muon}


def make_optimizer(name: str, model: nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](model, settings)


Schedule = torch.optim.lr_scheduler.LRScheduler


def onecycle(optimizer: torch.optim.Optimizer, total: int) -> Schedule | None:
    if total <= 2:  # too short to warm up and anneal
        return None
    # warm up over a quarter of the steps, and over at least two
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, total_steps=total, max_lr=[g["lr"] for g in optimizer.param_groups],
        pct_start=max(0.25, 2 / total),
        cycle_momentum=not isinstance(optimizer, Muon))  # Muon's momentum is its own setting


def cosine(optimizer: torch.optim.Optimizer, total: int) -> Schedule:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def linear(optimizer: torch.optim.Optimizer, total: int) -> Schedule:
    peak = max(1, int(0.23 * total))

    def factor(step: int) -> float:
        if step < peak:
            return 0.2 + 0.8 * step / peak
        return 1.0 - 0.93 * (step - peak) / max(1, total - peak)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay(optimizer: torch.optim.Optimizer, total: int) -> Schedule:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int], Schedule | None]] = {
    "none": lambda optimizer, total: None, "onecycle": onecycle, "cosine": cosine,
    "linear": linear, "decay": decay}


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, total: int) -> Schedule | None:
    """`total` steps; stepped once per batch."""
    return SCHEDULES[name](optimizer, total)
