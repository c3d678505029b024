"""A password in a tracking URI or an Optuna storage URL never reaches params, tags,
artifacts, checkpoints or the console."""
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import training.tune
from shared.messages import mask_secrets
from training.servers import MlflowServer

PASSWORD = "S3cret-Pw"


@pytest.mark.parametrize("uri, masked", [
    (f"postgresql://user:{PASSWORD}@host/db", "postgresql://user:***@host/db"),
    (f"http://user:{PASSWORD}@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    (f"postgresql+psycopg://u:{PASSWORD}@h:5432/db?sslmode=require",
     "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
    (f"postgresql://h/db?user=u&password={PASSWORD}", "postgresql://h/db?user=u&password=***"),
    ("sqlite:////tmp/mlruns/mlflow.db", "sqlite:////tmp/mlruns/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_passwords_in_uris_are_masked(uri, masked):
    assert mask_secrets(uri) == masked
    assert mask_secrets(f"see {uri} now") == f"see {masked} now"


def everything_logged(client: MlflowClient, run_id: str, folder: Path) -> str:
    """Params, tags and every text artifact of a run, as one text."""
    run = client.get_run(run_id)
    texts = [*run.data.params.values(), *run.data.tags.values()]
    local = Path(client.download_artifacts(run_id, "", str(folder)))
    texts += [p.read_text(errors="replace") for p in local.rglob("*")
              if p.is_file() and p.suffix in (".yaml", ".txt", ".csv", ".json")]
    return "\n".join(texts)


@pytest.fixture
def password_server(tmp_path, store):
    server = MlflowServer(store, tmp_path / "server-artifacts")
    server.start()
    yield server.url.replace("http://", f"http://alice:{PASSWORD}@")
    server.stop()


def test_a_training_run_through_a_server_keeps_its_password_secret(password_server, image_folder,
                                                                   tmp_path, capsys):
    from training.train import main

    code = main(["--data-dir", str(image_folder), "--tracking-uri", password_server,
                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.2", "--device", "cpu",
                 "--no-system-metrics", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert code == 0, out.err
    client = MlflowClient(password_server)
    run = client.search_runs([client.get_experiment_by_name("training").experiment_id])[0]
    logged = everything_logged(client, run.info.run_id, tmp_path / "artifacts")
    assert run.data.params["tracking_uri"].startswith("http://alice:***@")
    assert PASSWORD not in logged
    assert PASSWORD not in out.out + out.err and "alice:***@" in out.out


def test_a_study_keeps_its_storage_password_secret(store, image_folder, tmp_path, capsys,
                                                   monkeypatch):
    """The storage URL names a PostgreSQL server with a password; the study itself runs on a
    real SQLite storage underneath, so every place the URL flows to is exercised."""
    real_open = training.tune.open_storage
    sqlite_storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setattr(training.tune, "open_storage",
                        lambda url, heartbeat: real_open(sqlite_storage, heartbeat))
    storage = f"postgresql://bob:{PASSWORD}@db.example.org/optuna"
    code = training.tune.main([
        "--model", "mlp", "--data-dir", str(image_folder), "--tracking-uri", store,
        "--storage", storage, "--trials", "2", "--epochs-range", "1,2", "--pruner", "none",
        "--experiment", "tuning",
        "--no-final", "--batch-size", "16", "--val-fraction", "0.2", "--device", "cpu",
        "--no-system-metrics", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert code == 0, out.err
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tuning").experiment_id])
    assert len(runs) == 3  # the study's parent run and its two trials
    logged = "\n".join(everything_logged(client, r.info.run_id, tmp_path / r.info.run_id)
                       for r in runs)
    assert "bob:***@db.example.org" in logged and PASSWORD not in logged
    assert PASSWORD not in out.out + out.err and "bob:***@" in out.out


def test_an_unreachable_storage_is_refused_without_showing_its_password(store, capsys, tmp_path):
    storage = f"postgresql://bob:{PASSWORD}@127.0.0.1:1/optuna"
    code = training.tune.main(["--tracking-uri", store, "--storage", storage,
                               "--data-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and "bob:***@127.0.0.1:1" in err and PASSWORD not in err
