"""From a config to what a run trains: the data on its device (`prepare`), then the model, its
loaders and its training state (`build`). Bad input raises here, before any run exists."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shared.messages import brief
from shared.network import InputTransform
from shared.preprocess import Preprocessing
from training.engine import distributed
from training.engine.averaging import Lookahead
from training.engine.batches import Augmentation, DeviceLoader, HostImages, Sampling, Shard
from training.engine.config import ConfigError, TrainConfig
from training.engine.data import (
    DatasetError,
    ImageData,
    channel_stats,
    load_found,
    median_side,
    split_indices,
    stratified_split,
    train_then_val,
)
from training.engine.device import data_placement, describe_device, resolve_device
from training.engine.features import NOT_CACHED, FeatureLoader, feature_loaders, frozen_features
from training.engine.layouts import Found, Source, find_layout
from training.engine.loop import autocast_for, warm_up
from training.engine.models import ModelSpec, build_model, get_spec, is_convolutional
from training.engine.optim import OptimizerSettings, Schedule, make_optimizer, make_scheduler
from training.engine.shards import local_root, read_manifest, shard_source
from training.engine.state import (
    EarlyStopping,
    EpochSums,
    FitResult,
    TrainingState,
    Unfreezer,
    restore,
)
from training.engine.stream import SAMPLE_IMAGES, StreamLoader, StreamSpec
from training.engine.whiten import whiten_first_conv


def random_rows(total: int, n: int, seed: int) -> torch.Tensor:
    """n of range(total) at random, with a fixed seed: the splits are in folder order (one
    class after another), so the first n would hold only a class or two."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def whitening_sample(images: torch.Tensor, seed: int, n: int = 5000) -> torch.Tensor:
    """n training images at random, on the [0, 1] scale, for an unbiased patch covariance."""
    return images[random_rows(len(images), n, seed).to(images.device)].float() / 255


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("fp16 training needs a GPU; use --precision bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.compile == "auto":
        return "default" if device.type == "cuda" else "none"
    return cfg.compile


SMALL_MODEL_SIDE = 64  # the stored side, at most, for a model with no input size of its own


@dataclass
class DeviceSplits:
    """A dataset, split and moved to the training device once; the trials of a study share it.
    `files` names each split's rows for folder layouts; `image_size_reason` says why the
    images are stored at their size; `val_source` where the validation split came from."""

    data: ImageData
    device: torch.device
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    scratch_stats: tuple[tuple[float, ...], tuple[float, ...]]  # mean, std of the train split
    files: dict[str, list[str]] = field(default_factory=dict)
    image_size_reason: str = ""
    val_source: str = ""
    on_device: bool = True  # else the images stay in the memory-mapped cache (HostImages)
    placement_reason: str = ""
    stream: StreamSpec | None = None  # --stream: the training shards; `train` is then a sample

    @property
    def train_size(self) -> int:
        return self.stream.total if self.stream else len(self.train[1])

    def train_counts(self) -> torch.Tensor:
        """Training images per class (of the whole stream, with --stream)."""
        if self.stream:
            return torch.tensor(self.stream.class_counts)
        return torch.bincount(self.train[1].cpu(), minlength=self.num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def sizes(self) -> dict[str, int]:
        return {"train_size": self.train_size, "val_size": len(self.val[1]),
                "test_size": len(self.test[1])}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split."""
        counts = {"train": self.train_counts()}
        counts |= {split: torch.bincount(pair[1].cpu(), minlength=self.num_classes)
                   for split, pair in (("val", self.val), ("test", self.test))}
        return {split: dict(zip(self.data.classes, c.tolist())) for split, c in counts.items()}

    def subset(self, n_train: int | None, n_val: int | None = None) -> DeviceSplits:
        """n_train training and n_val validation images (None: all), drawn at random with a
        fixed seed: benchmarks measure on a subset."""
        if self.stream:
            raise ConfigError("a streamed training split cannot be subset: leave out --stream")
        def draw(pair, n):
            if n is None or n >= len(pair[1]):
                return pair
            pick = random_rows(len(pair[1]), n, seed=0).sort().values.to(pair[1].device)
            images = pair[0].select(pick) if isinstance(pair[0], HostImages) else pair[0][pick]
            return images, pair[1][pick]
        return dataclasses.replace(self, train=draw(self.train, n_train), val=draw(self.val, n_val),
                                   files={})


def image_size_for(cfg: TrainConfig, spec: ModelSpec, found: Found) -> tuple[int, str]:
    """The side the images are stored at, and why: --image-size; else the network's input
    side, but never more than the images' median shorter side (smaller images are resized
    per batch on the device, which costs no memory); for a model with no input side of its
    own, the median shorter side, at most SMALL_MODEL_SIDE."""
    if cfg.image_size:
        return cfg.image_size, "--image-size"
    if found.layout == "torchvision":
        return 32, "CIFAR-10's own size"
    median, measured = median_side(found)
    target = cfg.input_size or spec.input_size
    seen = f"the images' median shorter side, {median} px over {measured} sampled"
    if target:
        if median >= target:
            return target, f"{spec.name}'s input side ({seen})"
        return median, f"{seen}, below {spec.name}'s input side {target}: resized per batch"
    if median > SMALL_MODEL_SIDE:
        return SMALL_MODEL_SIDE, (f"{seen}, capped at {SMALL_MODEL_SIDE} for {spec.name}, a model "
                                  "built for small images (--image-size sets another)")
    return max(8, median), seen


def check_skipped(data: ImageData, max_skipped: float, log=print) -> None:
    """Go on while at most `max_skipped` of the files could not be read, saying which were
    skipped; else stop, listing them."""
    skipped, listed = data.skipped, max(1, data.listed)
    if not skipped:
        return
    lines = "\n  ".join(f"{name} ({why})" for name, why in skipped[:20])
    more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    if len(skipped) > max_skipped * listed:
        raise DatasetError(f"{len(skipped)} of the {listed} image files in {data.root} could not "
                           f"be read, more than --max-skipped {max_skipped:g} allows:\n  {lines}"
                           f"{more}\nDelete or replace these files (nothing in the folder was "
                           "changed), or raise --max-skipped to train without them")
    log(f"skipped {len(skipped)} unreadable file(s) of {listed} (listed in the run's "
        f"data/skipped_files.csv):\n  {lines}{more}")


def prepare(cfg: TrainConfig, log=print) -> DeviceSplits:
    """Device, dataset, split. Raises DeviceError / DatasetError on bad input."""
    device = distributed.place(resolve_device(cfg.device))
    spec = get_spec(cfg.model)
    labels = Path(cfg.labels).expanduser().resolve() if cfg.labels else None
    with distributed.machine_first():
        found = find_layout(Source(local_root(cfg.data_dir, cfg.cache_dir), labels,
                                   cfg.test_fraction))
        whole, found = found, streamed(cfg, found) if cfg.stream else found
        size, reason = image_size_for(cfg, spec, found)
        copies = distributed.world().local_size if device.type != "cuda" else 1
        on_device, placement = data_placement(cfg.data_on_device, dataset_bytes(found, size),
                                              device, copies)
        data = load_found(found, size, cache_dir=cfg.cache_dir, workers=cfg.decode_workers,
                          log=log, mapped=not on_device)
    stream = stream_spec(cfg, whole, size) if cfg.stream else None
    if stream:
        log(f"training images streamed from {len(stream.urls)} shard(s), {stream.workers} "
            f"worker process(es), a shuffle buffer of {cfg.shuffle_buffer}; validation, test and "
            f"a sample of {len(data.train_labels)} training images decoded")
    log(f"data on {device.type if on_device else 'disk (memory-mapped cache)'}: {placement}")
    check_skipped(data, cfg.max_skipped, log)
    for line in data.duplicates:
        log(f"warning: {line}")
    if int(data.train_labels.max()) >= len(data.classes):
        raise DatasetError(f"{data.root}: labels exceed the {len(data.classes)} classes found")
    files = {split: names for split, names in data.files.items() if not (stream and split == "train")}
    if data.val_images is not None:
        train, val = (data.train_images, data.train_labels), (data.val_images, data.val_labels)
        val_source = "given (val/ folder)"
    else:
        train, val, files = carve_val(cfg, data, files, in_place=on_device)
        each = " of each class's" if data.carved else " of the"
        val_source = f"{cfg.val_fraction:g}{each} training images" if len(val[1]) else "none"
    pairs = (train, val, (data.test_images, data.test_labels))
    if on_device:
        on = [tuple(t.to(device) for t in pair) for pair in pairs]
    else:
        on = [(images if isinstance(images, HostImages) else HostImages(images, device=device),
               labels.to(device)) for images, labels in pairs]
    return DeviceSplits(data, device, *on, channel_stats(on[0][0]), files=files,
                        image_size_reason=reason, val_source=val_source, on_device=on_device,
                        placement_reason=placement, stream=stream)


def streamed(cfg: TrainConfig, found: Found) -> Found:
    """--stream: what is decoded into the cache, of shards: validation, test, and the first
    training shards (at least SAMPLE_IMAGES images) as a sample for statistics and warm-up."""
    if found.layout != "shards":
        raise ConfigError(f"--stream reads WebDataset shards, and {found.root} holds "
                          f"{found.layout}: write them with python -m training.shards "
                          f"{found.root} OUT, then train with --data-dir OUT --stream")
    if "val" not in found.splits and cfg.val_fraction > 0:
        raise ConfigError(f"the shards in {found.root} have no validation split, which a "
                          "streamed training validates on: write them again with python -m "
                          "training.shards SRC OUT --val-fraction 0.1, or train with "
                          "--val-fraction 0 (no validation, no early stopping)")
    sample, count = [], 0
    for shard, info in zip(found.splits["train"], read_manifest(found.root)["splits"]["train"]["shards"]):
        if count >= SAMPLE_IMAGES:
            break
        sample.append(shard)
        count += info["count"]
    return dataclasses.replace(found, splits={**found.splits, "train": sample})


def stream_spec(cfg: TrainConfig, found: Found, size: int) -> StreamSpec:
    """The training shards to stream; --stream-workers, but no more per process than it has
    shards (a worker with none would give no batch)."""
    train = read_manifest(found.root)["splits"]["train"]
    per_process = max(1, len(train["shards"]) // distributed.world().size)
    return StreamSpec(tuple(shard_source(found.root, s["name"]) for s in train["shards"]),
                      tuple(s["count"] for s in train["shards"]),
                      tuple(train["class_counts"][c] for c in found.classes), size,
                      cfg.shuffle_buffer, min(cfg.stream_workers, per_process))


def dataset_bytes(found: Found, size: int) -> int:
    """The uint8 images' size once decoded at `size` (CIFAR-10: its 60,000 at 32 px)."""
    count = 60_000 if found.layout == "torchvision" else sum(map(len, found.splits.values()))
    return count * 3 * size * size


def carve_val(cfg: TrainConfig, data: ImageData, files: dict[str, list[str]], in_place: bool = True):
    """The validation split held out of the training images: as views, the rows moved in
    place so the training ones come first (no copy of the images); or, for images left in
    the memory-mapped cache (`in_place=False`), as the rows of each split (HostImages)."""
    labels = data.train_labels
    if data.carved:
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed, data.classes)
    else:
        train_idx, val_idx = split_indices(len(labels), cfg.val_fraction, cfg.split_seed)
    if "train" in files:
        names = files["train"]
        files = {**files, "train": [names[i] for i in train_idx.tolist()],
                 "val": [names[i] for i in val_idx.tolist()]}
    if not in_place:
        return ((HostImages(data.train_images, train_idx), labels[train_idx]),
                (HostImages(data.train_images, val_idx), labels[val_idx]), files)
    n = train_then_val(data.train_images, labels, train_idx, val_idx)
    images = data.train_images
    return (images[:n], labels[:n]), (images[n:], labels[n:]), files


@dataclass
class Loaders:
    train: DeviceLoader
    val: DeviceLoader
    test: DeviceLoader


@dataclass
class Setup:
    """The training objects of one run, built from its config and data splits."""

    prep: Preprocessing
    state: TrainingState  # the model, optimizer, training loader...
    network: nn.Module  # state.model; under torchrun, in DDP; compiled when asked (shared parameters)
    loaders: Loaders
    loss_fn: nn.Module
    precision: str
    compile_mode: str
    compile_seconds: float = 0.0
    start: FitResult | None = None  # where a resumed run goes on
    world_params: dict = field(default_factory=dict)  # under torchrun: its processes and devices
    whole: nn.Module | None = None  # with cached features: the network whose head state.model is
    feature_params: dict = field(default_factory=lambda: dict(NOT_CACHED))
    spec: ModelSpec | None = None  # the model's, resolved once by build

    @property
    def model(self) -> nn.Module:
        """The whole network, as logged (with cached features, the loop trains its head)."""
        return self.whole if self.whole is not None else self.state.model


def preprocessing(cfg: TrainConfig, splits: DeviceSplits, spec: ModelSpec) -> Preprocessing:
    # pretrained features expect the inputs they were trained on
    mean, std = spec.pretrained_stats if cfg.weights != "none" else splits.scratch_stats
    image_size = splits.data.image_size
    return Preprocessing(image_size, cfg.input_size or spec.input_side(image_size),
                         mean, std, cfg.tta)


def loss_for(cfg: TrainConfig, splits: DeviceSplits) -> nn.Module:
    """Cross-entropy, its classes weighted by N / (classes x count) with --class-weights
    balanced (a class with no training image weighs 0)."""
    weight = None
    if cfg.class_weights == "balanced":
        counts = splits.train_counts().double()
        weight = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1)), 0.0)
        weight = weight.float().to(splits.device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def check_world(cfg: TrainConfig, splits: DeviceSplits) -> None:
    """Several processes share each batch: it must split evenly, and every process needs images."""
    size = distributed.world().size
    if cfg.batch_size % size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch, shared by the "
                          f"{size} processes of this training: it must divide by {size} (e.g. "
                          f"{cfg.batch_size // size * size or size})")
    if cfg.sync_bn and size > 1 and splits.device.type != "cuda":
        raise ConfigError("--sync-bn needs GPUs (NCCL): PyTorch's SyncBatchNorm does not train "
                          "on the CPU; leave it off there")
    if cfg.unfreeze_after and size > 1:
        raise ConfigError("--unfreeze-after changes which parameters train midway, which "
                          "DistributedDataParallel does not allow: under torchrun train all "
                          "layers from the start (--freeze none, with --backbone-lr-scale)")
    if splits.train_size < size:
        raise ConfigError(f"{splits.train_size} training image(s) for {size} processes: "
                          "every process needs at least one")


def augmentation_for(cfg: TrainConfig) -> Augmentation:
    if not cfg.augment:
        return Augmentation()
    return Augmentation(cfg.crop_padding, cfg.crop_fill, cfg.flip)


def make_loaders(cfg: TrainConfig, splits: DeviceSplits, prep: Preprocessing,
                 channels_last: bool) -> Loaders:
    """Under torchrun every loader gives this process its share; an evaluation batch stays
    --eval-batch-size per process."""
    world = distributed.world()
    shard, transform = Shard(world.rank, world.size), InputTransform(prep)
    sampling = Sampling(shuffle=True, seed=cfg.seed, augmentation=augmentation_for(cfg),
                        drop_last=splits.train_size > cfg.batch_size or splits.stream is not None,
                        balanced=cfg.sampler == "balanced")
    if splits.stream:
        train = StreamLoader(splits.stream, *splits.train, cfg.batch_size, transform, sampling,
                             channels_last=channels_last, shard=shard)
    else:
        train = DeviceLoader(*splits.train, cfg.batch_size, transform, sampling,
                             channels_last=channels_last, shard=shard)
    eval_batch = cfg.eval_batch_size * world.size
    return Loaders(train, *(DeviceLoader(*split, eval_batch, transform, channels_last=channels_last,
                                         shard=shard) for split in (splits.val, splits.test)))


def optimizer_for(cfg: TrainConfig, model: nn.Module, head: str | None) -> torch.optim.Optimizer:
    """The config's optimizer; `head` is the model's head module (its spec's)."""
    settings = OptimizerSettings(
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        bias_lr_scale=cfg.bias_lr_scale, backbone_lr_scale=cfg.backbone_lr_scale, head=head,
        include_frozen=bool(cfg.unfreeze_after), muon_lr=cfg.muon_lr,
        muon_momentum=cfg.muon_momentum)
    return make_optimizer(cfg.optimizer, model, settings)


def schedule_for(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                 steps_per_epoch: int) -> Schedule | None:
    return make_scheduler(cfg.schedule, optimizer, cfg.epochs * steps_per_epoch)


def training_state(cfg: TrainConfig, model: nn.Module, loader: DeviceLoader | FeatureLoader,
                   precision: str, head: str | None) -> TrainingState:
    optimizer = optimizer_for(cfg, model, head)
    return TrainingState(
        model, optimizer, loader, EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta),
        scheduler=schedule_for(cfg, optimizer, len(loader)),
        scaler=torch.amp.GradScaler(loader.device.type) if precision == "fp16" else None,
        averager=Lookahead(model, cfg.epochs * len(loader)) if cfg.lookahead else None,
        unfreezer=Unfreezer.of(model, cfg.unfreeze_after), sums=EpochSums())


def compiled(setup: Setup, log=print) -> Setup:
    """The network compiled and warmed up before the clock starts; eager when compiling fails.
    The compiled module shares its parameters with the model, which is what gets saved and
    evaluated (eager evaluation: no recompiling for each evaluation batch shape)."""
    if setup.compile_mode == "none":
        return setup
    network = torch.compile(setup.network, mode=setup.compile_mode)
    try:
        setup.compile_seconds = warm_up(network, setup.model, setup.state.optimizer,
                                        setup.loaders.train, setup.loss_fn,
                                        autocast=autocast_for(setup.loaders.train.device,
                                                              setup.precision))
        setup.network = network
    except Exception as exc:  # noqa: BLE001 - no compiler toolchain, an unsupported op...
        log(f"warning: torch.compile ({setup.compile_mode}) failed, training without it: "
            f"{brief(exc)}")
        setup.compile_mode = "none"
    return setup


@dataclass
class Parts:
    """What the loop trains and on what: the network itself on images, or its head on the
    backbone's cached outputs (`whole` is then the network, `feature_params` what was cached)."""

    trained: nn.Module
    loaders: Loaders
    whole: nn.Module | None = None
    feature_params: dict = field(default_factory=lambda: dict(NOT_CACHED))


def on_device(cfg: TrainConfig, model: nn.Module, device: torch.device) -> nn.Module:
    channels_last = cfg.channels_last and is_convolutional(model)
    return model.to(device, memory_format=torch.channels_last if channels_last
                    else torch.preserve_format)


def on_images(cfg: TrainConfig, splits: DeviceSplits, model: nn.Module,
              prep: Preprocessing) -> Parts:
    model = on_device(cfg, model, splits.device)
    if cfg.sync_bn and distributed.world().size > 1:  # in place: the same parameters
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loaders = make_loaders(cfg, splits, prep, cfg.channels_last and is_convolutional(model))
    if cfg.whiten_init:
        whiten_first_conv(model, loaders.train.transform(whitening_sample(splits.train[0],
                                                                          cfg.seed)))
    return Parts(model, loaders)


def on_features(cfg: TrainConfig, splits: DeviceSplits, model: nn.Module, prep: Preprocessing,
                head: str, log=print) -> Parts:
    model = on_device(cfg, model, splits.device)
    features = frozen_features(cfg, model, head, prep, splits, log)
    return Parts(model.get_submodule(head), Loaders(*feature_loaders(cfg, features, splits)),
                 whole=model, feature_params=features.params())


def build(cfg: TrainConfig, splits: DeviceSplits, resume_from: dict | None = None,
          log=print) -> Setup:
    """Model, loaders, optimizer and the rest, seeded; restored from `resume_from` (a
    checkpoint) when given; compiled when asked."""
    device, data = splits.device, splits.data
    precision = resolve_precision(cfg.precision, device)
    check_world(cfg, splits)
    torch.manual_seed(cfg.seed)
    spec = get_spec(cfg.model)  # resolved once, carried in the Setup
    model = build_model(cfg.model, splits.num_classes, data.image_size, weights=cfg.weights,
                        freeze=cfg.freeze)
    prep = preprocessing(cfg, splits, spec)
    cached = cfg.uses_feature_cache
    parts = (on_features(cfg, splits, model, prep, spec.head, log) if cached
             else on_images(cfg, splits, model, prep))
    state = training_state(cfg, parts.trained, parts.loaders.train, precision, spec.head)
    start = restore(resume_from, state) if resume_from is not None else None
    setup = Setup(prep, state, distributed.wrap(parts.trained, device), parts.loaders,
                  loss_for(cfg, splits), precision,
                  "none" if cached else compile_mode(cfg, device), start=start,
                  world_params=distributed.describe(describe_device(device)["device_name"],
                                                     cfg.batch_size),
                  whole=parts.whole, feature_params=parts.feature_params, spec=spec)
    return compiled(setup, log)
