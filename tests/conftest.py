from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).parent))

from datagen import make_image_folder  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test reads the user's MLflow store, torch hub, dataset or app cache, or the network."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory) -> Path:
    """A migrated SQLite store, made once: creating one runs every schema migration (seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, _store_template) -> str:
    """A fresh tracking URI for one test; its artifacts land beside the database."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(_store_template, db)
    return f"sqlite:///{db}"


@pytest.fixture
def train_config(image_folder, store, tmp_path):
    """A TrainConfig for a seconds-long run on the tiny image folder."""
    from training.engine.config import resolve

    def make(**overrides):
        settings = dict(model="cnn", data_dir=str(image_folder), cache_dir=str(tmp_path / "cache"),
                        tracking_uri=store, epochs=2, batch_size=16, val_fraction=0.2,
                        progress=False, system_metrics=False, device="cpu")
        settings.update(overrides)
        return resolve(settings)

    return make


@pytest.fixture
def cifar_mirror(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 download, pointed at a miniature archive served on loopback."""
    from torchvision.datasets import CIFAR10

    from datagen import make_cifar_archive
    from mirror import serve

    archive, train_list, test_list, meta, md5 = make_cifar_archive(tmp_path / "mirror",
                                                                   n_train_per_batch=8)
    with serve(archive.parent) as base:
        for name, value in (("url", f"{base}/{archive.name}"), ("tgz_md5", md5),
                            ("train_list", train_list), ("test_list", test_list), ("meta", meta)):
            monkeypatch.setattr(CIFAR10, name, value)
        yield archive


@pytest.fixture
def offline(monkeypatch):
    """CIFAR-10's download URL refuses connections, as on a machine without network."""
    from torchvision.datasets import CIFAR10

    from mirror import closed_port_url

    monkeypatch.setattr(CIFAR10, "url", closed_port_url())


@pytest.fixture(scope="session")
def registered(tmp_path_factory, image_folder, _store_template):
    """A store holding 'tiny-cnn': version 1 (champion) and version 2 (not champion)."""
    from training.engine.config import resolve
    from training.tracking.publish import register_version
    from training.train import train

    folder = tmp_path_factory.mktemp("registered")
    db = folder / "mlflow.db"
    shutil.copy(_store_template, db)
    uri = f"sqlite:///{db}"
    cfg = resolve(dict(model="cnn", data_dir=str(image_folder), cache_dir=str(folder / "cache"),
                       tracking_uri=uri, epochs=2, batch_size=16, val_fraction=0.2,
                       progress=False, system_metrics=False, device="cpu"))
    result = train(cfg, log=lambda *_: None)
    register_version(result.model_uri, result.registered_name, score=0.0)
    return uri, result


@pytest.fixture
def registered_store(registered, tmp_path) -> str:
    """A private copy of the registered store's database (artifacts stay shared, read-only)."""
    uri, _ = registered
    db = tmp_path / "registered.db"
    shutil.copy(uri.removeprefix("sqlite:///"), db)
    return f"sqlite:///{db}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "postgres" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


def pytest_terminal_summary(terminalreporter):
    """How many tests ran against the real PostgreSQL: CI must never skip them unseen."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        reports = terminalreporter.stats.get(outcome, [])
        counts[outcome] = sum(1 for r in reports if r.when in ("call", "setup")
                              and "postgres" in getattr(r, "keywords", {}))
    if any(counts.values()):
        terminalreporter.write_line("PostgreSQL tests: " + ", ".join(
            f"{n} {outcome}" for outcome, n in counts.items() if n))


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL on a private folder and port of 127.0.0.1, for the whole session,
    with a migrated MLflow database to copy. Skipped where PostgreSQL is not installed, except
    in CI (CI=true), which must run these tests."""
    from training.servers import Postgres, ServerError, free_port, postgres_tool
    try:
        postgres_tool("initdb")
        importlib.import_module("psycopg")
    except (ServerError, ImportError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the PostgreSQL tests, and this machine cannot: {exc}")
        pytest.skip(f"PostgreSQL is not available here: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="cifarlab-pg-"))
    folder.chmod(0o755)  # the postgres user, when tests run as root, must reach its folder
    server = Postgres(folder / "postgres", free_port())
    server.start()
    server.create_database("mlflow_template")
    subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(sys.argv[1]).search_experiments()",
                    server.url("mlflow_template")], check=True, capture_output=True)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_store(postgres) -> str:
    """A fresh, migrated MLflow database for one test, as a postgresql:// URL."""
    name = f"mlflow_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name, template="mlflow_template")
    return postgres.url(name)


@pytest.fixture
def postgres_storage(postgres) -> str:
    """A fresh, empty Optuna database for one test."""
    name = f"optuna_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    return postgres.url(name)
