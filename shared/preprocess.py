"""Image preprocessing shared by dataset decoding, the training loader and inference.

Every image enters the project through `decode_image` (file -> uint8 RGB at the dataset's
stored size) and reaches a network through `shared.network.InputTransform` (float [0, 1] ->
normalized, resized to the network's input size). Training applies `InputTransform` per batch
on the device; the logged model carries the same module in front of the network, so a
consumer feeds plain [0, 1] images and gets exactly the training-time preprocessing.

No PyTorch here: the app opening a model run by ONNX Runtime, and the model server, decode
and check with this module alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_MEGAPIXELS = 64  # larger images are refused rather than decoded into gigabytes of memory
MAX_IMAGE_SIDE = 1024  # the largest stored or network input side a dataset or model may have
TTA_MODES = ("none", "flip", "flip-translate")  # test-time augmentations (shared.network.TTA)


@dataclass(frozen=True)
class Preprocessing:
    """What a consumer needs to feed a trained model: stored image size, network input size,
    and the normalization the model applies itself."""

    image_size: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tta: str = "none"  # test-time augmentation the model applies itself (TTA_MODES)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(int(d["image_size"]), int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("tta", "none"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (palette, grayscale, 16-bit, CMYK, alpha) to 8-bit RGB, upright by EXIF.
    Transparent areas become white, as a viewer shows them."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """The centered square of side min(width, height), resized to size x size: the same as
    resizing the shorter side to `size` and center-cropping, without ever holding the
    resized whole (a 1 x 1,000,000 image would become 32 x 32,000,000 pixels)."""
    if img.size == (size, size):
        return img
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return img.resize((size, size), Image.Resampling.BILINEAR,
                      box=(left, top, left + side, top + side), reducing_gap=3.0)


def decode_image(source: str | Path | BinaryIO, size: int) -> np.ndarray:
    """Decode an image file to a (3, size, size) uint8 array. Raises OSError (not an image,
    truncated, corrupt) or ValueError (too large) on bad files."""
    with Image.open(source) as img:
        megapixels = img.width * img.height / 1e6
        if megapixels > MAX_MEGAPIXELS:
            raise ValueError(f"image is {img.width}x{img.height} ({megapixels:.0f} megapixels), "
                             f"over the {MAX_MEGAPIXELS}-megapixel limit")
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster for photos
        rgb = fit_square(to_rgb(img), size)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()
