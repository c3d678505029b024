"""WebDataset shards: a dataset in any layout written as tar files of encoded images, with a
manifest, and read back into the decoded cache.

A shard is a plain tar of samples `NNNNNNNN.<ext>` (the image file's own bytes, never
re-encoded), `NNNNNNNN.cls` (the class index) and `NNNNNNNN.txt` (the file's name in the
source), NNNNNNNN being the image's row in its split. `manifest.json` beside the shards names
the classes, each split's shards with their first row and count, and a fingerprint of every
image's bytes and label: shards can be copied, served or stored anywhere as whole files.

Reading goes through the `webdataset` package, one shard per decoding process, each image
decoded by `shared.preprocess.decode_image` (as the app and the folders are) straight into its
row of the memory-mapped cache. A shard that cannot be read is named, and its missing images
are counted against --max-skipped like unreadable files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from shared.preprocess import decode_image
from training.engine.layouts import DatasetError, Found, held_out

MANIFEST = "manifest.json"
FORMAT = "cifarlab-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


SHUFFLE_SEED = 0  # the training images' order in the shards: fixed, so shards are reproducible
BASE = "base.txt"  # beside a remote manifest's local copy: where its shards are


def is_shards(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def is_remote(data_dir: str) -> bool:
    """A URL webdataset opens (http(s)://, gs://, s3 through pipe:, hf://, ...), not a folder."""
    return data_dir.startswith("pipe:") or (
        re.match(r"^[a-z][a-z0-9+.-]*://", data_dir) is not None and not data_dir.startswith("file://"))


def shard_url(base: str, name: str) -> str:
    """`name`'s URL under `base`: a pipe: command has {} where the file name goes."""
    if base.startswith("pipe:"):
        return base.replace("{}", name)
    return f"{base.rstrip('/')}/{name}"


BRACES = re.compile(r"\{\d+\.\.\d+\}")


def local_root(data_dir: str, cache_dir: str | Path | None) -> Path:
    """The folder `data_dir` names; for remote shards, a local folder holding a copy of their
    manifest (rewritten only when it changes, so the decoded cache stays valid) and where the
    shards are. A brace pattern of shard names, as webdataset takes them
    (`.../train-{000000..000044}.tar`), names the folder they are in, with their manifest:
    the shards it names must be the manifest's."""
    head, _, tail = data_dir.rstrip("/").rpartition("/")
    if head and BRACES.search(tail):
        root = local_root(head, cache_dir)
        _check_pattern(root, tail, data_dir)
        return root
    if not is_remote(data_dir):
        return Path(data_dir.removeprefix("file://")).expanduser().resolve()
    if data_dir.startswith("pipe:") and "{}" not in data_dir:
        raise DatasetError(f"--data-dir {data_dir}: a pipe: command names each file with {{}}, "
                           "e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -'")
    import webdataset as wds
    try:
        with wds.gopen(shard_url(data_dir, MANIFEST), "rb") as stream:
            data = stream.read()
        json.loads(data)
    except Exception as exc:  # noqa: BLE001 - whatever the scheme raises: say what was asked
        raise DatasetError(f"cannot read {MANIFEST} at {shard_url(data_dir, MANIFEST)} "
                           f"({type(exc).__name__}: {exc}); check the URL, or copy the shards "
                           "and their manifest to a folder") from None
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", data_dir.replace("{}", "").rstrip("/ -").rsplit("/", 1)[-1])
    digest = hashlib.blake2b(data_dir.encode(), digest_size=6).hexdigest()
    root = Path(cache_dir or tempfile.gettempdir()).expanduser() / "remote" / f"{tail or 'shards'}-{digest}"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MANIFEST).is_file() or (root / MANIFEST).read_bytes() != data:
        (root / MANIFEST).write_bytes(data)
    (root / BASE).write_text(data_dir)
    return root


def _check_pattern(root: Path, pattern: str, data_dir: str) -> None:
    from braceexpand import braceexpand

    named = {shard["name"] for split in read_manifest(root)["splits"].values()
             for shard in split["shards"]}
    unknown = [name for name in braceexpand(pattern) if name not in named]
    if unknown:
        raise DatasetError(f"--data-dir {data_dir} names {len(unknown)} shard(s) that its "
                           f"manifest does not ({', '.join(unknown[:3])}): every split's shards "
                           "are read from the manifest, so give their folder or URL alone")


def shard_source(root: Path, name: str) -> str:
    """Where a shard of the shards at `root` is read from: beside the manifest, or under the
    URL a remote manifest came from."""
    base = root / BASE
    return shard_url(base.read_text(), name) if base.is_file() else str(root / name)


def read_manifest(root: Path) -> dict:
    """The manifest of the shards at `root`, checked enough that reading them cannot go wrong
    later: one line says what is wrong otherwise."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        classes, splits = manifest["classes"], manifest["splits"]
        if manifest.get("format") != FORMAT or "train" not in splits or "test" not in splits:
            raise ValueError("not this project's shards, or no train and test splits")
        for split in splits.values():
            for shard in split["shards"]:
                if Path(shard["name"]).name != shard["name"]:
                    raise ValueError(f"shard name {shard['name']!r} is not a file name")
                int(shard["first"]), int(shard["count"])
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("no class names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a readable shards manifest ({exc}); write the shards "
                           "again with python -m training.shards SRC OUT") from None
    return manifest


def found_shards(root: Path) -> Found:
    """Shards as a layout: each split's shard files, in order, with the first row of each."""
    manifest = read_manifest(root)
    splits = {name: [(root / shard["name"], int(shard["first"])) for shard in split["shards"]]
              for name, split in manifest["splits"].items()}
    missing = [] if (root / BASE).is_file() else [
        path.name for items in splits.values() for path, _ in items if not path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} shard(s) named in {root / MANIFEST} are missing "
                           f"({', '.join(missing[:5])}): copy them beside the manifest")
    return Found("shards", root, list(manifest["classes"]), splits)


# --- writing ---------------------------------------------------------------------------------

Sample = tuple[str, str, Callable[[], bytes], int]  # name, extension, its bytes, label


def _samples(found: Found, split: str, arrays: dict | None) -> list[Sample]:
    """(name, extension, a reader of its encoded bytes, label) of each image of `split`, in
    order; CIFAR-10's arrays (`arrays`) encoded as PNG when read."""
    if arrays is not None:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        return [(f"{split}/{i:05d}.png", "png", partial(_png, images[i]), int(label))
                for i, label in enumerate(labels)]
    samples = []
    for path, label in found.splits[split]:
        ext = path.suffix.lower().lstrip(".")
        samples.append((found.relative(path), ext if ext in IMAGE_EXTENSIONS else "img",
                        path.read_bytes, label))
    return samples


def _png(image: np.ndarray) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(out, "PNG")
    return out.getvalue()


def _splits(found: Found, arrays: dict | None, classes: list[str],
            val_fraction: float) -> dict[str, list[Sample]]:
    """Each split's samples as they are written: a validation split held out of the training
    images by file name (as the test split of class folders is) where the source has none,
    and the training images in a fixed shuffled order, so that a shard, or a stream's
    shuffle buffer, holds every class, never one class after another."""
    names = ["train", "test"] if arrays else [s for s in ("train", "val", "test") if s in found.splits]
    splits = {split: _samples(found, split, arrays) for split in names}
    if "val" not in splits and val_fraction > 0:
        held = held_out([(name, label) for name, _, _, label in splits["train"]], val_fraction,
                        classes, "validation")
        splits["val"] = [sample for sample in splits["train"] if sample[0] in held]
        splits["train"] = [sample for sample in splits["train"] if sample[0] not in held]
    random.Random(SHUFFLE_SEED).shuffle(splits["train"])
    return {split: splits[split] for split in ("train", "val", "test") if split in splits}


def _shorter_side(data: bytes) -> int | None:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            return min(image.size)
    except (OSError, ValueError, SyntaxError):
        return None


def write_shards(found: Found, out: Path, per_shard: int = 1000, val_fraction: float = 0.1,
                 log=print) -> dict:
    """Write `found` as shards of `per_shard` images each into the new or empty folder `out`,
    its splits as `_splits` makes them; the manifest is written last, so a folder with one
    holds whole shards. It also keeps the median shorter side of the training images (every
    16th), which sets the stored size."""
    import webdataset as wds

    from training.engine.data import read_torchvision

    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty: the shards go into a new or empty folder "
                           "(nothing in it was changed)")
    arrays = read_torchvision(found.root) if found.layout == "torchvision" else None
    classes = arrays["classes"] if arrays else found.classes
    splits = _splits(found, arrays, classes, val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(classes).encode())
    manifest = {"format": FORMAT, "version": 1, "classes": classes, "layout": found.layout,
                "source": str(found.root), "splits": {}}
    sides = []
    written = int(time.time())  # whole seconds: a float adds a pax header to every member
    try:
        for split, samples in splits.items():
            shards, counts, writer = [], [0] * len(classes), None
            for row, (name, ext, read, label) in enumerate(samples):
                data = read()
                if row % per_shard == 0:
                    if writer:
                        writer.close()
                    shards.append({"name": f"{split}-{len(shards):06d}.tar", "first": row, "count": 0})
                    writer = wds.TarWriter(str(partial / shards[-1]["name"]), mtime=written)
                writer.write({"__key__": f"{row:08d}", ext: data, "cls": label, "txt": name})
                shards[-1]["count"] += 1
                counts[label] += 1
                h.update(f"{split}|{label}|".encode() + hashlib.blake2b(data, digest_size=16).digest())
                if split == "train" and row % 16 == 0:
                    sides.append(_shorter_side(data))
            if writer:
                writer.close()
            manifest["splits"][split] = {"count": sum(counts), "shards": shards,
                                         "class_counts": dict(zip(classes, counts))}
            log(f"shards: {split}, {sum(counts)} images in {len(shards)} shard(s)")
        sides = sorted(side for side in sides if side)
        manifest["median_side"] = [sides[(len(sides) - 1) // 2] if sides else 32, len(sides)]
        manifest["fingerprint"] = h.hexdigest()
        for shard in sorted(partial.iterdir()):
            os.replace(shard, out / shard.name)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


# --- reading into the decoded cache ------------------------------------------------------------

def read_shard(url: str) -> Iterator[tuple[dict, bytes | None]]:
    """One shard's samples in order, each with its image's bytes (None if it has none). The
    caller reads exactly this shard: no splitting by node or worker here."""
    import webdataset as wds

    samples = wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None,
                             workersplitter=None)
    for sample in samples:
        yield sample, next((sample[k] for k in sample if k in IMAGE_EXTENSIONS or k == "img"), None)


def decode_shard(args: tuple[str, int, str, int, int]) -> tuple[list[tuple[int, int, str]], str | None]:
    """Decode one shard's images into their rows of the .npy file at `target` (memory-mapped
    here, in the worker): (row, label, name) of each image written, and why the shard ended
    early, if it did. An image that cannot be decoded is left out, its row absent."""
    url, size, target, first, count = args
    out = np.load(target, mmap_mode="r+")
    kept, why = [], None
    try:
        for sample, data in read_shard(url):
            try:
                row, label = int(sample["__key__"]), int(sample["cls"])
                if not first <= row < first + count or data is None:
                    continue
                out[row] = decode_image(io.BytesIO(data), size)
            except (OSError, ValueError, KeyError, SyntaxError) as exc:
                why = why or f"an image or label that cannot be read ({type(exc).__name__})"
                continue
            kept.append((row, label, sample.get("txt", b"").decode(errors="replace")))
    except (OSError, EOFError, tarfile.TarError) as exc:  # a truncated or foreign tar
        why = f"the shard is damaged or cut short ({type(exc).__name__})"
    out.flush()
    del out
    return kept, why
