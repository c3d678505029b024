"""Serving a registered model over HTTP: images in, class names, probabilities and the unsure
flag out, through the project's own loader (shared.serving), nothing taken from the artifact
but data."""
import base64
import http.client
import json
import shutil
import urllib.error
import urllib.parse
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


def send(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def announce(url: str, length: int) -> int:
    """The status a client gets for a body it announces with `Expect: 100-continue` (as curl
    does for large bodies) and has not sent yet: sending 1.5 MB to a server that answers 413
    after reading only the headers races the server closing the connection (a broken pipe)."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    try:
        connection.putrequest("POST", "/invocations")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(length)),
                            ("Expect", "100-continue")):
            connection.putheader(name, value)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def flat_png(width: int, height: int) -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(out, "PNG")
    return out.getvalue()


def test_the_model_server_takes_every_request_format_and_bounds_what_it_decodes(
        registered_store, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_SERVE_MAX_BODY_MB", "1")
    monkeypatch.setenv("CIFARLAB_SERVE_MAX_ROWS", "4")
    monkeypatch.setenv("CIFARLAB_SERVE_MAX_MEGAPIXELS", "2")
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    formats = {"dataframe_split": {"columns": ["image"], "data": [[photo]]},
               "dataframe_records": [{"image": photo}],
               "inputs": {"image": [photo]},
               "instances": [{"image": photo}]}
    with ModelServer("models:/tiny-cnn@champion", registered_store, tmp_path / "serve.log") as server:
        answers = {}
        for name, payload in formats.items():
            status, body = send(server.url, json.dumps({name: payload}).encode())
            assert status == 200, (name, body[:300])
            answers[name] = json.loads(body)["predictions"][0]["class"]
        assert len(set(answers.values())) == 1

        too_many = {"dataframe_split": {"columns": ["image"], "data": [[photo]] * 5}}
        status, body = send(server.url, json.dumps(too_many).encode())
        assert status == 400 and b"5 images, over the limit of 4" in body

        big = base64.b64encode(flat_png(2000, 1500)).decode()  # 3 megapixels, a small file
        status, body = send(server.url, json.dumps({"inputs": {"image": [big]}}).encode())
        assert status == 400 and b"3 megapixels, over the limit of 2" in body

        assert announce(server.url, 1_500_000) == 413

        garbage = "not base64 at all! " * 30_000  # 570 KB of text, under the body limit
        status, body = send(server.url, json.dumps({"inputs": {"image": [garbage]}}).encode())
        assert 400 <= status < 500 and len(body) < 2000 and b"image 0" in body
        assert send(server.url, json.dumps({"inputs": {"image": [photo]}}).encode())[0] == 200
