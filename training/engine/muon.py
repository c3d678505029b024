"""Muon (Jordan 2024): momentum whose update is orthogonalised before it is applied.

Every parameter group says whether it is a Muon group. The weights of hidden layers (conv
filters, matrices) go in Muon groups; everything else (biases, normalization, the output
layer) gets Nesterov SGD in the same optimizer, so one scheduler, one checkpoint and the
lookahead average cover both.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.sgd import sgd

# quintic Newton-Schulz coefficients from the Muon write-up: they push every singular value
# toward 1 fast, without needing to converge exactly
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (2-D), approximately: U V^T of its SVD."""
    a, b, c = NS_COEFFICIENTS
    # bf16 matmuls on the GPU; this CPU has no fast bf16, so float32 there
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + 1e-7)  # every singular value at most 1: the iteration converges
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with `muon=True`: (Nesterov) momentum, reshaped to (outputs, inputs), orthogonalised
    and scaled by sqrt(max(1, outputs/inputs)). Their weights either keep a fixed norm
    (`normalize=True`, for weights followed by BatchNorm, whose outputs do not depend on
    the norm: the step then stays the same size relative to the weight) or get decoupled
    weight decay. Other groups: SGD with (Nesterov) momentum and coupled weight decay, as
    torch.optim.SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                    "weight_decay": weight_decay, "muon": False, "normalize": False}
        super().__init__(params, defaults)
        self.ns_steps = ns_steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._sgd_step(group, params)
        return loss

    def _sgd_step(self, group: dict, params: list[torch.Tensor]) -> None:
        # torch's own SGD kernel (foreach on the GPU: a few launches for the whole group)
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"],
            momentum=group["momentum"], lr=group["lr"], dampening=0.0,
            nesterov=group["nesterov"], maximize=False)
        for p, buffer in zip(params, buffers):
            self.state[p]["momentum_buffer"] = buffer

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(p.grad)
            update = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            rows = p.shape[0]
            cols = p.numel() // rows
            if group["normalize"]:
                p.mul_(rows ** 0.5 / (p.norm() + 1e-12))
            elif decay:
                p.mul_(1 - lr * decay)
            update = orthogonalize(update.reshape(rows, cols), self.ns_steps)
            p.add_(update.view_as(p), alpha=-lr * max(1.0, rows / cols) ** 0.5)


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
_PASS_THROUGH = (nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout)


def normalized_weights(model: nn.Module) -> set[int]:
    """ids of the conv and linear weights whose next layer (in definition order, through
    pooling) is a normalization layer: their scale does not change the network's outputs."""
    found, pending = set(), None
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            pending = module.weight
        elif isinstance(module, _NORMS):
            if pending is not None:
                found.add(id(pending))
            pending = None
        elif not isinstance(module, _PASS_THROUGH) and next(module.children(), None) is None:
            pending = None  # an activation or any other leaf between: not scale-free
    return found


def muon_groups(model: nn.Module, lr: float, momentum: float,
                weight_decay: float) -> tuple[list[dict], list[nn.Parameter]]:
    """Muon groups for the hidden layers' weights (every trainable tensor of 2 or more dims but
    the last, the output layer), and the parameters left to SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    hidden = {id(p) for p in matrices[:-1]}
    scale_free = normalized_weights(model)
    groups = []
    for normalize in (True, False):
        chosen = [p for p in matrices if id(p) in hidden and (id(p) in scale_free) == normalize]
        if chosen:
            groups.append({"params": chosen, "lr": lr, "momentum": momentum,
                           "weight_decay": 0.0 if normalize else weight_decay,
                           "muon": True, "normalize": normalize})
    return groups, [p for p in params if id(p) not in hidden]
