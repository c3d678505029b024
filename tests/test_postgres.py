"""A team's set-up, for real: `mlflow server` on PostgreSQL with proxied artifacts, Optuna's
storage on PostgreSQL, and the project's processes started from other folders."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from shared.inference import load_classifier
from shared.store import use_store
from training.servers import MlflowServer, free_port
from training.train import train

pytestmark = pytest.mark.postgres
State = optuna.trial.TrialState


@pytest.fixture
def team_server(postgres_store, tmp_path, monkeypatch):
    """The tracking server runs in its own folder; the clients in another."""
    server = MlflowServer(postgres_store, tmp_path / "server" / "artifacts")
    server.start()
    (tmp_path / "client").mkdir()
    monkeypatch.chdir(tmp_path / "client")
    yield server
    server.stop()


def tune_command(image_folder, server_url, storage, *extra):
    return [sys.executable, "-m", "training.tune", "--model", "mlp", "--data-dir",
            str(image_folder), "--cache-dir", "cache", "--tracking-uri", server_url,
            "--storage", storage, "--study-name", "team", "--experiment", "tuning",
            "--batch-size", "16", "--val-fraction", "0.2", "--no-progress", "--no-system-metrics",
            "--device", "cpu", "--epochs-range", "1,3", "--pruner", "none", *extra]


def study_runs(server_url):
    client = MlflowClient(server_url)
    experiment = client.get_experiment_by_name("tuning").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "optuna_trial" in r.data.tags]


def kill_mid_trial(worker, storage):
    """SIGKILL `worker` while one of its trials runs, once that trial's MLflow run exists."""
    for line in worker.stdout:
        if not line.startswith("trial ") or not line.split()[1].rstrip(":").isdigit():
            continue
        number = int(line.split()[1].rstrip(":"))
        trial = None
        while trial is None or (trial.state == State.RUNNING
                                and "mlflow_run_id" not in trial.user_attrs):
            time.sleep(0.05)
            trial = optuna.load_study(study_name="team", storage=storage).trials[number]
        if trial.state == State.RUNNING:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            return
    pytest.fail("the worker ended before it could be killed mid-trial: "
                f"{worker.communicate()[0][-1500:]}")


def test_a_model_trained_through_the_server_is_loaded_from_it_by_the_app_and_the_cli(
        team_server, train_config, image_folder, tmp_path):
    result = train(train_config(tracking_uri=team_server.url, epochs=1), log=lambda *_: None)
    registry = MlflowClient(team_server.url, registry_uri=team_server.url)
    assert registry.get_model_version_by_alias("tiny-cnn", "champion").run_id == result.run_id
    assert list((tmp_path / "server" / "artifacts").rglob("model.pt2"))  # uploaded over HTTP

    use_store(team_server.url)
    assert load_classifier("models:/tiny-cnn@champion").classes == ["cat", "dog", "ship"]
    photos = image_folder / "test" / "dog"
    done = subprocess.run([sys.executable, "-m", "gui.classify", "--tracking-uri", team_server.url,
                           "--model", "tiny-cnn@champion", str(photos)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count = len(list(photos.iterdir()))
    assert f"{count} of {count} files classified" in done.stderr


def test_a_lead_and_two_workers_finish_one_study_with_each_trial_run_once(
        team_server, postgres_storage, image_folder):
    command = tune_command(image_folder, team_server.url, postgres_storage, "--trials", "6")
    processes = [subprocess.Popen(command + extra, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for extra in ([], ["--worker"], ["--worker"])]
    outputs = [p.communicate(timeout=400)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [o[-1500:] for o in outputs]
    study = optuna.load_study(study_name="team", storage=postgres_storage)
    finished = study.get_trials(states=(State.COMPLETE, State.PRUNED))
    assert len(finished) >= 6 and not study.get_trials(states=(State.RUNNING,))
    parents, trials = study_runs(team_server.url)
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    numbers = [int(r.data.tags["optuna_trial"]) for r in trials]
    assert sorted(numbers) == sorted(t.number for t in study.trials)  # each trial once
    final = MlflowClient(team_server.url, registry_uri=team_server.url)
    assert final.get_model_version_by_alias("tiny-mlp", "champion")
    assert "team" in dashboard_studies(postgres_storage)


def dashboard_studies(storage: str) -> list[str]:
    """The study names optuna-dashboard shows for `storage` (it is started and stopped here)."""
    port = free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), storage,
                                  "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as answer:
                    return [s["study_name"] for s in json.load(answer)["study_summaries"]]
            except OSError:
                assert dashboard.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
    finally:
        dashboard.terminate()
        dashboard.wait()


def test_a_worker_killed_mid_trial_is_failed_after_its_heartbeat_and_the_study_finishes(
        team_server, postgres_storage, image_folder):
    command = tune_command(image_folder, team_server.url, postgres_storage, "--trials", "6",
                           "--heartbeat", "1", "--no-final")
    # the worker first (it waits for the lead's study): the lead must not finish alone
    worker = subprocess.Popen(command + ["--worker"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lead = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_mid_trial(worker, postgres_storage)
    output = lead.communicate(timeout=400)[0]
    assert lead.returncode == 0, output[-2000:]
    study = optuna.load_study(study_name="team", storage=postgres_storage)
    (dead,) = study.get_trials(states=(State.FAIL,))
    assert len(study.get_trials(states=(State.COMPLETE, State.PRUNED))) >= 6
    assert not study.get_trials(states=(State.RUNNING,))
    parents, trials = study_runs(team_server.url)
    assert len(parents) == 1
    (dead_run,) = [r for r in trials if r.info.run_id == dead.user_attrs["mlflow_run_id"]]
    assert dead_run.data.tags["optuna_trial"] == str(dead.number)
    assert dead_run.info.status == "FAILED"
    assert "heartbeats" in dead_run.data.tags["failure_reason"]
