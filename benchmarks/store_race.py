"""Processes started together on a store that does not exist yet: how many fail, and how many
stores are left broken (leftover `_alembic_tmp_` tables, or a schema version MLflow refuses).

Each try starts N `python -m training.train` processes at the same instant on a fresh
SQLite store (1 epoch of the mlp on a tiny generated image folder), waits for them, then
opens the store read-only to check it.

    python benchmarks/store_race.py --tries 10 --processes 2
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from datagen import make_image_folder  # noqa: E402


def head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def store_broken(db: Path, head: str) -> str | None:
    """Why the store is broken, or None."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = (con.execute("SELECT version_num FROM alembic_version").fetchone() or [None])[0] \
            if "alembic_version" in tables else None
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        return f"leftover {', '.join(leftovers)}"
    if version != head:
        return f"schema version {version}, expected {head}"
    return None


def one_try(work: Path, data: Path, processes: int) -> tuple[int, str | None, list[str]]:
    db = work / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    command = [sys.executable, "-m", "training.train", "--model", "mlp", "--data-dir", str(data),
               "--tracking-uri", f"sqlite:///{db}", "--epochs", "1", "--batch-size", "16",
               "--val-fraction", "0.2", "--device", "cpu", "--no-system-metrics", "--no-progress",
               "--cache-dir", str(work / "cache"), "--no-register"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = [subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    errors = [p.communicate()[1] for p in started]
    failed = [e.strip().splitlines()[-1][:160] for p, e in zip(started, errors) if p.returncode]
    return len(failed), store_broken(db, head_revision()) if db.exists() else "no store", failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="store-race-") as tmp:
        data = make_image_folder(Path(tmp) / "data")
        failures = broken = 0
        for i in range(args.tries):
            failed, damage, messages = one_try(Path(tmp) / f"try{i}", data, args.processes)
            failures += failed
            broken += damage is not None
            print(f"try {i + 1}: {failed} of {args.processes} processes failed"
                  + (f"; store broken: {damage}" if damage else "") +
                  "".join(f"\n    {m}" for m in messages), flush=True)
    print(f"\n{args.tries} tries of {args.processes} processes: {failures} of "
          f"{args.tries * args.processes} processes failed, {broken} of {args.tries} stores broken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
