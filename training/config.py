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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from shared.batches import FLIPS
from shared.data import DEFAULT_CACHE_DIR
from shared.preprocess import MAX_IMAGE_SIDE, TTA_MODES
from shared.store import mask_secrets
from shared.models import MODELS, get_spec
from training.optim import OPTIMIZERS, SCHEDULES


REGISTERED_NAME = re.compile(r"[^\W_][\w.-]{0,99}")
COMPILE_MODES = ("none", "auto", "default", "reduce-overhead", "max-autotune")


class ConfigError(Exception):
    """An invalid setting; the message names it and the valid choices."""


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    model: str = opt("cnn", "model to train (--list-models lists them)", tuple(MODELS))
    data_dir: str = opt("data", "CIFAR-10 is downloaded here, or: a folder with train/<class>/ "
                                "and test/<class>/ image folders")
    image_size: int | None = opt(None, "image-folder datasets: side to resize images to "
                                       "(default: the first image's size)")
    val_fraction: float = opt(0.1, "share of the training images held out for validation (0: "
                                   "train on all of them, with no validation and no early stopping)")
    split_seed: int = opt(0, "seed of the train/validation split (fixed across runs)")
    cache_dir: str = opt(str(DEFAULT_CACHE_DIR), "where decoded datasets are cached")
    epochs: int = opt(30, "maximum number of epochs")
    batch_size: int = opt(128, "training batch size")
    eval_batch_size: int = opt(1000, "evaluation batch size")
    optimizer: str = opt("sgd", "optimizer; muon: orthogonalised momentum for the hidden "
                                "layers' weights (--muon-lr, --muon-momentum), Nesterov SGD for "
                                "the rest", tuple(OPTIMIZERS))
    lr: float = opt(0.05, "learning rate (peak rate for onecycle)")
    muon_lr: float = opt(0.02, "optimizer muon: learning rate of the hidden layers' weights")
    muon_momentum: float = opt(0.95, "optimizer muon: momentum of the hidden layers' weights")
    weight_decay: float = opt(5e-4, "weight decay")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum for SGD")
    schedule: str = opt("onecycle", "learning-rate schedule (linear: warm up over 23%% of the "
                                    "steps from 0.2x, then down to 0.07x; decay: straight "
                                    "down from the full rate to 0)",
                        tuple(SCHEDULES))
    bias_lr_scale: float = opt(1.0, "learning-rate multiplier for biases and normalization "
                                    "parameters (their weight decay is divided by it)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    augment: bool = opt(True, "augment training batches (random crop and flip)")
    crop_padding: int = opt(4, "random-crop padding in pixels (0: no crop)")
    crop_fill: str = opt("zeros", "what the crop padding holds", ("zeros", "reflect"))
    flip: str = opt("random", "horizontal flip: random, alternate (each image mirrored in "
                              "every other epoch) or none", FLIPS)
    whiten_init: bool = opt(False, "set the first conv's filters by whitening image patches "
                                   "and keep them fixed")
    lookahead: bool = opt(False, "lookahead weight averaging: every 5 steps the weights are "
                                 "pulled toward a running average, and end on it")
    tta: str = opt("none", "test-time augmentation for validation, test and the logged model: "
                           "none, flip, flip-translate (6 views)", TTA_MODES)
    compile: str = opt("auto", "torch.compile the training step; auto: on CUDA only (falls "
                               "back to eager if compiling fails); reduce-overhead adds CUDA "
                               "graphs", COMPILE_MODES)
    weights: str = opt("none", "initial weights: none (from scratch), imagenet, or a checkpoint path")
    freeze: str = opt("none", "none: train all layers; backbone: train only the new head",
                      ("none", "backbone"))
    input_size: int | None = opt(None, "network input side (default: the model's, 224 for "
                                       "alexnet/vgg16, else the image size)")
    seed: int = opt(0, "seed for weights, shuffling and augmentation")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = opt("auto", "auto: bf16 (fp16 if unsupported) on CUDA, fp32 elsewhere",
                         ("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = opt(True, "channels_last memory layout for conv nets")
    patience: int = opt(10, "early stopping: epochs without improvement before stopping (0: off)")
    min_delta: float = opt(0.0, "early stopping: smallest change that counts as improvement")
    monitor: str = opt("val_acc", "early stopping: metric to watch", ("val_acc", "val_loss"))
    async_logging: bool = opt(True, "write checkpoints and epoch metrics on a background "
                                    "thread, so training never waits on the disk or the server")
    checkpoint_every: int = opt(1, "save a checkpoint every N epochs (0: never); epoch metrics "
                                   "reach MLflow with each checkpoint")
    resume: str | None = opt(None, "RUN_ID or 'last': continue that run from its checkpoint "
                                   "(its own settings are used)")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                         "else sqlite:///mlruns/mlflow.db)")
    experiment: str = opt("training", "MLflow experiment name")
    run_name: str | None = opt(None, "MLflow run name (default: model and weights)")
    register: str | None = opt(None, "registered model name (default: <dataset>-<model>)")
    no_register: bool = opt(False, "do not register the model")
    system_metrics: bool = opt(True, "log CPU, memory and GPU use through MLflow")
    progress: bool = opt(True, "show a progress bar during each epoch")

    def validate(self) -> "TrainConfig":
        get_spec(self.model)
        kinds = _types(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if kinds[f.name] is float and value is not None and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number (got {value})")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} = {value!r} is not one of {', '.join(choices)}")
        positive = ["epochs", "batch_size", "eval_batch_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("lr", "muon_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name} must be a positive number (got {getattr(self, name)})")
        for name in ("weight_decay", "momentum", "muon_momentum", "min_delta", "crop_padding",
                     "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (got {getattr(self, name)})")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.val_fraction == 0 and self.patience:
            raise ConfigError("early stopping watches the validation split, and val_fraction 0 "
                              "leaves none: add --patience 0, or keep a --val-fraction")
        if not (self.bias_lr_scale > 0 and math.isfinite(self.bias_lr_scale)):
            raise ConfigError(f"bias_lr_scale must be a positive number (got {self.bias_lr_scale})")
        for name in ("image_size", "input_size"):
            side = getattr(self, name)
            if side is not None and not 8 <= side <= MAX_IMAGE_SIDE:
                raise ConfigError(f"{name} must be 8 to {MAX_IMAGE_SIDE} pixels (got {side})")
        if self.register is not None and not REGISTERED_NAME.fullmatch(self.register):
            raise ConfigError(f"register name {self.register!r}: use letters, digits, '_', '.' "
                              "and '-' (up to 100, starting with a letter or digit); the name "
                              "goes into models:/NAME@ALIAS URIs and registry searches")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """The settings as logged, printed and checkpointed: passwords in URIs masked."""
        return {k: mask_secrets(v) if isinstance(v, str) else v for k, v in self.to_dict().items()}


def _types(cls: type = TrainConfig) -> dict[str, type]:
    kinds = {}
    for f in fields(cls):
        text = str(f.type)
        kinds[f.name] = bool if text == "bool" else int if "int" in text else \
            float if "float" in text else str
    return kinds


def _coerce(name: str, value: Any, kind: type, source: str) -> Any:
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false (got {value!r})")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {kind.__name__} (got {value!r})") from None


def read_config_file(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """A TOML or YAML file of settings named like the dataclass fields (dashes allowed)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    kinds = _types(cls)
    settings = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in kinds:
            raise ConfigError(f"config file {path}: unknown setting {key!r}; valid settings: "
                              f"{', '.join(kinds)}")
        settings[name] = _coerce(name, value, kinds[name], f"config file {path}")
    return settings


TRAIN_DESCRIPTION = ("Train an image classifier; every run is tracked in MLflow and its model "
                     "registered. Settings resolve as: defaults < the model's recipe < --config "
                     "file < flags.")


def build_parser(cls: type = TrainConfig, prog: str = "python -m training.train",
                 description: str = TRAIN_DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML or YAML file of settings")
    parser.add_argument("--list-models", action="store_true", help="list the models and exit")
    kinds = _types(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kinds[f.name] is bool and f.name != "no_register":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif f.name == "no_register":
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
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
    layers = dict(spec.recipe)
    if chosen.get("weights", "none") != "none":
        layers.update(spec.finetune_recipe)
    layers.update(chosen)
    return cls(**layers).validate()


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
               cls: type = TrainConfig) -> tuple[Any, argparse.Namespace]:
    """(config, raw args). The config is None when --list-models was asked."""
    args = (parser or build_parser(cls)).parse_args(argv)
    if getattr(args, "list_models", False):
        return None, args
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "list_models")}
    file_settings = read_config_file(args.config, cls) if getattr(args, "config", None) else {}
    return resolve(cli, file_settings, cls), args
