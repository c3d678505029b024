"""Batches drawn from a dataset held whole, as one uint8 tensor, on the training device, or
gathered from the memory-mapped cache and sent there (`HostImages`).

Per-image PIL work and DataLoader worker processes are what make the seed studies' epochs slow;
here a batch is one index into a uint8 tensor, then crop, flip, normalization and resizing run
on the whole batch at once on the training device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from shared.network import InputTransform


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator,
                fill: str = "zeros") -> torch.Tensor:
    """Pad each image by `padding` (zeros, or its mirror image with fill="reflect") and cut a
    random crop of the original size."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    if fill == "reflect":  # reflect padding works on float tensors only
        padded = torch.nn.functional.pad(x.float(), (padding,) * 4, mode="reflect").to(x.dtype)
    else:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left to right."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def alternate_flip(x: torch.Tensor, first: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirror the images whose bit in `first` is set in even epochs and the others in odd
    ones: every image is seen both ways in any two epochs in a row (airbench's alternating
    flip), where a random flip repeats one view half the time."""
    flip = first ^ bool(epoch % 2)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class HostImages:
    """uint8 images left where they are (a memory-mapped cache file, in host memory only as
    far as the page cache holds it): rows `rows` of `source`, in that order, indexed like a
    tensor on `device`. A batch is gathered from the file, pinned where `device` is a GPU, and
    sent there; the dataset itself is never copied."""

    def __init__(self, source: torch.Tensor, rows: torch.Tensor | None = None,
                 device: torch.device | str = "cpu"):
        self.source = source
        self.rows = torch.arange(len(source)) if rows is None else rows.cpu()
        self.device = torch.device(device)
        self.dtype = source.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.source.shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        rows = self.rows[idx.cpu() if isinstance(idx, torch.Tensor) else idx]
        batch = self.source[rows]
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches of `size` images, on the device (as Tensor.split gives them)."""
        for start in range(0, len(self), size):
            yield self[start:start + size]

    def select(self, idx: torch.Tensor) -> HostImages:
        """The images at `idx`, still left where they are."""
        return HostImages(self.source, self.rows[idx.cpu()], self.device)


Images = torch.Tensor | HostImages


@dataclass(frozen=True)
class Flip:
    """A horizontal flip by name: `apply(x, generator, sides, epoch)`, where `sides` are the
    batch's images' bits of the alternating flip (None unless `alternates`)."""

    apply: Callable[[torch.Tensor, torch.Generator, torch.Tensor | None, int], torch.Tensor]
    alternates: bool = False


FLIPS: dict[str, Flip] = {
    "none": Flip(lambda x, generator, sides, epoch: x),
    "random": Flip(lambda x, generator, sides, epoch: random_flip(x, generator)),
    "alternate": Flip(lambda x, generator, sides, epoch: alternate_flip(x, sides, epoch),
                      alternates=True),
}


@dataclass(frozen=True)
class Augmentation:
    """What a training batch goes through on the device before normalization: a random crop
    of `crop_padding` pixels (padded with zeros or by reflection), then a flip from FLIPS."""

    crop_padding: int = 0
    crop_fill: str = "zeros"
    flip: str = "none"

    def __post_init__(self):
        if self.flip not in FLIPS:
            raise ValueError(f"flip must be one of {tuple(FLIPS)} (got {self.flip!r})")


@dataclass(frozen=True)
class Sampling:
    """How a loader draws its batches: in a seeded random order or in order, augmented or
    not, a short last batch dropped or kept; `balanced` draws each epoch's images with
    replacement, every class equally often (for imbalanced classes). The default is
    evaluation's."""

    shuffle: bool = False
    seed: int = 0
    augmentation: Augmentation = Augmentation()
    drop_last: bool = False
    balanced: bool = False


@dataclass(frozen=True)
class Shard:
    """This process's place among a torchrun training's processes."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size} processes")


class Batches:
    """What every loader of a training shares: `batch_size` rows of `labels` at a time, drawn
    as `sampling` says, this process's `shard` of each global batch, and a seeded generator
    saved with the training state."""

    def __init__(self, labels: torch.Tensor, batch_size: int, sampling: Sampling, shard: Shard):
        self.labels, self.batch_size, self.sampling, self.shard = labels, batch_size, sampling, shard
        self.generator = torch.Generator(device=labels.device).manual_seed(sampling.seed)
        self.epoch = 0  # passes started
        self.current: dict | None = None  # the pass in progress: its draws and batches done
        self.resume_at: dict | None = None  # a pass a mid-epoch checkpoint was taken in

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def drop_last(self) -> bool:
        return self.sampling.drop_last

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.drop_last else self.labels.shape[0]

    def order(self) -> torch.Tensor:
        n = self.labels.shape[0]
        if self.sampling.balanced:
            weights = 1.0 / torch.bincount(self.labels).float()[self.labels]
            return torch.multinomial(weights, n, replacement=True, generator=self.generator)
        if self.sampling.shuffle:
            return torch.randperm(n, device=self.device, generator=self.generator)
        return torch.arange(n, device=self.device)

    def shares(self, order: torch.Tensor, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch number, this process's indices of it) for each batch of `order` from
        `start`; a short last batch can leave a process none, and it is skipped."""
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            idx = idx[self.shard.rank::self.shard.world_size]
            if len(idx):
                yield i, idx

    def begin_pass(self, draw: Callable[[], dict[str, torch.Tensor]]) -> dict:
        """A new epoch's draws (`draw()`: its order and whatever else it draws at the start),
        or, after a mid-epoch checkpoint was restored, the draws of the epoch it was taken
        in, to go on after its last finished batch."""
        if self.resume_at is not None:
            current = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                       for k, v in self.resume_at.items()}
            self.resume_at = None
        else:
            current = {**draw(), "done": 0}
            self.epoch += 1
        self.current = current
        return current

    def batches(self, current: dict) -> Iterator[tuple[int, torch.Tensor]]:
        """The pass's batches still to go; `done` counts the global batches handed out."""
        for i, idx in self.shares(current["order"], current["done"]):
            current["done"] = i + 1
            yield i, idx
        self.current = None

    def state_dict(self) -> dict:
        """The generator and epoch; within an epoch, also its draws and the batches done."""
        state = {"generator": self.generator.get_state(), "epoch": self.epoch}
        if self.current is not None:
            state["within"] = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                               for k, v in self.current.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self.resume_at = state.get("within")


class DeviceLoader(Batches):
    """Iterates (inputs, labels) batches over uint8 images on the device of `labels`, held
    there whole or gathered batch by batch from the cache (`HostImages`): the same seed
    draws the same batches either way.

    Inputs come out normalized (and resized, for 224-pixel networks) by `transform`, in
    channels_last layout when asked, ready for the network.

    With a `shard` of several processes (torchrun), `batch_size` is the global batch: every
    process draws the same seeded order and takes its own share of each batch (rank, rank +
    world, ...), so an epoch still visits every image once across processes. Augmentation
    draws are then seeded per process and epoch, so processes do not crop their shares alike.
    """

    def __init__(self, images: Images, labels: torch.Tensor, batch_size: int,
                 transform: InputTransform, sampling: Sampling = Sampling(), *,
                 channels_last: bool = False, shard: Shard = Shard()):
        super().__init__(labels, batch_size, sampling, shard)
        self.images = images
        self.transform = transform.to(images.device)
        self.channels_last = channels_last
        self.flip = FLIPS[sampling.augmentation.flip]
        self.first_flips = None
        if self.flip.alternates:  # each image's side in even epochs, fixed by the seed
            self.first_flips = torch.rand(images.shape[0], device=images.device,
                                          generator=torch.Generator(device=images.device)
                                          .manual_seed(sampling.seed + 1)) < 0.5

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        current = self.begin_pass(lambda: {"order": self.order()})
        epoch = self.epoch - 1
        for i, idx in self.batches(current):
            yield (self.prepare(self.images[idx], idx, epoch, self.augment_generator(epoch, i)),
                   self.labels[idx])

    def augment_generator(self, epoch: int, batch: int) -> torch.Generator:
        """One process: the shuffling generator, as always (saved with the state). Several:
        one of this process, epoch and batch, so a resumed run draws what it would have
        drawn, within an epoch too, without saving every rank's."""
        if self.shard.world_size == 1:
            return self.generator
        seed = ((self.sampling.seed * 1_000_003 + epoch) * 4099 + self.shard.rank + 1) * 65_537 + batch
        return torch.Generator(device=self.device).manual_seed(seed)

    def prepare(self, x: torch.Tensor, idx: torch.Tensor | None = None, epoch: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 batch (the images at `idx`) -> augmented (when asked), normalized network input."""
        generator = generator or self.generator
        augmentation = self.sampling.augmentation
        if augmentation.crop_padding:
            x = random_crop(x, augmentation.crop_padding, generator, augmentation.crop_fill)
        sides = self.first_flips[idx] if self.flip.alternates else None
        x = self.flip.apply(x, generator, sides, epoch)
        x = self.transform(x.float().div_(255))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
