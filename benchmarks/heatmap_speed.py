"""Time of a Grad-CAM heatmap per image, as the app computes it (one image at a time, on the
decoded image), beside classifying the same image (decode + model), for each model:

    python benchmarks/heatmap_speed.py --tracking-uri sqlite:///mlruns/mlflow.db \
        --models cifar10-cnn@champion,cifar10-fast@champion --images inputs --rounds 3

Rounds alternate the two measurements; the ratio is heatmap time over classification time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.files import image_files  # noqa: E402
from shared.heatmap import Explainer  # noqa: E402
from shared.inference import classify_files, load_classifier  # noqa: E402
from shared.store import tracking_uri, use_store  # noqa: E402


def seconds_per_image(work, paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        work(path)
    return (time.perf_counter() - started) / len(paths)


def measure(name: str, paths: list[Path], rounds: int) -> dict:
    clf = load_classifier(f"models:/{name}")
    explainer = Explainer(clf.module)

    def classify(path):
        next(classify_files(clf, [path]))

    def heatmap(path):
        explainer.heatmaps(clf.load_images([path]))

    classify(paths[0]), heatmap(paths[0])  # warm-up
    times = {"classify": [], "heatmap": []}
    for _ in range(rounds):
        times["classify"].append(seconds_per_image(classify, paths))
        times["heatmap"].append(seconds_per_image(heatmap, paths))
    row = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"model": name, "image_size": clf.prep.image_size, "input_size": clf.prep.input_size,
            "images": len(paths), "classify_ms": row["classify"], "heatmap_ms": row["heatmap"],
            "ratio": row["heatmap"] / row["classify"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--models", required=True, help="comma-separated NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--images", type=Path, required=True, help="a folder of images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    use_store(tracking_uri(args.tracking_uri))
    paths = image_files(args.images)
    rows = [measure(name, paths, args.rounds) for name in args.models.split(",")]
    print("| model | input | classify ms/image | heatmap ms/image | heatmap / classify |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input_size']} px | {r['classify_ms']:.1f} | "
              f"{r['heatmap_ms']:.1f} | {r['ratio']:.1f}x |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
