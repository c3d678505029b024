"""Head-only fine-tuning with the frozen features cached against without, side by side.

Both train the same head of the same pretrained network on the same training images: without
the cache every epoch runs the whole network over every image (the backbone frozen), with it
the features are computed once and an epoch runs the head alone. Rounds alternate (the
machine is shared and noisy); the table gives each one's median training epoch on the subset,
what a whole epoch of the full training split comes to at that rate, and the speed-up; and the
one-time cost of computing the features.

    python benchmarks/feature_cache.py --data-dir ~/data/cifar10 --model efficientnet_lite0 \
        --train-images 2000 --rounds 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine.build import build, prepare  # noqa: E402
from training.engine.config import resolve  # noqa: E402
from training.engine.loop import autocast_for, train_epoch  # noqa: E402


def epoch_seconds(setup) -> float:
    start = time.perf_counter()
    train_epoch(setup.network, setup.state, setup.loss_fn,
                autocast=autocast_for(setup.loaders.train.device, setup.precision))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None, help="where the dataset cache is")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    settings = {"model": args.model, "data_dir": args.data_dir, "weights": args.weights,
                "freeze": "backbone", "device": args.device, "feature_views": 1,
                "val_fraction": 0.1, "patience": 0,
                "input_size": args.input_size, "progress": False}
    if args.cache_dir:
        settings["cache_dir"] = args.cache_dir
    cfg = resolve({k: v for k, v in settings.items() if v is not None})
    full = prepare(cfg, log=lambda *_: None)
    splits = full.subset(args.train_images, 0)
    splits = dataclasses.replace(splits, test=(splits.test[0][:1], splits.test[1][:1]))
    with tempfile.TemporaryDirectory() as features_dir:  # a fresh feature cache: built here
        cached_cfg = dataclasses.replace(cfg, cache_dir=features_dir)
        start = time.perf_counter()
        cached = build(cached_cfg, splits, log=lambda *_: None)
        build_seconds = time.perf_counter() - start
    plain = build(dataclasses.replace(cfg, feature_cache=False), splits, log=lambda *_: None)
    times = {"without cache": [], "with cache": []}
    for _ in range(args.rounds):
        times["without cache"].append(epoch_seconds(plain))
        times["with cache"].append(epoch_seconds(cached))
    n, n_full = len(splits.train[1]), len(full.train[1])
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "input_size": cached.prep.input_size, "train_images": n,
              "full_train_images": n_full, "rounds": args.rounds,
              "feature_seconds": cached.feature_params["feature_seconds"],
              "build_seconds_with_features": build_seconds,
              "features_per_second": n / cached.feature_params["feature_seconds"],
              **{f"epoch_seconds {k}": v for k, v in median.items()},
              **{f"full_epoch_seconds {k}": v * n_full / n for k, v in median.items()},
              "speedup": median["without cache"] / median["with cache"]}
    print(f"{args.model} at {result['input_size']} px, {n} training images, median of "
          f"{args.rounds} rounds")
    print(f"features computed once: {result['feature_seconds']:.1f} s "
          f"({result['features_per_second']:.0f} images/s)")
    for k, v in median.items():
        print(f"{k:>14}: {v:8.3f} s per epoch; the {n_full:,}-image split: "
              f"{v * n_full / n:8.1f} s per epoch")
    print(f"speed-up: {result['speedup']:,.0f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
