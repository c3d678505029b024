"""Where the MLflow store is. Standard library only, so the app's window can start without
importing MLflow or PyTorch.

Every entry point imports this module, so it also sets the process's second wall against
code in model artifacts: MLflow may not unpickle (its default in 3.17 is to allow it). The
first wall is shared/safe_model.py, which checks a model's files before anything reads them.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

CHAMPION = "champion"  # the registry alias of each model's best version
SCORE_TAG = "best_val_acc"  # the model-version tag the champion rule compares


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path.cwd() / "mlruns"
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def use_store(uri: str) -> None:
    """Point MLflow's tracking and registry at `uri`."""
    import mlflow  # here, not at the top: see the module docstring

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"
