"""Export a registered version to ONNX (float or int8), check it against the original, and
link it to the version only if it keeps its accuracy.

    python -m training.export --model cifar10-cnn@champion --format onnx-int8

The export is the logged pt2 program itself (preprocessing, test-time augmentation and the
calibration temperature inside), through `torch.onnx`'s dynamo exporter; int8 is ONNX
Runtime's static quantization, calibrated on training images of the version's dataset. Both
run on the version's test split (or --data-dir) beside the original: top-1 agreement,
accuracy, ECE, latency at batch 1 and images/s at batch 64. The export is logged as the model
of its own run in the `exports` experiment (its figures that run's metrics), and the version
is tagged `export.FORMAT` with the export's URI: the app, `gui.classify --runtime`,
`training.evaluate --runtime` and `mlflow models serve` use it from there. An export that
loses more than --max-drop points of accuracy is refused: logged with its figures, never
linked.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from shared import serving
from shared.command import run_command
from shared.inference import LoadedClassifier, ModelLoadError, open_model_dir
from shared.messages import BadInput, RunFailed, brief
from shared.network import resize_batch
from shared.onnx_model import EXPORTS, OnnxModule, UnsafeOnnx, check_onnx, need, open_session
from shared.registry import CHECKS_TAG, EXPORT_TAG
from shared.safe_model import ARCHIVE, open_program
from shared.store import tracking_uri, ui_command, ui_page, use_store
from training.engine.data import DEFAULT_CACHE_DIR, load_dataset
from training.engine.exporting import quantize_int8, to_onnx
from training.evaluate import (
    EvalSet,
    ModelRef,
    evaluation_set,
    find_version,
    held_out_files,
    log_evaluation,
    measure,
    worst_mistakes,
)
from training.tracking.publish import ensure_experiment
from training.tracking.run_log import git_commit

EXPERIMENT = "exports"


class ExportFailed(BadInput):
    """The exporter or the quantizer could not convert this network; nothing was stored."""


@dataclass(frozen=True)
class ExportSettings:
    """What an export is made and checked with."""

    fmt: str = "onnx-int8"
    data_dir: str | None = None  # the test images; default: the version's own dataset
    max_drop: float = 1.0  # accuracy points the export may lose against pt2
    calibration_images: int = 512
    float_edges: bool = False  # int8: the first convolution and the last matrix product in float
    batch_size: int = 64
    latency_runs: int = 50
    cache_dir: str | None = str(DEFAULT_CACHE_DIR)
    seed: int = 0


@dataclass
class Exported:
    run_id: str
    model_uri: str  # the export's own model: models:/m-...
    figures: dict[str, float]
    accepted: bool


def export(spec: str | None, uri: str, settings: ExportSettings = ExportSettings(),
           log=print) -> Exported:
    """Export, check and (if it passes) link the version `spec` names; see the docstring."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        need(module)
    use_store(uri)
    ref = find_version(spec, uri)
    params = mlflow.get_run(ref.run_id).data.params if ref.run_id else {}
    data_dir = settings.data_dir or params.get("data_root")
    if not data_dir or not Path(data_dir).expanduser().exists():
        raise BadInput(f"{ref.name} version {ref.version} was trained on {data_dir or 'data not recorded'}, "
                       "which is not here: name the test images with --data-dir")
    with tempfile.TemporaryDirectory(prefix="cifarlab-export-") as tmp:
        original, program = _original(ref, Path(tmp))
        test = evaluation_set(data_dir, original.classes, original.prep.image_size,
                              settings.cache_dir,
                              held_out=held_out_files(ref.run_id) if ref.run_id else None)
        log(f"exporting {ref.uri} to {settings.fmt}; checking on {len(test.labels)} images of "
            f"{test.source}: {test.scored}")
        calibration, batches = "", []
        if settings.fmt == "onnx-int8":
            calibration, batches = _calibration_batches(data_dir, test, original, settings)
        try:
            path = to_onnx(program, test.images[:2].float().div(255), Path(tmp) / "model.onnx")
            if settings.fmt == "onnx-int8":
                path = quantize_int8(path, Path(tmp) / "model-int8.onnx", batches,
                                     settings.float_edges)
        except Exception as exc:  # noqa: BLE001 - the exporter's and quantizer's own errors
            raise ExportFailed(f"cannot export {ref.uri} to {settings.fmt}: {brief(exc)}"
                               + ("; try --format onnx" if settings.fmt == "onnx-int8" else "")
                               ) from exc
        try:
            check_onnx(path)
        except UnsafeOnnx as exc:
            raise RunFailed(f"the export did not pass this project's own ONNX check: {exc}") from None
        exported = LoadedClassifier(ref.uri, OnnxModule(open_session(path)), original.classes,
                                    original.prep, original.calibration, settings.fmt)
        figures, result = check(original, exported, test, settings)
        accepted = figures["accuracy_drop_points"] <= settings.max_drop
        run_id, model_uri = _log(ref, test, path, exported, (figures, result), accepted,
                                 calibration, settings, uri)
    if not accepted:
        raise RunFailed(f"refused: the {settings.fmt} export of {ref.name} version {ref.version} "
                        f"loses {figures['accuracy_drop_points']:.2f} points of accuracy "
                        f"({figures['accuracy']:.4f} against {figures['accuracy_pt2']:.4f}), more "
                        f"than --max-drop {settings.max_drop:g}; agreement "
                        f"{figures['agreement']:.4f}. Its figures are in run {run_id}; it was "
                        "not linked to the version")
    client = MlflowClient(uri)
    client.set_model_version_tag(ref.name, ref.version, EXPORT_TAG.format(settings.fmt), model_uri)
    client.set_model_version_tag(ref.name, ref.version, CHECKS_TAG.format(settings.fmt),
                                 summary(figures))
    return Exported(run_id, model_uri, figures, accepted)


def _original(ref: ModelRef, tmp: Path) -> tuple[LoadedClassifier, torch.export.ExportedProgram]:
    """The version's pt2 model through the safe loader, and its exported program."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(tmp / "pt2")))
    except Exception as exc:  # noqa: BLE001 - missing artifacts, store errors
        raise ModelLoadError(f"cannot read the model {ref.uri}: its artifacts are missing or "
                             f"unreachable ({exc})") from None
    original = open_model_dir(local, ref.uri)
    return original, open_program(local / ARCHIVE)


def _calibration_batches(data_dir: str, test: EvalSet, original: LoadedClassifier,
                         settings: ExportSettings) -> tuple[str, list[np.ndarray]]:
    """A seeded sample of the dataset's training images, as float batches in [0, 1]; the
    test images where the dataset has no training split here."""
    size = original.prep.image_size
    try:
        data = load_dataset(data_dir, image_size=size, cache_dir=settings.cache_dir,
                            download=False, log=lambda *_: None)
        pool, source = data.train_images, f"{len(data.train_images)} training images of {data_dir}"
    except BadInput:
        pool, source = test.images, f"the {len(test.images)} test images (no training split found)"
    generator = torch.Generator().manual_seed(settings.seed)
    count = min(settings.calibration_images, len(pool))
    rows = torch.randperm(len(pool), generator=generator)[:count].sort().values
    images = resize_batch(torch.as_tensor(pool[rows]), size)
    batches = [chunk.float().div(255).numpy() for chunk in images.split(32)]
    return f"{count} of {source}", batches


def check(original: LoadedClassifier, exported: LoadedClassifier, test: EvalSet,
          settings: ExportSettings) -> tuple[dict[str, float], dict]:
    """The export beside the original on the same images: agreement, accuracy, ECE, latency
    p50 at batch 1 and images/s at batch 64, measured alternately in this process; and the
    export's own evaluation (`training.evaluate.measure`)."""
    scores = {"pt2": original.scores(test.images, settings.batch_size),
              "export": exported.scores(test.images, settings.batch_size)}
    results = {name: measure(s, test.labels, original.classes, original.calibration.temperature)
               for name, s in scores.items()}
    speed = speeds({"pt2": original, "export": exported}, test.images, settings)
    ours, theirs = results["export"]["metrics"], results["pt2"]["metrics"]
    figures = {"agreement": float((scores["export"].argmax(1) == scores["pt2"].argmax(1)).double().mean()),
               "max_score_difference": float((scores["export"] - scores["pt2"]).abs().max()),
               "accuracy": ours["accuracy"], "accuracy_pt2": theirs["accuracy"],
               "accuracy_drop_points": 100 * (theirs["accuracy"] - ours["accuracy"]),
               "ece": ours["ece"], "ece_pt2": theirs["ece"], "images": len(test.labels)}
    for name, suffix in (("export", ""), ("pt2", "_pt2")):
        figures[f"latency_p50_ms{suffix}"] = speed[name]["latency_p50_ms"]
        figures[f"images_per_s{suffix}"] = speed[name]["images_per_s"]
    figures["speedup"] = figures["images_per_s"] / figures["images_per_s_pt2"]
    return figures, results["export"]


def speeds(models: dict[str, LoadedClassifier], images: torch.Tensor,
           settings: ExportSettings) -> dict[str, dict[str, float]]:
    """Latency p50 at batch 1 and images/s at `batch_size`, the models taking turns."""
    single = images[:1].float().div(255)
    batch = images[:settings.batch_size].float().div(255)
    if len(batch) < settings.batch_size:
        batch = batch.repeat((settings.batch_size + len(batch) - 1) // len(batch), 1, 1, 1)
        batch = batch[:settings.batch_size]
    latencies = {name: [] for name in models}
    rates = {name: [] for name in models}
    with torch.no_grad():
        for clf in models.values():  # warm-up: first calls allocate and plan
            clf.module(single), clf.module(batch)
        for _ in range(settings.latency_runs):
            for name, clf in models.items():
                started = time.perf_counter()
                clf.module(single)
                latencies[name].append(time.perf_counter() - started)
        for _ in range(5):
            for name, clf in models.items():
                started = time.perf_counter()
                clf.module(batch)
                rates[name].append(len(batch) / (time.perf_counter() - started))
    return {name: {"latency_p50_ms": 1000 * statistics.median(latencies[name]),
                   "images_per_s": statistics.median(rates[name])} for name in models}


def summary(figures: dict[str, float]) -> str:
    """The checked figures in words, as the version's tag and the app show them."""
    return (f"agreement {figures['agreement']:.2%}, accuracy {figures['accuracy']:.2%} "
            f"(pt2 {figures['accuracy_pt2']:.2%}), {figures['speedup']:.1f}x images/s at batch 64, "
            f"{figures['latency_p50_ms']:.1f} ms at batch 1 (pt2 {figures['latency_p50_ms_pt2']:.1f})")


def _log(ref: ModelRef, test: EvalSet, path: Path, exported: LoadedClassifier,
         checked: tuple[dict[str, float], dict], accepted: bool, calibration: str,
         settings: ExportSettings, uri: str) -> tuple[str, str]:
    """The export's run, an evaluation of the export as `training.evaluate` writes one (the
    dataset, its metrics and figures) plus the comparison with pt2 and, if accepted, the
    export as its model."""
    figures, result = checked
    with mlflow.start_run(experiment_id=ensure_experiment(EXPERIMENT, uri),
                          run_name=f"export-{ref.name}-v{ref.version}-{settings.fmt}") as run:
        mlflow.set_tags({"registered_model": ref.name, "model_version": ref.version,
                         "source_run": ref.run_id, "kind": "export", "format": settings.fmt,
                         "export_status": "accepted" if accepted else "refused",
                         "dataset": test.name, "git_commit": git_commit()})
        mlflow.log_params({"format": settings.fmt, "model_uri": ref.uri, "data_dir": str(test.source),
                           "scored": test.scored, "max_drop": settings.max_drop,
                           "calibration": calibration or "none (float)",
                           "float_edges": settings.float_edges,
                           "batch_size": settings.batch_size, "threads": torch.get_num_threads(),
                           "onnxruntime": need("onnxruntime").__version__})
        mistakes = worst_mistakes(result["probs"], test.labels, exported.classes, 24)
        log_evaluation(test, exported, result, mistakes)
        mlflow.log_metrics({k: v for k, v in figures.items() if k not in result["metrics"]})
        model_uri = ""
        if accepted:
            metadata = {"class_names": exported.classes, "preprocessing": exported.prep.to_dict(),
                        "calibration": exported.calibration.to_dict(), "runtime": settings.fmt,
                        "source": ref.uri, "checks": summary(figures),
                        "input": "float32 RGB in [0, 1], shape (N, 3, image_size, image_size)",
                        "output": "one score per class; softmax gives probabilities"}
            info = mlflow.models.Model.log(artifact_path=None, name=settings.fmt,
                                           flavor=serving, onnx_file=path,
                                           metadata=metadata)
            model_uri = info.model_uri
    return run.info.run_id, model_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="NAME@ALIAS, NAME/VERSION or NAME (its champion); "
                                        "default: the champion of the newest registered model")
    parser.add_argument("--format", choices=EXPORTS, default="onnx-int8",
                        help="onnx (float32) or onnx-int8 (int8 weights and activations; default)")
    parser.add_argument("--data-dir", help="the images to check it on (default: the version's own "
                                           "dataset, its test split)")
    parser.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                        help="refuse an export that loses more accuracy than this (default 1)")
    parser.add_argument("--calibration-images", type=int, default=512,
                        help="training images that set int8's activation ranges (default 512)")
    parser.add_argument("--float-edges", action="store_true",
                        help="int8: keep the first convolution and the last matrix product in "
                             "float32 (closer to the original, slower on some networks)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="where decoded datasets are cached")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlruns)")
    args = parser.parse_args(argv)
    if not 0 <= args.max_drop <= 100 or args.calibration_images < 1:
        parser.error("--max-drop must be between 0 and 100 and --calibration-images 1 or more")
    uri = tracking_uri(args.tracking_uri)
    settings = ExportSettings(args.format, args.data_dir, args.max_drop, args.calibration_images,
                              args.float_edges, cache_dir=args.cache_dir)

    def body() -> int:
        done = export(args.model, uri, settings)
        print(f"export run {done.run_id}: {summary(done.figures)}")
        print(f"linked as {EXPORT_TAG.format(args.format)} = {done.model_uri}; use it with "
              f"--runtime {args.format}, or serve it: mlflow models serve -m {done.model_uri} "
              "--env-manager local")
        page = ui_page(mlflow.get_run(done.run_id).info.experiment_id, done.run_id)
        print(f"see it: {ui_command(uri, page)}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
