"""The model code (PyTorch and torch.export: most of a launch) imported on a thread of its own
from the first moment, while Qt starts and the window is built: by the time the window asks
for its model, the import is done or under way. Import locks make the worker's own import
wait for this one rather than repeat it."""
from __future__ import annotations

import importlib
import threading

MODULES = ("shared.inference", "shared.heatmap")  # what the worker imports to open a model


def preload() -> None:
    for name in MODULES:
        importlib.import_module(name)


def start_preloading() -> threading.Thread:
    thread = threading.Thread(target=preload, name="preload-model-code", daemon=True)
    thread.start()
    return thread
