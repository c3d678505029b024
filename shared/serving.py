"""Serving a logged classifier over HTTP with `mlflow models serve`: images in, class names out.

A logged model carries two flavors: MLflow's `pytorch` flavor (the pt2 network, for
`mlflow.pytorch.load_model`) and a `python_function` flavor whose loader is this module,
installed with the project. MLflow's server imports it by name and calls `_load_pyfunc` on the
model's `data/` folder; it opens the folder with the app's safe loader (every file checked,
nothing unpickled, no code taken from the artifact) and answers, for each PNG/JPEG in the
request's `image` column (base64 in JSON, as MLflow encodes binary columns), the class, its
calibrated probability, the unsure flag and every class's probability, in any of MLflow's
request formats (`dataframe_split`, `dataframe_records`, `inputs`, `instances`). An image that
cannot be decoded gets HTTP 400 naming its row, never echoing it; the server keeps running.

Bounded (environment variables of the server process, defaults in LIMITS): a request body of
at most CIFARLAB_SERVE_MAX_BODY_MB (HTTP 413 beyond: FastAPI's own limit, set on the app the
scoring server creates), CIFARLAB_SERVE_MAX_ROWS images, CIFARLAB_SERVE_MAX_MEGAPIXELS decoded
megapixels in all (read from the files' headers before any is decoded). The worker decodes
on one thread of its own, one image at a time, whatever the number of clients: decoding in
each request's thread gave each thread its own allocator arena, and eight clients' 64-megapixel
PNGs kept gigabytes resident (benchmarks/serving_memory.py).

MLflow's models-from-code would instead execute a Python file stored in the artifact: anyone
able to change one version's files could make the server run their code. Here the code is
the installed project's, and the artifact holds only data.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema
from PIL import Image

LOADER = __name__
COLUMN = "image"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, COLUMN)]),
    outputs=Schema([ColSpec(DataType.string, "class"), ColSpec(DataType.double, "probability"),
                    ColSpec(DataType.boolean, "unsure")]))
EXAMPLES = ("input_example.json", "serving_input_example.json")
LIMITS = {"CIFARLAB_SERVE_MAX_BODY_MB": 32, "CIFARLAB_SERVE_MAX_ROWS": 256,
          "CIFARLAB_SERVE_MAX_MEGAPIXELS": 64}
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def limit(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else LIMITS[name]


def limit_request_bodies() -> None:
    """In the scoring server's process (MLflow loads the model, then builds its FastAPI app
    with `FastAPI()`), make that app refuse bodies over the limit with HTTP 413 before
    reading them: MLflow offers no setting for it, and FastAPI's is a constructor argument."""
    import fastapi

    if getattr(fastapi.FastAPI, "cifarlab_limited", False):
        return
    cap = limit("CIFARLAB_SERVE_MAX_BODY_MB") * 1024 * 1024

    class Limited(fastapi.FastAPI):
        cifarlab_limited = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("max_body_size", cap)
            super().__init__(*args, **kwargs)

    fastapi.FastAPI = Limited


def save_model(path, mlflow_model, pytorch_model=None, onnx_file: Path | None = None,
               **kwargs) -> None:
    """The flavor function `mlflow.models.Model.log(flavor=shared.serving, ...)` calls. A
    trained network: MLflow's pytorch flavor saves it as pt2 (its export needs the float input
    example and tensor signature). An export (`onnx_file`, from training.export): the file
    alone as `data/model.onnx`. Then the python_function flavor is pointed at this module and
    the signature set to what the server takes: one image file per row."""
    from shared.onnx_model import ONNX_ARCHIVE

    kwargs.pop("validate_serving_input", None)
    envs = {}
    if onnx_file is not None:
        (Path(path) / ONNX_ARCHIVE).parent.mkdir(parents=True)
        shutil.copyfile(onnx_file, Path(path) / ONNX_ARCHIVE)
    else:
        mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
        envs = {"conda_env": "conda.yaml", "python_env": "python_env.yaml"}
    for name in EXAMPLES:  # a float tensor example: not what the server takes
        (Path(path) / name).unlink(missing_ok=True)
    mlflow_model.saved_input_example_info = None
    mlflow_model.signature = SIGNATURE
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=LOADER, data="data", **envs)
    mlflow_model.save(str(Path(path) / "MLmodel"))


def _load_pyfunc(data_path: str, model_config=None) -> ImageService:
    from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH

    from shared.inference import open_model_dir

    if _SERVER_MODEL_PATH in os.environ:  # loaded by `mlflow models serve`
        limit_request_bodies()
    folder = Path(data_path).parent
    return ImageService(open_model_dir(folder, str(folder)))


class Refused(MlflowException):
    """HTTP 400 with our message alone: MLflow's scoring server prefixes the message of an
    error the model raises with the whole request ("Failed to predict data '...'"), which
    would echo megabytes of input back; this message keeps only what follows that prefix."""

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = value.rpartition("\nError: ")[2]


def _bad_request(message: str) -> MlflowException:
    return Refused(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value, row: int) -> bytes:
    """A row's image: bytes (MLflow decoded the base64), or base64 text (a string, or the
    bytes of one: the `inputs` and `instances` formats hand it over undecoded)."""
    if isinstance(value, (bytes, bytearray)) and bytes(value[:4]).startswith(IMAGE_MAGIC):
        return bytes(value)
    if isinstance(value, (str, bytes, bytearray)):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            if isinstance(value, (bytes, bytearray)):
                return bytes(value)  # not base64 either: the decoder says what it is
            raise _bad_request(f"image {row} is not valid base64") from None
    raise _bad_request(f"image {row} must be PNG/JPEG bytes, base64-encoded in JSON "
                       f"(got {type(value).__name__})")


class ImageService:
    """The python_function model: a DataFrame with an `image` column in, one row out per image."""

    def __init__(self, classifier):
        self.classifier = classifier
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")

    def predict(self, model_input, params=None) -> pd.DataFrame:
        import numpy as np

        from shared.inference import describe_error
        from shared.preprocess import decode_image

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if COLUMN not in frame.columns:
            raise _bad_request(f"the request needs a column named {COLUMN!r} holding "
                               f"base64-encoded PNG or JPEG files (got {list(frame.columns)})")
        rows = limit("CIFARLAB_SERVE_MAX_ROWS")
        if len(frame) > rows:
            raise _bad_request(f"the request has {len(frame)} images, over the limit of {rows} "
                               "per request (CIFARLAB_SERVE_MAX_ROWS); send them in batches")
        files = [image_bytes(value, row) for row, value in enumerate(frame[COLUMN])]
        pixels = [self.pixels(row, data) for row, data in enumerate(files)]
        budget = limit("CIFARLAB_SERVE_MAX_MEGAPIXELS")
        if sum(pixels) > budget * 1_000_000:
            raise _bad_request(f"the request's images hold {sum(pixels) / 1e6:.0f} megapixels, "
                               f"over the limit of {budget} per request "
                               "(CIFARLAB_SERVE_MAX_MEGAPIXELS); send fewer or smaller images")
        size = self.classifier.prep.image_size
        images = []
        for row, data in enumerate(files):
            try:
                images.append(self.decoder.submit(decode_image, io.BytesIO(data), size).result())
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise _bad_request(f"image {row} cannot be read: {describe_error(exc)[:200]}") from None
        if not images:
            return pd.DataFrame(columns=["class", "probability", "unsure", "probabilities"])
        predictions = self.classifier.predict([str(i) for i in range(len(images))], np.stack(images),
                                              top_k=len(self.classifier.classes))
        return pd.DataFrame([{"class": p.label, "probability": p.confidence, "unsure": p.unsure,
                              "probabilities": {name: round(prob, 6) for name, prob in p.top}}
                             for p in predictions])

    @staticmethod
    def pixels(row: int, data: bytes) -> int:
        """An image's pixel count from its header alone (nothing decoded)."""
        from shared.inference import describe_error

        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.width * img.height
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise _bad_request(f"image {row} cannot be read: {describe_error(exc)[:200]}") from None
