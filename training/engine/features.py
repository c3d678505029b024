"""Frozen features computed once. With `--freeze backbone` the backbone's outputs never change,
so each image's (and each augmented view's) output is computed once, kept on disk, and the head
trains on those: an epoch is one small layer over a tensor instead of the whole network over
every image. The logged model is still the whole network, backbone and trained head.

The outputs are taken where they enter the head, in evaluation mode (BatchNorm with its stored
statistics, no dropout): exactly what the whole network computes there at inference.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shared.network import InputTransform
from shared.preprocess import Preprocessing
from shared.progress import counted
from training.engine import backbone, distributed
from training.engine.backbone import Backbone, torch_backbone
from training.engine.batches import (
    Batches,
    HostImages,
    Sampling,
    Shard,
    random_crop,
    random_flip,
)
from training.engine.config import TrainConfig
from training.engine.models import is_convolutional

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
NAMES = {"val": "validation"}


class FeatureLoader(Batches):
    """Batches of cached backbone outputs and labels, with what the loop and the training state
    ask of a `DeviceLoader`. A training image comes out as one of its views, drawn anew each
    epoch; under torchrun every process takes its share of each global batch."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 sampling: Sampling = Sampling(), *, shard: Shard = Shard()):
        super().__init__(labels, batch_size, sampling, shard)
        self.features = features  # (views, images, width)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        views, n = self.features.shape[:2]

        def draw() -> dict[str, torch.Tensor]:
            order = self.order()
            view = (torch.randint(0, views, (n,), device=self.device, generator=self.generator)
                    if self.sampling.shuffle else torch.zeros(n, dtype=torch.long, device=self.device))
            return {"order": order, "view": view}

        current = self.begin_pass(draw)
        for _, idx in self.batches(current):
            yield self.features[current["view"][idx], idx].float(), self.labels[idx]


NOT_CACHED = {"feature_cache": "off", "feature_views": 0}  # the params of a run without the cache


@dataclass
class Features:
    train: torch.Tensor  # (views, images, width), float16
    val: torch.Tensor  # (1, images, width)
    test: torch.Tensor
    status: str  # "hit": read from the cache; "built": computed now (and cached)
    seconds: float  # computing or reading them
    path: Path
    runner: dict  # what ran the backbone for the training images (Runner.params)

    def params(self) -> dict:
        """What a run logs of them."""
        return {"feature_cache": self.status, "feature_views": self.train.shape[0],
                "feature_seconds": round(self.seconds, 2), "feature_width": self.train.shape[-1],
                **self.runner}


@dataclass(frozen=True)
class Views:
    """How the cache sees each image: view 0 as is, 1 mirrored, 2 and more a random crop (of
    `crop_padding` pixels, padded by `crop_fill`) and flip drawn from `seed` and the view;
    computed `batch_size` images at a time."""

    batch_size: int
    seed: int = 0
    crop_padding: int = 4
    crop_fill: str = "zeros"


@torch.no_grad()
def head_inputs(backbone: Backbone, images: torch.Tensor, view: int, views: Views,
                stage: str = "") -> torch.Tensor:
    """What the head receives for each uint8 image, seen as view `view`, as `backbone` (float
    images in [0, 1] in) computes it; float16. With a `stage`, each batch is reported as its
    progress."""
    generator = torch.Generator(device=images.device).manual_seed(views.seed * 1009 + view)
    outputs = []
    batches = images.split(views.batch_size)
    for batch in counted(batches, stage) if stage else batches:
        if view == 1:
            batch = batch.flip(3)
        elif view >= 2:
            batch = random_flip(random_crop(batch, views.crop_padding, generator,
                                            views.crop_fill), generator)
        outputs.append(backbone(batch.float() / 255).flatten(1).half())
    return torch.cat(outputs)


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        for part in t.split(4096) if isinstance(t, HostImages) else (t,):  # the same bytes
            h.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_digest(model: nn.Module, head: str) -> str:
    """The weights that make the features: every tensor but the head's."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    h = hashlib.sha256(json.dumps(list(state)).encode())
    h.update(digest(*state.values()).encode())
    return h.hexdigest()


def crop_padding(cfg: TrainConfig) -> int:
    """The random-crop views' padding: the training crop's, or 4 pixels where it has none."""
    return cfg.crop_padding or 4


def cache_key(cfg: TrainConfig, model: nn.Module, head: str, prep: Preprocessing,
              splits, runtime: str = "pt2", weights: str | None = None) -> str:
    """Everything the cached outputs depend on: the images of each split, the backbone's
    weights (`weights`: their digest, when the caller has it), the preprocessing (input size,
    normalization), the views and what ran the backbone for the training images."""
    views = {"views": cfg.feature_views, **({} if runtime == "pt2" else {"runtime": runtime})}
    if cfg.feature_views > 2:  # random crops: their padding, fill and seed matter too
        views.update(crop_padding=crop_padding(cfg), crop_fill=cfg.crop_fill, seed=cfg.seed)
    parts = {"version": CACHE_VERSION, "model": cfg.model, "head": head,
             "backbone": weights or backbone_digest(model, head), "preprocessing": prep.to_dict(),
             **views, **{name: digest(getattr(splits, name)[0])
                         for name in ("train", "val", "test")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def source_key(cfg: TrainConfig, head: str, prep: Preprocessing, runtime: str, weights: str) -> str:
    """What one image's plain and mirrored outputs depend on, whatever the other images are:
    the backbone's weights, the preprocessing and what runs it for the training images."""
    parts = {"version": CACHE_VERSION, "model": cfg.model, "head": head, "backbone": weights,
             "preprocessing": prep.to_dict(), "runtime": runtime}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def image_digests(images) -> torch.Tensor:
    """A 16-byte digest of each uint8 image, as a (N, 16) uint8 tensor on the CPU."""
    found = b"".join(hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                     for batch in images.split(256) for row in batch.cpu().contiguous().numpy())
    if not found:
        return torch.empty((0, 16), dtype=torch.uint8)
    return torch.frombuffer(bytearray(found), dtype=torch.uint8).reshape(-1, 16)


Known = dict[tuple[str, int], tuple[dict[bytes, int], torch.Tensor]]  # (runtime, view) -> rows


def known_rows(saved: dict | None, runtime: str) -> Known:
    """An earlier cache's rows by image digest, for each (runtime, view) it holds that does not
    depend on the other images: the training images' plain and mirrored views (by `runtime`),
    validation's and test's plain view (by PyTorch)."""
    if not saved:
        return {}
    parts: dict[tuple[str, int], tuple[dict[bytes, int], list[torch.Tensor]]] = {}

    def add(split: str, view: int, by: str) -> None:
        if not saved[split].shape[1]:  # no validation split
            return
        index, tensors = parts.setdefault((by, view), ({}, []))
        offset = sum(len(t) for t in tensors)
        for i, row in enumerate(saved["digests"][split].numpy()):
            index.setdefault(row.tobytes(), offset + i)
        tensors.append(saved[split][view])

    for view in range(min(2, saved["train"].shape[0])):
        add("train", view, runtime)
    for split in ("val", "test"):
        add(split, 0, "pt2")
    return {k: (index, torch.cat(tensors)) for k, (index, tensors) in parts.items()}


def earlier(folder: Path, name: str, source: str) -> dict | None:
    """The last cache written from the same source, whole (its checksum), else None."""
    pointer = folder / f"{name}-{source[:24]}.last"
    try:
        saved = torch.load(folder / pointer.read_text().strip(), map_location="cpu",
                           weights_only=True)
        whole = saved.get("source") == source \
            and saved["checksum"] == digest(saved["train"], saved["val"], saved["test"]) \
            and saved["digests_checksum"] == digest(*(saved["digests"][s] for s in SPLITS))
        return saved if whole else None
    except Exception:  # noqa: BLE001 - none yet, removed, truncated: every image is computed
        return None


def read_cached(path: Path, key: str, splits, log=print) -> dict | None:
    """The cached features at `path`, believed only when they are the ones `key` names, whole
    (their checksum) and one row per image of each split; None where there are none or they
    are damaged (said, then computed again and the file replaced)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location=splits.device, weights_only=True)
        wrong = damage(saved, key, splits)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: compute them again
        wrong = f"unreadable: {type(exc).__name__}"
    if wrong:
        log(f"warning: the feature cache {path} is damaged ({wrong}); computing the features "
            "again and replacing it")
        return None
    return saved


def damage(saved, key: str, splits) -> str | None:
    """What is wrong with cached features, or None."""
    if not isinstance(saved, dict) or saved.get("key") != key:
        return "made for other images, weights or settings"
    for name in ("train", "val", "test"):
        rows = len(getattr(splits, name)[1])
        tensor = saved.get(name)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[1] != rows:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            return f"{name} features of shape {shape} for {rows} images"
    if "checksum" not in saved:
        return "no checksum: written by an older version"
    if saved["checksum"] != digest(saved["train"], saved["val"], saved["test"]):
        return "its checksum does not match its contents"
    return None


def write_cached(path: Path, saved: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(saved, partial)
    os.replace(partial, path)


def frozen_features(cfg: TrainConfig, model: nn.Module, head: str, prep: Preprocessing,
                    splits, log=print) -> Features:
    """The head's inputs for every image of the splits: from the cache when it has them, else
    computed (the first process of each machine computes, the others read) and cached. The
    training images' go through the backbone `--feature-runtime` chooses (backbone.py);
    validation's and test's through PyTorch, as the logged model computes them."""
    start = time.perf_counter()
    pt2 = torch_backbone(model, head, InputTransform(prep).to(splits.device),
                         cfg.channels_last and is_convolutional(model))
    name = cfg.model.replace("/", "_")
    weights = backbone_digest(model, head)
    with distributed.machine_first():
        folder = backbone.backbone_folder(cfg.cache_dir, cfg.model, weights, head, prep)
        run = backbone.runner(cfg.feature_runtime, model, head, prep, pt2,
                              lambda: samples(splits, cfg.seed), folder, log)
        key = cache_key(cfg, model, head, prep, splits, run.runtime, weights)
        path = Path(cfg.cache_dir).expanduser() / "features" / f"{name}-{key[:24]}.pt"
        saved = read_cached(path, key, splits, log)
        status = "hit" if saved is not None else "built"
        if saved is None:
            source = source_key(cfg, head, prep, run.runtime, weights)
            known = known_rows(earlier(path.parent, name, source), run.runtime)
            saved = {**compute(cfg, run.backbone, pt2, splits, key, log, known, run.runtime),
                     "source": source}
            write_cached(path, saved)
            (path.parent / f"{name}-{source[:24]}.last").write_text(path.name)
    seconds = time.perf_counter() - start
    log(f"features: {status} {path} ({seconds:.1f} s; training images by {run.runtime})")
    rate = {"feature_train_images_per_s": round(saved["train_images_per_s"], 1)} if status == "built" else {}
    return Features(saved["train"], saved["val"], saved["test"], status, seconds, path,
                    {**run.params(), **rate})


def samples(splits, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images a backbone export is calibrated on (a seeded sample of the training images) and
    checked on (validation's, then training images where they are fewer than the check's)."""
    train_images, train_labels = splits.train
    generator = torch.Generator().manual_seed(seed)
    count = min(backbone.CALIBRATION_IMAGES, len(train_labels))
    rows = torch.randperm(len(train_labels), generator=generator)[:count].sort().values
    rows = rows.to(train_labels.device)
    extra = max(0, min(backbone.CHECK_IMAGES - len(splits.val[1]), len(train_labels)))
    check = (torch.cat([splits.val[0][:backbone.CHECK_IMAGES], train_images[:extra]]),
             torch.cat([splits.val[1][:backbone.CHECK_IMAGES], train_labels[:extra]]))
    return {"calibration": (train_images[rows], train_labels[rows]), "check": check}


def compute(cfg: TrainConfig, train_backbone: Backbone, pt2: Backbone, splits, key: str,
            log=print, known: Known | None = None, runtime: str = "pt2") -> dict:
    """Every split's features; an image whose plain or mirrored view an earlier cache of the
    same source holds (`known`) is not run through the backbone again."""
    seen = Views(cfg.eval_batch_size, cfg.seed, crop_padding(cfg), cfg.crop_fill)
    known = known or {}
    rates, digests = {}, {}

    def outputs(images, views: int, split: str, net: Backbone, by: str) -> torch.Tensor:
        digests[split] = image_digests(images)
        if not len(images):  # no validation split
            return torch.empty((views, 0, 1), dtype=torch.half, device=images.device)
        started, computed = time.perf_counter(), 0
        out = []
        for v in range(views):
            stage = f"features: {split}, view {v + 1} of {views}"
            rows, count = view_rows(net, images, v, seen, stage, digests[split], known.get((by, v)))
            out.append(rows)
            computed += count
        rates[split] = computed / max(time.perf_counter() - started, 1e-9)
        reused = views * len(images) - computed
        log(f"features: {NAMES.get(split, split)}, {len(images)} images x {views} view(s), "
            + (f"{reused:,} reused from an earlier cache, " if reused else "")
            + f"{computed:,} computed" + (f" at {rates[split]:,.0f} img/s" if computed else ""))
        return torch.stack(out)

    saved = {"key": key,
             "train": outputs(splits.train[0], cfg.feature_views, "train", train_backbone, runtime),
             "val": outputs(splits.val[0], 1, "val", pt2, "pt2"),
             "test": outputs(splits.test[0], 1, "test", pt2, "pt2")}
    checksum = digest(saved["train"], saved["val"], saved["test"])
    return {**saved, "checksum": checksum, "train_images_per_s": rates["train"],
            "digests": digests, "digests_checksum": digest(*(digests[s] for s in SPLITS))}


def view_rows(net: Backbone, images, view: int, seen: Views, stage: str, digests: torch.Tensor,
              known: tuple[dict[bytes, int], torch.Tensor] | None) -> tuple[torch.Tensor, int]:
    """One view's rows for every image, and how many were computed: the known ones taken from
    `known`, the others run through `net`. Random-crop views (2 and up) are never known."""
    if view >= 2 or not known:
        return head_inputs(net, images, view, seen, stage), len(images)
    index, rows = known
    found = torch.tensor([index.get(row.tobytes(), -1) for row in digests.numpy()], dtype=torch.long)
    have, missing = (found >= 0).nonzero().flatten(), (found < 0).nonzero().flatten()
    if not len(have):
        return head_inputs(net, images, view, seen, stage), len(images)
    out = torch.empty((len(images), rows.shape[1]), dtype=torch.half, device=rows.device)
    out[have] = rows[found[have]]
    if len(missing):
        chosen = images.select(missing) if isinstance(images, HostImages) \
            else images[missing.to(images.device)]
        out[missing] = head_inputs(net, chosen, view, seen, stage).to(out.device)
    return out.to(images.device), len(missing)


def feature_loaders(cfg: TrainConfig, features: Features, splits) -> tuple[FeatureLoader, ...]:
    """Training, validation and test loaders over the cached features, shared by processes
    as `make_loaders` shares images."""
    world = distributed.world()
    shard = Shard(world.rank, world.size)
    sampling = Sampling(shuffle=True, seed=cfg.seed, drop_last=len(splits.train[1]) > cfg.batch_size,
                        balanced=cfg.sampler == "balanced")
    eval_batch = cfg.eval_batch_size * world.size
    return (FeatureLoader(features.train, splits.train[1], cfg.batch_size, sampling, shard=shard),
            FeatureLoader(features.val, splits.val[1], eval_batch, shard=shard),
            FeatureLoader(features.test, splits.test[1], eval_batch, shard=shard))
