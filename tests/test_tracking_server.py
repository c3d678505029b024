"""A run against a real MLflow tracking server on loopback works as against the local store."""
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from training.train import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking_server(tmp_path, store):
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", store, "--artifacts-destination",
         str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("the MLflow server did not start")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=10)


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
