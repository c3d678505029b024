"""A short real training run, tracked in a real (temporary) MLflow store and registry."""
import csv
import io
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from shared.inference import load_classifier
from shared.network import Classifier
from shared.store import CHAMPION
from training.tracking.publish import register_version
from training.train import train

EPOCH_METRICS = {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                 "images_per_second"}
FINAL_METRICS = {"test_loss", "test_acc", "best_val_acc", "best_epoch", "train_seconds"}
PARAMS = {"model", "weights_source", "fine_tuned", "frozen_layers", "device", "device_name",
          "cpu_threads", "epochs_requested", "epochs_run", "early_stopping", "stopped_early",
          "stop_epoch", "lr", "batch_size", "optimizer", "weight_decay", "momentum", "schedule",
          "label_smoothing", "augment", "seed", "precision_resolved", "train_size", "val_size"}
TAGS = {"git_commit", "torch_version", "torchvision_version", "cuda_version", "dataset",
        "dataset_fingerprint"}
ARTIFACTS = {"curves.png", "confusion_matrix.png", "confusion_matrix.csv", "per_class_metrics.csv",
             "model_summary.txt", "config.yaml"}


def quiet(*_):
    pass


@pytest.mark.parametrize("form", ["image-folder", "torchvision"])
def test_a_run_logs_every_param_metric_tag_and_artifact(form, train_config, request):
    overrides = {}
    if form == "torchvision":
        request.getfixturevalue("cifar_mirror")
        overrides["data_dir"] = str(request.getfixturevalue("tmp_path") / "cifar")
    result = train(train_config(**overrides), log=quiet)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert PARAMS <= set(run.data.params)
    assert TAGS <= set(run.data.tags)
    assert run.data.tags["dataset_form"] == form
    assert EPOCH_METRICS | FINAL_METRICS <= set(run.data.metrics)
    client = MlflowClient()
    history = client.get_metric_history(result.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert ARTIFACTS <= artifacts
    assert run.data.params["epochs_run"] == "2" and run.data.params["stopped_early"] == "False"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == run.data.tags["dataset_fingerprint"]


def test_artifacts_hold_real_content(train_config, tmp_path):
    result = train(train_config(), log=quiet)
    folder = mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp_path / "a"))
    for png in ("curves.png", "confusion_matrix.png"):
        with Image.open(f"{folder}/{png}") as img:
            assert img.size[0] > 300
    rows = list(csv.DictReader(io.StringIO(open(f"{folder}/per_class_metrics.csv").read())))
    assert [r["class"] for r in rows] == ["cat", "dog", "ship"]
    assert sum(int(r["support"]) for r in rows) == 18
    confusion = list(csv.reader(open(f"{folder}/confusion_matrix.csv")))
    total = sum(int(v) for row in confusion[1:] for v in row[1:])
    assert total == 18


def test_logged_model_is_pt2_with_metadata_for_inference(train_config):
    result = train(train_config(), log=quiet)
    info = mlflow.models.get_model_info(result.model_uri)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri))
    assert [p.name for p in (folder / "data").iterdir()] == ["model.pt2"]  # torch.export, no pickle
    assert info.metadata["class_names"] == ["cat", "dog", "ship"]
    assert info.metadata["preprocessing"]["image_size"] == 32
    # the signature is the HTTP server's: one PNG/JPEG file per row (shared/serving.py)
    assert info.signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert info.flavors["python_function"]["loader_module"] == "shared.serving"
    assert not (folder / "input_example.json").exists()


def test_registered_model_reloaded_gives_the_same_predictions(train_config, image_folder, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    result = train(train_config(), log=quiet)
    loaded = load_classifier(f"models:/{result.registered_name}@{CHAMPION}")
    files = sorted((image_folder / "test").glob("*/*.png"))
    images = loaded.load_images(files)
    reference = Classifier(result.model, result.prep, result.calibration.temperature).cpu().eval()
    with torch.no_grad():
        expected = torch.softmax(reference(images.float() / 255), 1)
    assert torch.allclose(loaded.probabilities(images), expected, atol=1e-5)
    assert loaded.classes == ["cat", "dog", "ship"]


def test_run_is_registered_under_the_dataset_and_model_name(train_config):
    result = train(train_config(), log=quiet)
    assert result.registered_name == "tiny-cnn" and result.version == "1" and result.promoted
    version = MlflowClient().get_model_version_by_alias("tiny-cnn", CHAMPION)
    assert str(version.version) == "1" and version.run_id == result.run_id


def test_no_register_skips_the_registry(train_config):
    result = train(train_config(no_register=True), log=quiet)
    assert result.registered_name is None
    assert MlflowClient().search_registered_models() == []


def test_champion_alias_moves_only_on_improvement(train_config):
    result = train(train_config(no_register=True), log=quiet)
    client = MlflowClient()
    assert register_version(result.model_uri, "m", 0.50) == ("1", True)
    assert register_version(result.model_uri, "m", 0.40) == ("2", False)
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == "1"
    assert register_version(result.model_uri, "m", 0.50) == ("3", False)  # a tie keeps the champion
    assert register_version(result.model_uri, "m", 0.60) == ("4", True)
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == "4"


def test_early_stopping_stops_the_run_and_records_where(train_config):
    # lr far too small: validation accuracy does not move after the first epoch
    result = train(train_config(model="mlp", epochs=6, patience=2, lr=1e-9, schedule="none"),
                   log=quiet)
    params = mlflow.get_run(result.run_id).data.params
    assert result.stopped_epoch == 3 and result.epochs_run == 3
    assert params["stopped_early"] == "True" and params["stop_epoch"] == "3"
    assert params["epochs_requested"] == "6" and params["epochs_run"] == "3"


def test_a_photo_size_makes_the_logged_model_take_photos_decoded_larger(train_config):
    from shared.inference import classify_files, load_classifier

    result = train(train_config(epochs=1, photo_size=48), log=lambda *_: None)
    assert mlflow.get_run(result.run_id).data.params["photo_size_resolved"] == "48"
    clf = load_classifier(result.model_uri)
    assert clf.prep.image_size == 48 and clf.prep.input_size == 32
    photo = Path(__file__).resolve().parents[1] / "inputs" / "horse.png"
    [[prediction]] = list(classify_files(clf, [photo]))
    assert prediction.error is None and prediction.label in clf.classes
