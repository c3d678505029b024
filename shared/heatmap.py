"""Where a model looked: Grad-CAM (Selvaraju et al., 2017) over the exported network.

The app and gui.classify hold the logged pt2 module, a torch.fx graph with no layer objects to
hook, so the feature map is found in the graph itself: the last convolutional feature map
before the first flat (N, features) value, i.e. the output of the last convolution's block,
at that convolution's resolution. For a model with test-time augmentation that is the
unflipped view's. The graph is run by an fx Interpreter that keeps that value; the gradient
of the chosen class's score with respect to it gives each channel's weight (its spatial mean),
and the weighted sum of the channels, rectified, is the heatmap. A network without
convolutions (the MLP) has no such map: NoHeatmap says so.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import fx

from shared.onnx_model import NO_HEATMAP


class NoHeatmap(Exception):
    """The network has no convolutional feature map to explain."""


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _is_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and any(
        name in str(node.target) for name in ("aten.conv2d", "aten.convolution"))


def feature_map_node(graph: fx.Graph) -> fx.Node:
    """The node whose value Grad-CAM weighs (see the module's docstring)."""
    nodes = list(graph.nodes)
    convs = [i for i, n in enumerate(nodes) if _is_conv(n)]
    if not convs:
        raise NoHeatmap("this model has no convolutional layers (an MLP sees the image as one "
                        "flat vector), so there is no heatmap of where it looked")
    flat = next((i for i in range(convs[0], len(nodes))
                 if _shape(nodes[i]) is not None and len(_shape(nodes[i])) == 2), len(nodes))
    last_conv = max(i for i in convs if i < flat)
    side = _shape(nodes[last_conv])[-2:]
    return [n for n in nodes[last_conv:flat] if (_shape(n) or ())[-2:] == side
            and len(_shape(n)) == 4][-1]


class _Keeping(fx.Interpreter):
    """Runs the graph, keeping the value of one node."""

    def __init__(self, module: fx.GraphModule, node: fx.Node):
        super().__init__(module)
        self.node, self.kept = node, None

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n is self.node:
            self.kept = value
        return value


class Explainer:
    """Grad-CAM heatmaps for an exported classifier that takes float images in [0, 1]."""

    def __init__(self, module: fx.GraphModule):
        if not isinstance(module, fx.GraphModule):
            raise NoHeatmap(NO_HEATMAP)
        self.module = module
        self.node = feature_map_node(module.graph)

    def heatmaps(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> (N, S, S) in [0, 1]: where the scores of `classes` (default:
        each image's predicted class) came from."""
        x = images.float().div(255).requires_grad_(True)
        with torch.enable_grad():
            runner = _Keeping(self.module, self.node)
            out = runner.run(x)
            scores = out[0] if isinstance(out, (tuple, list)) else out
            if classes is None:
                classes = scores.argmax(1)
            chosen = scores.gather(1, classes.view(-1, 1)).sum()
            grads, = torch.autograd.grad(chosen, runner.kept)
        activation = runner.kept.detach()
        cam = F.relu((grads.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
        return (cam / peak).squeeze(1)


def photo_with_heatmap(path, heat: torch.Tensor, side: int) -> np.ndarray:
    """The file's centre square (what the model sees) decoded at `side` pixels, as (side,
    side, 3) uint8, with `heat` laid over it."""
    from shared.preprocess import decode_image

    return overlay(decode_image(path, side).transpose(1, 2, 0), heat.numpy())


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An (H, W, 3) uint8 picture with the heatmap (any size, values in [0, 1]) laid over it
    in the 'jet' colours: red where the class's evidence was strongest."""
    h, w = image.shape[:2]
    heat = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    heat = F.interpolate(heat, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    colours = colormaps["jet"](heat)[..., :3] * 255
    return (image * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)
