"""Labels broken on purpose, found again: a CIFAR-10 subset copied into class folders with
`--flip` of its training labels moved to another class at random (seeded); a frozen
EfficientNet-Lite0 trained on it and registered; `training.label_issues` ranks its training
images; precision at k (k = the number flipped) is the share of flipped images among the top
k. Then the same model trained without the top k, and on the true labels, side by side: test
accuracy on the untouched test images.

    python benchmarks/label_noise.py --data-dir ~/data/cifar10 --train-per-class 200 \
        --test-per-class 100 --flip 0.05 --work /tmp/label-noise
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow.tracking import MlflowClient  # noqa: E402

from training import label_issues  # noqa: E402
from training.engine.config import resolve  # noqa: E402
from training.train import train  # noqa: E402


def copy_subset(source: Path, target: Path, per_class: dict[str, int], flip: float,
                seed: int) -> set[str]:
    """Class folders of the first images of each class; `flip` of the training ones put in
    another class. Returns the flipped files' names as the training folder lists them."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    flipped = set()
    for split, count in per_class.items():
        for name in classes:
            for path in sorted((source / split / name).iterdir())[:count]:
                label = name
                if split == "train" and rng.random() < flip:
                    label = rng.choice([c for c in classes if c != name])
                    flipped.add(f"train/{label}/{name}-{path.name}")
                (target / split / label).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / split / label / f"{name}-{path.name}")
    return flipped


def trained(data_dir: Path, work: Path, args) -> tuple[float, str, float]:
    """(test accuracy, registered NAME/VERSION, seconds) of the frozen Lite0 on `data_dir`."""
    cfg = resolve({"model": "efficientnet_lite0", "weights": "imagenet", "freeze": "backbone",
                   "data_dir": str(data_dir), "cache_dir": str(work / "cache"),
                   "tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "epochs": args.epochs,
                   "input_size": args.input_size, "progress": False, "system_metrics": False,
                   "device": "cpu", "experiment": "label-noise"})
    started = time.perf_counter()
    result = train(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - started
    (version,) = MlflowClient(cfg.tracking_uri).search_model_versions(f"run_id='{result.run_id}'")
    return result.test_acc, f"{version.name}/{version.version}", seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="CIFAR-10 as class folders")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    counts = {"train": args.train_per_class, "test": args.test_per_class}
    noisy, true = args.work / "noisy", args.work / "true"
    flipped = copy_subset(args.data_dir, noisy, counts, args.flip, args.seed)
    copy_subset(args.data_dir, true, counts, 0.0, args.seed)

    noisy_acc, version, noisy_seconds = trained(noisy, args.work, args)
    started = time.perf_counter()
    csv_path = args.work / "label_issues.csv"
    if label_issues.main(["--model", version, "--data-dir", str(noisy), "--out", str(csv_path),
                          "--tracking-uri", f"sqlite:///{args.work / 'mlflow.db'}",
                          "--cache-dir", str(args.work / "cache")]) != 0:
        raise SystemExit("training.label_issues failed; see its error above")
    ranking_seconds = time.perf_counter() - started
    rows = list(csv.DictReader(csv_path.open()))
    k = len(flipped)
    top = [r["file"] for r in rows[:k]]
    found = len(set(top) & flipped)

    cleaned = args.work / "cleaned"
    shutil.copytree(noisy, cleaned)
    for name in top:
        (cleaned / name).unlink()
    cleaned_acc, _, _ = trained(cleaned, args.work, args)
    true_acc, _, _ = trained(true, args.work, args)
    results = {"train_images": len(rows), "flipped": k,
               "flagged": sum(r["flagged"] == "True" for r in rows),
               "precision_at_k": round(found / max(k, 1), 3),
               "test_accuracy": {"noisy labels": round(noisy_acc, 4),
                                 "without the top k": round(cleaned_acc, 4),
                                 "true labels": round(true_acc, 4)},
               "seconds": {"train on noisy": round(noisy_seconds, 1),
                           "rank (features cached)": round(ranking_seconds, 1)}}
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
