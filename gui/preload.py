"""The model code imported on a thread of its own from the first moment, while Qt starts and
the window is built: by the time the window asks for its model, the import is done or under
way. Import locks make the worker's own import wait for this one rather than repeat it.

What is imported depends on the runtime the last launch used: PyTorch and torch.export (most
of a launch) for pt2; ONNX Runtime alone for a checked export, so that no PyTorch import takes
the interpreter from the window."""
from __future__ import annotations

import importlib
import threading

SETTINGS = ("cifarlab", "gui")  # the app's QSettings: organisation, application
# what the worker imports to open a model and explain it
MODULES = {"pt2": ("shared.inference", "torch.export.pt2_archive", "shared.heatmap"),
           "onnx": ("shared.inference", "onnxruntime")}


def modules_for(runtime: str) -> tuple[str, ...]:
    return MODULES["onnx" if runtime.startswith("onnx") else "pt2"]


def preload(runtime: str) -> None:
    for name in modules_for(runtime):
        importlib.import_module(name)


def last_runtime() -> str:
    from PySide6.QtCore import QSettings

    return str(QSettings(*SETTINGS).value("runtime", "pt2"))


def start_preloading(runtime: str = "pt2") -> threading.Thread:
    thread = threading.Thread(target=preload, args=(runtime,), name="preload-model-code",
                              daemon=True)
    thread.start()
    return thread
