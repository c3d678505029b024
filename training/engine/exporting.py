"""PyTorch networks as ONNX graphs, float or int8: what `training.export` stores beside a
registered version, and what the feature cache runs a frozen backbone with.

The float graph comes from `torch.onnx.export`'s dynamo exporter (torch.export, then
onnxscript), with a dynamic batch. The int8 graph is ONNX Runtime's static quantization in
QDQ form: weights int8 per output channel, activations uint8 with ranges taken from
calibration images (MinMax), so the CPU runs its int8 convolutions and matrix products; the
first convolution and the last matrix product can stay float (`edges`).
Both keep to the standard ONNX operators, which is all `shared.onnx_model` opens.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.onnx_model import INPUT, OUTPUT, need


def to_onnx(model: nn.Module | torch.export.ExportedProgram, example: torch.Tensor,
            path: Path) -> Path:
    """`model` (float images in, scores or features out) as an ONNX graph at `path`. An
    ExportedProgram keeps its own dynamic batch; a module gets one."""
    need("onnx"), need("onnxscript")
    dynamic = None
    if isinstance(model, nn.Module):
        model = model.eval()
        dynamic = ({0: torch.export.Dim("batch", min=1)},)
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=dynamic,
                                    verbose=False, optimize=True)
    program.save(str(path))
    prune_opsets(path)
    return path


def quantize_int8(float_path: Path, path: Path, batches: Iterable[np.ndarray],
                  float_edges: bool = False) -> Path:
    """The float graph quantized to int8 (QDQ, per-channel weights), its activation ranges
    calibrated on `batches` of float images; with `float_edges`, the nodes `edges` names stay
    float32."""
    need("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch, np.float32)}

    with tempfile.TemporaryDirectory(prefix="cifarlab-quant-") as tmp, warnings.catch_warnings(), \
            _quiet("root", "onnxruntime"):
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared))
        except Exception:  # noqa: BLE001 - its symbolic shape inference gives up on some graphs
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=edges(prepared) if float_edges else [])
    prune_opsets(path)
    return path


def edges(path: Path) -> list[str]:
    """The graph's edges: the input transform and the first convolution (raw pixels, the
    widest range), and the last matrix product (the class scores). Kept in float32 they bring
    an int8 copy closer to the float network, at a cost that depends on the network (see
    docs/exports.md: EfficientNet-Lite0's top-1 agreement 94.8% -> 96.2% at the same
    images/s; the cnn's images/s down by a third)."""
    onnx = need("onnx")
    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)
    first_conv = next((i for i, node in enumerate(nodes) if node.op_type == "Conv"), -1)
    products = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul")]
    return [node.name for node in nodes[:first_conv + 1]] + products[-1:]


def prune_opsets(path: Path) -> None:
    """Drop the operator domains the graph imports but never uses (ONNX Runtime's optimiser
    adds its own), so the file names the standard domain alone."""
    onnx = need("onnx")
    model = onnx.load(str(path))
    used = {node.domain for node in model.graph.node} | {""}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    if len(kept) < len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)
        onnx.save(model, str(path))


class _quiet:
    """Loggers set to errors only for a block: the exporter and quantizer report each step."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(name) for name in names]

    def __enter__(self):
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)
