"""Datasets: find them, decode them once into a uint8 cache, split them.

Two forms are recognised from what is on disk:
- an image-folder tree: ROOT/train/<class>/* and ROOT/test/<class>/* (Kaggle-style exports,
  cifar2png, a user's own photos). Class names are the folder names.
- torchvision's CIFAR-10 (ROOT/cifar-10-batches-py), downloaded into ROOT when absent.

Decoding 60,000 PNGs takes seconds; loading the cached arrays takes a fraction of one, so the
cache is keyed by the source files' names, sizes and modification times and rebuilt when any
of them changes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.messages import BadInput
from shared.preprocess import IMAGE_SUFFIXES, MAX_IMAGE_SIDE, decode_image

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarlab"


class DatasetError(BadInput):
    """A dataset is missing, incomplete or unreadable; the message says how to fix it."""


@dataclass
class ImageData:
    """A whole dataset as uint8 tensors of shape (N, 3, H, W) with int64 labels."""

    name: str
    form: str  # "image-folder" or "torchvision"
    root: Path
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    fingerprint: str

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


def load_dataset(data_dir: str | Path, *, image_size: int | None = None,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR, download: bool = True,
                 workers: int = 0, log=print) -> ImageData:
    """Load the dataset at `data_dir`, decoding it only if the cache is missing or stale."""
    root = Path(data_dir).expanduser().resolve()
    if _is_image_folder(root):
        form, name, sources = "image-folder", root.name, _folder_sources(root)
    else:
        form, name = "torchvision", "cifar10"
        sources = _torchvision_sources(root, download, log)
    key = _cache_key(form, root, sources, image_size)
    cached = _read_cache(cache_dir, name, key)
    if cached is not None:
        return ImageData(name=name, form=form, root=root, **cached)
    start = time.perf_counter()
    if form == "image-folder":
        arrays = _decode_folder(root, sources, image_size, workers, log)
    else:
        arrays = _read_torchvision(root)
    arrays["fingerprint"] = _fingerprint(arrays)
    log(f"decoded {name}: {len(arrays['train_labels'])} train + {len(arrays['test_labels'])} "
        f"test images in {time.perf_counter() - start:.1f} s")
    _write_cache(cache_dir, name, key, arrays, log)
    return ImageData(name=name, form=form, root=root, **_as_tensors(arrays))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded train/validation split of range(n): (train indices, val indices)."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and (n_val < 1 or n_val >= n):
        raise DatasetError(f"a validation fraction of {val_fraction} leaves no images for "
                           f"{'validation' if n_val < 1 else 'training'} out of {n}; "
                           f"use a value between {1 / n:.3g} and {1 - 1 / n:.3g}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# --- finding the data --------------------------------------------------------------------

def _is_image_folder(root: Path) -> bool:
    train = root / "train"
    if not train.is_dir() or not any(p.is_dir() for p in train.iterdir()):
        return False
    if not (root / "test").is_dir():
        raise DatasetError(f"{root} has train/<class>/ folders but no test/ folder. An image-folder "
                           "dataset needs both train/<class>/* and test/<class>/* (the test set is "
                           "used once, for the final evaluation).")
    return True


def _list_images(split_dir: Path) -> dict[str, list[Path]]:
    classes = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if files:
            classes[class_dir.name] = files
    return classes


def _folder_sources(root: Path) -> dict[str, dict[str, list[Path]]]:
    sources = {split: _list_images(root / split) for split in ("train", "test")}
    train, test = sources["train"], sources["test"]
    if len(train) < 2:
        raise DatasetError(f"{root / 'train'} holds images for {len(train)} class folder(s); a "
                           "classifier needs at least 2 (one sub-folder of images per class).")
    if not test:
        raise DatasetError(f"{root / 'test'} holds no images in class sub-folders "
                           f"(expected test/<class>/*.png or .jpg, with classes {sorted(train)}).")
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise DatasetError(f"{root / 'test'} has classes that train/ lacks: {unknown}. Every test "
                           "class needs training images under train/<class>/.")
    return sources


def _torchvision_sources(root: Path, download: bool, log) -> dict[str, dict[str, list[Path]]]:
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise DatasetError(_missing_cifar_message(root, "it is not there"))
        log(f"CIFAR-10 not found in {root}; downloading it there (170 MB, once)")
        from torchvision.datasets import CIFAR10
        try:
            root.mkdir(parents=True, exist_ok=True)
            CIFAR10(str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise DatasetError(_missing_cifar_message(root, f"the download failed: {exc}")) from exc
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {"cifar10": {"batches": files}}


def _missing_cifar_message(root: Path, reason: str) -> str:
    return (f"CIFAR-10 is not in {root} and {reason}. Either: run again with network access "
            f"(it downloads into --data-dir); or, offline, copy {CIFAR10_ARCHIVE} into {root}; or "
            "point --data-dir at an extracted image-folder copy (a folder holding "
            "train/<class>/*.png and test/<class>/*.png), e.g. "
            "`tar -xzf cifar10-png.tar.gz -C ~/data/cifar10` then `--data-dir ~/data/cifar10`.")


# --- decoding ----------------------------------------------------------------------------

def _decode_one(args: tuple[str, int]) -> np.ndarray | str:
    path, size = args
    try:
        return decode_image(path, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _decode_folder(root: Path, sources, image_size: int | None, workers: int, log) -> dict:
    classes = sorted(sources["train"])
    size = image_size or _first_image_size(sources["train"])
    jobs = {split: [(str(p), classes.index(c)) for c in sorted(per_class)
                    for p in per_class[c]] for split, per_class in sources.items()}
    total = sum(len(v) for v in jobs.values())
    log(f"decoding {total} images from {root} at {size}x{size} (once; later runs use the cache)")
    workers = workers or min(os.cpu_count() or 1, 8)
    arrays, failures = {"classes": classes}, []
    pool = None
    if workers > 1 and total >= 4000:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for split, items in jobs.items():
            args = [(path, size) for path, _ in items]
            results = pool.map(_decode_one, args, chunksize=512) if pool else map(_decode_one, args)
            images = np.empty((len(items), 3, size, size), dtype=np.uint8)
            for i, result in enumerate(results):
                if isinstance(result, str):
                    failures.append(f"{items[i][0]} ({result})")
                else:
                    images[i] = result
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = np.array([label for _, label in items], dtype=np.int64)
    finally:
        if pool:
            pool.shutdown()
    if failures:
        shown = "\n  ".join(failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise DatasetError(f"{len(failures)} image file(s) in {root} could not be read:\n  {shown}"
                           f"{more}\nDelete or replace these files (or re-extract the dataset), "
                           "then run again.")
    return arrays


def _first_image_size(per_class: dict[str, list[Path]]) -> int:
    first = next(iter(per_class.values()))[0]
    try:
        with Image.open(first) as img:
            side = min(img.size)
    except OSError as exc:
        raise DatasetError(f"{first} could not be read ({exc}); delete or replace it.") from exc
    if side > MAX_IMAGE_SIDE:
        raise DatasetError(f"the first image, {first}, is {side} pixels on its shorter side; "
                           f"images are stored at most {MAX_IMAGE_SIDE} pixels wide: pass "
                           "--image-size (e.g. 224)")
    return side


def _read_torchvision(root: Path) -> dict:
    from torchvision.datasets import CIFAR10
    try:
        train, test = (CIFAR10(str(root), train=flag, download=False) for flag in (True, False))
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"the CIFAR-10 files in {root / CIFAR10_FOLDER} are incomplete or corrupt "
                           f"({exc}). Delete that folder and run again to download a fresh copy, or "
                           "point --data-dir at an image-folder copy.") from exc
    return {
        "classes": list(train.classes),
        "train_images": np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)),
        "train_labels": np.asarray(train.targets, dtype=np.int64),
        "test_images": np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)),
        "test_labels": np.asarray(test.targets, dtype=np.int64),
    }


def _fingerprint(arrays: dict) -> str:
    return fingerprint(arrays["classes"], *(arrays[key] for key in _ARRAYS))


def fingerprint(classes: list[str], *arrays) -> str:
    """A dataset's identity: the hash of its class names and image and label arrays."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(classes).encode())
    for array in arrays:
        h.update(np.ascontiguousarray(np.asarray(array)).data)
    return h.hexdigest()


# --- the cache ---------------------------------------------------------------------------

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cache_key(form: str, root: Path, sources, image_size: int | None) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{form}|{root}|{image_size}|v1".encode())
    for split, per_class in sorted(sources.items()):
        for class_name, files in sorted(per_class.items()):
            for path in files:
                st = path.stat()
                h.update(f"{split}/{class_name}/{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_path(cache_dir, name: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "datasets" / f"{name}-{key}"


def _read_cache(cache_dir, name: str, key: str) -> dict | None:
    if cache_dir is None:
        return None
    path = _cache_path(cache_dir, name, key)
    try:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {k: np.load(path / f"{k}.npy") for k in _ARRAYS}
    except (OSError, ValueError):
        return None
    return _as_tensors({**arrays, "classes": meta["classes"], "fingerprint": meta["fingerprint"]})


def _write_cache(cache_dir, name: str, key: str, arrays: dict, log) -> None:
    if cache_dir is None:
        return
    path = _cache_path(cache_dir, name, key)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
        for k in _ARRAYS:
            np.save(tmp / f"{k}.npy", arrays[k])
        meta = {"classes": arrays["classes"], "fingerprint": arrays["fingerprint"]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, path)  # atomic: a reader sees a whole cache or none
    except OSError as exc:
        if not (path / "meta.json").exists():  # else another process wrote the same cache first
            log(f"warning: could not write the dataset cache under {path.parent} ({exc}); "
                "the next run decodes again. Set --cache-dir to a writable folder.")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _as_tensors(arrays: dict) -> dict:
    out = {"classes": list(arrays["classes"]), "fingerprint": arrays["fingerprint"]}
    for k in _ARRAYS:
        out[k] = torch.from_numpy(np.ascontiguousarray(arrays[k]))
    return out
