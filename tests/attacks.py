"""Tampered copies of a logged model, each built as an attacker with write access to one model
version's artifacts would build it. Every payload creates a marker file when unpickled or
imported; a safe loader never lets it appear."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import torch
import yaml


class Payload:
    """Unpickling this opens (creates) the marker file: code of the artifact's choosing ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def edit_mlmodel(folder: Path, change) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    change(mlmodel)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def rewrite_archive(path: Path, change) -> None:
    """Rewrite the pt2 zip with `change(records)` applied to its {name: bytes} records."""
    with zipfile.ZipFile(path) as z:
        records = {name: z.read(name) for name in z.namelist()}
    change(records)
    with zipfile.ZipFile(path, "w") as z:
        for name, content in records.items():
            z.writestr(name, content)


def find(records: dict, suffix: str) -> str:
    return next(name for name in records if name.endswith(suffix))


def pth_beside_pt2(folder: Path, marker: Path) -> None:
    """Route 1: MLflow loads data/model.pth before data/model.pt2."""
    (folder / "data" / "model.pth").write_bytes(pickled(marker))
    (folder / "data" / "pickle_module_info.txt").write_text("pickle")


def pickled_sample_inputs(folder: Path, marker: Path) -> None:
    """Route 2: torch.export.load retries the sample inputs with weights_only=False."""
    def change(records):
        records[find(records, "data/sample_inputs/model.pt")] = pickled(marker)
    rewrite_archive(folder / "data" / "model.pt2", change)


def code_folder_module(folder: Path, marker: Path) -> None:
    """Route 3: a flavor `code` folder goes on sys.path and pickle_module_info.txt names a
    module in it, imported even with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false."""
    code = folder / "code"
    code.mkdir()
    module = f"cifarlab_evil_{abs(hash(str(marker)))}"
    (code / f"{module}.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (folder / "data" / "model.pth").write_bytes(b"not used")
    (folder / "data" / "pickle_module_info.txt").write_text(module)

    def change(mlmodel):
        mlmodel["flavors"]["pytorch"]["code"] = "code"
    edit_mlmodel(folder, change)


def absolute_model_data(folder: Path, marker: Path) -> None:
    """Route 4: model_data points outside the artifact, at a pickle."""
    outside = marker.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    (outside / "model.pth").write_bytes(pickled(marker))
    (outside / "pickle_module_info.txt").write_text("pickle")

    def change(mlmodel):
        mlmodel["flavors"]["pytorch"]["model_data"] = str(outside)
    edit_mlmodel(folder, change)


def pickled_weight(folder: Path, marker: Path) -> None:
    """Neighbour of route 2: a weight record marked use_pickle, loaded with weights_only=False."""
    def change(records):
        config_name = find(records, "model_weights_config.json")
        config = json.loads(records[config_name])
        fqn, entry = next(iter(config["config"].items()))
        entry["use_pickle"] = True
        records[config_name] = json.dumps(config).encode()
        records[config_name.rsplit("/", 1)[0] + "/" + entry["path_name"]] = pickled(marker)
    rewrite_archive(folder / "data" / "model.pt2", change)


def opaque_constant(folder: Path, marker: Path) -> None:
    """Neighbour of route 2: an 'opaque object' constant, which torch reads with pickle.loads."""
    import pickle

    def change(records):
        config_name = find(records, "model_constants_config.json")
        config = json.loads(records[config_name])
        config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                    "use_pickle": True, "tensor_meta": None}
        records[config_name] = json.dumps(config).encode()
        records[config_name.rsplit("/", 1)[0] + "/opaque_obj_0"] = pickle.dumps(Payload(marker))
    rewrite_archive(folder / "data" / "model.pt2", change)


def pth_instead_of_pt2(folder: Path, marker: Path) -> None:
    """Neighbour of route 1: the archive replaced by a pickle."""
    (folder / "data" / "model.pt2").unlink()
    pth_beside_pt2(folder, marker)


def foreign_loader_module(folder: Path, marker: Path) -> None:
    """Neighbour of route 3: the pyfunc flavor names another loader module."""
    def change(mlmodel):
        mlmodel["flavors"]["python_function"]["loader_module"] = "os"
    edit_mlmodel(folder, change)


def relative_escape(folder: Path, marker: Path) -> None:
    """Neighbour of route 4: model_data climbs out of the artifact."""
    absolute_model_data(folder, marker)

    def change(mlmodel):
        mlmodel["flavors"]["pytorch"]["model_data"] = "../../elsewhere"
    edit_mlmodel(folder, change)


def linked_archive(folder: Path, marker: Path) -> None:
    """A symbolic link where the archive should be."""
    target = marker.parent / "outside.pt2"
    shutil.move(folder / "data" / "model.pt2", target)
    (folder / "data" / "model.pt2").symlink_to(target)


ROUTES = {"pth_beside_pt2": pth_beside_pt2, "pickled_sample_inputs": pickled_sample_inputs,
          "code_folder_module": code_folder_module, "absolute_model_data": absolute_model_data}
NEIGHBOURS = {"pickled_weight": pickled_weight, "opaque_constant": opaque_constant,
              "pth_instead_of_pt2": pth_instead_of_pt2,
              "foreign_loader_module": foreign_loader_module, "relative_escape": relative_escape}
