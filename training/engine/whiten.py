"""Whitening initialisation of a network's first convolution (after airbench)."""
from __future__ import annotations

import torch
from torch import nn


def first_conv(model: nn.Module) -> nn.Conv2d:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{type(model).__name__} has no convolution to whiten")


@torch.no_grad()
def patch_covariance(images: torch.Tensor, kernel: tuple[int, int], chunk: int = 500) -> torch.Tensor:
    """The second moment of all kernel-sized patches of normalized images (N, C, H, W)."""
    c, (kh, kw) = images.shape[1], kernel
    cov = torch.zeros(c * kh * kw, c * kh * kw, dtype=torch.float64, device=images.device)
    count = 0
    for part in images.split(chunk):
        patches = part.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw).double()
        cov += flat.T @ flat
        count += flat.shape[0]
    return cov / count


@torch.no_grad()
def whiten_first_conv(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> int:
    """Set the first conv's filters to the principal directions of the image patches it sees,
    each scaled to unit variance (and their negatives, so GELU/ReLU keep both signs): its
    outputs start decorrelated, which lets the rest train faster. The filters are frozen when
    they fill the layer; its bias still trains. Returns how many filters were set."""
    conv = first_conv(model)
    c, kh, kw = conv.in_channels, *conv.kernel_size
    eigenvalues, eigenvectors = torch.linalg.eigh(patch_covariance(images, (kh, kw)))
    order = eigenvalues.argsort(descending=True)
    filters = (eigenvectors[:, order].T / (eigenvalues[order] + eps).sqrt()[:, None])
    filters = filters.reshape(-1, c, kh, kw).to(conv.weight.dtype)
    n = min(conv.out_channels // 2, filters.shape[0])
    conv.weight[:2 * n] = torch.cat([filters[:n], -filters[:n]]).to(conv.weight.device)
    if 2 * n == conv.out_channels:
        conv.weight.requires_grad_(False)
    return 2 * n
