"""Optimizers and learning-rate schedules by name. `config.py` derives its `--optimizer` and
`--schedule` choices from these registries, so adding one is one entry here."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from training.engine.models import get_spec
from training.engine.muon import Muon, muon_groups

if TYPE_CHECKING:
    from training.engine.config import TrainConfig



def param_groups(cfg: TrainConfig, params: list[nn.Parameter]) -> list[dict]:
    """Weights at the base rate; with bias_lr_scale k, biases and normalization parameters
    (every 1-D tensor) at k times the rate and 1/k the weight decay, so the decay per step
    stays the same (airbench trains its BatchNorm biases this way)."""
    if cfg.bias_lr_scale == 1:
        return [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    groups = [{"params": [p for p in params if p.dim() > 1], "lr": cfg.lr,
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "lr": cfg.lr * cfg.bias_lr_scale,
               "weight_decay": cfg.weight_decay / cfg.bias_lr_scale}]
    return [g for g in groups if g["params"]]


def trainable_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """The trainable parameters' groups (and, with --unfreeze-after, the frozen backbone's,
    which train later). With --backbone-lr-scale k, the backbone's at k times the head's rate."""
    params = [p for p in model.parameters() if p.requires_grad or cfg.unfreeze_after]
    head = get_spec(cfg.model).head
    if cfg.backbone_lr_scale == 1 or head is None:  # TrainConfig.validate refuses the latter
        return param_groups(cfg, params)
    # with cached features the optimizer gets the head alone
    modules = dict(model.named_modules())
    in_head = {id(p) for p in modules.get(head, model).parameters()}
    backbone = param_groups(cfg, [p for p in params if id(p) not in in_head])
    for group in backbone:
        group["lr"] *= cfg.backbone_lr_scale
    return param_groups(cfg, [p for p in params if id(p) in in_head]) + backbone


def sgd(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(trainable_groups(cfg, model), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def adam(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(trainable_groups(cfg, model), lr=cfg.lr)


def adamw(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_groups(cfg, model), lr=cfg.lr)


def muon(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    hidden, rest = muon_groups(model, cfg.muon_lr, cfg.muon_momentum, cfg.weight_decay)
    return Muon(hidden + param_groups(cfg, rest), lr=cfg.lr, momentum=cfg.momentum,
                nesterov=cfg.nesterov)


OPTIMIZERS: dict[str, Callable[[TrainConfig, nn.Module], torch.optim.Optimizer]] = {
    "sgd": sgd, "adam": adam, "adamw": adamw, "muon": muon}


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](cfg, model)


Schedule = torch.optim.lr_scheduler.LRScheduler


def onecycle(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int) -> Schedule | None:
    if total <= 2:  # too short to warm up and anneal
        return None
    # warm up over a quarter of the steps, and over at least two
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, total_steps=total, max_lr=[g["lr"] for g in optimizer.param_groups],
        pct_start=max(0.25, 2 / total),
        cycle_momentum=cfg.optimizer != "muon")  # Muon's momentum is its own setting


def cosine(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int) -> Schedule:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def linear(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int) -> Schedule:
    peak = max(1, int(0.23 * total))

    def factor(step: int) -> float:
        if step < peak:
            return 0.2 + 0.8 * step / peak
        return 1.0 - 0.93 * (step - peak) / max(1, total - peak)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int) -> Schedule:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)


SCHEDULES: dict[str, Callable[[TrainConfig, torch.optim.Optimizer, int], Schedule | None]] = {
    "none": lambda cfg, optimizer, total: None, "onecycle": onecycle, "cosine": cosine,
    "linear": linear, "decay": decay}


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> Schedule | None:
    """Stepped once per batch."""
    return SCHEDULES[cfg.schedule](cfg, optimizer, cfg.epochs * steps_per_epoch)
