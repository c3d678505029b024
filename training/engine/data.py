"""Datasets: decode them once into a uint8 cache, split them, and measure them.

`layouts.find_layout` says where the files are and how they are labelled; this module decodes
them (every image through `shared.preprocess.decode_image`, as the app does) into one uint8
array per split and caches the arrays. Decoding 60,000 PNGs takes seconds; loading the cached
arrays a fraction of one, so the cache is keyed by the files' names, labels, sizes and
modification times and rebuilt when any of them changes.

Files that cannot be read are skipped and listed (the caller decides how many are too many);
the same image under two classes, or in two splits, is reported. Memory stays close to the
images' own size: each split is decoded into its own array, rows are moved in place rather
than copied, and statistics are taken in chunks of a fixed number of pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.files import not_readable
from shared.preprocess import MAX_IMAGE_SIDE, decode_image
from shared.progress import report
from training.engine.layouts import (
    CARVED,
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    DatasetError,
    Found,
    Source,
    find_layout,
)
from training.engine.shards import MANIFEST, decode_shard, local_root, read_manifest, shard_source

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarlab"
SPLITS = ("train", "val", "test")
__all__ = ["CIFAR10_ARCHIVE", "CIFAR10_FOLDER", "DatasetError", "ImageData", "load_dataset",
           "load_found", "decode_files", "split_indices", "stratified_split", "channel_stats",
           "fingerprint"]


@dataclass
class ImageData:
    """A whole dataset as uint8 tensors of shape (N, 3, H, W) with int64 labels; `val_*` only
    where the dataset gives its own validation split. `files` names each split's rows (paths
    relative to the root) for folder layouts."""

    name: str
    layout: str
    root: Path
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    fingerprint: str
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    files: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[list[str]] = field(default_factory=list)  # [name, why] of unreadable files
    duplicates: list[str] = field(default_factory=list)  # the same image twice, in words
    listed: int = 0  # image files found, the skipped ones included

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def form(self) -> str:
        return "torchvision" if self.layout == "torchvision" else "image-folder"

    @property
    def carved(self) -> bool:
        """Whether this project held out the test split (a layout with no test/ of its own)."""
        return self.layout in CARVED


def load_dataset(data_dir: str | Path, *, image_size: int | None = None,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR, download: bool = True,
                 workers: int = 0, log=print, labels: str | Path | None = None,
                 test_fraction: float = 0.1, mapped: bool = False) -> ImageData:
    """The dataset at `data_dir`, in whichever layout it is, decoded at `image_size` (default:
    the median shorter side of its images); `mapped` as `load_found` says."""
    root = local_root(str(data_dir), cache_dir)
    found = find_layout(Source(root, Path(labels).expanduser().resolve() if labels else None,
                               test_fraction))
    size = image_size or min(median_side(found)[0], MAX_IMAGE_SIDE)
    return load_found(found, size, cache_dir=cache_dir, download=download, workers=workers,
                      log=log, mapped=mapped)


def load_found(found: Found, image_size: int, *, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
               download: bool = True, workers: int = 0, log=print, mapped: bool = False) -> ImageData:
    """Decode `found` at `image_size`, unless the cache holds it already. `mapped` leaves the
    images in the cache's files, memory-mapped (read from disk as batches need them), instead
    of reading them into memory."""
    for note in found.notes:
        log(note)
    if found.layout == "torchvision":
        name, sources = "cifar10", cifar10_files(found.root, download, log)
    elif found.layout == "shards":  # the shards' files, and the manifest (for remote ones)
        name, sources = found.root.name, {split: [(path.name, "", path) for path, _ in items]
                                          for split, items in found.splits.items()}
        sources["manifest"] = [(MANIFEST, "", found.root / MANIFEST)]
    else:
        name, sources = found.root.name, {split: [(found.relative(p), found.classes[label], p)
                                                  for p, label in items]
                                          for split, items in found.splits.items()}
    path = (None if cache_dir is None else
            _cache_path(cache_dir, name, _cache_key(found.layout, found.root, sources, image_size)))
    cached = _read_cache(path, mapped, log) if path is not None else None
    if cached is None:
        with _new_cache(path, log) as folder:
            _build_cache(found, name, image_size, workers, folder, log)
            path = _publish(folder, path, log)
            cached = _read_cache(path or folder, mapped, log)
    if cached is None:
        raise DatasetError(f"the decoded images of {found.root} could not be read back from "
                           f"{path}; check the disk has room, or set --cache-dir elsewhere")
    return ImageData(name=name, layout=found.layout, root=found.root, **cached)


def _build_cache(found: Found, name: str, image_size: int, workers: int, folder: Path,
                 log) -> None:
    """Decode into `folder`: the image files first (written as they are decoded), then the
    labels and meta.json."""
    start = time.perf_counter()
    if found.layout == "torchvision":
        arrays = read_torchvision(found.root)
    elif found.layout == "shards":
        arrays = _decode_shards(found, image_size, workers, log, folder)
    else:
        arrays = _decode_found(found, image_size, workers, log, folder)
    checksum, derived = _digests(arrays, carved=found.carved)
    arrays.update(checksum=checksum, carved=found.carved, derived=not arrays.get("fingerprint"))
    arrays["fingerprint"] = arrays.get("fingerprint") or derived
    counts = " + ".join(f"{len(arrays[f'{s}_labels'])} {s}" for s in SPLITS if f"{s}_labels" in arrays)
    log(f"decoded {name}: {counts} images in {time.perf_counter() - start:.1f} s")
    splits = [s for s in SPLITS if f"{s}_images" in arrays]
    for s in splits:
        if not isinstance(arrays[f"{s}_images"], np.memmap):  # torchvision's, in memory
            np.save(folder / f"{s}_images.npy", arrays[f"{s}_images"])
        np.save(folder / f"{s}_labels.npy", arrays[f"{s}_labels"])
    meta = {"splits": splits, **{k: arrays.get(k, _EMPTY.get(k)) for k in _META}}
    (folder / "meta.json").write_text(json.dumps(meta))
    for journal in folder.glob("*.journal"):  # the cache is whole
        journal.unlink()


def median_side(found: Found, sample: int = 256) -> tuple[int, int]:
    """The median shorter side of (an even sample of) the dataset's images, and how many
    were measured; CIFAR-10 is 32, shards say theirs. Only the files' headers are read."""
    if found.layout == "torchvision":
        return 32, 0
    if found.layout == "shards":
        return tuple(read_manifest(found.root)["median_side"])
    files = found.all_files()
    step = max(1, len(files) // sample)
    sides = []
    for path in files[::step]:
        if not_readable(path):  # a pipe would block the open
            continue
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    if not sides:
        raise DatasetError(f"none of the {len(files[::step])} images sampled in {found.root} "
                           "could be read; check that the files are images")
    return int(statistics.median_low(sides)), len(sides)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded train/validation split of range(n): (train indices, val indices)."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and (n_val < 1 or n_val >= n):
        raise DatasetError(f"a validation fraction of {val_fraction} leaves no images for "
                           f"{'validation' if n_val < 1 else 'training'} out of {n}; "
                           f"use a value between {1 / n:.3g} and {1 - 1 / n:.3g}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int,
                     classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/validation split that holds out round(n x fraction) of each class (at
    least one): (train indices, val indices), sorted. A class too small for both is named."""
    if val_fraction == 0:
        return torch.arange(len(labels)), torch.arange(0)
    generator = torch.Generator().manual_seed(seed)
    val, small = [], []
    for label in range(len(classes)):
        members = (labels == label).nonzero().squeeze(1)
        if len(members) == 0:
            continue
        n_val = max(1, round(len(members) * val_fraction))
        if len(members) - n_val < 1:
            small.append(f"{classes[label]} ({len(members)} training image(s))")
            continue
        val.append(members[torch.randperm(len(members), generator=generator)[:n_val]])
    if small:
        raise DatasetError(f"class(es) with too few images for both the training and the "
                           f"validation split: {', '.join(small)}. Add images, remove those "
                           "folders, or pass --val-fraction 0")
    val_idx = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().squeeze(1), val_idx


def pack_rows(array: np.ndarray, rows: np.ndarray, block: int = 256) -> int:
    """Move array[rows] (sorted row indices) to the front of `array`, in order, in place, and
    return how many: no copy of the whole, at most `block` rows buffered at a time."""
    write = 0
    for start in range(0, len(rows), block):
        part = rows[start:start + block]
        for run in np.split(part, np.flatnonzero(np.diff(part) != 1) + 1):
            first, n = int(run[0]), len(run)
            if first != write:
                array[write:write + n] = array[first:first + n]
            write += n
    return write


def train_then_val(images: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor,
                   val_idx: torch.Tensor) -> int:
    """Reorder images and labels in place so the training rows come first and the validation
    rows after them (each in order): both splits are then views, not copies. Returns the
    number of training rows."""
    for tensor in (images, labels):
        array = tensor.numpy()
        val_rows = array[val_idx.numpy()].copy()
        n_train = pack_rows(array, train_idx.numpy())
        array[n_train:n_train + len(val_rows)] = val_rows
    return len(train_idx)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale, in chunks of about 4
    million pixels: memory stays flat whatever the dataset's size."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    per_chunk = max(1, (1 << 22) // max(1, images.shape[2] * images.shape[3]))
    for chunk in images.split(per_chunk):
        x = chunk.to(torch.float32).div_(255)
        total += x.sum(dim=(0, 2, 3), dtype=torch.float64)
        total_sq += x.square_().sum(dim=(0, 2, 3), dtype=torch.float64)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# --- torchvision's CIFAR-10 --------------------------------------------------------------

def cifar10_files(root: Path, download: bool, log) -> dict[str, list]:
    """torchvision's CIFAR-10 batch files under `root` (downloaded there if asked), as the
    cache key's sources."""
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
    return {"cifar10": [(p.name, "batches", p) for p in files]}


def _missing_cifar_message(root: Path, reason: str) -> str:
    return (f"CIFAR-10 is not in {root} and {reason}. Either: run again with network access "
            f"(it downloads into --data-dir); or, offline, copy {CIFAR10_ARCHIVE} into {root}; or "
            "point --data-dir at an extracted image-folder copy (a folder holding "
            "train/<class>/*.png and test/<class>/*.png), e.g. "
            "`tar -xzf cifar10-png.tar.gz -C ~/data/cifar10` then `--data-dir ~/data/cifar10`.")


# --- decoding ---------------------------------------------------------------------------

DECODE_CHUNK = 64  # files per task of a decoding worker


def _decode_one(args: tuple[str, int]) -> tuple[np.ndarray, str] | str:
    """(image, hash of the file's bytes), or why the file could not be read."""
    path, size = args
    why = not_readable(path)
    if why:
        return why.removeprefix("skipped: ")
    try:
        data = Path(path).read_bytes()
        if not data:
            return "an empty file"
        return decode_image(io.BytesIO(data), size), hashlib.blake2b(data, digest_size=16).hexdigest()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _decode_rows(args: tuple[list[str], int, str, int]) -> list[tuple[str | None, str | None]]:
    """Decode `paths` straight into rows `first`... of the .npy file at `target` (memory-mapped
    here, in the worker): nothing but (hash, None) or (None, why) per file comes back."""
    paths, size, target, first = args
    out = np.load(target, mmap_mode="r+")
    results = []
    for row, path in enumerate(paths, start=first):
        result = _decode_one((path, size))
        if isinstance(result, str):
            results.append((None, result))
        else:
            out[row], digest = result
            results.append((digest, None))
    out.flush()
    del out
    return results


@dataclass
class Decoded:
    """One list of files decoded: the readable ones' images packed at the front of `images`
    (rows `kept` of the list), each one's hash of bytes, and why the others failed."""

    images: np.ndarray
    kept: list[int]
    digests: list[str]
    failed: list[tuple[int, str]]


class DecodeKilled(DatasetError):
    """A decoding process died (the system killed it, most often for lack of memory)."""


def killed(done: int, total: int) -> DecodeKilled:
    return DecodeKilled(
        f"a process decoding the images was killed after {done} of {total} were decoded, most "
        "likely for lack of memory (nothing in the dataset's folder was changed; the images "
        "decoded are kept, and the next run goes on from them). Run again with "
        "--decode-workers 1, or free memory; the training itself then reads the images from "
        "disk with --data-on-device no")


class Journal:
    """The results of a decoding's finished tasks, one JSON line each, appended as they
    finish (after their rows are flushed to the images file): a decoding killed midway goes
    on from them. The first line names what is decoded; "packing" then "packed" mark the rows
    being moved to the front, after which the file is whole. A journal of something else, or
    one cut while packing, is started afresh."""

    def __init__(self, path: Path, header: dict):
        self.path, self.done, self.packed = path, {}, False
        entries = []
        try:
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[0]) == header:
                for line in lines[1:]:
                    entries.append(json.loads(line))
        except (OSError, ValueError):  # none, or its last line cut short by the kill
            pass
        marks = [key for key, _ in entries if key in ("packing", "packed")]
        if marks == ["packing", "packed"]:
            self.packed = True
        if not marks or self.packed:
            self.done = {key: result for key, result in entries if key not in ("packing", "packed")}
        with open(path, "w") as out:
            out.write(json.dumps(header) + "\n")
            out.writelines(json.dumps([key, result]) + "\n" for key, result in self.done.items())
            if self.packed:
                out.write('["packing", null]\n["packed", null]\n')
        self.file = open(path, "a")

    def record(self, key, result) -> None:
        self.file.write(json.dumps([key, result]) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def decode_files(paths: list[Path], size: int, pool: ProcessPoolExecutor | None = None,
                 target: Path | None = None) -> Decoded:
    """Decode `paths` at `size` into the uint8 .npy file `target`, each worker writing its
    rows in place through a memory map: the images are never all in memory, and never
    copied. Unreadable files are left out (the readable ones packed to the front) and said
    why. With no `target`, the images come back in memory."""
    if target is None:
        with tempfile.TemporaryDirectory(prefix="cifarlab-decode-") as folder:
            decoded = decode_files(paths, size, pool, Path(folder) / "images.npy")
            decoded.images = np.array(decoded.images)
            return decoded
    names = hashlib.blake2b("\n".join(map(str, paths)).encode("utf-8", "surrogateescape"),
                            digest_size=16).hexdigest()
    journal = resumed_journal(target, {"files": names, "count": len(paths), "size": size})
    starts = range(0, len(paths), DECODE_CHUNK)
    tasks = [([str(p) for p in paths[i:i + DECODE_CHUNK]], size, str(target), i)
             for i in starts if i not in journal.done]
    try:
        results = pool.map(_decode_rows, tasks) if pool else map(_decode_rows, tasks)
        for (_, _, _, first), chunk in zip(tasks, results):
            journal.record(first, chunk)
            journal.done[first] = chunk
            report("stage", stage="decoding", done=sum(map(len, journal.done.values())),
                   total=len(paths))
    except BrokenProcessPool as exc:
        raise killed(sum(len(chunk) for chunk in journal.done.values()), len(paths)) from exc
    finally:
        journal.close()
    decoded = Decoded(np.empty(0, np.uint8), [], [], [])
    for first in starts:
        for i, (digest, why) in enumerate(journal.done[first], start=first):
            if why is None:
                decoded.kept.append(i)
                decoded.digests.append(digest)
            else:
                decoded.failed.append((i, why))
    decoded.images = packed_once(journal, target, decoded.kept)
    return decoded


def resumed_journal(target: Path, header: dict) -> Journal:
    """The journal of decoding into `target`: what an interrupted decoding left, where it
    left its images file too; else a new one, with a new, empty images file."""
    path = target.with_name(target.name + ".journal")
    if not target.is_file():
        path.unlink(missing_ok=True)
    journal = Journal(path, header)
    if not journal.done:
        _empty_images(target, header["count"], header["size"])
    return journal


def packed_once(journal: Journal, target: Path, rows: list[int]) -> np.ndarray:
    """`_packed`, marked in the journal before and after: a run killed while packing decodes
    again, one that packed reads the packed file."""
    if journal.packed:
        return np.load(target, mmap_mode="r+")[:len(rows)]
    with open(journal.path, "a") as out:
        out.write('["packing", null]\n')
    images = _packed(target, rows)
    with open(journal.path, "a") as out:
        out.write('["packed", null]\n')
    return images


def _empty_images(target: Path, n: int, size: int) -> None:
    """A uint8 .npy file of `n` images, to be filled in place by the decoding processes."""
    np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(n, 3, size, size)).flush()


def _packed(target: Path, rows: list[int]) -> np.ndarray:
    """The .npy file at `target` with its rows `rows` (sorted) moved to the front, in place:
    a memory-mapped view of them."""
    images = np.load(target, mmap_mode="r+")
    return images[:pack_rows(images, np.array(rows, dtype=np.int64))]


def decode_pool(n_files: int, workers: int = 0) -> ProcessPoolExecutor | None:
    """Worker processes for decoding many files; None (decode here) for a few."""
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and n_files >= 4000:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return None


def _decode_found(found: Found, size: int, workers: int, log, folder: Path) -> dict:
    """Each split into its own uint8 .npy file in `folder`; unreadable files left out and
    listed."""
    total = sum(len(items) for items in found.splits.values())
    log(f"decoding {total} images from {found.root} ({found.layout}) at {size}x{size} "
        "(once; later runs use the cache)")
    arrays = {"classes": found.classes, "files": {}, "skipped": [], "listed": total}
    seen: dict[str, tuple[str, str, str]] = {}  # file hash -> (name, split, class) first seen
    duplicates = []
    pool = decode_pool(total, workers)
    try:
        for split, items in found.splits.items():
            decoded = decode_files([path for path, _ in items], size, pool,
                                   folder / f"{split}_images.npy")
            names = [found.relative(path) for path, _ in items]
            arrays["skipped"] += [[names[i], why] for i, why in decoded.failed]
            if not decoded.kept:
                raise DatasetError(f"none of the {len(items)} {split} images in {found.root} "
                                   "could be read; check that the files are images")
            for i, digest in zip(decoded.kept, decoded.digests):
                here = (names[i], split, found.classes[items[i][1]])
                if digest in seen and seen[digest][1:] != here[1:]:
                    duplicates.append(_duplicate(seen[digest], here))
                seen.setdefault(digest, here)
            arrays[f"{split}_images"] = decoded.images
            arrays[f"{split}_labels"] = np.array([items[i][1] for i in decoded.kept], dtype=np.int64)
            arrays["files"][split] = [names[i] for i in decoded.kept]
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    arrays["duplicates"] = duplicates
    return arrays


def _decode_shards(found: Found, size: int, workers: int, log, folder: Path) -> dict:
    """Each split's shards into its own uint8 .npy file in `folder`, a decoding process per
    shard; images a damaged shard lost are listed as skipped, by shard and row."""
    manifest = read_manifest(found.root)
    names = {split: {path.name for path, _ in items} for split, items in found.splits.items()}
    chosen = {split: [s for s in manifest["splits"][split]["shards"] if s["name"] in names[split]]
              for split in found.splits}  # every shard, or a sample's
    total = sum(s["count"] for shards in chosen.values() for s in shards)
    log(f"decoding {total} images from the shards in {found.root} at {size}x{size} (once; later "
        "runs use the cache)")
    arrays = {"classes": found.classes, "files": {}, "skipped": [], "listed": total,
              "duplicates": []}
    pool = decode_pool(total, workers)
    done = 0
    try:
        for split, shards in chosen.items():
            target = folder / f"{split}_images.npy"
            count = max(s["first"] + s["count"] for s in shards)
            journal = resumed_journal(target, {"shards": [s["name"] for s in shards],
                                               "count": count, "size": size})
            todo = [s for s in shards if s["name"] not in journal.done]
            tasks = [(shard_source(found.root, s["name"]), size, str(target), s["first"], s["count"])
                     for s in todo]
            try:
                results = pool.map(decode_shard, tasks) if pool else map(decode_shard, tasks)
                for shard, result in zip(todo, results):
                    journal.record(shard["name"], result)
                    journal.done[shard["name"]] = result
                    done += len(result[0])
            finally:
                journal.close()
            kept = []
            for shard in shards:
                rows, why = journal.done[shard["name"]]
                kept += rows
                seen = {row for row, _, _ in rows}
                arrays["skipped"] += [[f"{shard['name']}#{row}", why or "missing from the shard"]
                                      for row in range(shard["first"], shard["first"] + shard["count"])
                                      if row not in seen]
            if not kept:
                raise DatasetError(f"none of the {count} {split} images in the shards "
                                   f"of {found.root} could be read; write them again")
            kept.sort()
            arrays[f"{split}_images"] = packed_once(journal, target, [row for row, _, _ in kept])
            arrays[f"{split}_labels"] = np.array([label for _, label, _ in kept], dtype=np.int64)
            arrays["files"][split] = [name for _, _, name in kept]
    except BrokenProcessPool as exc:
        raise killed(done, total) from exc
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if not arrays["skipped"]:  # the manifest's: the same images, labels and classes
        arrays["fingerprint"] = manifest["fingerprint"]
    return arrays


def _duplicate(first: tuple[str, str, str], second: tuple[str, str, str]) -> str:
    where = (f"under two classes ({first[2]} and {second[2]})" if first[2] != second[2]
             else f"in two splits ({first[1]} and {second[1]})")
    return f"the same image {where}: {first[0]} and {second[0]}"


def read_torchvision(root: Path) -> dict:
    """torchvision's CIFAR-10 as uint8 (N, 3, 32, 32) arrays and labels."""
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


def _digests(arrays: dict, carved: bool) -> tuple[str, str]:
    """(the checksum of the arrays, the dataset's fingerprint) in one pass. The fingerprint is
    the arrays' hash; where this project held out the test split, each split's file names
    too, so a run that scored other files has another fingerprint."""
    present = [arrays[f"{s}_{kind}"] for s in ("train", "test", "val") for kind in ("images", "labels")
               if f"{s}_images" in arrays]
    h = _hash(arrays["classes"], present)
    checksum = h.hexdigest()
    if carved:
        h.update(json.dumps(arrays["files"]).encode())
    return checksum, h.hexdigest()


def fingerprint(classes: list[str], *arrays) -> str:
    """A dataset's identity: the hash of its class names and image and label arrays (or bytes)."""
    return _hash(classes, arrays).hexdigest()


def _hash(classes: list[str], arrays, rows: int = 4096):
    """The running blake2b of `fingerprint`; arrays are read `rows` at a time, so a
    memory-mapped one is never copied whole into memory."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(classes).encode())
    for array in arrays:
        if isinstance(array, bytes):
            h.update(array)
            continue
        array = np.asarray(array)
        for start in range(0, max(len(array), 1), rows) if array.ndim else (None,):
            part = array if start is None else array[start:start + rows]
            h.update(np.ascontiguousarray(part).data)
    return h


# --- the cache ---------------------------------------------------------------------------

_META = ("classes", "fingerprint", "files", "skipped", "duplicates", "listed", "checksum", "carved",
         "derived")


def _cache_key(layout: str, root: Path, sources: dict, image_size: int) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{layout}|{root}|{image_size}|v2".encode())
    for split, items in sorted(sources.items()):
        for name, label, path in items:
            st = path.stat() if path.exists() else None
            stamp = f"{st.st_size}|{st.st_mtime_ns}" if st else "missing"
            h.update(f"{split}/{label}/{name}|{stamp}\n".encode("utf-8", "backslashreplace"))
    return h.hexdigest()


def _cache_path(cache_dir, name: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "datasets" / f"{name}-{key}"


def _read_cache(path: Path, mapped: bool, log=print) -> dict | None:
    """The cache at `path`, or None where there is none or it is damaged (said; it is then
    built again and replaced): the images memory-mapped (copy-on-write, so the file never
    changes) or read. It is believed only when its arrays have the shapes, types and label
    range a dataset has and the checksum written with them; the fingerprint a run logs is
    the one computed here, from the arrays it uses."""
    if not (path / "meta.json").exists():
        return None
    try:
        arrays, wrong = _cached_arrays(path, mapped)
    except (OSError, ValueError, KeyError, TypeError, EOFError, AttributeError) as exc:
        arrays, wrong = None, f"unreadable: {type(exc).__name__}: {str(exc)[:120]}"
    if wrong:
        log(f"warning: the dataset cache {path} is damaged ({wrong}); decoding the images "
            "again and replacing it")
        return None
    return _as_tensors(arrays)


def _cached_arrays(path: Path, mapped: bool) -> tuple[dict | None, str | None]:
    meta = json.loads((path / "meta.json").read_text())
    if "checksum" not in meta:
        return None, "no checksum: written by an older version"
    arrays = {k: meta[k] for k in _META}
    if not isinstance(arrays["classes"], list) or not all(isinstance(c, str) for c in arrays["classes"]):
        return None, "its class names are not a list of names"
    for s in meta["splits"]:
        labels = np.load(path / f"{s}_labels.npy")
        images = np.load(path / f"{s}_images.npy", mmap_mode="c" if mapped else "r")
        if (labels.ndim != 1 or labels.dtype.kind not in "iu" or images.ndim != 4
                or images.dtype != np.uint8 or images.shape[1] != 3 or len(images) < len(labels)):
            return None, f"{s} arrays of shapes {images.shape} {images.dtype}, {labels.shape} {labels.dtype}"
        if len(labels) and (labels.min() < 0 or labels.max() >= len(arrays["classes"])):
            return None, f"{s} labels outside 0..{len(arrays['classes']) - 1}"
        images = images[:len(labels)]
        arrays[f"{s}_labels"], arrays[f"{s}_images"] = labels, images if mapped else np.array(images)
    checksum, derived = _digests(arrays, arrays["carved"])
    if checksum != arrays["checksum"]:
        return None, "its checksum does not match its arrays"
    if arrays["derived"]:
        arrays["fingerprint"] = derived
    return arrays, None


@contextmanager
def _new_cache(path: Path | None, log) -> Iterator[Path]:
    """The folder to build a cache in: beside `path` (so it can be renamed into place), the
    one an interrupted decoding left there if any (its journals say what it decoded), or a
    temporary one where there is no cache folder, it cannot be written, or another process
    is building it. What is left of it is removed at the end, except after a killed or
    interrupted decoding (mapped files stay readable until closed)."""
    folder, lock = None, None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            folder, lock = _partial_folder(path, log)
        except OSError as exc:
            log(f"warning: could not write the dataset cache under {path.parent} ({exc}); "
                "the next run decodes again. Set --cache-dir to a writable folder.")
    folder = folder or Path(tempfile.mkdtemp(prefix="cifarlab-decoded-"))
    keep = False
    try:
        yield folder
    except (DecodeKilled, KeyboardInterrupt):
        keep = lock is not None
        raise
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _partial_folder(path: Path, log):
    """`path`'s partial folder and the open, locked folder that makes it this process's;
    (None, None) while another process holds it."""
    import fcntl

    folder = path.parent / f".{path.name}.partial"
    resumed = folder.is_dir() and any(folder.glob("*.journal"))
    folder.mkdir(exist_ok=True)
    lock = os.open(folder, os.O_RDONLY)  # held open, and locked, until the cache is built
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None, None
    if resumed:
        log(f"going on from the images an interrupted decoding left in {folder}")
    return folder, lock


def _publish(folder: Path, path: Path | None, log) -> Path | None:
    """Rename the built cache `folder` to `path` (atomic: a reader sees a whole cache or
    none), replacing a damaged one there; None where it stays in `folder`."""
    if path is None or not folder.is_relative_to(path.parent):
        return None
    try:
        if path.exists():  # damaged (else it was read), or another process's, just written
            stale = Path(tempfile.mkdtemp(prefix=f".{path.name}-stale-", dir=path.parent))
            os.replace(path, stale / "cache")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(folder, path)
    except OSError as exc:
        if not (path / "meta.json").exists():
            log(f"warning: could not write the dataset cache at {path} ({exc}); the next "
                "run decodes again. Set --cache-dir to a writable folder.")
        return None
    return path


_EMPTY = {"files": {}, "skipped": [], "duplicates": [], "listed": 0}


def _as_tensors(arrays: dict) -> dict:
    out = {"classes": list(arrays["classes"]), "fingerprint": arrays["fingerprint"]}
    out.update({k: arrays.get(k, _EMPTY[k]) for k in _EMPTY})
    for s in SPLITS:
        for kind in ("images", "labels"):
            if f"{s}_{kind}" in arrays:
                out[f"{s}_{kind}"] = torch.from_numpy(np.ascontiguousarray(arrays[f"{s}_{kind}"]))
    if not out["listed"]:
        out["listed"] = sum(len(out[f"{s}_labels"]) for s in SPLITS if f"{s}_labels" in out)
    return out
