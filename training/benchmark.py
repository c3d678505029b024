"""Seconds per epoch and inference speed of each model on each device, side by side.

    python -m training.benchmark --data-dir ~/data/cifar10 [--models mlp,cnn] [--devices cpu,cuda]

Every model trains on every available device (and, on the CPU, with 1 thread and with all of
them) on the same images, seed and batch size, through the same training step as
training.train. Warm-up batches are excluded. Each measurement is one MLflow run in the
`benchmark` experiment under a parent run that holds the report: a markdown table with each
device's speed-up over the CPU, a bar chart, and the same files in --out.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are files: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch
from torch import nn

from shared.command import run_command
from shared.messages import shown
from shared.network import InputTransform
from shared.preprocess import Preprocessing
from shared.store import tracking_uri, ui_command, use_store
from training.engine.batches import Augmentation, DeviceLoader, Sampling
from training.engine.build import random_rows, resolve_precision
from training.engine.data import channel_stats, load_dataset
from training.engine.device import DeviceError, describe_device, resolve_device
from training.engine.loop import autocast_for, train_epoch
from training.engine.models import MODELS, ModelError, build_model, input_size_for, is_convolutional
from training.engine.optim import OptimizerSettings, make_optimizer
from training.engine.state import TrainingState


def available_devices(names: list[str], log=print) -> list[str]:
    """The named devices this machine has; the others are reported and skipped."""
    found = []
    for name in names:
        try:
            resolve_device(name)
            found.append(name)
        except DeviceError as exc:
            log(f"skipping {name}: {exc}")
    return found


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, Linux KiB


def measure(model_name: str, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
            prep: Preprocessing, batch_size: int, epochs: int, seed: int) -> dict[str, float]:
    """Train `epochs` timed epochs after a warm-up, then time inference."""
    torch.manual_seed(seed)
    model = build_model(model_name, int(labels.max()) + 1, prep.image_size).to(device)
    conv = is_convolutional(model)
    if conv:
        model = model.to(memory_format=torch.channels_last)
    precision = resolve_precision("auto", device)
    autocast = autocast_for(device, precision)
    x, y = images.to(device), labels.to(device)
    augmented = Sampling(shuffle=True, seed=seed, augmentation=Augmentation(4, flip="random"),
                         drop_last=True)
    loader = DeviceLoader(x, y, batch_size, InputTransform(prep), augmented, channels_last=conv)
    warmup = DeviceLoader(x[:batch_size * 3], y[:batch_size * 3], batch_size, InputTransform(prep),
                          channels_last=conv)
    # plain momentum SGD from the optimizers' registry: the step, not the recipe
    sgd = make_optimizer("sgd", model, OptimizerSettings(lr=0.01, momentum=0.9))
    state = TrainingState(model, sgd, warmup)
    loss_fn = nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_epoch(model, state, loss_fn, autocast=autocast)
    state.loader = loader
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        train_epoch(model, state, loss_fn, autocast=autocast)  # reads its sums: synced
        seconds.append(time.perf_counter() - start)
    per_epoch = statistics.median(seconds)
    model.eval()
    batch = loader.prepare(x[:256])
    with torch.no_grad(), autocast():
        model(batch[:8])
        start = time.perf_counter()
        model(batch).float().sum().item()
        inference = len(batch) / (time.perf_counter() - start)
        latencies = []
        for i in range(20):
            start = time.perf_counter()
            model(batch[i:i + 1]).float().sum().item()
            latencies.append(time.perf_counter() - start)
    return {"seconds_per_epoch": per_epoch, "images_per_second": loader.num_images / per_epoch,
            "peak_memory_mb": peak_memory_mb(device), "inference_images_per_second": inference,
            "latency_ms": statistics.median(latencies) * 1000, "precision": precision}


def report(rows: list[dict], gpu: bool) -> tuple[str, object]:
    """Markdown table with speed-ups over the all-threads CPU, and a bar chart."""
    base = {r["model"]: r["seconds_per_epoch"] for r in rows if r["setting"] == "cpu (all threads)"}
    lines = [] if gpu else ["No GPU (CUDA or MPS) is available on this machine, so this report "
                            "compares the CPU with 1 thread against all its threads.", ""]
    lines += ["| model | device | threads | precision | batch | s/epoch | images/s | speed-up vs "
              "CPU | peak memory (MB) | inference images/s | latency (ms) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = base.get(r["model"], float("nan")) / r["seconds_per_epoch"]
        lines.append(f"| {r['model']} | {r['device_name']} | {r['threads']} | {r['precision']} | "
                     f"{r['batch_size']} | {r['seconds_per_epoch']:.2f} | {r['images_per_second']:,.0f} | "
                     f"{speedup:.2f}x | {r['peak_memory_mb']:,.0f} | "
                     f"{r['inference_images_per_second']:,.0f} | {r['latency_ms']:.2f} |")
    models = list(dict.fromkeys(r["model"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(models)), 4.5))
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        values = [next((r["seconds_per_epoch"] for r in rows
                        if r["model"] == m and r["setting"] == setting), 0)
                  for m in models]
        ax.bar([j + i * width for j in range(len(models))], values, width, label=setting)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(models))], models)
    ax.set(ylabel="seconds per epoch", title="seconds per epoch (lower is better)")
    ax.legend()
    fig.tight_layout()
    return "\n".join(lines) + "\n", fig


@dataclass
class Plan:
    """What to measure: models x devices, on `images` training images of `data_dir`."""

    data_dir: str
    models: list[str]
    devices: list[str]
    epochs: int = 1
    images: int = 10_000
    batch_size: int | None = None  # None: each model's recipe
    seed: int = 0


def settings(devices: list[str]) -> list[tuple[str, int | None]]:
    """(device, CPU threads): the CPU with all its threads and with one, then the others."""
    others = [(d, None) for d in devices if d != "cpu"]
    if "cpu" not in devices:
        return others
    threads = torch.get_num_threads()
    return [("cpu", threads)] + ([("cpu", 1)] if threads > 1 else []) + others


def log_row(row: dict, images: int, epochs: int) -> None:
    import mlflow

    mlflow.log_params({k: row[k] for k in ("model", "setting", "device", "device_name",
                                            "threads", "batch_size", "precision")}
                      | {"images": images, "epochs": epochs})
    mlflow.log_metrics({k: row[k] for k in ("seconds_per_epoch", "images_per_second",
                                             "peak_memory_mb", "inference_images_per_second",
                                             "latency_ms")})


def write_report(rows: list[dict], gpu: bool, out: Path) -> str:
    import mlflow

    table, fig = report(rows, gpu)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(table)
    fig.savefig(out / "seconds_per_epoch.png", dpi=110)
    plt.close(fig)
    mlflow.log_artifacts(str(out))
    mlflow.set_tag("gpu_available", str(gpu))
    return table


def benchmark(plan: Plan, out: Path, uri: str, log=print) -> list[dict]:
    import mlflow

    from training.tracking.publish import ensure_experiment

    for name in plan.models:
        if name not in MODELS:
            raise ModelError(f"unknown model {shown(name)}; choose from {', '.join(MODELS)}")
    devices = available_devices(plan.devices, log)
    if not devices:
        raise DeviceError("none of the requested devices is available")
    use_store(uri)  # before any measurement: a store that cannot take them is refused first
    data = load_dataset(plan.data_dir, log=log)
    count = min(plan.images, len(data.train_labels))
    subset = random_rows(len(data.train_labels), count, plan.seed)
    x, y = data.train_images[subset], data.train_labels[subset]
    mean, std = channel_stats(x)
    gpu = any(d != "cpu" for d in devices)
    experiment_id = ensure_experiment("benchmark", uri)
    rows, plan_settings = [], settings(devices)
    all_threads = torch.get_num_threads()
    with mlflow.start_run(experiment_id=experiment_id, run_name="device-benchmark") as parent:
        for model_name in plan.models:
            batch = min(count, plan.batch_size or MODELS[model_name].recipe.get("batch_size", 128))
            prep = Preprocessing(data.image_size, input_size_for(model_name, data.image_size),
                                 mean, std)
            for device_name, threads in plan_settings:
                device = resolve_device(device_name)
                torch.set_num_threads(threads or all_threads)
                setting = (f"cpu ({'all threads' if threads == all_threads else f'{threads} thread'})"
                           if device.type == "cpu" else device_name)
                log(f"{model_name} on {setting}: {plan.epochs} timed epoch(s) of {count} images, "
                    f"batch {batch}")
                result = measure(model_name, device, x, y, prep, batch, plan.epochs, plan.seed)
                info = describe_device(device)
                row = {"model": model_name, "setting": setting, "device": device.type,
                       "device_name": info["device_name"] if device.type != "cpu" else info["cpu_name"],
                       "threads": torch.get_num_threads(), "batch_size": batch, **result}
                rows.append(row)
                with mlflow.start_run(experiment_id=experiment_id, nested=True,
                                      run_name=f"{model_name}-{setting}"):
                    log_row(row, count, plan.epochs)
        torch.set_num_threads(all_threads)
        table = write_report(rows, gpu, out)
        log(f"\n{table}\nreport in {out}/ and in run {parent.info.run_id} (see it: {ui_command(uri)})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="as for training.train")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--devices", default="cpu,cuda,mps",
                        help="devices to compare; unavailable ones are reported and skipped")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per measurement")
    parser.add_argument("--images", type=int, default=10_000, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, help="default: each model's recipe")
    parser.add_argument("--out", type=Path, default=None, help="default: reports/benchmark-<time>")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.images < 1:
        print("error: --epochs and --images must be at least 1", file=sys.stderr)
        return 2
    out = args.out or Path("reports") / time.strftime("benchmark-%Y%m%d-%H%M%S")

    def body() -> int:
        plan = Plan(args.data_dir, args.models.split(","), args.devices.split(","), args.epochs,
                    args.images, args.batch_size)
        benchmark(plan, out, tracking_uri(args.tracking_uri))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
