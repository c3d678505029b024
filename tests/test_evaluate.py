"""python -m training.evaluate: a registered model scored on a labelled folder, as its own run."""
import shutil

import pytest
from mlflow.tracking import MlflowClient

from training.compare import main as compare_main
from training.evaluate import main

from datagen import make_class_folders, make_image_folder

ARTIFACTS = {"confusion_matrix.png", "confusion_matrix.csv", "reliability_diagram.png",
             "per_class_metrics.csv", "confused_pairs.csv", "worst_mistakes.png",
             "worst_mistakes.csv"}


def evaluation_runs(store):
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("evaluations")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.fixture
def evaluated(registered, registered_store, image_folder, tmp_path):
    """tiny-cnn version 1 scored on the test images it was trained beside."""
    assert main(["--model", "tiny-cnn/1", "--data-dir", str(image_folder), "--tracking-uri",
                 registered_store, "--cache-dir", str(tmp_path / "cache")]) == 0
    (run,) = evaluation_runs(registered_store)
    return registered_store, registered[1], run


def test_accuracy_equals_the_training_runs_test_accuracy(evaluated):
    _, trained, run = evaluated
    assert run.data.metrics["accuracy"] == pytest.approx(trained.test_acc, abs=1e-9)
    assert run.data.metrics["images"] == 18


def test_run_is_tagged_with_the_model_and_logs_the_dataset_it_scored(evaluated):
    store, trained, run = evaluated
    tags = run.data.tags
    assert (tags["registered_model"], tags["model_version"], tags["source_run"]) == (
        "tiny-cnn", "1", trained.run_id)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "tiny-test" and dataset.dataset.digest == tags["dataset_fingerprint"]
    assert run.data.params["model"] == "cnn"


def test_metrics_hold_per_class_scores_and_calibration_error(evaluated):
    metrics = evaluated[2].data.metrics
    for cls in ("cat", "dog", "ship"):
        assert {f"precision_{cls}", f"recall_{cls}", f"f1_{cls}"} <= set(metrics)
    assert {"loss", "macro_f1", "ece", "ece_before_temperature"} <= set(metrics)
    assert 0 <= metrics["ece"] <= 1


def test_artifacts_hold_the_diagrams_gallery_and_confused_pairs(evaluated):
    store, _, run = evaluated
    names = {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id)}
    accuracy = run.data.metrics["accuracy"]
    expected = ARTIFACTS if accuracy < 1 else ARTIFACTS - {"worst_mistakes.png", "worst_mistakes.csv",
                                                           "confused_pairs.csv"}
    assert expected <= names


def test_the_model_version_is_tagged_with_the_result(evaluated):
    store, _, run = evaluated
    tag = MlflowClient(store).get_model_version("tiny-cnn", "1").tags["eval.tiny-test"]
    assert f"accuracy {run.data.metrics['accuracy']:.4f}" in tag and run.info.run_id in tag


def test_a_folder_of_class_subfolders_is_scored_too(registered_store, image_folder, tmp_path):
    assert main(["--model", "tiny-cnn@champion", "--data-dir", str(image_folder / "test"),
                 "--tracking-uri", registered_store]) == 0
    assert evaluation_runs(registered_store)[0].data.params["dataset"] == "tiny-test"


def test_a_subset_of_the_classes_is_accepted(registered_store, image_folder, tmp_path):
    folder = tmp_path / "dogs"
    shutil.copytree(image_folder / "test" / "dog", folder / "dog")
    assert main(["--model", "tiny-cnn/1", "--data-dir", str(folder),
                 "--tracking-uri", registered_store]) == 0
    (run,) = evaluation_runs(registered_store)
    assert run.data.metrics["images"] == 6


def test_classes_the_model_does_not_know_are_refused_with_the_list(registered_store, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "other", classes=["cat", "horse", "truck"])
    assert main(["--model", "tiny-cnn/1", "--data-dir", str(folder),
                 "--tracking-uri", registered_store]) == 2
    err = capsys.readouterr().err
    assert "['horse', 'truck']" in err and "['cat', 'dog', 'ship']" in err
    assert evaluation_runs(registered_store) == []


def test_a_folder_without_labelled_images_is_refused(registered_store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--model", "tiny-cnn/1", "--data-dir", str(tmp_path / "empty"),
                 "--tracking-uri", registered_store]) == 2
    assert "holds no labelled images" in capsys.readouterr().err


def test_an_unknown_version_is_refused(registered_store, image_folder, capsys):
    assert main(["--model", "tiny-cnn/9", "--data-dir", str(image_folder),
                 "--tracking-uri", registered_store]) == 2
    assert "no registered model version 'tiny-cnn/9'" in capsys.readouterr().err


def test_compare_includes_evaluation_runs(evaluated, tmp_path):
    import csv

    store, _, run = evaluated
    assert compare_main(["--tracking-uri", store, "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "comparison.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    row = rows[run.info.run_id[:8]]
    assert row["kind"] == "evaluation" and row["dataset"] == "tiny-test"
    assert float(row["test_acc"]) == pytest.approx(run.data.metrics["accuracy"])


def test_every_experiment_opens_on_its_runs_in_the_mlflow_ui(evaluated):
    store = evaluated[0]
    for experiment in MlflowClient(store).search_experiments():
        if experiment.name != "Default":
            assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.fixture
def own_photos_model(train_config, tmp_path):
    """A cnn trained and registered on class folders with no split of their own."""
    from training.tracking.publish import register_version
    from training.train import train

    root = make_class_folders(tmp_path / "photos", n_per_class=10)
    result = train(train_config(data_dir=str(root), epochs=1, batch_size=8), log=lambda *_: None)
    register_version(result.model_uri, result.registered_name, score=0.0)
    return root, result


def test_the_models_own_split_less_folder_is_scored_on_exactly_its_held_out_files(
        own_photos_model, store, tmp_path):
    import mlflow
    root, result = own_photos_model
    assert main(["--model", f"{result.registered_name}/1", "--data-dir", str(root),
                 "--tracking-uri", store]) == 0
    (run,) = evaluation_runs(store)
    source = mlflow.get_run(result.run_id)
    assert run.data.metrics["images"] == int(source.data.params["test_size"]) == 3
    assert run.data.params["scored"] == "the source run's held-out test files"
    assert run.data.params["data_layout"] == "class-folders"
    assert run.data.metrics["accuracy"] == pytest.approx(source.data.metrics["test_acc"], abs=1e-6)


def test_a_held_out_file_that_is_gone_is_named(own_photos_model, store, tmp_path, capsys):
    root, result = own_photos_model
    lost = MlflowClient(store).download_artifacts(result.run_id, "data/files_test.txt", str(tmp_path))
    name = open(lost).read().splitlines()[0]
    (root / name).unlink()
    assert main(["--model", f"{result.registered_name}/1", "--data-dir", str(root),
                 "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert name in err and "1 of the 3 test files" in err
    assert evaluation_runs(store) == []


def test_a_moved_copy_of_the_folder_is_still_scored_on_its_held_out_files(own_photos_model, store,
                                                                         tmp_path):
    root, result = own_photos_model
    shutil.copytree(root, tmp_path / "elsewhere")
    shutil.rmtree(root)
    assert main(["--model", f"{result.registered_name}/1", "--data-dir", str(tmp_path / "elsewhere"),
                 "--tracking-uri", store]) == 0
    (run,) = evaluation_runs(store)
    assert run.data.metrics["images"] == 3


def test_another_folder_of_the_same_classes_is_scored_whole(own_photos_model, store, tmp_path):
    _, result = own_photos_model
    other = make_class_folders(tmp_path / "more", n_per_class=4)  # the same names, a few of them
    (other / "cat" / "cat_001.png").write_bytes(b"")
    assert main(["--model", f"{result.registered_name}/1", "--data-dir", str(other),
                 "--tracking-uri", store]) == 0
    (run,) = evaluation_runs(store)
    assert run.data.metrics["images"] == 11 and run.data.params["skipped_files"] == "1"
    assert run.data.params["scored"] == "all labelled images"
