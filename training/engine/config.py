"""The training command's configuration: one dataclass, resolved in layers.

Defaults, then the chosen model's recipe (and its fine-tuning recipe when pretrained weights
are used), then a config file (TOML or YAML), then command-line flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from shared.messages import BadInput, mask_secrets, shown
from shared.onnx_model import RUNTIMES
from shared.preprocess import MAX_IMAGE_SIDE, TTA_MODES
from training.engine.batches import FLIPS
from training.engine.data import DEFAULT_CACHE_DIR
from training.engine.models import MODELS, get_spec
from training.engine.optim import OPTIMIZERS, SCHEDULES

REGISTERED_NAME = re.compile(r"[^\W_][\w.-]{0,99}")
# --compile's choices: the torch.compile modes, and two of our own
COMPILE_MODES = {
    "none": "eager", "auto": "default on CUDA, none elsewhere (falls back to eager if compiling "
    "fails)", "default": "torch.compile", "reduce-overhead": "adds CUDA graphs",
    "max-autotune": "searches kernels (slow to compile)"}


class ConfigError(BadInput):
    """An invalid setting; the message names it and the valid choices."""


def opt(default: Any, help: str, choices: tuple | None = None, **rules: Any) -> Any:
    """A setting: its default, help and choices, and the rules its value obeys (checked by
    `validate`): min, max (inclusive), below (exclusive), positive, unit (for messages);
    switch=True makes a bool a flag that only turns it on (--no-register); added=True marks a
    setting added after checkpoints began to be written: a checkpoint without it was written
    before it existed, when training behaved as its default does, and resumes with it.
    """
    return field(default=default, metadata={"help": help, "choices": choices, **rules})


def check_rules(name: str, value: Any, rules: Mapping[str, Any]) -> None:
    """Raise ConfigError if `value` breaks the field's rules (None: unset, always allowed)."""
    if value is None:
        return
    low, high, below = rules.get("min"), rules.get("max"), rules.get("below")
    if rules.get("positive") and not value > 0:
        raise ConfigError(f"{name} must be a positive number (got {value})")
    if below is not None and not low <= value < below:
        raise ConfigError(f"{name} must be in [{low:g}, {below:g}) (got {value})")
    if high is not None and not low <= value <= high:
        raise ConfigError(f"{name} must be {low} to {high} {rules.get('unit', '')}".rstrip()
                          + f" (got {value})")
    if low is not None and value < low:
        need = "must not be negative" if low == 0 else f"must be at least {low}"
        raise ConfigError(f"{name} {need} (got {value})")


@dataclass
class TrainConfig:
    model: str = opt("cnn", f"model to train: {', '.join(MODELS)}, or timm/NAME for any timm "
                            "model (--list-models describes them)")
    data_dir: str = opt("data", "the dataset's folder: train/<class>/ and test/<class>/ (and "
                                "val/), <class>/ folders with no split, train/ with a labels "
                                "CSV, WebDataset shards with their manifest.json (or their "
                                "URL: https://HOST/DIR, or pipe:CMD with {} for each file "
                                "name), or CIFAR-10 (downloaded into an empty or missing folder)")
    labels: str | None = opt(None, "a CSV of file id,label for the images in DATA_DIR/train/ "
                                   "(default: DATA_DIR/trainLabels.csv when there is one)",
                             added=True)
    image_size: int | None = opt(None, "side the images are stored at (default: the model's "
                                       "input side, or for a model built for small images the "
                                       "photos' median shorter side, at most 64; never larger "
                                       "than the photos' median)", min=8, max=MAX_IMAGE_SIDE,
                                 unit="pixels")
    val_fraction: float = opt(0.1, "share of the training images held out for validation (0: "
                                   "train on all of them, with no validation and no early "
                                   "stopping); a given val/ folder is used instead",
                              min=0, below=1)
    test_fraction: float = opt(0.1, "class folders with no split, or a labels file: share of "
                                    "each class held out for testing (fixed by the file names)",
                               min=0.01, below=1, added=True)
    max_skipped: float = opt(0.05, "share of the image files that may be unreadable: they are "
                                   "skipped and listed; more stops the run with the list",
                             min=0, max=1, added=True)
    class_weights: str = opt("none", "balanced: weigh each class's loss by the inverse of its "
                                     "training images' count", ("none", "balanced"), added=True)
    sampler: str = opt("shuffle", "balanced: draw each epoch's training images with "
                                  "replacement, every class equally often", ("shuffle", "balanced"),
                       added=True)
    split_seed: int = opt(0, "seed of the train/validation split (fixed across runs)")
    cache_dir: str = opt(str(DEFAULT_CACHE_DIR), "where decoded datasets are cached")
    data_on_device: str = opt("auto", "hold the whole dataset on the training device (yes), or "
                                      "leave it in the memory-mapped cache on disk and send each "
                                      "batch (no); auto: yes when it fits in half the device's "
                                      "free memory", ("auto", "yes", "no"), added=True)
    stream: bool = opt(False, "WebDataset shards: stream the training images from their "
                              "shards each epoch (worker processes decoding, a shuffle buffer, "
                              "each process its own shards) instead of decoding them into the "
                              "cache; validation and test are decoded from their own shards",
                       switch=True, added=True)
    shuffle_buffer: int = opt(2000, "--stream: images each stream worker shuffles among", min=1,
                              added=True)
    stream_workers: int = opt(2, "--stream: DataLoader worker processes decoding the shards, "
                                 "per training process (0: decode in the training process)",
                              min=0, added=True)
    decode_workers: int = opt(0, "processes decoding the images into the cache (0: one per "
                                 "core, at most 8; fewer need less memory)", min=0, added=True)
    epochs: int = opt(30, "maximum number of epochs", min=1)
    batch_size: int = opt(128, "training batch size; under torchrun the global batch, shared "
                               "by the processes", min=1)
    eval_batch_size: int = opt(1000, "evaluation batch size", min=1)
    optimizer: str = opt("sgd", "optimizer; muon: orthogonalised momentum for the hidden "
                                "layers' weights (--muon-lr, --muon-momentum), Nesterov SGD for "
                                "the rest", tuple(OPTIMIZERS))
    lr: float = opt(0.05, "learning rate (peak rate for onecycle)", positive=True)
    muon_lr: float = opt(0.02, "optimizer muon: learning rate of the hidden layers' weights",
                         positive=True)
    muon_momentum: float = opt(0.95, "optimizer muon: momentum of the hidden layers' weights",
                               min=0)
    weight_decay: float = opt(5e-4, "weight decay", min=0)
    momentum: float = opt(0.9, "SGD momentum", min=0)
    nesterov: bool = opt(True, "Nesterov momentum for SGD")
    schedule: str = opt("onecycle", "learning-rate schedule (linear: warm up over 23%% of the "
                                    "steps from 0.2x, then down to 0.07x; decay: straight "
                                    "down from the full rate to 0)",
                        tuple(SCHEDULES))
    bias_lr_scale: float = opt(1.0, "learning-rate multiplier for biases and normalization "
                                    "parameters (their weight decay is divided by it)",
                                positive=True)
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss", min=0,
                                 below=1)
    augment: bool = opt(True, "augment training batches (random crop and flip)")
    crop_padding: int = opt(4, "random-crop padding in pixels (0: no crop)", min=0)
    crop_fill: str = opt("zeros", "what the crop padding holds", ("zeros", "reflect"))
    flip: str = opt("random", "horizontal flip: random, alternate (each image mirrored in "
                              "every other epoch) or none", tuple(FLIPS))
    whiten_init: bool = opt(False, "set the first conv's filters by whitening image patches "
                                   "and keep them fixed")
    lookahead: bool = opt(False, "lookahead weight averaging: every 5 steps the weights are "
                                 "pulled toward a running average, and end on it")
    tta: str = opt("none", "test-time augmentation for validation, test and the logged model: "
                           f"{', '.join(TTA_MODES)} (flip-translate: 6 views)", TTA_MODES)
    compile: str = opt("auto", "torch.compile the training step: " + "; ".join(
        f"{mode}: {what}" for mode, what in COMPILE_MODES.items()), tuple(COMPILE_MODES))
    weights: str = opt("none", "initial weights: none (from scratch), imagenet, or a checkpoint path")
    freeze: str = opt("none", "none: train all layers; backbone: train only the new head",
                      ("none", "backbone"))
    feature_cache: bool = opt(True, "with --freeze backbone: compute the backbone's outputs once "
                                    "per image and view, cache them on disk, and train the head "
                                    "on them", added=True)
    feature_views: int = opt(2, "feature cache: views of each training image (1: as is, 2: and "
                                "mirrored, more: random crops and flips)", min=1, max=16, added=True)
    feature_runtime: str = opt("auto", "feature cache: what runs the frozen backbone for the "
                                       "training images: pt2 (PyTorch), onnx or onnx-int8 (an "
                                       "ONNX export of the backbone, made and checked once, then "
                                       "kept), or auto (the fastest such export that passed its "
                                       "check, else pt2)", ("auto", *RUNTIMES), added=True)
    unfreeze_after: int = opt(0, "with --freeze backbone: train all layers after this many "
                                 "head-only epochs (0: never)", min=0, added=True)
    backbone_lr_scale: float = opt(1.0, "fine-tuning: the backbone's learning rate as a multiple "
                                        "of --lr (the head's)", positive=True, added=True)
    input_size: int | None = opt(None, "network input side (default: the model's, 224 for "
                                       "alexnet/vgg16, else the image size)", min=8,
                                 max=MAX_IMAGE_SIDE, unit="pixels")
    photo_size: int | None = opt(None, "side of the images the logged model takes: consumers "
                                       "(the app, gui.classify) decode photos to it, and the "
                                       "model resizes them to its input. Default: the dataset's "
                                       "image size, as trained; larger keeps a photo's detail "
                                       "for a model with a larger input", min=8,
                                 max=MAX_IMAGE_SIDE, unit="pixels", added=True)
    seed: int = opt(0, "seed for weights, shuffling and augmentation")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = opt("auto", "auto: bf16 (fp16 if unsupported) on CUDA, fp32 elsewhere",
                         ("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = opt(True, "channels_last memory layout for conv nets")
    sync_bn: bool = opt(False, "under torchrun on GPUs: BatchNorm statistics over the whole "
                               "global batch (SyncBatchNorm) rather than each process's share", added=True)
    patience: int = opt(10, "early stopping: epochs without improvement before stopping (0: off)",
                        min=0)
    min_delta: float = opt(0.0, "early stopping: smallest change that counts as improvement",
                           min=0)
    monitor: str = opt("val_acc", "early stopping: metric to watch", ("val_acc", "val_loss"))
    async_logging: bool = opt(True, "write checkpoints and epoch metrics on a background "
                                    "thread, so training never waits on the disk or the server")
    checkpoint_every: int = opt(1, "save a checkpoint every N epochs (0: never); epoch metrics "
                                   "reach MLflow with each checkpoint", min=0)
    checkpoint_steps: int = opt(0, "also save a checkpoint every N training steps within an "
                                   "epoch (0: at epoch ends only): a run killed mid-epoch "
                                   "resumes after its last such step, every image of that epoch "
                                   "seen once", min=0, added=True)
    resume: str | None = opt(None, "RUN_ID or 'last': continue that run from its checkpoint "
                                   "(its own settings are used)")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                         "else sqlite:///mlruns/mlflow.db)")
    experiment: str = opt("training", "MLflow experiment name")
    run_name: str | None = opt(None, "MLflow run name (default: model and weights)")
    register: str | None = opt(None, "registered model name (default: <dataset>-<model>)")
    no_register: bool = opt(False, "do not register the model", switch=True)
    improves_on: str | None = opt(None, "NAME/VERSION of the registered version this run "
                                        "retrains (on corrected data, say): tagged on the "
                                        "version it registers, as its lineage", added=True)
    system_metrics: bool = opt(True, "log CPU, memory and GPU use through MLflow")
    progress: bool = opt(True, "show a progress bar during each epoch")

    def validate(self) -> TrainConfig:
        spec = get_spec(self.model)
        kinds = setting_types(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if kinds[f.name] is float and value is not None and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number (got {value})")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} = {shown(value)} is not one of {', '.join(choices)}")
            check_rules(f.name, value, f.metadata)
        if self.val_fraction == 0 and self.patience:
            raise ConfigError("early stopping watches the validation split, and val_fraction 0 "
                              "leaves none: add --patience 0, or keep a --val-fraction")
        if self.backbone_lr_scale != 1 and spec.head is None:
            raise ConfigError(f"--backbone-lr-scale sets the rate of all but the head, and "
                              f"{self.model} has no separate head; models with one: "
                              f"{', '.join(n for n, s in MODELS.items() if s.head)}, timm/NAME")
        if self.uses_feature_cache and self.tta != "none":
            raise ConfigError(f"the feature cache scores each image's plain view, so --tta "
                              f"{self.tta} cannot apply: use --tta none, or --no-feature-cache")
        if self.unfreeze_after and self.freeze != "backbone":
            raise ConfigError("--unfreeze-after N starts with a frozen backbone: add --freeze "
                              "backbone (or drop --unfreeze-after to train all layers from the "
                              "start)")
        if self.unfreeze_after >= self.epochs:
            raise ConfigError(f"--unfreeze-after {self.unfreeze_after} leaves no epoch of the "
                              f"{self.epochs} to train all layers: make it less than --epochs")
        if self.stream and self.uses_feature_cache:
            raise ConfigError("--stream reads the training images anew each epoch, and the "
                              "feature cache needs them all at once: add --no-feature-cache, "
                              "or leave out --stream")
        if self.stream and self.sampler == "balanced":
            raise ConfigError("--sampler balanced draws images by index, which a stream has "
                              "not: use --class-weights balanced with --stream, or leave out "
                              "--stream")
        if self.register is not None and not REGISTERED_NAME.fullmatch(self.register):
            raise ConfigError(f"register name {shown(self.register)}: use letters, digits, '_', '.' "
                              "and '-' (up to 100, starting with a letter or digit); the name "
                              "goes into models:/NAME@ALIAS URIs and registry searches")
        if self.improves_on is not None and not re.fullmatch(
                REGISTERED_NAME.pattern + r"/\d+", self.improves_on):
            raise ConfigError(f"--improves-on {shown(self.improves_on)}: name a registered "
                              "version as NAME/VERSION (e.g. pets-lite0/3)")
        return self

    @property
    def uses_feature_cache(self) -> bool:
        """The backbone stays frozen the whole run, and the feature cache is not turned off."""
        return self.freeze == "backbone" and self.feature_cache and not self.unfreeze_after

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """The settings as logged, printed and checkpointed: passwords in URIs masked."""
        return {k: mask_secrets(v) if isinstance(v, str) else v for k, v in self.to_dict().items()}


def added_settings(cls: type = TrainConfig) -> tuple[str, ...]:
    """The settings marked added=True: a checkpoint may lack them (it is older than they are)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("added"))


def setting_types(cls: type = TrainConfig) -> dict[str, type]:
    """Each field's type as the dataclass declares it (bool, int, float or str; None allowed
    where the type says `| None`)."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in fields(cls):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        kinds[f.name] = args[0] if args else hints[f.name]
    return kinds


CONFIG_BYTES = 1 << 20  # a config file is settings, not data
# what a run's config.yaml records beside its settings; dropped when it is read back as a
# config file, so a run's recipe starts a new run (the app's Retrain)
RESOLVED_PRECISION = "resolved_precision"  # the precision 'auto' became
RECORDED = (RESOLVED_PRECISION,)


def coerce(name: str, value: Any, kind: type, source: str) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, dict, tuple, set)):
        raise ConfigError(f"{source}: {name} must be a single value, not a "
                          f"{type(value).__name__} (got {shown(value)})")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false (got {shown(value)})")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind in (int, float) and isinstance(value, str) and len(value) > 100:
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{source}: {name} must be {kind.__name__} (got {shown(value)})") from None


def read_config_file(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """A TOML or YAML file of settings named like the dataclass fields (dashes allowed)."""
    path = Path(path)
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file; pass a TOML or YAML file")
        if path.stat().st_size > CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes, over "
                              f"{CONFIG_BYTES:,}: a config file holds settings, not data")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it "
                          "as UTF-8") from None
    try:
        data = tomllib.loads(text) if kind == "TOML" else load_yaml(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        message = shown(" ".join(str(exc).split()), text=True)
        raise ConfigError(f"config file {path} is not valid {kind}: {message}") from None
    except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
        raise ConfigError(f"config file {path} cannot be read as {kind}: "
                          f"{type(exc).__name__}: {shown(str(exc), text=True)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    names = [key for key in data if not isinstance(key, str)]
    if names:
        raise ConfigError(f"config file {path}: setting names are text; {shown(names[0])} "
                          "is not")
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    return typed_settings({k: v for k, v in settings.items() if k not in RECORDED},
                          f"config file {path}", cls)


def load_yaml(text: str) -> Any:
    """YAML without aliases: settings never need them, and a few hundred bytes of nested
    aliases expand to billions of values (a "billion laughs" file)."""
    if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
        raise yaml.YAMLError("aliases (*name) are not accepted in a config file; write the "
                             "values out")
    return yaml.safe_load(text)


TRAIN_DESCRIPTION = ("Train an image classifier; every run is tracked in MLflow and its model "
                     "registered. Settings resolve as: defaults < the model's recipe < --config "
                     "file < flags.")


def build_parser(cls: type = TrainConfig, prog: str = "python -m training.train",
                 description: str = TRAIN_DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML or YAML file of settings")
    parser.add_argument("--list-models", action="store_true", help="list the models and exit")
    kinds = setting_types(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.metadata.get("switch"):
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        elif kinds[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kinds[f.name],
                                choices=f.metadata.get("choices"), help=help_text)
    return parser


def resolve(cli: dict[str, Any], file_settings: dict[str, Any] | None = None,
            cls: type = TrainConfig) -> Any:
    """defaults < model recipe (< fine-tuning recipe) < file < CLI."""
    file_settings = file_settings or {}
    chosen = {**file_settings, **cli}
    spec = get_spec(chosen.get("model", TrainConfig.model))
    layers = [(f"the {spec.name} recipe", spec.recipe)]
    if chosen.get("weights", "none") != "none":
        layers.append((f"the {spec.name} fine-tuning recipe", spec.finetune_recipe))
    settings = {}
    for source, layer in layers:
        settings.update(typed_settings(layer, source, cls))
    settings.update(typed_settings(chosen, "the settings given", cls))
    return cls(**settings).validate()


def typed_settings(settings: Mapping[str, Any], source: str,
                   cls: type = TrainConfig) -> dict[str, Any]:
    """`settings` checked against the fields: an unknown name is an error naming it, and each
    value is given its field's type (or refused, naming it)."""
    kinds = setting_types(cls)
    unknown = sorted(set(settings) - set(kinds))
    if unknown:
        raise ConfigError(f"{source}: unknown setting {', '.join(map(shown, unknown[:5]))}; valid "
                          f"settings: {', '.join(kinds)}")
    return {k: coerce(k, v, kinds[k], source) for k, v in settings.items()}


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
               cls: type = TrainConfig) -> tuple[Any, argparse.Namespace]:
    """(config, raw args). The config is None when --list-models was asked."""
    args = (parser or build_parser(cls)).parse_args(argv)
    if getattr(args, "list_models", False):
        return None, args
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "list_models")}
    file_settings = read_config_file(args.config, cls) if getattr(args, "config", None) else {}
    return resolve(cli, file_settings, cls), args
