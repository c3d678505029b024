"""Exports against the original, side by side in one run: pt2 against its checked int8 ONNX
export for the `cnn` and EfficientNet-Lite0 (images/s at batch 64, latency at batch 1,
accuracy and agreement on the test images; every layer int8, and with --float-edges), and
frozen feature extraction with PyTorch against the checked int8 backbone (images/s of the
training features, and the fine-tuned test accuracy each gives). Every figure comes from
the commands a user runs (`training.train`, `training.export`), read back from their MLflow
runs.

    python benchmarks/export_speed.py --data-dir ~/data/cifar10 --work /tmp/export-bench

The `cnn` trains on all of --data-dir and is checked on its whole test split; EfficientNet-
Lite0 (ImageNet weights, frozen backbone) on --per-class training and test images of each
class, copied from it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True)


def subset(data_dir: Path, out: Path, per_class: int) -> Path:
    """`per_class` training and test images of each class of a train/ + test/ folder tree."""
    for split in ("train", "test"):
        for folder in sorted(p for p in (data_dir / split).iterdir() if p.is_dir()):
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir())[:per_class]:
                shutil.copyfile(path, target / path.name)
    return out


def newest_version(client, name: str):
    return max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="train/ and test/ class folders")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--cnn-epochs", type=int, default=2)
    parser.add_argument("--lite0-epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--models", default="cnn,efficientnet_lite0")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "mlruns").mkdir(exist_ok=True)
    store = f"sqlite:///{(args.work / 'mlruns' / 'mlflow.db').resolve()}"
    common = ["--tracking-uri", store, "--cache-dir", str(args.work / "cache")]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    results = {}
    models = args.models.split(",")
    if "cnn" in models:
        run("training.train", "--model", "cnn", "--data-dir", str(args.data_dir), "--epochs",
            str(args.cnn_epochs), "--no-progress", *common)
        version = newest_version(client, f"{args.data_dir.name}-cnn")
        results["cnn"] = exports(client, version, common)
    if "efficientnet_lite0" in models:
        photos = subset(args.data_dir, args.work / f"{args.data_dir.name}-{args.per_class}",
                        args.per_class)
        runs = {}
        for runtime in ("pt2", "onnx-int8"):
            run("training.train", "--model", "efficientnet_lite0", "--weights", "imagenet",
                "--freeze", "backbone", "--data-dir", str(photos), "--epochs", str(args.lite0_epochs),
                "--feature-runtime", runtime, "--no-progress", *common)
            version = newest_version(client, f"{photos.name}-efficientnet_lite0")
            runs[runtime] = (version, client.get_run(version.run_id).data)
        results["efficientnet_lite0"] = exports(client, runs["pt2"][0], common)
        results["features"] = {
            runtime: {"train_images_per_s": float(data.params["feature_train_images_per_s"]),
                      "test_acc": data.metrics["test_acc"],
                      "backbone": data.params["feature_backbone_runtime"]}
            for runtime, (_, data) in runs.items()}
        rates = [results["features"][r]["train_images_per_s"] for r in ("onnx-int8", "pt2")]
        results["features"]["speedup"] = rates[0] / rates[1]
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def exports(client, version, common: list[str]) -> dict:
    """The version exported to int8 twice, every layer int8 and with --float-edges: each
    export's figures, read from its export run."""
    figures = {}
    for name, extra in (("int8", []), ("int8 float edges", ["--float-edges"])):
        run("training.export", "--model", f"{version.name}/{version.version}", "--format",
            "onnx-int8", *extra, *common)
        figures[name] = export_figures(client, version)
    return figures


def export_figures(client, version) -> dict:
    """The int8 export's figures, from its export run's metrics."""
    version = client.get_model_version(version.name, version.version)
    model_id = version.tags["export.onnx-int8"].removeprefix("models:/")
    metrics = client.get_run(client.get_logged_model(model_id).source_run_id).data.metrics
    keys = ("images_per_s", "images_per_s_pt2", "speedup", "latency_p50_ms", "latency_p50_ms_pt2",
            "accuracy", "accuracy_pt2", "accuracy_drop_points", "agreement", "ece", "ece_pt2", "images")
    return {key: metrics[key] for key in keys}


if __name__ == "__main__":
    sys.exit(main())
