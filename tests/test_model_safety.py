"""Loading a registered model never runs code from its artifacts, and a model whose metadata
is wrong is refused with the reason: in the CLI (exit 2) and in the app (a message, and the
app stays usable)."""
import mlflow
import pytest
from mlflow.tracking import MlflowClient

import gui.main_window
from gui.classify import main
from shared.safe_model import UnsafeModel, check_model_dir
from shared.store import use_store

import attacks


@pytest.fixture
def tamper(registered, registered_store, tmp_path):
    """A new version of tiny-cnn whose artifacts an attacker changed: (uri, folder, marker)."""
    _, result = registered

    def make(change, name="tampered"):
        use_store(registered_store)
        folder = tmp_path / name
        folder.mkdir()
        mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, dst_path=str(folder))
        marker = tmp_path / f"{name}-code-ran"
        change(folder, marker)
        version = MlflowClient(registered_store).create_model_version(
            "tiny-cnn", source=folder.as_uri(), run_id=result.run_id)
        return f"tiny-cnn/{version.version}", folder, marker

    return make


def classify(store, model, folder, capsys):
    code = main([str(folder), "--tracking-uri", store, "--model", model])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("route", sorted(attacks.ROUTES))
def test_each_attack_runs_code_through_mlflows_own_loader(route, tamper, monkeypatch):
    """The attacks are real: MLflow's loader, with its default of allowing pickle, runs them."""
    _, folder, marker = tamper(attacks.ROUTES[route])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    try:
        mlflow.pytorch.load_model(str(folder))
    except Exception:  # noqa: BLE001 - the payload is no model; what matters is that it ran
        pass
    assert marker.exists()


@pytest.mark.parametrize("route", sorted(attacks.ROUTES) + sorted(attacks.NEIGHBOURS))
def test_cli_refuses_a_tampered_model_and_runs_none_of_it(route, tamper, registered_store,
                                                          image_folder, capsys):
    change = {**attacks.ROUTES, **attacks.NEIGHBOURS}[route]
    model, _, marker = tamper(change)
    code, err = classify(registered_store, model, image_folder / "test" / "cat", capsys)
    assert code == 2
    assert "refused to load" in err and "Nothing of it was run" in err
    assert not marker.exists()


def test_a_symbolic_link_in_the_model_folder_is_refused(tamper):
    """MLflow's download already refuses links out of the artifact; a local folder is checked."""
    _, folder, marker = tamper(lambda folder, marker: None)
    attacks.linked_archive(folder, marker)
    with pytest.raises(UnsafeModel, match="symbolic link"):
        check_model_dir(folder)


def test_untouched_copy_of_the_model_loads(tamper, registered_store, image_folder, capsys):
    model, _, _ = tamper(lambda folder, marker: None)
    code, err = classify(registered_store, model, image_folder / "test" / "cat", capsys)
    assert code == 0, err


@pytest.mark.parametrize("route", sorted(attacks.ROUTES))
def test_app_refuses_a_tampered_model_and_stays_usable(route, tamper, registered_store,
                                                       image_folder, qtbot, tmp_path, monkeypatch):
    from PySide6.QtCore import QSettings

    shown = []
    monkeypatch.setattr(gui.main_window.QMessageBox, "warning",
                        lambda parent, title, text: shown.append(text))
    model, _, marker = tamper(attacks.ROUTES[route])
    window = gui.main_window.MainWindow(
        registered_store, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat),
        image_folder / "test" / "cat", model=model)
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: bool(shown), timeout=30_000)
    assert "refused to load" in shown[0] and not marker.exists()
    window.model_box.setCurrentIndex(window.model_box.findData("models:/tiny-cnn/1"))
    qtbot.waitUntil(lambda: not window.running and bool(window.images.predictions())
                    and all(p.error is None for p in window.images.predictions()), timeout=30_000)
    window.close()


def metadata_change(change):
    def tamper_metadata(folder, marker):
        attacks.edit_mlmodel(folder, lambda mlmodel: change(mlmodel["metadata"]))
    return tamper_metadata


BAD_METADATA = {
    "empty preprocessing": (lambda m: m.update(preprocessing={}), "lacks preprocessing"),
    "image size unlike the network's": (lambda m: m["preprocessing"].update(image_size=48),
                                        "does not take 48x48 images"),
    "fewer class names than outputs": (lambda m: m.update(class_names=["cat", "dog"]),
                                       "names 2 classes"),
    "more class names than outputs": (lambda m: m.update(class_names=["a", "b", "c", "d"]),
                                      "names 4 classes"),
    "no class names": (lambda m: m.pop("class_names"), "lacks class names"),
    "std of zero": (lambda m: m["preprocessing"].update(std=[0, 0, 0]), "std above 0"),
    "absurd image size": (lambda m: m["preprocessing"].update(image_size=100000), "outside 8.."),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_cli_refuses_wrong_metadata_with_the_reason(case, tamper, registered_store,
                                                    image_folder, capsys):
    change, reason = BAD_METADATA[case]
    model, _, _ = tamper(metadata_change(change))
    code, err = classify(registered_store, model, image_folder / "test" / "cat", capsys)
    assert code == 2 and reason in err
    assert "Traceback" not in err
