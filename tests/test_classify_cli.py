"""python -m gui.classify: the app's inference without a window."""
import csv

import pytest

import shared.preprocess
from gui.classify import main
from shared.files import image_files
from shared.inference import classify_files, load_classifier

from datagen import make_odd_images


@pytest.fixture
def odd_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(shared.preprocess, "MAX_MEGAPIXELS", 2)
    return tmp_path / "odd", make_odd_images(tmp_path / "odd")


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_file_with_the_class_or_the_reason(registered_store, odd_folder, tmp_path):
    folder, cases = odd_folder
    out = tmp_path / "out.csv"
    assert main([str(folder), "--tracking-uri", registered_store, "--csv", str(out)]) == 0
    by_file = {r["file"].rsplit("/", 1)[-1]: r for r in rows(out)}
    assert set(by_file) == set(cases)
    for name, error in cases.items():
        if error is None:
            assert by_file[name]["predicted_class"] in {"cat", "dog", "ship"}, name
            assert by_file[name]["error"] == ""
            assert len(by_file[name]["top5"].split("; ")) == 3  # 3 classes in the tiny model
        else:
            assert error in by_file[name]["error"] and by_file[name]["predicted_class"] == ""


def test_cli_predictions_equal_the_model_loaded_directly(registered_store, image_folder, tmp_path):
    import mlflow
    mlflow.set_tracking_uri(registered_store)
    folder = image_folder / "test" / "dog"
    out = tmp_path / "out.csv"
    assert main([str(folder), "--tracking-uri", registered_store, "--model", "tiny-cnn@champion",
                 "--csv", str(out)]) == 0
    clf = load_classifier("models:/tiny-cnn@champion")
    direct = [p for batch in classify_files(clf, image_files(folder)) for p in batch]
    got = rows(out)
    assert [r["predicted_class"] for r in got] == [p.label for p in direct]
    assert [float(r["confidence"]) for r in got] == pytest.approx([p.confidence for p in direct], abs=1e-4)


def test_an_empty_registry_says_how_to_train(store, image_folder, capsys):
    assert main([str(image_folder / "test" / "cat"), "--tracking-uri", store]) == 2
    assert "no registered model" in capsys.readouterr().err


def test_an_unknown_model_is_reported(registered_store, image_folder, capsys):
    assert main([str(image_folder / "test" / "cat"), "--tracking-uri", registered_store,
                 "--model", "nope@champion"]) == 2
    assert "nope" in capsys.readouterr().err


def test_heatmaps_are_written_for_every_classified_file(registered_store, odd_folder, tmp_path):
    from PIL import Image

    folder, cases = odd_folder
    out = tmp_path / "heat"
    assert main([str(folder), "--tracking-uri", registered_store, "--csv", str(tmp_path / "o.csv"),
                 "--heatmaps", str(out), "--heatmap-size", "64"]) == 0
    readable = {name.rsplit(".", 1)[0] for name, error in cases.items() if error is None}
    written = {p.name.removesuffix("_heatmap.png") for p in out.iterdir()}
    assert written == readable
    with Image.open(next(out.iterdir())) as image:
        assert image.size == (64, 64)


def test_heatmaps_of_a_model_without_convolutions_are_refused_before_anything_runs(
        train_config, image_folder, tmp_path, capsys):
    from training.train import train

    train(train_config(model="mlp"), log=lambda *_: None)
    out = tmp_path / "heat"
    assert main([str(image_folder / "test" / "cat"), "--tracking-uri", train_config().tracking_uri,
                 "--heatmaps", str(out)]) == 2
    assert "no convolutional layers" in capsys.readouterr().err and not out.exists()


def test_a_kaggle_test_folder_gets_a_submission_file_in_id_order(registered_store, tmp_path, capsys):
    from datagen import make_labels_file_dataset
    root = make_labels_file_dataset(tmp_path / "kaggle", n_per_class=2, n_unlabelled_test=3)
    (root / "train" / "1.png").replace(root / "test" / "10.png")
    (root / "train" / "2.png").replace(root / "test" / "20.png")
    (root / "test" / "broken.png").write_bytes(b"")
    out, preds = tmp_path / "submission.csv", tmp_path / "preds.csv"
    assert main([str(root / "test"), "--tracking-uri", registered_store, "--csv", str(preds),
                 "--submission", str(out)]) == 0
    table = rows(out)
    assert [r["id"] for r in table] == ["1", "2", "3", "10", "20"]
    assert {r["label"] for r in table} <= {"cat", "dog", "ship"}
    by_file = {r["file"].rsplit("/", 1)[-1]: r["predicted_class"] for r in rows(preds)}
    assert all(by_file[f"{r['id']}.png"] == r["label"] for r in table)
    err = capsys.readouterr().err
    assert "1 unreadable file(s) have no row" in err and "broken.png" in err


def test_two_files_sharing_an_id_are_refused_before_classifying(registered_store, tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "test"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "7.png")
    Image.new("RGB", (8, 8)).save(folder / "7.jpg")
    out = tmp_path / "submission.csv"
    assert main([str(folder), "--tracking-uri", registered_store, "--submission", str(out)]) == 2
    err = capsys.readouterr().err
    assert "7.jpg" in err and "7.png" in err and "share the id 7" in err and not out.exists()
