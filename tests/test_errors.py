"""Bad input through the command line: a clear message, the right exit status, nothing lost."""
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import training.tracking.run
from training.train import main

from datagen import make_image_folder


def args(image_folder, store, tmp_path, *extra):
    return ["--data-dir", str(image_folder), "--tracking-uri", store, "--cache-dir",
            str(tmp_path / "cache"), "--epochs", "2", "--batch-size", "16", "--val-fraction", "0.2",
            "--no-progress", "--no-system-metrics", "--device", "cpu", *extra]


def runs(store):
    return MlflowClient(store).search_runs(
        [e.experiment_id for e in MlflowClient(store).search_experiments()])


def test_unknown_model_lists_the_valid_ones(image_folder, store, tmp_path, capsys):
    assert main(args(image_folder, store, tmp_path, "--model", "vgg19")) == 2
    err = capsys.readouterr().err
    assert "vgg19" in err and "resnet18" in err and "mlp" in err and "timm/NAME" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-0.1", "lr must be a positive number"),
    ("--epochs", "0", "epochs must be at least 1"),
])
def test_invalid_values_exit_2_before_any_run(image_folder, store, tmp_path, capsys, flag, value, message):
    assert main(args(image_folder, store, tmp_path, flag, value)) == 2
    assert message in capsys.readouterr().err
    assert runs(store) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent(image_folder, store, tmp_path, capsys):
    assert main(args(image_folder, store, tmp_path, "--device", "cuda")) == 2
    assert "--device cuda was asked for" in capsys.readouterr().err


def test_missing_dataset_offline_says_how_to_fix_it(offline, store, tmp_path, capsys):
    assert main(args(tmp_path / "no-data", store, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 is not in" in err and "--data-dir" in err
    assert runs(store) == []


def test_corrupt_image_names_the_file(store, tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", n_train=3, n_test=2)
    (root / "test" / "ship" / "0000.png").write_bytes(b"")
    assert main(args(root, store, tmp_path)) == 2
    assert "0000.png" in capsys.readouterr().err


def test_nan_loss_marks_the_run_failed_with_the_reason(image_folder, store, tmp_path, capsys):
    code = main(args(image_folder, store, tmp_path, "--model", "mlp", "--optimizer", "sgd",
                     "--lr", "1e30", "--schedule", "none"))
    assert code == 1
    assert "training loss became nan" in capsys.readouterr().err.lower()
    (run,) = runs(store)
    assert run.info.status == "FAILED"
    assert "lower the learning rate" in run.data.tags["failure_reason"]


def test_ctrl_c_marks_the_run_killed_and_keeps_what_was_logged(image_folder, store, tmp_path,
                                                              capsys, monkeypatch):
    original = training.tracking.run.epoch_line

    def interrupted_after_epoch_2(epoch, epochs, metrics):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(epoch, epochs, metrics)

    monkeypatch.setattr(training.tracking.run, "epoch_line", interrupted_after_epoch_2)
    assert main(args(image_folder, store, tmp_path, "--epochs", "5")) == 130
    assert "marked KILLED" in capsys.readouterr().err
    (run,) = runs(store)
    assert run.info.status == "KILLED"
    history = MlflowClient(store).get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    assert mlflow.get_run(run.info.run_id).data.params["model"] == "cnn"


def without_psycopg(monkeypatch):
    for name in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError


def test_a_postgresql_store_without_its_driver_names_the_extra_to_install(
        image_folder, tmp_path, capsys, monkeypatch):
    without_psycopg(monkeypatch)
    url = "postgresql://team:s3cret@127.0.0.1:1/mlflow"
    assert main(args(image_folder, url, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "pip install 'cifarlab[server]'" in err and "s3cret" not in err


def test_a_postgresql_study_storage_without_its_driver_names_the_extra_to_install(
        image_folder, store, tmp_path, capsys, monkeypatch):
    from training.tune import main as tune_main
    without_psycopg(monkeypatch)
    url = "postgresql://team:s3cret@127.0.0.1:1/optuna"
    assert tune_main(args(image_folder, store, tmp_path, "--storage", url)) == 2
    err = capsys.readouterr().err
    assert "pip install 'cifarlab[server]'" in err and "s3cret" not in err


def test_the_app_pointed_at_a_postgresql_store_without_its_driver_names_the_extra(monkeypatch):
    from shared.registry import RegistryError, list_versions
    without_psycopg(monkeypatch)
    with pytest.raises(RegistryError, match=r"pip install 'cifarlab\[server\]'"):
        list_versions("postgresql://team:s3cret@127.0.0.1:1/mlflow")


@pytest.mark.parametrize("command", ["training.compare", "training.benchmark", "training.evaluate",
                                     "training.train", "training.tune", "gui.classify"])
def test_every_command_on_a_store_that_is_not_a_database_exits_2_with_one_line(
        command, image_folder, tmp_path, capfd):
    not_a_store = tmp_path / "notes.db"
    not_a_store.write_text("these are notes, not an MLflow store\n")
    before = not_a_store.read_bytes()
    err = run_on_store(command, f"sqlite:///{not_a_store}", image_folder, tmp_path, capfd)
    assert str(not_a_store) in err
    assert not_a_store.read_bytes() == before


@pytest.mark.parametrize("command", ["training.compare", "training.benchmark", "training.evaluate",
                                     "training.train", "training.tune", "gui.classify"])
@pytest.mark.parametrize("scheme, says", [("http", "cannot be reached"),
                                          ("postgresql", "cannot be opened")])
def test_every_command_on_a_store_that_does_not_answer_says_so_within_seconds(
        command, scheme, says, image_folder, tmp_path, capfd):
    import time

    from training.servers import free_port

    port = free_port()
    store = (f"http://127.0.0.1:{port}" if scheme == "http"
             else f"postgresql://cifarlab:S3cret@127.0.0.1:{port}/mlflow")
    started = time.monotonic()
    err = run_on_store(command, store, image_folder, tmp_path, capfd)
    assert says in err and "S3cret" not in err
    assert time.monotonic() - started < 15


def run_on_store(command: str, store: str, image_folder, tmp_path, capfd) -> str:
    """`command` run on `store`: asserts exit 2 with one error line, and returns it."""
    import importlib

    argv = {"training.compare": ["--tracking-uri", store, "--out", str(tmp_path / "report")],
            "training.benchmark": ["--data-dir", str(image_folder), "--devices", "cpu",
                                   "--models", "mlp", "--tracking-uri", store,
                                   "--out", str(tmp_path / "report")],
            "training.evaluate": ["--model", "m@champion", "--data-dir", str(image_folder),
                                  "--tracking-uri", store],
            "training.train": args(image_folder, store, tmp_path),
            "training.tune": [*args(image_folder, store, tmp_path), "--trials", "1"],
            "gui.classify": [str(image_folder / "test" / "cat"), "--tracking-uri", store],
            }[command]
    assert importlib.import_module(command).main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]
