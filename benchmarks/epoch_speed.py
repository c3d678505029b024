"""Seconds per epoch of every built-in model, plain against tuned, and the share of each epoch
the training thread spends on checkpoints and MLflow.

Both variants train through `training.train.train` with tracking on, on the same images:
- plain: fp32, contiguous (NCHW) memory, no compilation, checkpoints and metrics written
  synchronously on the training thread;
- tuned: the recipe's settings (bf16 on CUDA, channels_last, `--compile`), with checkpoints and
  metrics written by the background writer.
Epoch 1 is a warm-up and is left out; the figure is the median of the other epochs, scaled to
a full 50,000-image CIFAR-10 epoch (45k train + 5k validation) when a subset was used.
Variants alternate model by model, so both see the same machine load.

    python benchmarks/epoch_speed.py --data-dir ~/data/cifar10 --models mlp,cnn,fast --device cuda
    python benchmarks/epoch_speed.py --data-dir ~/data/cifar10 --models resnet18,alexnet \\
        --train-images 2000 --epochs 3          # a CPU: a subset, scaled
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

PLAIN = {"precision": "fp32", "channels_last": False, "compile": "none", "async_logging": False}
FULL_EPOCH = 50_000


def measure(settings: dict, splits: DeviceSplits) -> dict:
    result = train(resolve(settings), log=lambda *_: None, splits=splits)
    seconds = [h["epoch_seconds"] for h in result.history[1:]] or [result.history[0]["epoch_seconds"]]
    images = len(splits.train[1]) + len(splits.val[1])
    return {"s_per_epoch": statistics.median(seconds),
            "s_per_full_epoch": statistics.median(seconds) * FULL_EPOCH / images,
            "tracking_share": result.tracking_seconds / (result.tracking_seconds + result.train_seconds),
            "compile_seconds": result.compile_seconds, "images": images}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--models", default="mlp,cnn,fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--train-images", type=int, default=None, help="train on the first N only")
    parser.add_argument("--compile", default="auto", help="the tuned variant's --compile")
    parser.add_argument("--batch-size", type=int, default=None, help="both variants (default: recipe)")
    parser.add_argument("--cache-dir", default=None, help="decoded-dataset cache")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {"data_dir": args.data_dir, "device": args.device, "epochs": args.epochs,
                "progress": False, "system_metrics": False, "patience": 0, "val_fraction": 0.1,
                "experiment": "epoch-speed", "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                "no_register": True,
                **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
                **({"batch_size": args.batch_size} if args.batch_size else {})}
        # a subset keeps the 45k/5k proportion: n training and n/9 validation images
        n = args.train_images
        splits = prepare(resolve({**base, "model": models[0]}), log=lambda *_: None).subset(
            n, max(1, n // 9) if n else None)
        for model in models:
            plain = measure({**base, "model": model, **PLAIN}, splits)
            tuned = measure({**base, "model": model, "compile": args.compile}, splits)
            rows.append({"model": model, "plain": plain, "tuned": tuned})
            print(f"{model}: plain {plain['s_per_full_epoch']:.2f} s, tuned "
                  f"{tuned['s_per_full_epoch']:.2f} s per 50k-image epoch", flush=True)
    print()
    print("| model | plain s/epoch | tuned s/epoch | speed-up | tracking share plain | "
          "tracking share tuned | compile s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        p, t = r["plain"], r["tuned"]
        print(f"| {r['model']} | {p['s_per_full_epoch']:.2f} | {t['s_per_full_epoch']:.2f} | "
              f"{p['s_per_full_epoch'] / t['s_per_full_epoch']:.2f}× | "
              f"{100 * p['tracking_share']:.2f}% | {100 * t['tracking_share']:.2f}% | "
              f"{t['compile_seconds']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
