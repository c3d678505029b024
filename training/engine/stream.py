"""The training split streamed from WebDataset shards (--stream): DataLoader worker processes
read and decode their own shards, a seeded shuffle buffer mixes their images, and each batch
goes to the device to be augmented as the in-memory loader augments it. Nothing of the
training split is decoded to disk; validation and test come from their own shards, decoded
into the cache as every other path decodes them.

Which shards a process's worker reads is fixed for a training: the manifest's training shards
are dealt in turn to every (process, worker) slot, as webdataset's split_by_node then
split_by_worker deal a list of shards. Each epoch a slot reads its shards in a seeded order
through a shuffle buffer seeded by the training's seed, the epoch, the process and the slot,
so an epoch's batches are the same whenever it is run: a run resumed mid-epoch reads past the
samples of the batches already trained (never decoding them) and goes on with the very batch
it stopped before. Every slot gives the same number of batches, the fewest any slot's images
make, so every process trains the same number of steps, as DistributedDataParallel needs; a
slot's images past that (fewer than a batch, or more where shards are uneven) wait for the next
epoch's shuffle.
"""
from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared.network import InputTransform
from shared.preprocess import decode_image
from training.engine.batches import DeviceLoader, Sampling, Shard
from training.engine.layouts import DatasetError
from training.engine.shards import read_shard

SAMPLE_IMAGES = 2048  # training images decoded for the statistics and whitening, at least
IN_FLIGHT_BYTES = 128 << 20  # batches decoded ahead, in shared memory, across the workers


@dataclass(frozen=True)
class StreamSpec:
    """The training shards (their URLs and image counts, in the manifest's order), the size
    the images are decoded at, the shuffle buffer and the DataLoader worker processes."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    class_counts: tuple[int, ...]
    image_size: int
    buffer: int = 2000
    workers: int = 2

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def slots_per_process(self) -> int:
        return max(1, self.workers)

    def slot_of(self, position: int, world: int) -> tuple[int, int]:
        """(process, worker) reading the shard at `position`: split_by_node's, then
        split_by_worker's deal."""
        return position % world, (position // world) % self.slots_per_process

    def shards_of(self, rank: int, slot: int, world: int) -> list[int]:
        return [p for p in range(len(self.urls)) if self.slot_of(p, world) == (rank, slot)]

    def batches_per_slot(self, per_process: int, world: int) -> int:
        """Batches every slot of every process gives in an epoch: the fewest any makes."""
        fewest = min(sum(self.counts[p] for p in self.shards_of(rank, slot, world))
                     for rank in range(world) for slot in range(self.slots_per_process))
        return fewest // per_process


def stream_seed(seed: int, epoch: int, rank: int, slot: int) -> int:
    return ((seed * 1_000_003 + epoch) * 4099 + rank) * 257 + slot


@dataclass(frozen=True)
class EpochPlan:
    """What one slot of this process reads in one epoch, and where it starts."""

    spec: StreamSpec
    seed: int
    epoch: int
    rank: int
    world: int
    per_process: int  # images in this process's share of a batch
    batches: int  # batches each slot gives in a whole epoch
    done: int  # the epoch's batches already trained (a resumed run skips them)
    consumed: tuple[tuple[int, int], ...] = ()  # (slot, samples read) for those batches

    def skipped(self, slot: int) -> int:
        """Of the `done` batches, those slot `slot` gave: batch i came from slot i % slots."""
        slots = self.spec.slots_per_process
        return max(0, (self.done - slot + slots - 1) // slots)

    def samples_read(self, slot: int) -> int:
        """The samples slot `slot` read for its batches already trained: as many as they
        hold, plus any that could not be decoded."""
        return dict(self.consumed).get(slot, self.skipped(slot) * self.per_process)

    def urls(self, slot: int) -> list[str]:
        positions = self.spec.shards_of(self.rank, slot, self.world)
        random.Random(stream_seed(self.seed, self.epoch, self.rank, slot)).shuffle(positions)
        return [self.spec.urls[p] for p in positions]


def _encoded(urls: list[str]) -> Iterator[tuple[str, bytes | None, int, int]]:
    """(name, image bytes, label, row) of each sample of `urls`, shard after shard; a shard
    that breaks off ends early, and the next one is read."""
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        try:
            for sample, data in read_shard(url):
                try:
                    yield f"{name}#{sample['__key__']}", data, int(sample["cls"]), int(sample["__key__"])
                except (KeyError, ValueError):
                    yield f"{name}#{sample.get('__key__', '?')}", None, -1, -1
        except (OSError, EOFError, tarfile.TarError, ValueError):
            continue


class SlotStream(IterableDataset):
    """The batches of one epoch of one process, each worker process reading its own slot's
    shards. Worker `j` plays slot (j + done) % slots, so the DataLoader, which takes a batch
    from each worker in turn starting at worker 0, hands out batch `done` first."""

    def __init__(self, plan: EpochPlan):
        self.plan = plan

    def __iter__(self):
        import webdataset as wds

        plan, info = self.plan, get_worker_info()
        slot = ((info.id if info else 0) + plan.done) % plan.spec.slots_per_process
        skip, size, read = plan.skipped(slot), plan.spec.image_size, plan.samples_read(slot)
        samples = wds.shuffle(plan.spec.buffer, plan.spec.buffer,
                              seed=stream_seed(plan.seed, plan.epoch, plan.rank, slot))(
                                  _encoded(plan.urls(slot)))
        images, labels, rows, bad = [], [], [], []
        given = skip
        for i, (name, data, label, row) in enumerate(samples):
            if given == plan.batches:
                return
            if i < read:
                continue
            try:
                if data is None:
                    raise ValueError("no image or label")
                images.append(torch.from_numpy(decode_image(io.BytesIO(data), size)))
            except (OSError, ValueError, SyntaxError):
                bad.append(name)
                continue
            labels.append(label)
            rows.append(row)
            if len(images) == plan.per_process:
                yield torch.stack(images), torch.tensor(labels), torch.tensor(rows), bad, (slot, i + 1)
                images, labels, rows, bad = [], [], [], []
                given += 1
        if given < plan.batches:
            names = ", ".join(url.rsplit("/", 1)[-1] for url in plan.urls(slot))
            yield f"{names}: {len(bad)} image(s) could not be read", None, None, bad, (slot, 0)


class StreamLoader(DeviceLoader):
    """Iterates (inputs, labels) batches of the streamed training split, prepared as
    DeviceLoader prepares them (crop, flip, normalization, channels_last) on `device`.

    `images` and `labels` are a sample of the training images decoded into memory: what
    compiling warms up on and what --whiten-init measures; the loader's epochs come from the
    shards. Augmentations draw from a generator of the seed, epoch, process and batch, so a
    resumed epoch draws what the uninterrupted one drew.
    """

    def __init__(self, spec: StreamSpec, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, transform: InputTransform, sampling: Sampling, *,
                 channels_last: bool = False, shard: Shard = Shard()):
        self.spec = spec
        self.per_process = batch_size // shard.world_size
        self.batches_per_slot = spec.batches_per_slot(self.per_process, shard.world_size)
        if self.batches_per_slot < 1:
            raise DatasetError(
                f"the {len(spec.urls)} training shard(s) dealt to {shard.world_size} process(es) "
                f"x {spec.slots_per_process} stream worker(s) leave a worker fewer images than "
                f"its batch of {self.per_process}: write smaller shards (python -m "
                "training.shards --per-shard), or use fewer --stream-workers or a smaller "
                "--batch-size")
        super().__init__(images, labels, batch_size, transform, sampling,
                         channels_last=channels_last, shard=shard)
        if self.flip.alternates:  # each image's side in even epochs, by its row in the shards
            self.first_flips = torch.rand(spec.total, device=self.device,
                                          generator=torch.Generator(device=self.device)
                                          .manual_seed(sampling.seed + 1)) < 0.5
        self.skipped: set[str] = set()  # shard#key of the images that could not be decoded

    def __len__(self) -> int:
        return self.batches_per_slot * self.spec.slots_per_process

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        current = self.begin_pass(lambda: {})
        epoch, done = self.epoch - 1, current["done"]
        consumed = current.setdefault("consumed", {})
        plan = EpochPlan(self.spec, self.sampling.seed, epoch, self.shard.rank,
                         self.shard.world_size, self.per_process, self.batches_per_slot, done,
                         tuple(consumed.items()))
        cuda = self.device.type == "cuda"
        loader = DataLoader(SlotStream(plan), batch_size=None, num_workers=self.spec.workers,
                            pin_memory=cuda, prefetch_factor=self.prefetch())
        for i, (x, y, rows, bad, (slot, read)) in enumerate(loader, start=done):
            self.skipped.update(bad)
            if isinstance(x, str):
                raise DatasetError(f"the streamed shards ran out in epoch {epoch + 1}: {x} "
                                   f"({', '.join(bad[:5]) or 'the shard is damaged or cut short'}); "
                                   "write the shards again, or train without --stream, which "
                                   "skips unreadable images (--max-skipped)")
            current["done"] = i + 1
            consumed[slot] = read
            x, rows = x.to(self.device, non_blocking=cuda), rows.to(self.device)
            yield (self.prepare(x, rows, epoch, self.augment_generator(epoch, i)),
                   y.to(self.device, non_blocking=cuda))
        self.current = None

    def prefetch(self) -> int | None:
        """Batches each worker decodes ahead: up to 4, fewer where batches are large. They
        wait in shared memory, which a memory limit counts: 8 batches of 512 images at 160
        px are 315 MB."""
        if not self.spec.workers:
            return None
        batch = self.per_process * 3 * self.spec.image_size ** 2
        return max(1, min(4, IN_FLIGHT_BYTES // (batch * self.spec.workers)))

    def augment_generator(self, epoch: int, batch: int) -> torch.Generator:
        seed = ((self.sampling.seed * 1_000_003 + epoch) * 4099 + self.shard.rank + 1) * 65_537 + batch
        return torch.Generator(device=self.device).manual_seed(seed)


