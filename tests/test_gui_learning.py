"""The app learns: a real `training.train` process started from the window until its version is
registered and selected; stop and resume; a corrected answer copied into the training folder
and undone; a retrain tagged with its lineage; the mislabel gallery's decisions applied to a
copy of a folder only once confirmed."""
import csv
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import QMessageBox

import gui.main_window
from gui.main_window import MainWindow
from gui.train_dialog import STOPPED_KEY, TrainDialog
from shared import curation

FAST = "--epochs 2 --batch-size 16 --device cpu --no-system-metrics"


@pytest.fixture
def window(qtbot, tmp_path, registered_store, monkeypatch):
    monkeypatch.setattr(gui.main_window.QMessageBox, "warning",
                        lambda parent, title, text: pytest.fail(f"{title}: {text}"))
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    made = MainWindow(registered_store, settings)
    qtbot.addWidget(made)
    qtbot.waitUntil(lambda: made.model_uri is not None and not made.loading, timeout=30_000)
    yield made
    made.close()


@pytest.fixture
def photos(image_folder, tmp_path) -> Path:
    """A private copy of the tiny folder, for the app to change."""
    return Path(shutil.copytree(image_folder, tmp_path / "photos"))


def start(dialog: TrainDialog, folder: Path, choice: str, more: str, name: str = "") -> None:
    dialog.folder_edit.setText(str(folder))
    dialog.start_box.setCurrentIndex(dialog.start_box.findText(choice, Qt.MatchFlag.MatchStartsWith))
    if name:
        dialog.name_edit.setText(name)
    dialog.more_edit.setText(more)
    dialog.train()


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_model_trained_from_the_window_is_registered_then_selected(window, qtbot, photos, tmp_path):
    dialog = window.open_training()
    start(dialog, photos, "Small CNN", f"{FAST} --cache-dir {tmp_path / 'cache'}", "from-window")
    assert dialog.state == "running" and not dialog.train_button.isEnabled()
    qtbot.waitUntil(lambda: dialog.state in ("done", "failed"), timeout=120_000)
    assert dialog.state == "done", dialog.result.text() + dialog.log.toPlainText()[-2000:]
    assert len(dialog.curves.history) == 2 and "val_acc" in dialog.curves.history[-1]
    assert "Registered <b>from-window version 1</b>" in dialog.result.text()
    assert "MLflow UI" in dialog.result.text()
    qtbot.waitUntil(lambda: window.model_uri == "models:/from-window/1" and not window.loading,
                    timeout=30_000)
    version = MlflowClient(window.tracking_uri).get_model_version("from-window", "1")
    run = MlflowClient(window.tracking_uri).get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data_dir"] == str(photos)


def test_a_bad_folder_is_one_line_in_the_dialog_and_nothing_starts(window, qtbot, tmp_path):
    dialog = window.open_training()
    start(dialog, tmp_path / "nowhere", "Small CNN", FAST)
    assert dialog.state == "idle" and "is not a folder" in dialog.result.text()
    one_class = tmp_path / "one"
    (one_class / "cat").mkdir(parents=True)
    shutil.copy(_any_png(tmp_path), one_class / "cat" / "a.png")
    start(dialog, one_class, "Small CNN", FAST)
    qtbot.waitUntil(lambda: dialog.state in ("done", "failed"), timeout=60_000)
    assert dialog.state == "failed"
    message = dialog.result.text()
    assert "Traceback" not in message and "class" in message, message


def _any_png(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "any.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return path


def long_run(window, photos: Path, tmp_path: Path, name: str) -> TrainDialog:
    """A 40-epoch run of the small CNN started from the window, to stop on the way."""
    dialog = window.open_training()
    start(dialog, photos, "Small CNN", f"--epochs 40 --patience 0 --batch-size 16 --device cpu "
                                       f"--no-system-metrics --cache-dir {tmp_path / 'cache'}", name)
    return dialog


def test_a_run_stopped_from_the_window_resumes_to_its_end(window, qtbot, photos, tmp_path):
    dialog = long_run(window, photos, tmp_path, "stopped")
    qtbot.waitUntil(lambda: dialog.epochs_seen >= 2, timeout=90_000)
    dialog.stop()
    qtbot.waitUntil(lambda: dialog.state in ("stopped", "done", "failed"), timeout=60_000)
    assert dialog.state == "stopped", dialog.log.toPlainText()[-2000:]
    stopped_at = dialog.epochs_seen
    assert 2 <= stopped_at < 40 and dialog.resume_button.isEnabled()
    client = MlflowClient(window.tracking_uri)
    assert client.get_run(dialog.run_id).info.status == "KILLED"
    dialog.resume()
    qtbot.waitUntil(lambda: dialog.state in ("stopped", "done", "failed"), timeout=120_000)
    assert dialog.state == "done", dialog.log.toPlainText()[-2000:]
    run = client.get_run(dialog.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(dialog.run_id, "train_loss")) == 40
    assert len(dialog.curves.history) == 40


def test_closing_the_dialog_stops_the_run_and_the_next_one_offers_to_resume_it(
        window, qtbot, photos, tmp_path):
    dialog = long_run(window, photos, tmp_path, "closed")
    qtbot.waitUntil(lambda: dialog.epochs_seen >= 1, timeout=90_000)
    dialog.close()
    assert not dialog.job.running and not dialog.isVisible()
    run_id = dialog.run_id
    assert MlflowClient(window.tracking_uri).get_run(run_id).info.status == "KILLED"
    assert window.settings.value(STOPPED_KEY)
    again = window.open_training()
    assert again.state == "stopped" and again.resume_button.isEnabled() and again.run_id == run_id
    again.resume()
    qtbot.waitUntil(lambda: again.state in ("done", "failed"), timeout=120_000)
    assert again.state == "done"
    assert MlflowClient(window.tracking_uri).get_run(run_id).info.status == "FINISHED"
    assert not window.settings.value(STOPPED_KEY)


def test_a_correction_is_a_copy_in_the_training_folder_and_undo_takes_it_back(
        window, qtbot, photos, image_folder):
    window.settings.setValue("training/folder", str(photos))
    window.open_folder(image_folder / "test" / "cat")
    qtbot.waitUntil(lambda: not window.running and bool(window.images.predictions()), timeout=30_000)
    window.grid.setCurrentIndex(window.images.index(0, 0))
    assert window.correct_button.isEnabled()
    assert [a.text() for a in window.correct_menu.actions()][:len(window.classes)] == window.classes
    source = Path(window._selected_path())
    before = files_under(photos)
    window.correct("dog")
    window.correct("zebra")
    dog = photos / "train" / "dog" / source.name
    copy = photos / "train" / "dog" / f"{source.stem}-2{source.suffix}"
    assert copy.read_bytes() == source.read_bytes() and source.exists()
    assert dog.read_bytes() == before[f"train/dog/{source.name}"]  # never overwritten
    assert (photos / "train" / "zebra" / source.name).exists()
    assert window.undo_action.isEnabled()
    window.undo_correction()
    assert not (photos / "train" / "zebra").exists()
    window.undo_correction()
    assert files_under(photos) == before and not window.undo_action.isEnabled()


def test_retrain_uses_the_versions_recipe_and_registers_its_lineage(window, qtbot, photos, tmp_path):
    window.settings.setValue("training/folder", str(photos))
    base = window.current_version()
    window.correct("dog", str(next((photos / "test" / "cat").iterdir())))
    dialog = window.retrain()
    assert dialog.lineage.text() == f"lineage: improves on {base.name}/{base.version}"
    assert dialog.name_edit.text() == base.name
    dialog.more_edit.setText(f"--epochs 1 --cache-dir {tmp_path / 'cache'}")
    dialog.train()
    qtbot.waitUntil(lambda: dialog.state in ("done", "failed"), timeout=120_000)
    assert dialog.state == "done", dialog.result.text() + dialog.log.toPlainText()[-2000:]
    assert "Side by side" in dialog.result.text()
    qtbot.waitUntil(lambda: window.facts["improves on"].text() == f"{base.name}/{base.version}",
                    timeout=30_000)
    name, number = window.model_uri.removeprefix("models:/").split("/")
    version = MlflowClient(window.tracking_uri).get_model_version(name, number)
    assert version.tags["improves_on"] == f"{base.name}/{base.version}"
    params = MlflowClient(window.tracking_uri).get_run(version.run_id).data.params
    assert params["model"] == "cnn" and params["epochs"] == "1" and params["data_dir"] == str(photos)


@pytest.fixture
def frozen_version(train_config, photos):
    """A version with a frozen pretrained backbone, trained on the folder with labels broken."""
    from tests.test_features import frozen
    from training.train import train

    cat, dog = photos / "train" / "cat", photos / "train" / "dog"
    for path in sorted(cat.iterdir())[:2]:
        shutil.move(path, dog / f"was-cat-{path.name}")
    cfg = frozen(train_config, data_dir=str(photos), epochs=2, register="frozen-pets")
    result = train(cfg, log=lambda *_: None)
    return cfg, result


def test_the_gallery_changes_the_folder_only_once_confirmed(qtbot, tmp_path, frozen_version,
                                                            photos, monkeypatch):
    from gui.label_issues_dialog import LabelIssuesDialog
    from shared.registry import list_versions

    cfg, result = frozen_version
    version = next(v for v in list_versions(cfg.tracking_uri) if v.name == "frozen-pets")
    assert version.facts["frozen pretrained"] == "yes"
    dialog = LabelIssuesDialog(cfg.tracking_uri, version, photos)
    qtbot.addWidget(dialog)
    dialog.find()
    qtbot.waitUntil(lambda: not dialog.job.running and bool(dialog.rows), timeout=180_000)
    before = files_under(photos)
    first, second = dialog.rows[0], dialog.rows[1]
    dialog.choose(first["file"], "relabel", first["suggested"])
    dialog.choose(second["file"], "exclude")
    monkeypatch.setattr(QMessageBox, "question", lambda *a: QMessageBox.StandardButton.No)
    dialog.confirm_apply()
    assert files_under(photos) == before and not dialog.applied
    monkeypatch.setattr(QMessageBox, "question", lambda *a: QMessageBox.StandardButton.Yes)
    dialog.confirm_apply()
    assert dialog.applied and dialog.retrain_button.isEnabled()
    after = files_under(photos)
    aside = curation.excluded_folder(photos)
    log = {row["file"]: row for row in csv.DictReader(curation.decisions_log(photos).open())}
    assert [log[f]["decision"] for f in (first["file"], second["file"])] == ["relabel", "exclude"]
    relabelled = log[first["file"]]["copied_to"]
    assert Path(relabelled).parent == Path(first["file"]).parent.parent / first["suggested"]
    assert after[relabelled] == before[first["file"]]
    assert set(after) - set(before) == {relabelled}
    assert set(before) - set(after) == {first["file"], second["file"]}
    assert (aside / first["file"]).read_bytes() == before[first["file"]]
    assert (aside / second["file"]).read_bytes() == before[second["file"]]
    artifacts = MlflowClient(cfg.tracking_uri).list_artifacts(result.run_id, "label_decisions")
    assert [a.path for a in artifacts] == ["label_decisions/label_decisions.csv"]
    dialog.close()
