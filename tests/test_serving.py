"""Serving a registered model over HTTP: images in, class names, probabilities and the unsure
flag out, through the project's own loader (shared.serving), nothing taken from the artifact
but data."""
import base64
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from shared.inference import ModelLoadError
from shared.store import use_store
from training.servers import ModelServer

PHOTO = Path(__file__).resolve().parent.parent / "inputs" / "dog.png"
CLASSES = {"cat", "dog", "ship"}


def post(url: str, images: list[bytes]) -> tuple[int, dict]:
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(b).decode()] for b in images]}}
    request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_the_pyfunc_answers_class_names_probabilities_and_the_unsure_flag(registered_store):
    use_store(registered_store)
    model = mlflow.pyfunc.load_model("models:/tiny-cnn/1")
    out = model.predict(pd.DataFrame({"image": [PHOTO.read_bytes()]}))
    row = out.iloc[0]
    assert row["class"] in CLASSES and set(row["probabilities"]) == CLASSES
    assert row["probability"] == pytest.approx(max(row["probabilities"].values()), abs=1e-6)
    assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert row["unsure"] in (True, False)


def test_the_pyfunc_refuses_a_tampered_artifact(registered_store, tmp_path):
    use_store(registered_store)
    folder = Path(mlflow.artifacts.download_artifacts("models:/tiny-cnn/1", dst_path=str(tmp_path / "m")))
    shutil.copy(folder / "data" / "model.pt2", folder / "data" / "model.pth")  # could be unpickled
    with pytest.raises(ModelLoadError, match="refused"):
        mlflow.pyfunc.load_model(str(folder))


def test_mlflow_models_serve_classifies_a_photo_and_refuses_a_corrupt_one(registered_store, tmp_path):
    with ModelServer("models:/tiny-cnn@champion", registered_store, tmp_path / "serve.log") as server:
        status, answer = post(server.url, [PHOTO.read_bytes(), PHOTO.read_bytes()])
        assert status == 200
        first, second = answer["predictions"]
        assert first["class"] in CLASSES and first == second
        assert set(first["probabilities"]) == CLASSES and isinstance(first["unsure"], bool)

        status, answer = post(server.url, [PHOTO.read_bytes()[:200]])  # a truncated PNG
        assert 400 <= status < 500
        assert "image 0 cannot be read" in answer["message"]

        status, answer = post(server.url, [b"not an image at all"])
        assert 400 <= status < 500 and "not an image" in answer["message"]
        assert post(server.url, [PHOTO.read_bytes()])[0] == 200  # still serving
