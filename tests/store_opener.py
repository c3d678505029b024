"""A process that opens fresh stores at the same instant as another: for each database path,
it says it is ready, waits for the go-file, then opens the store and logs a run."""
import os
import sys
import time
from pathlib import Path

import mlflow

from shared.store import use_store
from training.tracking.publish import ensure_experiment

signals, dbs = Path(sys.argv[1]), sys.argv[2:]
for i, db in enumerate(dbs):
    (signals / f"ready-{i}-{os.getpid()}").touch()
    while not (signals / f"go-{i}").exists():
        time.sleep(0.001)
    uri = f"sqlite:///{db}"
    try:
        use_store(uri)
        with mlflow.start_run(experiment_id=ensure_experiment("training", uri)):
            mlflow.log_param("opened", True)
        print(f"OK {i}", flush=True)
    except Exception as exc:  # noqa: BLE001 - every failure is counted by the test
        print(f"FAIL {i} {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
