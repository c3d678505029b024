"""One training process against several under torchrun, side by side, on the real command.

    python benchmarks/ddp_speed.py --data-dir ~/data/cifar10 --device cpu   # 1 x 2 threads vs 2 x 1
    python benchmarks/ddp_speed.py --data-dir ~/data/cifar10 --device cuda  # plain vs torchrun, 1 GPU
    python benchmarks/ddp_speed.py --data-dir ~/data/cifar10 --device cuda --gpus 8  # and 8 GPUs

Each setup runs `training.train` (the `cnn` recipe unless --model says otherwise) for --epochs,
in alternating rounds so that a noisy machine hurts both alike; a setup's speed is the median
images per second of its epochs after the first (compilation and warm-up excluded), read back
from the MLflow runs. Prints a markdown table with each setup's speed relative to the first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    name: str
    processes: int  # 0: plain python, no torchrun
    threads: int

    def command(self) -> list[str]:
        if not self.processes:
            return [sys.executable, "-m", "training.train"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(self.processes), "-m", "training.train"]


def setups(device: str, cores: int, processes: int) -> list[Setup]:
    """CPU: one process with every core against one process per core. GPU: one process against
    torchrun with one, and with `processes` (one per GPU) when more than one."""
    if device == "cpu":
        return [Setup(f"1 process x {cores} threads", 0, cores),
                Setup(f"{cores} processes x 1 thread (torchrun, gloo)", cores, 1)]
    more = [Setup(f"torchrun, {processes} GPUs", processes, cores)] if processes > 1 else []
    return [Setup("1 process", 0, cores), Setup("torchrun, world size 1", 1, cores), *more]


def images_per_second(store: str, run_name: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp-benchmark").experiment_id],
                                f"attributes.run_name = '{run_name}'")
    history = sorted(client.get_metric_history(run.info.run_id, "images_per_second"),
                     key=lambda m: m.step)
    return [m.value for m in history[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=1, help="cuda: also train on this many GPUs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--work", default=None, help="folder for the store (default: temporary)")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if args.device == "cpu" else min(os.cpu_count() or 1, 8)
    work = Path(args.work or tempfile.mkdtemp(prefix="ddp-speed-"))
    store = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--data-dir", args.data_dir, "--epochs", str(args.epochs),
              "--device", args.device, "--tracking-uri", store, "--experiment", "ddp-benchmark",
              "--patience", "0", "--no-register", "--no-progress", "--no-system-metrics",
              "--checkpoint-every", "0"]
    common += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    common += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    speeds: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for setup in setups(args.device, cores, args.gpus):
            name = f"{setup.name} #{round_}"
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "OMP_NUM_THREADS": str(setup.threads), "PYTHONPATH": path,
                   "PYTHONUNBUFFERED": "1"}
            done = subprocess.run(setup.command() + common + ["--run-name", name], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
                return 1
            speeds.setdefault(setup.name, []).extend(images_per_second(store, name))
            print(f"{name}: {statistics.median(speeds[setup.name]):,.0f} img/s so far", flush=True)
    base = statistics.median(next(iter(speeds.values())))
    print(f"\n{args.model} on {args.device}, {args.epochs} epochs x {args.rounds} rounds "
          f"(median of epochs 2..{args.epochs}):\n")
    print("| setup | images/s | relative |\n|---|---|---|")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
