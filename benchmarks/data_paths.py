"""Training images/s with the dataset held whole on the device, read batch by batch from the
memory-mapped cache, read from WebDataset shards, and streamed from them, side by side in one
run.

    python -m training.shards ~/data/cifar10 /tmp/cifar-shards
    python benchmarks/data_paths.py --data-dir ~/data/cifar10 --shards /tmp/cifar-shards --rounds 3
    python benchmarks/data_paths.py --data-dir ~/data/cifar10 --train-images 5000 --device cuda

Every path trains through `training.train.train`, tracking on and the registry off: `held`
(`--data-on-device yes`) and `mapped` (`no`) on the same splits of the same decoded cache,
`shards` (`no`, with --shards) on the shards' own decoded cache, and `stream` (`--stream`,
with --shards: DataLoader workers decode the training shards each epoch; it always trains on
all of them, --train-images or not). Rounds alternate the order of
the paths, so all see the same machine load; each run trains --epochs epochs and the figure is
its last epoch's training images/s (the first warms up the page cache and the allocator). Each
round's ratio is a path's images/s over held's; the table gives the medians over rounds, and
the seconds each path's data took to decode into a fresh cache.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine.build import DeviceSplits, prepare  # noqa: E402
from training.engine.config import resolve  # noqa: E402
from training.engine.models import MODELS  # noqa: E402
from training.train import train  # noqa: E402

PATHS = {"held": {"data_on_device": "yes"}, "mapped": {"data_on_device": "no"},
         "shards": {"data_on_device": "no"}, "stream": {"data_on_device": "no", "stream": True}}


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
    parser.add_argument("--shards", default=None, help="the same dataset as shards "
                        "(python -m training.shards DATA_DIR OUT): the shards and stream paths")
    parser.add_argument("--stream-workers", type=int, default=2, help="as for training.train")
    parser.add_argument("--cache-dir", default=None, help="decoded-dataset cache (default: a "
                        "fresh one, so the first prepare of each path decodes)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(models) - set(MODELS))}; choose from "
                     f"{', '.join(MODELS)}")
    rows = []
    sources = {"held": args.data_dir, "mapped": args.data_dir}
    if args.shards:
        sources["shards"] = sources["stream"] = args.shards
    with tempfile.TemporaryDirectory() as tmp:
        base = {"device": args.device, "epochs": args.epochs,
                "progress": False, "system_metrics": False, "patience": 0, "val_fraction": 0.1,
                "experiment": "data-paths", "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                "no_register": True, "augment": True, "cache_dir": args.cache_dir or f"{tmp}/cache",
                "stream_workers": args.stream_workers,
                **({"batch_size": args.batch_size} if args.batch_size else {})}
        n = args.train_images
        splits, decode = {}, {}
        for path, data_dir in sources.items():
            started = time.perf_counter()
            settings = {**base, "model": models[0], "data_dir": data_dir, **PATHS[path]}
            prepared = prepare(resolve(settings), log=lambda *_: None)
            splits[path] = prepared if path == "stream" else prepared.subset(
                n, max(1, n // 9) if n else None)
            decode[path] = time.perf_counter() - started
        for model in models:
            rates = {path: [] for path in sources}
            for round_ in range(args.rounds):
                order = list(sources)[round_ % len(sources):] + list(sources)[:round_ % len(sources)]
                for path in order:
                    rates[path].append(images_per_second(
                        {**base, "model": model, "data_dir": sources[path], **PATHS[path]},
                        splits[path]))
            ratios = {path: [r / h for r, h in zip(rates[path], rates["held"])] for path in sources}
            rows.append({"model": model, "images": len(splits["held"].train[1]), "rates": rates,
                         "ratios": ratios, "prepare_seconds": decode,
                         "median_ratio": {p: statistics.median(r) for p, r in ratios.items()}})
            print(model + ": " + ", ".join(f"{p} {statistics.median(rates[p]):,.0f} img/s"
                                           for p in sources), flush=True)
    print("\n| model | path | training images | images/s (median of rounds) | / held (median) | "
          "lowest round | first prepare, s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        for path in sources:
            print(f"| {r['model']} | {path} | {r['images']} | {statistics.median(r['rates'][path]):,.0f} | "
                  f"{r['median_ratio'][path]:.3f} | {min(r['ratios'][path]):.3f} | "
                  f"{r['prepare_seconds'][path]:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
