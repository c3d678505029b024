"""ONNX copies of a logged classifier, opened so that nothing in them runs but their graph.

An export (`python -m training.export`) is a model folder of its own: an MLmodel whose only
flavor is the python_function served by `shared.serving`, metadata as the pt2 model's (class
names, preprocessing, calibration) plus its runtime and checked figures, and `data/model.onnx`
alone. ONNX Runtime would load a custom-operator library, read external tensor files from any
path a tensor names and build sessions of any size the file declares; so before it opens a
file, `check_onnx` reads the protobuf without external data and refuses anything this
project's exporter never writes: an operator outside the standard ONNX domains (or unknown to
them), external data outside the artifact's folder, a file or a tensor past sane sizes.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.messages import BadInput

if TYPE_CHECKING:
    import torch

ONNX_ARCHIVE = Path("data") / "model.onnx"
RUNTIMES = ("pt2", "onnx", "onnx-int8")
EXPORTS = RUNTIMES[1:]
EXTRA = "pip install 'cifarlab[export]'"
STANDARD_DOMAINS = ("", "ai.onnx")
MAX_FILE_BYTES = 1 << 30  # the largest export opened (EfficientNet-Lite0's is 18 MB)
MAX_TENSOR_ELEMENTS = 1 << 28  # one initializer (1 GiB of float32)
MAX_NODES = 100_000
INPUT, OUTPUT = "images", "scores"
# what the app says of an export, which it opens without PyTorch (shared.heatmap says it too)
NO_HEATMAP = "heatmaps need the pt2 runtime (Grad-CAM follows PyTorch's graph)"
RUNTIME_HELP = ("what runs the network: pt2 (PyTorch), or the version's checked onnx or onnx-int8 "
                "export (python -m training.export); default pt2")


class MissingExtra(BadInput):
    """onnx or onnxruntime is not installed."""


class UnsafeOnnx(Exception):
    """The file is not what this project's exporter writes; the message says what is wrong."""


def need(module: str):
    """Import onnx, onnxruntime or onnxscript, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"ONNX exports need the {module} package: {EXTRA}") from None


def check_onnx(path: Path) -> None:
    """Refuse (UnsafeOnnx) an ONNX file that is not a plain graph of standard operators with
    every tensor inside the file or in a file of its own folder."""
    onnx = need("onnx")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UnsafeOnnx(f"{path.name} is {size / 2**20:,.0f} MB, over the "
                         f"{MAX_FILE_BYTES >> 20} MB an export may take")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: protobuf's own errors
        raise UnsafeOnnx(f"{path.name} is not an ONNX model ({type(exc).__name__})") from None
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise UnsafeOnnx(f"it imports the operator domain {opset.domain!r}; an export uses "
                             "the standard ONNX operators only")
    if len(model.functions):
        raise UnsafeOnnx("it defines functions of its own; an export is one plain graph")
    nodes = _check_graph(onnx, model.graph, path.parent)
    if nodes > MAX_NODES:
        raise UnsafeOnnx(f"its graph has {nodes:,} nodes, over {MAX_NODES:,}")
    if [i.name for i in _inputs(model.graph)] != [INPUT] or [o.name for o in model.graph.output] != [OUTPUT]:
        raise UnsafeOnnx(f"its graph must take one input named {INPUT!r} and give one output "
                         f"named {OUTPUT!r}, as the exporter writes")


def _inputs(graph) -> list:
    initialized = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initialized]


def _check_graph(onnx, graph, folder: Path) -> int:
    """Every node and tensor of `graph` and its subgraphs; returns how many nodes."""
    for tensor in [*graph.initializer, *(s.values for s in graph.sparse_initializer)]:
        _check_tensor(onnx, tensor, folder)
    count = 0
    for node in graph.node:
        count += 1
        if node.domain not in STANDARD_DOMAINS or not onnx.defs.has(node.op_type, node.domain):
            raise UnsafeOnnx(f"its node {node.name or node.op_type!r} is the operator "
                             f"{node.domain + '::' if node.domain else ''}{node.op_type}, not a "
                             "standard ONNX operator")
        for attribute in node.attribute:
            for tensor in [attribute.t, *attribute.tensors] if attribute.HasField("t") else attribute.tensors:
                _check_tensor(onnx, tensor, folder)
            for subgraph in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                count += _check_graph(onnx, subgraph, folder)
    return count


def _check_tensor(onnx, tensor, folder: Path) -> None:
    elements = int(np.prod(tensor.dims, dtype=np.float64)) if len(tensor.dims) else 1
    if any(d < 0 for d in tensor.dims) or elements > MAX_TENSOR_ELEMENTS:
        raise UnsafeOnnx(f"its tensor {tensor.name!r} declares {list(tensor.dims)} elements, "
                         "past what an export holds")
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    target = (folder / location).resolve()
    if not location or os.path.isabs(location) or target.parent != folder.resolve():
        raise UnsafeOnnx(f"its tensor {tensor.name!r} names external data {location!r} "
                         "outside the model's own folder")
    if not target.is_file() or target.is_symlink():
        raise UnsafeOnnx(f"its tensor {tensor.name!r} names external data {location!r}, "
                         "which is not a file of the model's folder")
    try:
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0))
    except ValueError:
        raise UnsafeOnnx(f"its tensor {tensor.name!r} has a malformed external data offset") from None
    if offset < 0 or length < 0 or offset + length > target.stat().st_size:
        raise UnsafeOnnx(f"its tensor {tensor.name!r} reads past the end of {location!r}")


def open_session(path: Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU for a checked file (call `check_onnx` first): no
    custom-operator library is registered, so the standard operators are all it can run."""
    ort = need("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    # no busy-waiting between calls: spinning threads would take the cores from PyTorch (a pt2
    # model timed beside an export, the rest of a training run)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cpu_threads() -> int:
    """PyTorch's thread count where PyTorch is loaded (an export timed beside a pt2 model runs
    on as many threads), else 0: ONNX Runtime's own default, one per physical core as
    PyTorch's. The app opening an export imports no PyTorch for it."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0


class OnnxModule:
    """A checked ONNX graph called like the pt2 module: float (N, 3, S, S) images in [0, 1]
    in, (N, classes) scores out."""

    def __init__(self, session):
        self.session = session

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.run(images.detach().cpu().float().contiguous().numpy()))

    def run(self, images: np.ndarray) -> np.ndarray:
        """The same without PyTorch: float32 arrays in and out."""
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, np.float32)})[0]

    def eval(self) -> OnnxModule:
        return self

