"""The desktop app, offscreen, against a temporary store with a tiny registered model."""
import csv
import os
import shutil
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPointF, QSettings, Qt, QUrl
from PySide6.QtGui import QDropEvent

import gui.main_window
import shared.inference
import shared.preprocess
from gui.main_window import MainWindow
from shared.files import image_files
from shared.inference import classify_files, load_classifier

from datagen import make_odd_images


@pytest.fixture
def messages(monkeypatch):
    """Message boxes are recorded instead of shown (they would block the test)."""
    shown = []
    for kind in ("information", "warning"):
        monkeypatch.setattr(gui.main_window.QMessageBox, kind,
                            lambda parent, title, text, _kind=kind: shown.append((_kind, title, text)))
    return shown


@pytest.fixture
def open_window(qtbot, tmp_path, messages):
    windows = []

    def make(uri, folder=None, settings_file="settings.ini"):
        settings = QSettings(str(tmp_path / settings_file), QSettings.Format.IniFormat)
        window = MainWindow(uri, settings, folder)
        qtbot.addWidget(window)
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()


def wait_classified(qtbot, window, count, timeout=30_000):
    qtbot.waitUntil(lambda: not window.running and len(window.images.predictions()) == count,
                    timeout=timeout)


def test_picker_lists_the_registered_versions_and_selects_champion(open_window, qtbot,
                                                                   registered_store):
    window = open_window(registered_store)
    qtbot.waitUntil(lambda: window.model_box.count() == 2, timeout=20_000)
    assert "@champion" in window.model_box.currentText()
    assert window.model_uri == "models:/tiny-cnn/1"
    assert window.facts["model"].text() == "cnn"
    assert window.facts["training"].text() == "from scratch"
    assert window.facts["epochs run"].text() == "2"
    assert window.facts["test accuracy"].text().endswith("%")


def test_classifying_a_folder_fills_every_item_with_the_models_predictions(
        open_window, qtbot, registered_store, image_folder):
    folder = image_folder / "test" / "ship"
    window = open_window(registered_store, folder)
    wait_classified(qtbot, window, 6)
    import mlflow
    mlflow.set_tracking_uri(registered_store)
    clf = load_classifier("models:/tiny-cnn/1")
    direct = [p for batch in classify_files(clf, image_files(folder)) for p in batch]
    shown = {p.path: p for p in window.images.predictions()}
    for p in direct:
        assert [c for c, _ in shown[p.path].top] == [c for c, _ in p.top]
        assert [v for _, v in shown[p.path].top] == pytest.approx([v for _, v in p.top])
    assert all(item.caption.count("\n") == 1 for item in window.images.items)


def test_each_bad_file_is_marked_and_the_rest_of_the_batch_finishes(
        open_window, qtbot, registered_store, tmp_path, monkeypatch, messages):
    monkeypatch.setattr(shared.preprocess, "MAX_MEGAPIXELS", 2)
    cases = make_odd_images(tmp_path / "odd")
    window = open_window(registered_store, tmp_path / "odd")
    wait_classified(qtbot, window, len(cases))
    by_name = {Path(p.path).name: p for p in window.images.predictions()}
    for name, error in cases.items():
        if error is None:
            assert by_name[name].error is None and by_name[name].label, name
        else:
            assert error in by_name[name].error, name
    assert "unreadable" in window.message.text()
    assert messages == []  # per-file problems are shown in the grid, not in dialogs


def test_selecting_an_image_shows_its_top_classes_as_bars(open_window, qtbot, registered_store,
                                                          image_folder):
    window = open_window(registered_store, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    window.grid.setCurrentIndex(window.images.index(0))
    prediction = window.images.items[0].prediction
    names = [name.text() for name, _ in window.bars[:3]]
    assert names == [c for c, _ in prediction.top]
    assert window.bars[0][1].value() == round(prediction.top[0][1] * 1000)
    assert not window.preview.pixmap().isNull()


def test_export_writes_one_row_per_file(open_window, qtbot, registered_store, image_folder, tmp_path):
    window = open_window(registered_store, image_folder / "test" / "dog")
    wait_classified(qtbot, window, 6)
    window.export_csv(tmp_path / "out.csv")
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == window.images.paths()
    assert all(r["predicted_class"] in {"cat", "dog", "ship"} and r["top5"] for r in rows)


def test_cancel_stops_the_batch(open_window, qtbot, registered_store, image_folder, tmp_path,
                                monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    source = next((image_folder / "test" / "cat").iterdir())
    for i in range(60):
        shutil.copy(source, folder / f"{i:03d}.png")
    real = shared.inference.classify_files

    def slow(clf, paths, batch_size, cancelled):
        for batch in real(clf, paths, 2, cancelled=cancelled):
            time.sleep(0.05)
            yield batch

    monkeypatch.setattr(shared.inference, "classify_files", slow)
    window = open_window(registered_store, folder)
    qtbot.waitUntil(lambda: window.running and window.progress.value() >= 2, timeout=20_000)
    with qtbot.waitSignal(window.worker.finished, timeout=10_000) as finished:
        window.cancel_action.trigger()
    assert finished.args[1] is True  # cancelled
    assert not window.running and window.message.text() == "Cancelled"
    assert len(window.images.predictions()) < 60
    assert window.classify_action.isEnabled()


def test_switching_model_classifies_again(open_window, qtbot, registered_store, image_folder):
    window = open_window(registered_store, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    first_job = window.job
    window.model_box.setCurrentIndex(1)
    qtbot.waitUntil(lambda: window.model_uri == "models:/tiny-cnn/2" and window.job > first_job
                    and not window.running and len(window.images.predictions()) == 6,
                    timeout=30_000)


def test_dropped_files_are_added_and_classified(open_window, qtbot, registered_store, image_folder):
    window = open_window(registered_store, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    mime = QMimeData()
    dog = sorted((image_folder / "test" / "dog").iterdir())[:2]
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in dog])
    event = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime,
                       Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)
    wait_classified(qtbot, window, 8)
    assert window.images.paths()[-2:] == [str(p) for p in dog]


def test_a_pasted_image_is_kept_in_the_cache_and_classified(open_window, qtbot, registered_store,
                                                             image_folder, tmp_path, monkeypatch):
    from PySide6.QtGui import QImage
    from PySide6.QtWidgets import QApplication

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    window = open_window(registered_store, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    QApplication.clipboard().setText("just words")
    window.paste_action.trigger()
    assert "holds no image" in window.message.text() and window.images.rowCount() == 6
    QApplication.clipboard().setImage(QImage(str(sorted((image_folder / "test" / "dog").iterdir())[0])))
    window.paste_action.trigger()
    wait_classified(qtbot, window, 7)
    pasted = Path(window.images.paths()[-1])
    assert pasted.parent == tmp_path / "cache" / "cifarlab" / "pasted" and pasted.suffix == ".png"
    assert sorted(os.listdir(image_folder / "test" / "cat")) == [f"{i:04d}.png" for i in range(6)]


def test_an_empty_registry_says_how_to_train(open_window, qtbot, store, messages):
    window = open_window(store)
    qtbot.waitUntil(lambda: bool(messages), timeout=20_000)
    kind, _, text = messages[0]
    assert "no registered model" in text and "training.train" in text
    assert "New model from a folder" in text and window.new_model_action.isEnabled()
    assert not window.classify_action.isEnabled()


def test_an_unreachable_store_says_where_to_point_the_app(open_window, qtbot, tmp_path, messages):
    open_window(f"sqlite:///{tmp_path}/missing/dir/mlflow.db")
    qtbot.waitUntil(lambda: bool(messages), timeout=20_000)
    assert "MLFLOW_TRACKING_URI" in messages[0][2]


def test_a_tracking_server_that_does_not_answer_is_named_within_seconds(open_window, qtbot,
                                                                        messages):
    from training.servers import free_port
    open_window(f"http://127.0.0.1:{free_port()}")
    qtbot.waitUntil(lambda: bool(messages), timeout=20_000)
    assert "cannot be reached" in messages[0][2] and "Traceback" not in messages[0][2]


def test_a_version_with_missing_artifacts_is_reported_and_the_app_keeps_working(
        open_window, qtbot, registered_store, tmp_path, messages, image_folder):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(registered_store, registry_uri=registered_store)
    from shared.store import use_store
    use_store(registered_store)
    model_uri = client.get_model_version("tiny-cnn", "1").source
    broken = client.create_model_version("tiny-cnn", source=str(tmp_path / "gone"), run_id=None)
    window = open_window(registered_store, image_folder / "test" / "cat")
    qtbot.waitUntil(lambda: window.model_box.count() == 3, timeout=20_000)
    index = [i for i, v in enumerate(window.versions) if v.version == str(broken.version)][0]
    window.model_box.setCurrentIndex(index)
    qtbot.waitUntil(lambda: bool(messages), timeout=20_000)
    assert messages[0][0] == "warning" and "missing" in messages[0][2]
    assert window.model_box.isEnabled() and window.model_uri is None
    window.model_box.setCurrentIndex(0)
    wait_classified(qtbot, window, 6)
    assert model_uri


def test_the_window_remembers_its_folder_and_model(open_window, qtbot, registered_store, image_folder):
    window = open_window(registered_store, image_folder / "test" / "dog")
    qtbot.waitUntil(lambda: window.model_box.count() == 2, timeout=20_000)
    window.model_box.setCurrentIndex(1)
    wait_classified(qtbot, window, 6)
    window.close()
    again = open_window(registered_store)
    qtbot.waitUntil(lambda: again.model_uri is not None, timeout=20_000)
    assert again.folder == image_folder / "test" / "dog"
    assert again.model_uri == "models:/tiny-cnn/2"


def test_an_unexpected_error_while_loading_is_shown_not_left_on_loading(
        open_window, qtbot, registered_store, image_folder, messages, monkeypatch):
    def broken(uri, runtime="pt2", keep_in=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(shared.inference, "load_classifier", broken)
    window = open_window(registered_store, image_folder / "test" / "cat")
    qtbot.waitUntil(lambda: bool(messages), timeout=20_000)
    assert messages[0][0] == "warning" and "disk on fire" in messages[0][2]
    assert not window.loading and window.model_box.isEnabled()


def test_an_error_while_classifying_is_shown_and_the_app_stays_usable(
        open_window, qtbot, registered_store, image_folder, messages, monkeypatch):
    def broken(clf, paths, batch_size, cancelled):
        raise RuntimeError("model failed on this input")
        yield

    monkeypatch.setattr(shared.inference, "classify_files", broken)
    window = open_window(registered_store, image_folder / "test" / "cat")
    qtbot.waitUntil(lambda: bool(messages), timeout=20_000)
    assert "model failed on this input" in messages[0][2]
    assert not window.running and "failed" in window.message.text()
    assert window.classify_action.isEnabled()


def test_a_small_image_is_scaled_up_to_fill_the_preview(open_window, qtbot, registered_store,
                                                         image_folder):
    window = open_window(registered_store, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    window.grid.setCurrentIndex(window.images.index(0))  # a 32 x 32 image
    assert window.preview.pixmap().width() >= 256


def test_an_unsure_answer_is_marked_in_the_grid_and_the_details(open_window, qtbot, registered_store,
                                                                image_folder, monkeypatch):
    from shared.calibration import Calibration

    monkeypatch.setattr(Calibration, "unsure", lambda self, top: True)
    window = open_window(registered_store, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    window.grid.setCurrentIndex(window.images.index(0))
    assert "unsure — maybe none of these classes" in window.detail_title.text()
    assert "(unsure)" in window.images.items[0].caption


def test_the_heatmap_box_shows_where_the_model_looked(open_window, qtbot, registered_store,
                                                      image_folder):
    window = open_window(registered_store, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    window.grid.setCurrentIndex(window.images.index(0))
    plain = window.preview.pixmap().toImage()
    assert window.heatmap_box.isEnabled()
    window.heatmap_box.setChecked(True)
    qtbot.waitUntil(lambda: window.heatmap_note.text().startswith("Heatmap"), timeout=10_000)
    shown = window.preview.pixmap().toImage()
    assert shown.width() == window._preview_side() and shown != plain
    window.heatmap_box.setChecked(False)
    assert window.preview.pixmap().toImage() == plain


def test_a_model_without_convolutions_offers_no_heatmap_and_says_why(open_window, qtbot, train_config,
                                                                     image_folder):
    from training.train import train

    result = train(train_config(model="mlp"), log=lambda *_: None)
    window = open_window(train_config().tracking_uri, image_folder / "test" / "cat")
    wait_classified(qtbot, window, 6)
    assert result.registered_name in window.model_box.currentText()
    assert not window.heatmap_box.isEnabled()
    assert "no convolutional layers" in window.heatmap_box.toolTip()


def test_missing_window_libraries_are_named_with_the_packages_to_install(monkeypatch, capsys):
    import gui.app

    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    monkeypatch.setattr(gui.app, "loadable", lambda lib: lib not in {"libxcb-icccm.so.4",
                                                                       "libxcb-keysyms.so.1"})
    assert gui.app.main([]) == 2
    err = capsys.readouterr().err
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1" in err
    assert "apt-get install libxcb-icccm4 libxcb-keysyms1" in err and "gui.classify" in err


def test_no_library_check_off_x11(monkeypatch):
    import gui.app

    monkeypatch.setenv("QT_QPA_PLATFORM", "wayland")
    monkeypatch.setattr(gui.app, "loadable", lambda lib: False)
    assert gui.app.missing_window_libraries() == []


def launched_once(open_window, qtbot, uri: str) -> None:
    """A window on `uri` until its model is loaded, then closed: what it kept stays."""
    first = open_window(uri)
    qtbot.waitUntil(lambda: first.model_uri is not None and not first.loading, timeout=30_000)
    first.close()


def kept_models(tmp_path) -> list[Path]:
    return sorted((tmp_path / "xdg_cache" / "cifarlab" / "models").glob("*/*"))


def test_a_second_launch_shows_the_last_listing_and_opens_the_kept_model_without_the_store(
        open_window, qtbot, registered_store, tmp_path, monkeypatch):
    launched_once(open_window, qtbot, registered_store)
    (kept,) = kept_models(tmp_path)
    assert (kept / "MLmodel").is_file() and kept.name == "tiny-cnn_1-pt2"

    def no_store(*args, **kwargs):
        raise AssertionError("the store was asked for the model")

    monkeypatch.setattr(shared.inference, "load_classifier", no_store)
    second = open_window(registered_store)
    assert second.model_box.count() == 2 and second.model_uri == "models:/tiny-cnn/1"
    qtbot.waitUntil(lambda: not second.loading, timeout=30_000)
    assert second.message.text().startswith(("Ready", "2 model version"))
    qtbot.waitUntil(lambda: "in the registry" in second.message.text() or
                    second.message.text().startswith("Ready"), timeout=30_000)


def test_kept_model_files_changed_since_are_fetched_again_from_the_store(
        open_window, qtbot, registered_store, tmp_path, messages):
    launched_once(open_window, qtbot, registered_store)
    (kept,) = kept_models(tmp_path)
    archive = next(kept.rglob("*.pt2"))
    archive.write_bytes(archive.read_bytes()[:100])
    second = open_window(registered_store)
    qtbot.waitUntil(lambda: second.model_uri is not None and not second.loading, timeout=30_000)
    assert second.message.text().startswith("Ready") or "in the registry" in second.message.text()
    assert not messages
    (again,) = kept_models(tmp_path)
    assert next(again.rglob("*.pt2")).stat().st_size > 100


def test_a_listing_kept_for_another_store_is_not_shown(open_window, qtbot, registered_store, store,
                                                       messages):
    launched_once(open_window, qtbot, registered_store)
    other = open_window(store)
    assert other.model_box.count() == 0
    qtbot.waitUntil(lambda: bool(messages), timeout=20_000)
    assert "no registered model" in messages[0][2]
