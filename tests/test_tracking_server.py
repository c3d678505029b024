"""A run against a real MLflow tracking server on loopback (over SQLite, or over a real
PostgreSQL) works as against the local store."""
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from training.servers import MlflowServer
from training.tracking.run import RunOptions
from training.train import train


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request, tmp_path, store):
    """`mlflow server` with proxied artifacts, on a SQLite store or a real PostgreSQL."""
    backend = store if request.param == "sqlite" else request.getfixturevalue("postgres_store")
    server = MlflowServer(backend, tmp_path / "server-artifacts")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tracking_server(server):
    return server.url


def test_a_run_against_a_tracking_server_logs_and_registers_the_same(train_config, tracking_server,
                                                                     tmp_path):
    result = train(train_config(tracking_uri=tracking_server, epochs=1), log=lambda *_: None)
    client = MlflowClient(tracking_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    assert "curves.png" in {a.path for a in client.list_artifacts(result.run_id)}
    mlflow.set_tracking_uri(tracking_server)
    assert client.get_model_version_by_alias("tiny-cnn", "champion").run_id == result.run_id
    assert list((tmp_path / "server-artifacts").rglob("model.pt2"))  # stored by the server


def test_a_tracking_server_that_goes_away_mid_run_and_comes_back_loses_no_epoch(
        train_config, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail fast: seconds per epoch
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    messages = []

    def hook(epoch, metrics):
        if epoch == 2:
            server.stop()
        if epoch == 4:
            server.start()

    result = train(train_config(tracking_uri=server.url, epochs=6, patience=0),
                   log=messages.append, options=RunOptions(epoch_hook=hook))
    client = MlflowClient(server.url)
    history = client.get_metric_history(result.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert any("did not take epoch" in m for m in messages)
    assert any("answers again" in m for m in messages)
    assert client.get_run(result.run_id).info.status == "FINISHED"
