"""What tracking costs on each kind of store, side by side in one run: a local SQLite file,
`mlflow server` over SQLite, and `mlflow server` over a real PostgreSQL (started here by
training.servers on private ports, as `make server` does).

1. Seconds per logged epoch: one process logs `--epochs` epochs the way training does (one
   synchronous batch of the epoch's metrics per epoch, after the run's params), median.
2. Writers at once: 1, 4 and 8 processes each log a run of `--epochs` epochs on the same store
   at the same instant; how many calls failed, how many epochs are missing afterwards, and
   the total epochs logged per second.

    python benchmarks/tracking_stores.py --epochs 30 --writers 1,4,8
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
sys.path.insert(0, str(ROOT))

from training.servers import MlflowServer, Postgres, ServerError, free_port  # noqa: E402

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
           "images_per_second")
PARAMS = {f"setting_{i}": i for i in range(60)}  # about what a training run logs


def log_one_run(uri: str, epochs: int, barrier=None) -> dict:
    """One run as training logs it: params, then one synchronous batch per epoch."""
    import mlflow

    from shared.messages import brief
    from shared.store import use_store
    from training.tracking.publish import ensure_experiment
    from training.tracking.run_log import log_epoch, log_params

    use_store(uri)
    experiment = ensure_experiment("store-benchmark", uri)
    if barrier is not None:
        barrier.wait()
    errors, seconds, run_id, began, first = 0, [], None, time.time(), None
    try:
        run_id = mlflow.start_run(experiment_id=experiment).info.run_id
        log_params(PARAMS)
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            try:
                log_epoch(run_id, epoch, {k: epoch / 100 for k in METRICS})
            except Exception as exc:  # noqa: BLE001 - counted: what a training run would retry
                errors, first = errors + 1, first or f"log_epoch: {brief(exc)}"
            seconds.append(time.perf_counter() - start)
        mlflow.end_run()
    except Exception as exc:  # noqa: BLE001
        errors, first = errors + 1, first or f"run: {brief(exc)}"
    return {"run_id": run_id, "errors": errors, "seconds": seconds, "began": began,
            "ended": time.time(), "first_error": first}


def writer(args) -> dict:
    uri, epochs, barrier = args
    return log_one_run(uri, epochs, barrier)


def missing_epochs(uri: str, run_ids: list[str | None], epochs: int) -> int:
    from mlflow.tracking import MlflowClient

    client, missing = MlflowClient(uri), 0
    for run_id in run_ids:
        logged = ({m.step for m in client.get_metric_history(run_id, "val_acc")}
                  if run_id else set())
        missing += epochs - len(logged)
    return missing


def concurrent(uri: str, processes: int, epochs: int) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(processes)
        with context.Pool(processes) as pool:
            results = pool.map(writer, [(uri, epochs, barrier)] * processes)
    # from the barrier to the last writer's end: process start-up and imports left out
    wall = max(r["ended"] for r in results) - min(r["began"] for r in results)
    return {"errors": sum(r["errors"] for r in results),
            "first_errors": [r["first_error"] for r in results if r["first_error"]],
            "missing": missing_epochs(uri, [r["run_id"] for r in results], epochs),
            "epochs_per_second": processes * epochs / wall}


def stores(work: Path, kinds: list[str]):
    """(name, tracking URI, its server or None) for each kind asked; PostgreSQL started here."""
    made, postgres = [], None
    for kind in kinds:
        server = None
        if kind == "sqlite":
            made.append(("SQLite file", f"sqlite:///{work / 'local' / 'mlflow.db'}", None))
            continue
        if kind == "server-sqlite":
            name = "mlflow server on SQLite"
            server = MlflowServer(f"sqlite:///{work / 'server' / 'mlflow.db'}",
                                  work / "server" / "artifacts")
        elif kind == "server-postgresql":
            name = "mlflow server on PostgreSQL"
            postgres = Postgres(work / "postgres", free_port())
            postgres.start()
            server = MlflowServer(postgres.url("mlflow"), work / "pgserver" / "artifacts")
        else:
            continue
        made.append((name, server.url, server))
    return made, postgres


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--writers", default="1,4,8")
    parser.add_argument("--stores", default="sqlite,server-sqlite,server-postgresql")
    parser.add_argument("--epoch-seconds", type=float, default=31.9,
                        help="a training epoch to compare with (default: the cnn's 31.9 s on "
                             "the 2-core CPU, README's epoch-speed table)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cifarlab-stores-"))
    work.chmod(0o755)  # PostgreSQL's own user must reach its folder when this runs as root
    for sub in ("local", "server"):
        (work / sub).mkdir()
    try:
        made, postgres = stores(work, args.stores.split(","))
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    try:
        for name, uri, server in made:
            if server is not None:
                server.start()
            per_epoch = statistics.median(log_one_run(uri, args.epochs)["seconds"])
            rows.append({"store": name, "per_epoch": per_epoch,
                         **{n: concurrent(uri, n, args.epochs)
                            for n in map(int, args.writers.split(","))}})
            if server is not None:
                server.stop()
    finally:
        if postgres is not None:
            postgres.stop()
    print(table(rows, args))
    for row in rows:
        for n in map(int, args.writers.split(",")):
            for error in row[n]["first_errors"]:
                print(f"{row['store']}, {n} writers: {error}")
    return 0


def table(rows: list[dict], args) -> str:
    base = rows[0]["per_epoch"]
    writers = list(map(int, args.writers.split(",")))
    head = ("| store | s per logged epoch | vs first | share of a "
            f"{args.epoch_seconds:g} s epoch | " +
            " | ".join(f"{n} writer{'s' if n > 1 else ''}: failed calls, missing epochs, epochs/s"
                       for n in writers) + " |")
    lines = [head, "|" + "---|" * (4 + len(writers))]
    for r in rows:
        cells = [f"{r[n]['errors']}, {r[n]['missing']}, {r[n]['epochs_per_second']:.0f}"
                 for n in writers]
        lines.append(f"| {r['store']} | {r['per_epoch'] * 1000:.1f} ms | "
                     f"{r['per_epoch'] / base:.1f}× | {r['per_epoch'] / args.epoch_seconds:.3%} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
