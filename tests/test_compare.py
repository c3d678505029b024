"""training.compare and training.benchmark: reports built from tracked runs."""
import csv

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from training.benchmark import main as benchmark_main
from training.compare import main as compare_main
from training.train import train


def quiet(*_):
    pass


@pytest.fixture
def two_runs(train_config, store):
    runs = [train(train_config(model=m, epochs=e), log=quiet) for m, e in (("mlp", 2), ("cnn", 3))]
    return store, runs


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_comparison_cells_equal_the_values_logged_in_the_runs(two_runs, tmp_path):
    store, runs = two_runs
    assert compare_main(["--tracking-uri", store, "--experiment", "training", "--out",
                         str(tmp_path / "report")]) == 0
    rows = {r["run"]: r for r in read_rows(tmp_path / "report" / "comparison.csv")}
    client = MlflowClient(store)
    for result in runs:
        run = client.get_run(result.run_id)
        row = rows[result.run_id[:8]]
        assert row["model"] == run.data.params["model"]
        assert row["epochs_run"] == run.data.params["epochs_run"]
        assert row["trainable_params"] == run.data.params["trainable_params"]
        assert float(row["test_acc"]) == pytest.approx(run.data.metrics["test_acc"])
        assert float(row["best_val_acc"]) == pytest.approx(run.data.metrics["best_val_acc"])
        assert float(row["final_val_loss"]) == pytest.approx(run.data.metrics["val_loss"])
        assert row["training"] == "scratch"


def test_report_files_exist_and_are_logged_to_a_comparison_run(two_runs, tmp_path):
    store, _ = two_runs
    out = tmp_path / "report"
    assert compare_main(["--tracking-uri", store, "--filter", "params.model = 'cnn'", "--out", str(out)]) == 0
    assert len(read_rows(out / "comparison.csv")) == 1
    assert "| cnn |" in (out / "comparison.md").read_text()
    for png in ("val_curves.png", "accuracy_vs_time.png"):
        with Image.open(out / png) as img:
            img.verify()
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
    assert {"comparison.md", "comparison.csv", "val_curves.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_run_missing_a_metric_gets_an_empty_cell(train_config, store, tmp_path):
    result = train(train_config(model="mlp", epochs=1), log=quiet)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("training").experiment_id
    partial = client.create_run(experiment, run_name="partial")
    client.log_param(partial.info.run_id, "model", "cnn")
    client.log_metric(partial.info.run_id, "val_acc", 0.5, step=1)
    client.set_terminated(partial.info.run_id, "KILLED")
    assert compare_main(["--tracking-uri", store, "--out", str(tmp_path / "r")]) == 0
    rows = {r["run"]: r for r in read_rows(tmp_path / "r" / "comparison.csv")}
    assert rows[partial.info.run_id[:8]]["test_acc"] == ""
    assert rows[partial.info.run_id[:8]]["status"] == "KILLED"
    assert rows[result.run_id[:8]]["test_acc"] != ""


def test_a_filter_matching_nothing_says_so(two_runs, tmp_path, capsys):
    store, _ = two_runs
    assert compare_main(["--tracking-uri", store, "--filter", "params.model = 'vgg16'",
                         "--out", str(tmp_path / "r")]) == 2
    assert "no training or evaluation run matches the filter" in capsys.readouterr().err


def test_benchmark_logs_one_run_per_model_and_device_and_skips_missing_devices(
        image_folder, store, tmp_path, capsys):
    out = tmp_path / "bench"
    assert benchmark_main(["--data-dir", str(image_folder), "--tracking-uri", store, "--images", "32",
                           "--devices", "cpu,cuda,mps", "--out", str(out)]) == 0
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("benchmark").experiment_id
    runs = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    settings = 2 if torch.get_num_threads() > 1 else 1  # all threads, and 1 thread
    if not torch.cuda.is_available():
        assert "skipping cuda" in capsys.readouterr().out
        assert "No GPU" in (out / "benchmark.md").read_text()
    assert len(runs) == 2 * settings + (2 if torch.cuda.is_available() else 0)
    for run in runs:
        expected = {"model", "device", "device_name", "threads", "batch_size", "precision"}
        assert expected <= set(run.data.params)
        assert {"seconds_per_epoch", "images_per_second", "peak_memory_mb",
                "inference_images_per_second", "latency_ms"} <= set(run.data.metrics)
    with Image.open(out / "seconds_per_epoch.png") as img:
        img.verify()
