"""Opening a logged model so that nothing in it runs but its graph.

A registered model is a folder of files that anyone with write access to one version's
artifacts can change. MLflow's own loader trusts that folder: it loads a pickled `model.pth`
it finds beside the `.pt2`, imports modules named by the flavor's `code` folder and
`pickle_module_info.txt`, follows a `model_data` path outside the artifact, and
`torch.export.load` unpickles records of the archive with `weights_only=False`. So this module
never calls either on an unchecked folder: the folder is checked against what the project
writes (`check_model_dir`), every record of the pt2 archive against what `torch.export.save`
writes for a plain network (`check_archive`), and only then is the archive opened, with
PyTorch told to unpickle nothing but tensors (`open_archive`). Anything else is refused with
the reason, before a byte of it is deserialised.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from shared.calibration import Calibration
from shared.onnx_model import EXPORTS, ONNX_ARCHIVE, OnnxModule
from shared.preprocess import MAX_IMAGE_SIDE, TTA_MODES, Preprocessing

if TYPE_CHECKING:  # PyTorch is imported where a pt2 archive is read: an ONNX model needs none
    import torch

ARCHIVE = Path("data") / "model.pt2"
# the flavor fields MLflow writes for `log_model(..., serialization_format="pt2")`
FLAVOR_FIELDS = {
    "pytorch": {"code", "model_data", "pytorch_version"},
    "python_function": {"code", "config", "data", "env", "loader_module", "pickle_module_name",
                        "python_version"},
}
# the image server (shared.serving); MLflow's own, in models logged before it
PYFUNC_LOADERS = ("shared.serving", "mlflow.pytorch")
MODEL = "model"  # the one program an archive of ours holds


class UnsafeModel(Exception):
    """The artifact is not what this project writes; loading it could run code."""


def check_model_dir(folder: Path) -> tuple[dict, Path]:
    """The model's metadata and its archive (relative to `folder`), once the folder holds only
    what this project logs: an MLmodel with the pytorch flavor pointing at `data/` and
    `data/` holding the pt2 archive alone, or (an export of `training.export`) the image
    server's python_function flavor alone and `data/` holding the ONNX file alone; no code,
    no pickle. Raises UnsafeModel naming what is wrong."""
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise UnsafeModel(f"it holds a symbolic link ({path.relative_to(folder)})")
    mlmodel = _read_mlmodel(folder / "MLmodel")
    metadata = mlmodel.get("metadata") or {}
    archive = _check_flavors(mlmodel.get("flavors"), metadata)
    if (folder / "code").exists():
        raise UnsafeModel("it has a code/ folder: this project logs no code with a model")
    data = sorted(p.relative_to(folder) for p in (folder / "data").rglob("*"))
    if data != [archive]:
        found = ", ".join(str(p) for p in data) or "nothing"
        raise UnsafeModel(f"its data/ folder must hold {archive.name} alone (found {found}); "
                          "another file there could be loaded by pickle")
    if not (folder / archive).is_file():
        raise UnsafeModel(f"{archive} is not a regular file")
    return metadata, archive


def _read_mlmodel(path: Path) -> dict:
    try:
        mlmodel = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UnsafeModel("it has no MLmodel file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UnsafeModel(f"its MLmodel file cannot be read ({exc})") from exc
    if not isinstance(mlmodel, dict):
        raise UnsafeModel("its MLmodel file is not a mapping")
    return mlmodel


def _check_flavors(flavors: object, metadata: dict) -> Path:
    """The archive the flavors point at: the pt2 network, or an export's ONNX graph."""
    export = isinstance(flavors, dict) and set(flavors) == {"python_function"}
    if export and metadata.get("runtime") not in EXPORTS:
        raise UnsafeModel(f"its MLmodel has no pytorch flavor, and its metadata names no export "
                          f"runtime ({', '.join(EXPORTS)})")
    if not isinstance(flavors, dict) or not (export or "pytorch" in flavors):
        raise UnsafeModel("its MLmodel has no pytorch flavor")
    for name, conf in flavors.items():
        if name not in FLAVOR_FIELDS:
            raise UnsafeModel(f"its MLmodel has a {name!r} flavor, which this project never logs")
        if not isinstance(conf, dict):
            raise UnsafeModel(f"its MLmodel's {name} flavor is not a mapping")
        unknown = set(conf) - FLAVOR_FIELDS[name]
        if unknown:
            raise UnsafeModel(f"its MLmodel's {name} flavor has fields this project never "
                              f"writes: {', '.join(sorted(unknown))}")
        if conf.get("code") is not None:
            raise UnsafeModel(f"its MLmodel's {name} flavor names a code folder "
                              f"({conf['code']!r}); loading would import it")
    if not export and flavors["pytorch"].get("model_data") != "data":
        raise UnsafeModel(f"its pytorch flavor's model_data is "
                          f"{flavors['pytorch'].get('model_data')!r}, not the artifact's 'data' "
                          "folder")
    pyfunc = flavors.get("python_function", {})
    loaders = PYFUNC_LOADERS[:1] if export else PYFUNC_LOADERS
    if pyfunc and (pyfunc.get("loader_module") not in loaders or pyfunc.get("data") != "data"
                   or pyfunc.get("pickle_module_name") not in (None, "mlflow.pytorch.pickle_module")):
        raise UnsafeModel("its python_function flavor names another loader, data folder or "
                          "pickle module than this project's server or MLflow's pytorch flavor")
    return ONNX_ARCHIVE if export else ARCHIVE


def check_archive(path: Path) -> None:
    """Every record of the pt2 archive is one `torch.export.save` writes for a plain network:
    JSON, a few short text records, raw tensor bytes listed in the weight and constant
    configs as not pickled, and sample inputs that PyTorch's tensors-only unpickler accepts.
    Custom or opaque objects, pickled weights, compiled libraries, the legacy format and
    anything else are refused."""
    from torch.export.pt2_archive import constants as pt2

    text_records = {pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder",
                    ".data/version", ".data/serialization_id"}
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UnsafeModel(f"{ARCHIVE} is not a pt2 archive ({exc})") from exc
    with archive:
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        roots = {name.split("/", 1)[0] for name in names}
        if len(roots) != 1 or any("/" not in name for name in names) or len(set(names)) < len(names):
            raise UnsafeModel(f"{ARCHIVE} is not laid out as a pt2 archive (one folder, each "
                              "record once)")
        root = roots.pop() + "/"

        def read(name: str) -> bytes:
            return archive.read(root + name)

        raw = _raw_tensor_records(read, set(names), root)
        expected_json = {pt2.MODELS_FILENAME_FORMAT.format(MODEL),
                         pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL),
                         pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL)}
        for name in (n.removeprefix(root) for n in names):
            if name in raw:
                continue
            if name in expected_json:
                _json(read(name), name)
            elif name in text_records:
                if archive.getinfo(root + name).file_size > 64 or not read(name).isascii():
                    raise UnsafeModel(f"the archive's {name} record is not a short text")
            elif name == pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL):
                _tensors_only(read(name), name)
            else:
                raise UnsafeModel(f"the archive holds a record this project never writes: {name}")
        missing = expected_json - {n.removeprefix(root) for n in names}
        if missing:
            raise UnsafeModel(f"the archive lacks {', '.join(sorted(missing))}")


def _json(content: bytes, name: str):
    try:
        return json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UnsafeModel(f"the archive's {name} record is not JSON") from None


def _raw_tensor_records(read, names: set[str], root: str) -> set[str]:
    """The records the weight and constant configs list as raw (not pickled) tensor bytes."""
    from torch.export.pt2_archive import constants as pt2

    raw = set()
    for config_name, folder, prefix in (
            (pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL), pt2.WEIGHTS_DIR,
             pt2.WEIGHT_FILENAME_PREFIX),
            (pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL), pt2.CONSTANTS_DIR,
             pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
        if root + config_name not in names:
            continue
        config = _json(read(config_name), config_name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise UnsafeModel(f"the archive's {config_name} is not a payload config")
        for fqn, entry in entries.items():
            entry = entry if isinstance(entry, dict) else {}
            path_name = entry.get("path_name")
            if (not isinstance(path_name, str) or "/" in path_name
                    or not path_name.startswith(prefix) or entry.get("use_pickle") is not False):
                raise UnsafeModel(f"the archive stores {fqn!r} as record {path_name!r} with "
                                  f"use_pickle={entry.get('use_pickle')!r}: this project exports "
                                  "plain tensor records only")
            raw.add(folder + path_name)
    return raw


def _tensors_only(content: bytes, name: str) -> None:
    import torch

    try:
        torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler refused a global
        raise UnsafeModel(f"the archive's {name} record holds more than tensors "
                          f"({type(exc).__name__})") from None


@contextlib.contextmanager
def _tensors_only_unpickling():
    """torch.export.load retries records with weights_only=False; this variable, read by
    torch.load on every call, makes that retry as restricted as the first try."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def open_program(path: Path) -> torch.export.ExportedProgram:
    """The exported program of a checked archive (call `check_archive` first)."""
    import torch

    with _tensors_only_unpickling():
        return torch.export.load(str(path))


def open_archive(path: Path) -> torch.nn.Module:
    """The exported module of a checked archive (call `check_archive` first)."""
    return open_program(path).module()


def check_metadata(metadata: dict) -> tuple[list[str], Preprocessing]:
    """Class names and preprocessing, each value checked; UnsafeModel says which is wrong."""
    classes = metadata.get("class_names")
    if not isinstance(classes, list) or not classes or not all(
            isinstance(c, str) and c for c in classes):
        raise UnsafeModel("its metadata lacks class names (a list of non-empty names); it was "
                          "not logged by this project's training")
    prep = metadata.get("preprocessing")
    if not isinstance(prep, dict) or not prep:
        raise UnsafeModel("its metadata lacks preprocessing; it was not logged by this "
                          "project's training")
    try:
        prep = Preprocessing.from_dict(prep)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsafeModel(f"its preprocessing metadata is incomplete or malformed ({exc!r})") from None
    for side in ("image_size", "input_size"):
        if not 8 <= getattr(prep, side) <= MAX_IMAGE_SIDE:
            raise UnsafeModel(f"its preprocessing {side} is {getattr(prep, side)}, outside "
                              f"8..{MAX_IMAGE_SIDE}")
    numbers = [*prep.mean, *prep.std]
    if len(prep.mean) != 3 or len(prep.std) != 3 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in numbers) or min(prep.std) <= 0:
        raise UnsafeModel("its preprocessing mean and std must be three finite numbers each "
                          "(std above 0)")
    if prep.tta not in TTA_MODES:
        raise UnsafeModel(f"its preprocessing tta {prep.tta!r} is not one of {', '.join(TTA_MODES)}")
    return list(classes), prep


def check_calibration(metadata: dict) -> Calibration:
    """The model's temperature and unsure rule; a model logged before them has none."""
    try:
        return Calibration.from_dict(metadata.get("calibration"))
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsafeModel(f"its calibration metadata is malformed ({exc})") from None


def check_outputs(module: torch.nn.Module | OnnxModule, classes: list[str],
                  prep: Preprocessing) -> None:
    """The network takes images of the metadata's size and scores exactly its classes."""
    size = prep.image_size
    try:
        scores = _scores_of_blank_images(module, size)
    except Exception as exc:  # noqa: BLE001 - a shape guard of the exported graph
        raise UnsafeModel(f"the network does not take {size}x{size} images, the image size its "
                          f"metadata states ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    if not hasattr(scores, "shape") or tuple(scores.shape) != (2, len(classes)):
        shape = tuple(scores.shape) if hasattr(scores, "shape") else type(scores).__name__
        raise UnsafeModel(f"the network answers {shape} for 2 images, but its metadata names "
                          f"{len(classes)} classes")


def _scores_of_blank_images(module: torch.nn.Module | OnnxModule, size: int):
    if isinstance(module, OnnxModule):
        return module.run(np.zeros((2, 3, size, size), np.float32))
    import torch

    with torch.no_grad():
        return module(torch.zeros(2, 3, size, size))
