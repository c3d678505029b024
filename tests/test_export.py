"""ONNX and int8 exports of a registered version: checked against the original before they are
linked, refused past --max-drop, opened only after the file is checked, and used by each
consumer (gui.classify, training.evaluate, the pyfunc server, the app)."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PySide6.QtCore import QSettings

import gui.main_window
import shared.onnx_model
import training.export
from gui.classify import main as classify_main
from shared.files import image_files
from shared.inference import ModelLoadError, load_classifier
from shared.onnx_model import UnsafeOnnx, check_onnx
from shared.registry import CHECKS_TAG, EXPORT_TAG
from shared.store import use_store
from training.evaluate import main as evaluate_main
from training.export import ExportSettings, export
from training.export import main as export_main

PHOTO = Path(__file__).resolve().parent.parent / "inputs" / "dog.png"
BENCHMARKS = PHOTO.parent.parent / "benchmarks"
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def exported(registered, tmp_path_factory, image_folder):
    """A copy of the registered store where tiny-cnn version 1 has an onnx and an onnx-int8
    export, each made once for the module: (uri, {format: Exported})."""
    folder = tmp_path_factory.mktemp("exported")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    shutil.copy(registered[0].removeprefix("sqlite:///"), folder / "mlflow.db")
    done = {fmt: export("tiny-cnn/1", uri, ExportSettings(fmt, str(image_folder),
                                                          cache_dir=str(folder / "cache")), **QUIET)
            for fmt in ("onnx", "onnx-int8")}
    return uri, done


@pytest.fixture
def store_with_exports(exported, tmp_path):
    """A private copy of that store's database (artifacts shared, read-only)."""
    db = tmp_path / "exported.db"
    shutil.copy(exported[0].removeprefix("sqlite:///"), db)
    return f"sqlite:///{db}"


def test_a_float_export_gives_the_pt2_scores_to_a_tolerance(store_with_exports, image_folder):
    use_store(store_with_exports)
    files = image_files(image_folder / "test" / "dog")
    pt2 = load_classifier("models:/tiny-cnn/1")
    ours = load_classifier("models:/tiny-cnn/1", "onnx")
    images = pt2.load_images(files)
    assert ours.runtime == "onnx" and ours.classes == pt2.classes
    assert torch.allclose(ours.scores(images), pt2.scores(images), atol=1e-4)


def test_an_int8_export_agrees_on_top1_and_carries_its_figures(exported, store_with_exports,
                                                               image_folder):
    figures = exported[1]["onnx-int8"].figures
    assert figures["agreement"] >= 0.9 and figures["accuracy_drop_points"] <= 1.0
    assert figures["images"] == 18 and figures["images_per_s"] > 0 and figures["latency_p50_ms"] > 0
    use_store(store_with_exports)
    version = MlflowClient().get_model_version("tiny-cnn", "1")
    assert version.tags[EXPORT_TAG.format("onnx-int8")] == exported[1]["onnx-int8"].model_uri
    assert "agreement" in version.tags[CHECKS_TAG.format("onnx-int8")]
    run = mlflow.get_run(exported[1]["onnx-int8"].run_id)
    assert run.data.tags["export_status"] == "accepted" and run.data.tags["format"] == "onnx-int8"
    assert run.data.metrics["agreement"] == pytest.approx(figures["agreement"])
    assert run.data.params["calibration"].startswith("60 of 60 training images")
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "reliability_diagram.png", "per_class_metrics.csv"} <= logged
    assert run.data.metrics["ece"] == pytest.approx(figures["ece"])
    files = image_files(image_folder / "test" / "ship")
    pt2 = load_classifier("models:/tiny-cnn/1")
    int8 = load_classifier("models:/tiny-cnn@champion", "onnx-int8")
    images = pt2.load_images(files)
    assert torch.equal(int8.scores(images).argmax(1), pt2.scores(images).argmax(1))


def test_an_export_that_loses_more_than_max_drop_is_refused_with_its_figures(
        registered_store, image_folder, monkeypatch, capsys):
    real = training.export.quantize_int8

    def broken(float_path, path, batches, float_edges):
        real(float_path, path, batches, float_edges)
        model = onnx.load(str(path))
        for tensor in model.graph.initializer:  # every weight and bias zeroed: one answer for all
            array = onnx.numpy_helper.to_array(tensor)
            if array.dtype != np.float32 or array.size <= 1:
                continue
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(array), tensor.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(training.export, "quantize_int8", broken)
    code = export_main(["--model", "tiny-cnn/1", "--data-dir", str(image_folder),
                        "--tracking-uri", registered_store, "--max-drop", "5"])
    err = capsys.readouterr().err
    assert code == 1
    assert "refused: the onnx-int8 export of tiny-cnn version 1 loses" in err and "agreement" in err
    use_store(registered_store)
    assert EXPORT_TAG.format("onnx-int8") not in MlflowClient().get_model_version("tiny-cnn", "1").tags
    runs = mlflow.search_runs(experiment_names=["exports"])
    assert list(runs["tags.export_status"]) == ["refused"]
    assert float(runs["metrics.accuracy_drop_points"].iloc[0]) > 5


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_gui_classify_with_an_export_answers_as_pt2_does(runtime, store_with_exports,
                                                         image_folder, tmp_path, capsys):
    folder = image_folder / "test" / "cat"
    answers = {}
    for chosen in ("pt2", runtime):
        out = tmp_path / f"{chosen}.csv"
        assert classify_main([str(folder), "--tracking-uri", store_with_exports, "--model",
                              "tiny-cnn/1", "--runtime", chosen, "--csv", str(out)]) == 0
        answers[chosen] = [row["predicted_class"] for row in csv.DictReader(out.open())]
    assert answers[runtime] == answers["pt2"] and len(answers["pt2"]) == 6
    assert f"models:/tiny-cnn/1 ({runtime}): 6 of 6 files classified" in capsys.readouterr().err


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_evaluate_with_an_export_logs_the_runtime_and_scores_as_pt2_does(
        runtime, store_with_exports, image_folder, tmp_path):
    accuracy = {}
    for chosen in ("pt2", runtime):
        assert evaluate_main(["--model", "tiny-cnn/1", "--data-dir", str(image_folder),
                              "--tracking-uri", store_with_exports, "--runtime", chosen,
                              "--cache-dir", str(tmp_path / "cache")]) == 0
        use_store(store_with_exports)
        run = mlflow.search_runs(experiment_names=["evaluations"],
                                 filter_string=f"params.runtime = '{chosen}'").iloc[0]
        accuracy[chosen] = run["metrics.accuracy"]
    assert accuracy[runtime] == pytest.approx(accuracy["pt2"], abs=1 / 18 + 1e-9)
    tags = MlflowClient().get_model_version("tiny-cnn", "1").tags
    assert f"eval.tiny-test.{runtime}" in tags and "eval.tiny-test" in tags


def test_the_model_server_answers_with_an_export(exported, store_with_exports):
    use_store(store_with_exports)
    request = pd.DataFrame({"image": [PHOTO.read_bytes()]})
    out = mlflow.pyfunc.load_model(exported[1]["onnx-int8"].model_uri).predict(request)
    pt2 = mlflow.pyfunc.load_model("models:/tiny-cnn/1").predict(request)
    assert out.iloc[0]["class"] == pt2.iloc[0]["class"]
    assert set(out.iloc[0]["probabilities"]) == {"cat", "dog", "ship"}


def test_mlflow_models_serve_serves_an_int8_export_over_http(exported, store_with_exports, tmp_path):
    from test_serving import post

    from training.servers import ModelServer

    uri = exported[1]["onnx-int8"].model_uri
    with ModelServer(uri, store_with_exports, tmp_path / "serve.log") as server:
        status, answer = post(server.url, [PHOTO.read_bytes()])
        assert status == 200 and answer["predictions"][0]["class"] in {"cat", "dog", "ship"}
        status, answer = post(server.url, [b"not an image at all"])
        assert 400 <= status < 500 and "image 0 cannot be read" in answer["message"]


def test_a_runtime_with_no_export_is_one_line_naming_the_command(registered_store, image_folder, capsys):
    code = classify_main([str(image_folder / "test" / "cat"), "--tracking-uri", registered_store,
                          "--model", "tiny-cnn/2", "--runtime", "onnx-int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "python -m training.export --model tiny-cnn/2 --format onnx-int8" in err


def test_a_missing_onnx_package_names_the_extra(registered_store, image_folder, monkeypatch, capsys):
    real = shared.onnx_model.importlib.import_module

    def without_onnx(name, *args):
        if name.startswith("onnx"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(shared.onnx_model.importlib, "import_module", without_onnx)
    code = export_main(["--model", "tiny-cnn/1", "--data-dir", str(image_folder),
                        "--tracking-uri", registered_store])
    assert code == 2 and "pip install 'cifarlab[export]'" in capsys.readouterr().err


# --- tampered exports: each is refused before ONNX Runtime opens the file ----------------------

def _edit(folder: Path, change) -> None:
    path = folder / "data" / "model.onnx"
    model = onnx.load(str(path))
    change(model, folder)
    onnx.save(model, str(path))


def _external_outside(model, folder):
    secret = folder.parent / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _custom_operator(model, folder):
    model.opset_import.add(domain="com.example.evil", version=1)
    node = model.graph.node[0]
    node.domain, node.op_type = "com.example.evil", "RunAnything"


def _contrib_operator(model, folder):
    model.graph.node[0].domain = "com.microsoft"


def _unknown_standard_operator(model, folder):
    model.graph.node[0].op_type = "NotAnOnnxOperator"


def _huge_tensor(model, folder):
    model.graph.initializer[0].dims[:] = [1 << 20, 1 << 20]


def _local_function(model, folder):
    function = model.functions.add()
    function.name, function.domain = "Payload", ""


TAMPERED = {
    "external data outside the folder": (_external_outside, "outside the model's own folder"),
    "a custom operator domain": (_custom_operator, "operator domain 'com.example.evil'"),
    "a contrib operator": (_contrib_operator, "not a standard ONNX operator"),
    "an unknown operator": (_unknown_standard_operator, "not a standard ONNX operator"),
    "a huge tensor": (_huge_tensor, "past what an export holds"),
    "a function of its own": (_local_function, "functions of its own"),
    "not protobuf": (lambda model, folder: None, "is not an ONNX model"),
    "a second file in data/": (lambda model, folder: (folder / "data" / "ops.so").write_bytes(b"x"),
                               "must hold model.onnx alone"),
}


@pytest.fixture
def tampered_export(exported, store_with_exports, tmp_path):
    """tiny-cnn version 1's int8 export, changed, and its tag pointed at the change."""

    def make(name):
        change, _ = TAMPERED[name]
        use_store(store_with_exports)
        folder = Path(mlflow.artifacts.download_artifacts(exported[1]["onnx-int8"].model_uri,
                                                          dst_path=str(tmp_path / "export")))
        if name == "not protobuf":
            (folder / "data" / "model.onnx").write_bytes(b"\xff" * 1000)
        else:
            _edit(folder, change)
        MlflowClient().set_model_version_tag("tiny-cnn", "1", EXPORT_TAG.format("onnx-int8"),
                                             folder.as_uri())
        return folder

    return make


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_the_cli_refuses_a_tampered_export_in_one_line(name, tampered_export, store_with_exports,
                                                      image_folder, capsys):
    tampered_export(name)
    code = classify_main([str(image_folder / "test" / "cat"), "--tracking-uri", store_with_exports,
                          "--model", "tiny-cnn/1", "--runtime", "onnx-int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "refused to load models:/tiny-cnn/1 (onnx-int8)" in err and TAMPERED[name][1] in err


@pytest.mark.parametrize("name", ["external data outside the folder", "a custom operator domain"])
def test_the_server_refuses_a_tampered_export(name, tampered_export):
    folder = tampered_export(name)
    with pytest.raises(ModelLoadError, match="refused"):
        mlflow.pyfunc.load_model(str(folder))


def test_the_checked_file_is_what_onnx_runtime_would_open(exported, store_with_exports, tmp_path):
    """Our own exports pass the check: it refuses what the exporter never writes, nothing more."""
    use_store(store_with_exports)
    for done in exported[1].values():
        local = tmp_path / done.model_uri[-6:]
        folder = Path(mlflow.artifacts.download_artifacts(done.model_uri, dst_path=str(local)))
        check_onnx(folder / "data" / "model.onnx")
    with pytest.raises(UnsafeOnnx, match="not an ONNX model"):
        (tmp_path / "empty.onnx").write_bytes(b"\xff" * 10)
        check_onnx(tmp_path / "empty.onnx")


# --- the app ---------------------------------------------------------------------------------

@pytest.fixture
def window(qtbot, tmp_path, monkeypatch, store_with_exports, image_folder):
    shown = []
    for kind in ("information", "warning"):
        monkeypatch.setattr(gui.main_window.QMessageBox, kind,
                            lambda parent, title, text, _kind=kind: shown.append((_kind, title, text)))
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    made = gui.main_window.MainWindow(store_with_exports, settings, image_folder / "test" / "dog")
    made.shown = shown
    qtbot.addWidget(made)
    yield made
    made.close()


def test_the_app_offers_each_checked_runtime_and_classifies_with_it(window, qtbot):
    qtbot.waitUntil(lambda: window.runtime_box.count() == 3 and not window.loading, timeout=30_000)
    assert [window.runtime_box.itemData(i) for i in range(3)] == ["pt2", "onnx", "onnx-int8"]
    qtbot.waitUntil(lambda: not window.running and len(window.images.predictions()) == 6, timeout=30_000)
    pt2 = [p.label for p in window.images.predictions()]
    window.runtime_box.setCurrentIndex(2)
    qtbot.waitUntil(lambda: window.runtime == "onnx-int8" and not window.loading
                    and not window.running and len(window.images.predictions()) == 6, timeout=30_000)
    assert [p.label for p in window.images.predictions()] == pt2
    assert window.facts["runtime"].text().startswith("ONNX int8: agreement")
    assert not window.heatmap_box.isEnabled() and "pt2" in window.no_heatmap
    assert window.runtime_box.itemData(2, gui.main_window.Qt.ItemDataRole.ToolTipRole).startswith("agreement")
    assert not window.shown


def test_a_launch_running_an_export_opens_it_without_importing_pytorch(store_with_exports,
                                                                      image_folder):
    folder = str(image_folder / "test" / "dog")
    out = subprocess.run([sys.executable, str(BENCHMARKS / "app_speed.py"), "--tracking-uri",
                          store_with_exports, "--models", "tiny-cnn/1", "--images", folder,
                          "--launch-folder", folder, "--rounds", "1", "--runtimes", "onnx-int8,pt2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| ")]
    launched = {(row[0], row[1]): row[-1] for row in rows if row[1] in ("pt2", "onnx-int8")}
    assert launched == {("| first", "onnx-int8"): "no |", ("| later, no preloading", "onnx-int8"): "no |",
                        ("| later", "onnx-int8"): "no |", ("| first", "pt2"): "yes |",
                        ("| later, no preloading", "pt2"): "yes |", ("| later", "pt2"): "yes |"}


def test_the_app_shows_a_tampered_export_refused_and_stays_usable(tampered_export, window, qtbot):
    qtbot.waitUntil(lambda: window.runtime_box.count() == 3 and not window.loading, timeout=30_000)
    tampered_export("a custom operator domain")
    window.runtime_box.setCurrentIndex(2)
    qtbot.waitUntil(lambda: bool(window.shown), timeout=30_000)
    assert window.shown[0][0] == "warning" and "refused to load" in window.shown[0][2]
    window.runtime_box.setCurrentIndex(0)
    qtbot.waitUntil(lambda: window.model_uri == "models:/tiny-cnn/1" and not window.loading, timeout=30_000)



def test_refreshing_the_models_offers_the_exports_of_the_version_in_use(window, qtbot,
                                                                      store_with_exports):
    qtbot.waitUntil(lambda: window.runtime_box.count() == 3 and not window.loading, timeout=30_000)
    MlflowClient(store_with_exports).delete_model_version_tag("tiny-cnn", "1", EXPORT_TAG.format("onnx"))
    window.refresh_models()
    qtbot.waitUntil(lambda: window.runtime_box.count() == 2, timeout=30_000)
    assert [window.runtime_box.itemData(i) for i in range(2)] == ["pt2", "onnx-int8"]
    assert window.model_uri == "models:/tiny-cnn/1" and not window.loading


def test_a_network_the_exporter_cannot_convert_is_one_line_and_nothing_stored(
        registered_store, image_folder, monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise RuntimeError("Unsupported FX nodes: {'call_function': ['aten.weird.default']}\nmore")

    monkeypatch.setattr(training.export, "to_onnx", fails)
    code = export_main(["--model", "tiny-cnn/1", "--data-dir", str(image_folder),
                        "--tracking-uri", registered_store])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "cannot export models:/tiny-cnn/1 to onnx-int8: RuntimeError: Unsupported FX" in err
    assert "try --format onnx" in err
    use_store(registered_store)
    assert mlflow.get_experiment_by_name("exports") is None
