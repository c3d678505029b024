"""The PyTorch side of preprocessing: the modules a logged model carries in front of its
network (normalisation and resizing, test-time augmentation, the calibration temperature) and
the batch resize of stored images. Decoding, and what a model's metadata says, are in
shared.preprocess, which needs no PyTorch."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shared.preprocess import TTA_MODES, Preprocessing


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) images resized to (N, 3, size, size), bilinear, still uint8."""
    if images.shape[-1] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=size < images.shape[-1])
    return resized.round().clamp(0, 255).to(torch.uint8)


class InputTransform(nn.Module):
    """float images in [0, 1] at the stored size -> normalized network input."""

    def __init__(self, prep: Preprocessing):
        super().__init__()
        self.input_size = prep.input_size
        self.resize = prep.input_size != prep.image_size
        self.register_buffer("mean", torch.tensor([prep.mean], dtype=torch.float32)[..., None, None])
        self.register_buffer("std", torch.tensor([prep.std], dtype=torch.float32)[..., None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.resize:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
        return x


def flip_views(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The scores of `x` and its mirror image, averaged."""
    return 0.5 * (net(x) + net(x.flip(3)))


def flip_translate_views(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mirrored pair, and the mirrored pair shifted one pixel up-left and down-right
    (reflect-padded), weighted half and half."""
    pair = flip_views(net, x)
    h, w = x.shape[2], x.shape[3]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
    moved = sum(flip_views(net, s) for s in shifted) / len(shifted)
    return 0.5 * pair + 0.5 * moved


def plain_view(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


# test-time augmentation by name (the names are shared.preprocess.TTA_MODES, which a model's
# metadata is checked against without PyTorch): the views a model's scores are averaged over
TTA: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = dict(
    zip(TTA_MODES, (plain_view, flip_views, flip_translate_views), strict=True))


def tta_logits(net: nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """The network's scores averaged over the views of `x` that TTA[mode] takes."""
    return TTA[mode](net, x)


class Classifier(nn.Module):
    """The network with its preprocessing in front (and its test-time augmentation around
    it), its scores divided by the calibration `temperature`: what gets logged and served."""

    def __init__(self, net: nn.Module, prep: Preprocessing, temperature: float = 1.0):
        super().__init__()
        self.transform = InputTransform(prep)
        self.net = net
        self.tta = prep.tta
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.net, self.transform(x), self.tta) / self.temperature
