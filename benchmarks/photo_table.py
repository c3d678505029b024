"""Registered models side by side on the same photos: each one's answer and confidence per
photo, through the app's own path (decode, the logged model, softmax), and optionally its
accuracy on a labelled image folder (class = parent folder name) sampled every Nth file.

    python benchmarks/photo_table.py --tracking-uri sqlite:///mlruns/mlflow.db \
        --models cifar10-cnn@champion,cifar10-efficientnet_lite0/2 \
        --photos inputs/bird.png,inputs/car.png,inputs/dog.png,inputs/horse.png,inputs/truck.png \
        --labelled ~/data/cifar10/test --every 10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.inference import classify_files, load_classifier  # noqa: E402
from shared.preprocess import IMAGE_SUFFIXES  # noqa: E402
from shared.store import tracking_uri, use_store  # noqa: E402


def predictions(clf, paths: list[Path]) -> list:
    return [p for batch in classify_files(clf, paths, batch_size=100) for p in batch]


def accuracy(clf, folder: Path, every: int) -> float:
    files = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)[::every]
    found = predictions(clf, files)
    return sum(p.label == Path(p.path).parent.name for p in found) / len(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--models", required=True, help="comma-separated NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--photos", required=True, help="comma-separated image files")
    parser.add_argument("--labelled", type=Path, help="a folder of <class>/<image> to score too")
    parser.add_argument("--every", type=int, default=10, help="score every Nth labelled image")
    args = parser.parse_args(argv)
    use_store(tracking_uri(args.tracking_uri))
    photos = [Path(p) for p in args.photos.split(",")]
    header = ["model", "photo size", *(p.name for p in photos)]
    header += [f"{args.labelled.name} (every {args.every}th)"] if args.labelled else []
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for name in args.models.split(","):
        clf = load_classifier(f"models:/{name}")
        cells = [name, str(clf.prep.image_size)]
        cells += [f"{p.label} {p.confidence:.2f}" if not p.error else f"error: {p.error}"
                  for p in predictions(clf, photos)]
        if args.labelled:
            cells.append(f"{accuracy(clf, args.labelled, args.every):.2%}")
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
