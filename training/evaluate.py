"""Score a registered model on a labelled set of images, tracked as an evaluation run:

    python -m training.evaluate --model cifar10-cnn@champion --data-dir ~/data/cifar10

--data-dir is read in the training layouts' terms: CIFAR-10 (its test set); train/ and test/
class folders (test/); the model's own class folders or labels file with no test split of
their own (exactly the test files its training run held out, from the run's
data/files_test.txt); any other folder of <class>/ sub-folders named after the model's
classes, or train/ with a labels file (all their images). The model is loaded through
the app's safe loader and sees each image exactly as the app would. One MLflow run in the
`evaluations` experiment holds: the dataset (mlflow.log_input, digest = the images' hash),
accuracy, loss, per-class precision/recall/F1, calibration error before and after the model's
temperature; a confusion matrix, reliability diagram, the worst mistakes and the most-confused
class pairs. The model version is tagged with the result.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from shared.calibration import expected_calibration_error, reliability
from shared.command import run_command
from shared.inference import LoadedClassifier, load_classifier
from shared.network import resize_batch
from shared.onnx_model import RUNTIME_HELP, RUNTIMES
from shared.registry import RegistryError, registered_version, resolve_model_uri
from shared.store import tracking_uri, ui_command, ui_page, use_store
from training.engine.data import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    DEFAULT_CACHE_DIR,
    DatasetError,
    decode_files,
    decode_pool,
    fingerprint,
    load_dataset,
)
from training.engine.layouts import KAGGLE_LABELS, Found, Source, class_dirs, find_layout, some_names
from training.engine.shards import is_shards, local_root
from training.tracking import report
from training.tracking.publish import ensure_experiment, log_dataset
from training.tracking.run_log import git_commit

EXPERIMENT = "evaluations"


@dataclass
class EvalSet:
    """Labelled images as the model sees them: uint8 (N, 3, S, S) at its image size."""

    name: str
    source: Path
    images: torch.Tensor
    labels: torch.Tensor  # indices into the model's class names
    digest: str
    layout: str = ""
    scored: str = ""  # which of the folder's images, in words
    skipped: list[list[str]] = field(default_factory=list)  # [name, why] of unreadable files


@dataclass
class ModelRef:
    """A registered version: what the evaluation is tagged with."""

    uri: str
    name: str
    version: str
    run_id: str


def find_version(spec: str | None, uri: str) -> ModelRef:
    """NAME@ALIAS, NAME/VERSION or NAME (its champion), as a registered version."""
    model_uri = resolve_model_uri(spec, uri)
    if not model_uri.startswith("models:/"):
        raise RegistryError(f"{spec} is not a registered model; name one as NAME@ALIAS or "
                            "NAME/VERSION")
    version = registered_version(model_uri, MlflowClient(uri))
    return ModelRef(f"models:/{version.name}/{version.version}", version.name,
                    str(version.version), version.run_id or "")


def evaluation_set(data_dir: str | Path, classes: list[str], size: int,
                   cache_dir: str | Path | None = DEFAULT_CACHE_DIR, *,
                   labels: str | Path | None = None,
                   held_out: HeldOut | None = None) -> EvalSet:
    """The labelled images under `data_dir` (see the module's docstring), decoded at `size`.
    `held_out` is the source run's file lists: on the folder that run trained on, with a test
    split this project held out, exactly its test files are scored."""
    root = local_root(str(data_dir), cache_dir)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    if (root / CIFAR10_FOLDER).is_dir() or (root / CIFAR10_ARCHIVE).is_file():
        return _cifar_test(root, classes, size, cache_dir)
    if is_shards(root):
        return _shards_test(root, classes, size, cache_dir)
    found = _labelled(root, Path(labels).expanduser().resolve() if labels else None)
    unknown = sorted(set(found.classes) - set(classes))
    if unknown:
        raise DatasetError(f"{found.root} has class folders the model does not know: {unknown}. "
                           f"The model's classes are: {classes}. Rename or remove those folders.")
    items = [item for split in ("train", "val", "test") for item in found.splits.get(split, [])]
    scored, a_test_split = "all labelled images", True
    if found.layout == "split-folders":
        items, scored = found.splits["test"], "the test/ folder"
    elif held_out is not None and held_out.trained_on(found, items):
        items, scored = held_out.test_items(found, items), "the source run's held-out test files"
    else:
        a_test_split = False
    name = found.root.name
    if found.root.name == "test" and found.layout != "split-folders":
        name, a_test_split = found.root.parent.name, True
    name += "-test" if a_test_split else ""
    decoded = decode_files([path for path, _ in items], size, decode_pool(len(items)))
    if not decoded.kept:
        raise DatasetError(f"none of the {len(items)} images in {found.root} could be read; "
                           "check that the files are images")
    images = decoded.images
    labels_ = np.array([classes.index(found.classes[items[i][1]]) for i in decoded.kept],
                       dtype=np.int64)
    skipped = [[found.relative(items[i][0]), why] for i, why in decoded.failed]
    return EvalSet(name, found.root, torch.from_numpy(images), torch.from_numpy(labels_),
                   fingerprint(classes, images, labels_), found.layout, scored, skipped)


def _labelled(root: Path, labels: Path | None) -> Found:
    """The folder's labelled files, in the training layouts' terms; a folder of class
    sub-folders may hold any of the model's classes, even one."""
    train = root / "train"
    if train.is_dir() and (labels or (root / KAGGLE_LABELS).is_file() or class_dirs(train)):
        return find_layout(Source(root, labels))
    if (root / "test").is_dir():
        root = root / "test"
    per_class = class_dirs(root)
    if not per_class:
        raise DatasetError(f"{root} holds no labelled images: expected <class>/ sub-folders of "
                           f"images, a test/ folder of them, train/ with a labels file, or "
                           f"CIFAR-10 ({CIFAR10_FOLDER}/)")
    names = sorted(per_class)
    return Found("class-folders", root, names,
                 {"test": [(p, names.index(c)) for c in names for p in per_class[c]]})


@dataclass
class HeldOut:
    """A training run's data folder and file lists (names relative to that folder)."""

    root: str
    listed: dict[str, list[str]]

    def trained_on(self, found: Found, items: list[tuple[Path, int]]) -> bool:
        """Whether `found` is the folder the run trained on: the same path, or a copy holding
        every file the run listed and (almost) nothing else."""
        if str(found.root) == self.root:
            return True
        here = {found.relative(path) for path, _ in items}
        there = {name for names in self.listed.values() for name in names}
        return there <= here and len(here - there) <= 0.05 * len(here)

    def test_items(self, found: Found, items: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        by_name = {found.relative(path): (path, label) for path, label in items}
        test = self.listed["test"]
        missing = [name for name in test if name not in by_name]
        if missing:
            raise DatasetError(f"{len(missing)} of the {len(test)} test files the model was held "
                               f"out from are gone from {found.root}: {some_names(missing)}. "
                               "Restore them to score the model on its own test split, or "
                               "evaluate on another folder")
        return [by_name[name] for name in test]


def held_out_files(run_id: str) -> HeldOut | None:
    """The source run's data folder and data/files_*.txt lists, where it logged them."""
    import tempfile
    root = mlflow.get_run(run_id).data.params.get("data_root")
    listed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "val", "test"):
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=f"data/files_{split}.txt", dst_path=tmp)
            except Exception:  # noqa: BLE001 - older runs and other layouts log no lists
                continue
            listed[split] = Path(local).read_text(encoding="utf-8").splitlines()
    return HeldOut(root or "", listed) if "test" in listed and "train" in listed else None


def _cifar_test(root: Path, classes: list[str], size: int, cache_dir) -> EvalSet:
    data = load_dataset(root, cache_dir=cache_dir, download=False, log=lambda *_: None)
    if data.classes != classes:
        raise DatasetError(f"{root} holds {data.name} with classes {data.classes}; the model's "
                           f"classes are {classes}")
    images = resize_batch(data.test_images, size)
    return EvalSet(f"{data.name}-test", root, images, data.test_labels,
                   fingerprint(classes, images.numpy(), data.test_labels.numpy()), data.layout,
                   "CIFAR-10's test set")


def _shards_test(root: Path, classes: list[str], size: int, cache_dir) -> EvalSet:
    """The test split of WebDataset shards, decoded at the model's size."""
    data = load_dataset(root, image_size=size, cache_dir=cache_dir, log=lambda *_: None)
    unknown = sorted(set(data.classes) - set(classes))
    if unknown:
        raise DatasetError(f"the shards in {root} have classes the model does not know: "
                           f"{unknown}. The model's classes are: {classes}")
    labels = torch.tensor([classes.index(data.classes[i]) for i in data.test_labels.tolist()])
    skipped = [item for item in data.skipped if item[0].startswith("test-")]
    return EvalSet(f"{data.name}-test", root, data.test_images, labels,
                   fingerprint(classes, data.test_images.numpy(), labels.numpy()), data.layout,
                   "the shards' test split", skipped)


def measure(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
            temperature: float) -> dict:
    """Every figure of an evaluation: metrics to log and the tables behind the artifacts."""
    probs = torch.softmax(logits.double(), 1)
    predicted = probs.argmax(1)
    n = len(classes)
    confusion = torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)
    per_class = report.per_class_scores(confusion, classes)
    present = [s for s in per_class if s["support"]]
    ece = expected_calibration_error(probs, labels)
    ece_raw = expected_calibration_error(torch.softmax(logits.double() * temperature, 1), labels)
    metrics = {"accuracy": float((predicted == labels).double().mean()),
               "loss": float(F.cross_entropy(logits.double(), labels)),
               "macro_f1": sum(s["f1"] for s in present) / len(present),
               "ece": ece, "ece_before_temperature": ece_raw, "images": len(labels)}
    for s in per_class:
        metrics.update({f"{k}_{s['class']}": s[k] for k in ("precision", "recall", "f1")})
    return {"metrics": metrics, "confusion": confusion, "per_class": per_class,
            "reliability": reliability(probs, labels), "probs": probs}


def worst_mistakes(probs: torch.Tensor, labels: torch.Tensor, classes: list[str],
                   top: int) -> list[dict]:
    """The wrong answers with the highest loss (the most confident mistakes), worst first."""
    loss = -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log()
    wrong = (probs.argmax(1) != labels).nonzero().squeeze(1)
    order = wrong[loss[wrong].argsort(descending=True)][:top]
    return [{"index": int(i), "true": classes[labels[i]], "predicted": classes[probs[i].argmax()],
             "confidence": round(float(probs[i].max()), 4), "loss": round(float(loss[i]), 4)}
            for i in order]


def log_evaluation(data: EvalSet, clf: LoadedClassifier, result: dict, mistakes: list[dict]) -> None:
    """Metrics, dataset and artifacts into the active run."""
    log_dataset(data.name, str(data.source), data.digest, "evaluation")
    mlflow.log_metrics(result["metrics"])
    m = result["metrics"]
    figures = {"confusion_matrix.png": report.confusion_figure(result["confusion"], clf.classes,
                                                               f"{data.name} confusion matrix"),
               "reliability_diagram.png": report.reliability_figure(
                   result["reliability"], m["ece"], m["ece_before_temperature"])}
    if mistakes:
        captions = [f"#{k + 1} {w['true']} as {w['predicted']}\n{w['confidence']:.2f}"
                    for k, w in enumerate(mistakes)]
        shown = data.images[[w["index"] for w in mistakes]]
        figures["worst_mistakes.png"] = report.mistakes_figure(shown, captions)
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)
        plt.close(fig)
    mlflow.log_text(report.confusion_csv(result["confusion"], clf.classes), "confusion_matrix.csv")
    mlflow.log_text(report.scores_csv(result["per_class"]), "per_class_metrics.csv")
    pairs = report.confused_pairs(result["confusion"], clf.classes)
    if pairs:
        mlflow.log_text(report.scores_csv(pairs), "confused_pairs.csv")
    if mistakes:
        mlflow.log_text(report.scores_csv(mistakes), "worst_mistakes.csv")


def evaluate(spec: str | None, data_dir: str | Path, uri: str, *, worst: int = 24,
             experiment: str = EXPERIMENT, batch_size: int = 256,
             cache_dir: str | Path | None = DEFAULT_CACHE_DIR, labels: str | Path | None = None,
             runtime: str = "pt2", log=print) -> tuple[str, dict]:
    """Evaluate the registered version `spec` on `data_dir`, run by `runtime` (pt2, or its
    checked onnx or onnx-int8 export); (run id, metrics)."""
    use_store(uri)
    ref = find_version(spec, uri)
    clf = load_classifier(ref.uri, runtime)
    data = evaluation_set(data_dir, clf.classes, clf.prep.image_size, cache_dir, labels=labels,
                          held_out=held_out_files(ref.run_id) if ref.run_id else None)
    log(f"scoring {len(data.labels)} images of {data.source}: {data.scored}")
    for name, why in data.skipped:
        log(f"warning: skipped {name} ({why})")
    result = measure(clf.scores(data.images, batch_size), data.labels, clf.classes,
                     clf.calibration.temperature)
    mistakes = worst_mistakes(result["probs"], data.labels, clf.classes, worst)
    source_params = mlflow.get_run(ref.run_id).data.params if ref.run_id else {}
    with mlflow.start_run(experiment_id=ensure_experiment(experiment, uri),
                          run_name=f"eval-{ref.name}-v{ref.version}-{data.name}"
                                   + ("" if runtime == "pt2" else f"-{runtime}")) as run:
        mlflow.set_tags({"registered_model": ref.name, "model_version": ref.version,
                         "source_run": ref.run_id, "dataset": data.name,
                         "dataset_fingerprint": data.digest, "git_commit": git_commit(),
                         "kind": "evaluation"})
        mlflow.log_params({"model": source_params.get("model", ref.name),
                           "model_uri": ref.uri, "runtime": runtime, "dataset": data.name,
                           "data_dir": str(data.source), "images": len(data.labels),
                           "image_size": clf.prep.image_size, "tta": clf.prep.tta,
                           "temperature": clf.calibration.temperature, "worst_shown": worst,
                           "data_layout": data.layout, "scored": data.scored,
                           "skipped_files": len(data.skipped)})
        if data.skipped:
            mlflow.log_text(report.skipped_csv(data.skipped), "skipped_files.csv")
        log_evaluation(data, clf, result, mistakes)
    m = result["metrics"]
    MlflowClient(uri).set_model_version_tag(
        ref.name, ref.version, f"eval.{data.name}" + ("" if runtime == "pt2" else f".{runtime}"),
        f"accuracy {m['accuracy']:.4f}, ece {m['ece']:.4f}, {m['images']} images, run {run.info.run_id}")
    return run.info.run_id, m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="NAME@ALIAS, NAME/VERSION or NAME (its champion); "
                                        "default: the champion of the newest registered model")
    parser.add_argument("--data-dir", required=True, help="CIFAR-10, an image-folder dataset "
                        "(its test/ is used), the model's own split-less folder (its held-out "
                        "test files are used), or any folder of <class>/ sub-folders")
    parser.add_argument("--labels", help="a CSV of file id,label for DATA_DIR/train/ "
                                         "(default: DATA_DIR/trainLabels.csv when there is one)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="pt2", help=RUNTIME_HELP)
    parser.add_argument("--worst", type=int, default=24, help="mistakes shown in the gallery")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="where decoded CIFAR-10 is cached")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlruns)")
    args = parser.parse_args(argv)
    if args.worst < 0 or args.batch_size < 1:
        parser.error("--worst must be 0 or more and --batch-size 1 or more")
    uri = tracking_uri(args.tracking_uri)

    def body() -> int:
        run_id, m = evaluate(args.model, args.data_dir, uri, worst=args.worst,
                             experiment=args.experiment, batch_size=args.batch_size,
                             cache_dir=args.cache_dir, labels=args.labels, runtime=args.runtime)
        print(f"evaluation run {run_id}: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}, "
              f"macro F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} (before temperature "
              f"{m['ece_before_temperature']:.4f}) on {m['images']} images")
        page = ui_page(mlflow.get_run(run_id).info.experiment_id, run_id)
        print(f"see it: {ui_command(uri, page)}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
