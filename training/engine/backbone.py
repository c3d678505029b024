"""What runs a frozen backbone for the feature cache: PyTorch (pt2), or an ONNX export of the
backbone, float or int8, kept beside the cache once it has passed its check.

A backbone export is the network up to its head's input, with the input transform in front
(float images in [0, 1] in, one feature row per image out), exported and (int8) calibrated on
a seeded sample of the run's training images, its first convolution kept in float32. Its
check scores up to 512 validation images (made up with training images where there are fewer)
with PyTorch and with the export, and classifies both by their nearest class mean (means of
PyTorch's features): the export passes when the two agree on at least `MIN_AGREEMENT` of the
images. `--feature-runtime auto` takes the fastest export of this backbone that passed, when
one exists; only the training images' features come from it, so validation, test and the
logged model stay PyTorch's.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shared.messages import BadInput
from shared.network import InputTransform
from shared.onnx_model import EXPORTS, MissingExtra, OnnxModule, check_onnx, open_session
from shared.preprocess import Preprocessing

MIN_AGREEMENT = 0.98
CHECK_IMAGES = 512
CALIBRATION_IMAGES = 512
Backbone = Callable[[torch.Tensor], torch.Tensor]  # float images in [0, 1] -> (N, width)


class _Captured(Exception):
    """Raised from the head's pre-hook: the head's input is all that is needed."""


@dataclass
class Runner:
    """The backbone the training images' features come from, and why it was chosen."""

    runtime: str
    backbone: Backbone
    reason: str
    check: dict | None = None

    def params(self) -> dict:
        figures = {f"feature_check_{k}": v for k, v in (self.check or {}).items()
                   if k in ("agreement", "cosine", "images_per_s", "images_per_s_pt2")}
        return {"feature_backbone_runtime": self.runtime, "feature_runtime_reason": self.reason,
                **figures}


def torch_backbone(model: nn.Module, head: str, transform: InputTransform,
                   channels_last: bool = False) -> Backbone:
    """What `model`'s `head` layer receives, computed by PyTorch in evaluation mode."""

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        outputs = []

        def grab(module: nn.Module, args: tuple) -> None:
            outputs.append(args[0].detach().flatten(1))
            raise _Captured

        hook = model.get_submodule(head).register_forward_pre_hook(grab)
        model.eval()
        x = transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            model(x)
        except _Captured:
            pass
        finally:
            hook.remove()
        return outputs[0]

    return run


def truncated(model: nn.Module, head: str, prep: Preprocessing) -> nn.Module:
    """A copy of `model` on the CPU that ends where its head begins, the input transform in
    front: what an ONNX backbone export holds."""
    body = copy.deepcopy(model).cpu().float().eval()
    parent, _, name = head.rpartition(".")
    setattr(body.get_submodule(parent) if parent else body, name, nn.Identity())
    return nn.Sequential(InputTransform(prep), body, nn.Flatten(1)).eval()


def choose(wanted: str, device: torch.device, folder: Path) -> tuple[str, str, dict | None]:
    """(runtime, reason, its check) for `--feature-runtime wanted`: auto takes the fastest
    export here that passed its check, else pt2."""
    if wanted == "pt2":
        return "pt2", "asked for (--feature-runtime pt2)", None
    if device.type != "cpu":
        if wanted != "auto":
            raise BadInput(f"--feature-runtime {wanted} runs the backbone with ONNX Runtime on "
                           f"the CPU, but this run trains on {device.type}: use --device cpu, "
                           "or --feature-runtime pt2")
        return "pt2", f"auto: the backbone runs on {device.type}", None
    if wanted != "auto":
        return wanted, f"asked for (--feature-runtime {wanted})", _read_check(folder, wanted)
    passed = {r: check for r in EXPORTS if (check := _read_check(folder, r)) and check["passed"]}
    if not passed:
        return "pt2", ("auto: no checked ONNX export of this backbone yet (--feature-runtime "
                       "onnx-int8 makes one)"), None
    best = max(passed, key=lambda r: passed[r]["images_per_s"])
    return best, (f"auto: the fastest checked export of this backbone ({passed[best]['speedup']:.1f}x "
                  f"pt2's images/s, agreement {passed[best]['agreement']:.2%})"), passed[best]


def _read_check(folder: Path, runtime: str) -> dict | None:
    try:
        check = json.loads((folder / f"{runtime}.json").read_text())
    except (OSError, ValueError):
        return None
    return check if isinstance(check, dict) and (folder / f"{runtime}.onnx").is_file() else None


def backbone_folder(cache_dir: str | Path, model_name: str, backbone: str, head: str,
                    prep: Preprocessing) -> Path:
    """Where this backbone's exports live: one folder per weights, head and preprocessing."""
    key = hashlib.sha256(json.dumps([backbone, head, prep.to_dict()]).encode()).hexdigest()
    return Path(cache_dir).expanduser() / "backbones" / f"{model_name.replace('/', '_')}-{key[:24]}"


def runner(wanted: str, model: nn.Module, head: str, prep: Preprocessing, pt2: Backbone,
           samples: Callable[[], dict[str, tuple[torch.Tensor, torch.Tensor]]], folder: Path,
           log=print) -> Runner:
    """The Runner for `wanted` (see `choose`): an export is made and checked when asked for
    and not here yet; one that fails its check leaves the features to PyTorch, saying so.
    `samples()` gives uint8 images and labels: "calibration" and "check"."""
    device = next(model.parameters()).device
    try:
        runtime, reason, check = choose(wanted, device, folder)
        if runtime == "pt2":
            return Runner("pt2", pt2, reason)
        if check is None:
            check = _make(runtime, model, head, prep, pt2, samples(), folder, log)
        session = OnnxModule(open_session(folder / f"{runtime}.onnx"))
    except MissingExtra as exc:
        if wanted != "auto":
            raise
        return Runner("pt2", pt2, f"auto: {exc}")
    if not check["passed"]:
        return Runner("pt2", pt2, f"the {runtime} export of this backbone failed its check "
                                  f"(agreement {check['agreement']:.2%} < {MIN_AGREEMENT:.0%}): "
                                  "features computed with pt2", check)
    return Runner(runtime, lambda x: session(x.cpu()).to(x.device), reason, check)


def _make(runtime: str, model: nn.Module, head: str, prep: Preprocessing, pt2: Backbone,
          samples: dict, folder: Path, log=print) -> dict:
    """Export the backbone in `runtime`, check it against PyTorch, keep both and the check."""
    from training.engine.exporting import quantize_int8, to_onnx

    folder.mkdir(parents=True, exist_ok=True)
    calibration = samples["calibration"][0]
    example = calibration[:2].float().div(255).cpu()
    started = time.perf_counter()
    path = to_onnx(truncated(model, head, prep), example, folder / "onnx.partial.onnx")
    if runtime == "onnx-int8":
        batches = [chunk.float().div(255).cpu().numpy() for chunk in calibration.split(32)]
        path = quantize_int8(path, folder / "onnx-int8.partial.onnx", batches, float_edges=True)
    check_onnx(path)
    export = OnnxModule(open_session(path))
    check = check_against(pt2, lambda x: export(x.cpu()).to(x.device), *samples["check"])
    check.update(runtime=runtime, seconds=round(time.perf_counter() - started, 1),
                 calibration_images=len(calibration) if runtime == "onnx-int8" else 0)
    path.replace(folder / f"{runtime}.onnx")
    (folder / f"{runtime}.json").write_text(json.dumps(check, indent=1))
    for leftover in folder.glob("*.partial.onnx"):
        leftover.unlink()
    log(f"features: {runtime} export of the backbone checked on {check['images']} images: "
        f"agreement {check['agreement']:.2%}, cosine {check['cosine']:.4f}, "
        f"{check['speedup']:.1f}x pt2's images/s ({'passed' if check['passed'] else 'failed'})")
    return check


def check_against(pt2: Backbone, export: Backbone, images: torch.Tensor,
                  labels: torch.Tensor, batch_size: int = 64) -> dict:
    """The export's features beside PyTorch's on `images`: mean cosine similarity, and how
    often a nearest-class-mean classifier (PyTorch's class means) gives both the same class;
    images/s of each, measured alternately."""
    ours, theirs, seconds = [], [], {"export": 0.0, "pt2": 0.0}
    for chunk in images.split(batch_size):
        x = chunk.float().div(255)
        for name, backbone, out in (("pt2", pt2, theirs), ("export", export, ours)):
            started = time.perf_counter()
            out.append(backbone(x).float())
            seconds[name] += time.perf_counter() - started
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    classes = labels.unique()
    means = torch.stack([theirs[labels == c].mean(0) for c in classes])
    agreement = (torch.cdist(ours, means).argmin(1) == torch.cdist(theirs, means).argmin(1))
    rates = {name: len(images) / max(s, 1e-9) for name, s in seconds.items()}
    figures = {"images": len(images), "agreement": float(agreement.double().mean()),
               "cosine": float(torch.cosine_similarity(ours, theirs, dim=1).mean()),
               "images_per_s": rates["export"], "images_per_s_pt2": rates["pt2"],
               "speedup": rates["export"] / rates["pt2"]}
    figures["passed"] = figures["agreement"] >= MIN_AGREEMENT
    return figures
