"""The `fast` recipe timed like the CIFAR-10 speed record, over seeds, with ablations.

Each run goes through `training.train.train` exactly as the command does: MLflow tracking,
checkpoints, the logged model and the registry are all on. Its time is counted like the
record's (airbench): every training epoch plus the test-time-augmented test pass, with the
training thread's checkpoint and tracking work included and one-time compilation excluded
(`compile_seconds`, reported apart, as is the wall time of the whole call). One row per
variant: the recipe, then the recipe with one piece taken out (or, for lookahead, put in).

    python benchmarks/fast_record.py --data-dir ~/data/cifar10 --seeds 5 [--device cuda]
    python benchmarks/fast_record.py --data-dir ~/data/cifar10 --seeds 5 --ablate all
    # a quick look on a CPU: a subset and fewer epochs (accuracy is then not the record's)
    python benchmarks/fast_record.py --data-dir ~/data/cifar10 --train-images 5000 --epochs 2
    # and where the time goes: one more run of the recipe under torch.profiler (not timed)
    python benchmarks/fast_record.py --data-dir ~/data/cifar10 --seeds 1 --profile profile.txt
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine.build import DeviceSplits, prepare  # noqa: E402
from training.engine.config import ConfigError, coerce, resolve, setting_types  # noqa: E402
from training.engine.models import FAST_SGD  # noqa: E402
from training.train import train  # noqa: E402

# each piece, the row's name and the settings that take it out of the recipe (or, for an
# option the recipe leaves off, put it in)
PIECES = {
    "muon": ("Nesterov SGD instead of Muon (10 epochs, lookahead)", FAST_SGD),
    "whiten_init": ("without whiten_init", {"whiten_init": False}),
    "lookahead": ("with lookahead", {"lookahead": True}),
    "tta": ("without tta", {"tta": "none"}),
    "alternate_flip": ("without alternate_flip", {"flip": "random"}),
    "label_smoothing": ("without label_smoothing", {"label_smoothing": 0.0}),
    "bias_lr_scale": ("without bias_lr_scale", {"bias_lr_scale": 1.0}),
    "compile": ("without compile", {"compile": "none"}),
    "bf16": ("without bf16", {"precision": "fp32"}),
    "channels_last": ("without channels_last", {"channels_last": False}),
}


def one_run(settings: dict, splits: DeviceSplits) -> dict:
    cfg = resolve(settings)
    start = time.perf_counter()
    result = train(cfg, log=lambda *_: None, splits=splits)
    wall = time.perf_counter() - start
    record = result.train_seconds + result.tracking_seconds + result.test_seconds
    return {"seed": cfg.seed, "test_acc": result.test_acc, "record_seconds": record,
            "train_seconds": result.train_seconds, "test_seconds": result.test_seconds,
            "tracking_seconds": result.tracking_seconds,
            "compile_seconds": result.compile_seconds, "wall_seconds": wall,
            "run_id": result.run_id}


def profiled(settings: dict, splits: DeviceSplits, path: Path) -> None:
    """One more run under torch.profiler; its operators by total time (the GPU's where there
    is one), as a table in `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = splits.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        one_run(settings, splits)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40))


def summarize(name: str, runs: list[dict]) -> dict:
    accs = [r["test_acc"] for r in runs]
    times = [r["record_seconds"] for r in runs]
    return {"variant": name, "runs": len(runs), "mean_acc": statistics.mean(accs),
            "std_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "mean_seconds": statistics.mean(times),
            "mean_wall": statistics.mean(r["wall_seconds"] for r in runs),
            "mean_compile": statistics.mean(r["compile_seconds"] for r in runs),
            "tracking_share": sum(r["tracking_seconds"] for r in runs) /
            sum(r["train_seconds"] + r["tracking_seconds"] for r in runs)}


def table(rows: list[dict]) -> str:
    base = rows[0]["mean_seconds"]
    lines = ["| variant | runs | test acc (mean ± sd) | s per run (record timing) | vs recipe | "
             "compile s | wall s | tracking share |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['runs']} | {100 * r['mean_acc']:.2f}% ± "
                     f"{100 * r['std_acc']:.2f} | {r['mean_seconds']:.2f} | "
                     f"{r['mean_seconds'] / base:.2f}× | {r['mean_compile']:.1f} | "
                     f"{r['mean_wall']:.1f} | {100 * r['tracking_share']:.2f}% |")
    return "\n".join(lines)


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE, typed like the training config's field KEY."""
    key, sep, value = text.partition("=")
    key, kinds = key.strip().replace("-", "_"), setting_types()
    if not sep or key not in kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY a training "
                                         f"setting ({', '.join(kinds)})")
    if kinds[key] is bool:
        value = {"true": True, "false": False}.get(value.lower(), value)
    try:
        return key, coerce(key, value, kinds[key], "--set")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ablate", default="", help=f"comma list of pieces, or all: {', '.join(PIECES)}")
    parser.add_argument("--train-images", type=int, default=None, help="train on the first N only")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the recipe in every row (repeatable)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: a temporary one, deleted afterwards)")
    parser.add_argument("--cache-dir", default=None, help="decoded-dataset cache")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="then profile one more run of the recipe: its operators by time here")
    args = parser.parse_args(argv)
    pieces = list(PIECES) if args.ablate == "all" else [p for p in args.ablate.split(",") if p]
    unknown = set(pieces) - set(PIECES)
    if unknown:
        parser.error(f"unknown pieces {sorted(unknown)}; choose from {', '.join(PIECES)}")

    with tempfile.TemporaryDirectory() as tmp:
        base = {"model": "fast", "data_dir": args.data_dir, "device": args.device,
                "progress": False, "system_metrics": False, "experiment": "speed-record",
                "tracking_uri": args.tracking_uri or f"sqlite:///{tmp}/mlflow.db",
                **({"cache_dir": args.cache_dir} if args.cache_dir else {})}
        # the user's overrides hold in every row, over the piece's own settings
        overrides = {**({"epochs": args.epochs} if args.epochs else {}), **dict(args.set)}
        splits = prepare(resolve({**base, **overrides}), log=lambda *_: None).subset(
            args.train_images)
        device = splits.device
        print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; "
              f"{len(splits.train[1])} training images, seeds 0..{args.seeds - 1}", flush=True)
        rows, detail = [], []
        for name, change in [("recipe", {}), *(PIECES[p] for p in pieces)]:
            runs = []
            for seed in range(args.seeds):
                run = one_run({**base, **change, **overrides, "seed": seed,
                               "run_name": f"fast: {name}"}, splits)
                runs.append(run)
                print(f"{name}, seed {seed}: {100 * run['test_acc']:.2f}% in "
                      f"{run['record_seconds']:.2f} s (compile {run['compile_seconds']:.1f} s, "
                      f"wall {run['wall_seconds']:.1f} s)", flush=True)
            rows.append(summarize(name, runs))
            detail.append({"variant": name, "runs": runs})
        if args.profile:
            profiled({**base, **overrides, "seed": 0, "run_name": "fast: profiled"}, splits,
                     args.profile)
            print(f"profile of one run: {args.profile}", flush=True)
    print()
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "runs": detail}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
