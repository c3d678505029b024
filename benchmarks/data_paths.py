"""Training images/s with the dataset held whole on the device against read batch by batch
from the memory-mapped cache, side by side in one run.

    python benchmarks/data_paths.py --data-dir ~/data/cifar10 --models cnn,mlp --rounds 3
    python benchmarks/data_paths.py --data-dir ~/data/cifar10 --train-images 5000 --device cuda

Both placements (`--data-on-device yes` and `no`) train through `training.train.train`, tracking
on and the registry off, on the same splits of the same decoded cache. Rounds alternate the two
placements, so both see the same machine load; each run trains --epochs epochs and the figure is
its last epoch's training images/s (the first warms up the page cache and the allocator). The
ratio of each round is mapped / held; the table gives the medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine.build import DeviceSplits, prepare  # noqa: E402
from training.engine.config import resolve  # noqa: E402
from training.engine.models import MODELS  # noqa: E402
from training.train import train  # noqa: E402

PLACEMENTS = ("yes", "no")  # held on the device, read from the memory-mapped cache


def images_per_second(settings: dict, splits: DeviceSplits) -> float:
    result = train(resolve(settings), log=lambda *_: None, splits=splits)
    return result.history[-1]["images_per_second"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--models", default="cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last is timed")
    parser.add_argument("--train-images", type=int, default=None, help="train on N images only")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--cache-dir", default=None, help="decoded-dataset cache")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(models) - set(MODELS))}; choose from "
                     f"{', '.join(MODELS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {"data_dir": args.data_dir, "device": args.device, "epochs": args.epochs,
                "progress": False, "system_metrics": False, "patience": 0, "val_fraction": 0.1,
                "experiment": "data-paths", "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                "no_register": True, "augment": True,
                **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
                **({"batch_size": args.batch_size} if args.batch_size else {})}
        n = args.train_images
        splits = {p: prepare(resolve({**base, "model": models[0], "data_on_device": p}),
                             log=lambda *_: None).subset(n, max(1, n // 9) if n else None)
                  for p in PLACEMENTS}
        for model in models:
            rates = {p: [] for p in PLACEMENTS}
            for round_ in range(args.rounds):
                for p in PLACEMENTS if round_ % 2 == 0 else PLACEMENTS[::-1]:
                    rates[p].append(images_per_second({**base, "model": model,
                                                       "data_on_device": p}, splits[p]))
            ratios = [m / h for h, m in zip(rates["yes"], rates["no"])]
            rows.append({"model": model, "images": len(splits["yes"].train[1]),
                         "held_images_per_s": rates["yes"], "mapped_images_per_s": rates["no"],
                         "ratios": ratios, "median_ratio": statistics.median(ratios)})
            print(f"{model}: held {statistics.median(rates['yes']):,.0f} img/s, mapped "
                  f"{statistics.median(rates['no']):,.0f} img/s, ratio "
                  f"{statistics.median(ratios):.3f}", flush=True)
    print("\n| model | training images | held on the device, img/s | memory-mapped cache, "
          "img/s | mapped / held (median of rounds) | lowest round |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['images']} | {statistics.median(r['held_images_per_s']):,.0f} | "
              f"{statistics.median(r['mapped_images_per_s']):,.0f} | {r['median_ratio']:.3f} | "
              f"{min(r['ratios']):.3f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
