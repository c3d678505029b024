"""Serving a logged classifier over HTTP with `mlflow models serve`: images in, class names out.

A logged model carries two flavors: MLflow's `pytorch` flavor (the pt2 network, for
`mlflow.pytorch.load_model`) and a `python_function` flavor whose loader is this module,
installed with the project. MLflow's server imports it by name and calls `_load_pyfunc` on the
model's `data/` folder; it opens the folder with the app's safe loader (every file checked,
nothing unpickled, no code taken from the artifact) and answers, for each PNG/JPEG in the
request's `image` column (base64 in JSON, as MLflow encodes binary columns), the class, its
calibrated probability, the unsure flag and every class's probability. An image that cannot
be decoded gets HTTP 400 naming it; the server keeps running.

MLflow's models-from-code would instead execute a Python file stored in the artifact: anyone
able to change one version's files could make the server run their code. Here the code is
the installed project's, and the artifact holds only data.
"""
from __future__ import annotations

import base64
import binascii
import io
import shutil
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
    from shared.inference import open_model_dir

    folder = Path(data_path).parent
    return ImageService(open_model_dir(folder, str(folder)))


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value) -> bytes:
    """A row's image: bytes (MLflow decoded the base64) or a base64 string."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            raise _bad_request("an image is not valid base64") from None
    raise _bad_request(f"an image must be PNG/JPEG bytes, base64-encoded in JSON "
                       f"(got {type(value).__name__})")


class ImageService:
    """The python_function model: a DataFrame with an `image` column in, one row out per image."""

    def __init__(self, classifier):
        self.classifier = classifier

    def predict(self, model_input, params=None) -> pd.DataFrame:
        import numpy as np
        import torch

        from shared.inference import describe_error
        from shared.preprocess import decode_image

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if COLUMN not in frame.columns:
            raise _bad_request(f"the request needs a column named {COLUMN!r} holding "
                               f"base64-encoded PNG or JPEG files (got {list(frame.columns)})")
        size = self.classifier.prep.image_size
        images = []
        for row, value in enumerate(frame[COLUMN]):
            try:
                images.append(decode_image(io.BytesIO(image_bytes(value)), size))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise _bad_request(f"image {row} cannot be read: {describe_error(exc)}") from None
        if not images:
            return pd.DataFrame(columns=["class", "probability", "unsure", "probabilities"])
        batch = torch.from_numpy(np.stack(images))
        predictions = self.classifier.predict([str(i) for i in range(len(images))], batch,
                                              top_k=len(self.classifier.classes))
        return pd.DataFrame([{"class": p.label, "probability": p.confidence, "unsure": p.unsure,
                              "probabilities": {name: round(prob, 6) for name, prob in p.top}}
                             for p in predictions])
