"""A new SQLite store survives processes that open it at the same instant, and a store left
broken says how to repair it."""
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from shared.store import StoreBroken, use_store
from training.train import main

TRIES = 10
HERE = Path(__file__).parent


def start_openers(signals: Path, dbs: list[Path], count: int = 2) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    return [subprocess.Popen([sys.executable, str(HERE / "store_opener.py"), str(signals),
                              *map(str, dbs)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env) for _ in range(count)]


def test_processes_creating_a_new_store_together_all_succeed_and_leave_it_whole(tmp_path):
    signals = tmp_path / "signals"
    signals.mkdir()
    dbs = [tmp_path / f"store{i}" / "mlflow.db" for i in range(TRIES)]
    for db in dbs:
        db.parent.mkdir()
    openers = start_openers(signals, dbs)
    for i in range(TRIES):
        deadline = time.monotonic() + 120
        while len(list(signals.glob(f"ready-{i}-*"))) < len(openers):
            assert time.monotonic() < deadline, f"the openers never got ready for try {i}"
            time.sleep(0.01)
        (signals / f"go-{i}").touch()  # both open store i at this instant
    outputs = [p.communicate(timeout=300)[0] for p in openers]
    lines = [line for out in outputs for line in out.splitlines()]
    assert [line for line in lines if line.startswith("FAIL")] == []
    assert sorted(lines) == sorted(f"OK {i}" for i in range(TRIES) for _ in openers)
    for db in dbs:
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        assert not any(t.startswith("_alembic_tmp_") for t in tables)
        client = MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([client.get_experiment_by_name("training").experiment_id])
        assert len(runs) == 2


def half_migrated(db: Path, template: Path) -> None:
    shutil.copy(template, db)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_model_versions (x INTEGER)")
        con.execute("UPDATE alembic_version SET version_num = '84291f40a231'")


def test_a_half_migrated_store_without_runs_says_to_delete_it(tmp_path, _store_template):
    db = tmp_path / "mlflow.db"
    half_migrated(db, _store_template)
    with pytest.raises(StoreBroken, match=r"interrupted.*holds no runs, so delete it"):
        use_store(f"sqlite:///{db}")


def test_a_half_migrated_store_with_runs_says_to_back_it_up_and_upgrade(tmp_path, store):
    client = MlflowClient(store)
    client.create_run(client.create_experiment("e"))
    db = tmp_path / "copy.db"  # a path this process has not opened: MLflow caches open stores
    shutil.copy(store.removeprefix("sqlite:///"), db)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_model_versions (x INTEGER)")
        con.execute("UPDATE alembic_version SET version_num = '84291f40a231'")
    with pytest.raises(StoreBroken, match=r"holds 1 run\(s\): back it up.*mlflow db upgrade"):
        use_store(f"sqlite:///{db}")


def test_training_on_a_broken_store_exits_2_with_the_repair(tmp_path, _store_template,
                                                            image_folder, capsys):
    db = tmp_path / "mlflow.db"
    half_migrated(db, _store_template)
    code = main(["--data-dir", str(image_folder), "--tracking-uri", f"sqlite:///{db}",
                 "--epochs", "1", "--device", "cpu", "--no-system-metrics", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and f"rm {db}" in err and "Traceback" not in err
