"""Training throughput of the seed studies' own input pipelines against ours, side by side.

The seed pipelines, copied faithfully: a torch DataLoader over the PNG files (torchvision
ImageFolder), per-image PIL decoding and torchvision transforms.
- CNN study: RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize,
  batch 200, SGD (lr 0.01, momentum 0.9), 4 workers (fewer on a smaller machine).
- MLP study: ToTensor + Normalize, batch 64, Adam (lr 1e-3).
Ours: the whole dataset as one uint8 tensor on the device (training.engine.batches.DeviceLoader), same
augmentation done per batch on the device, at the seed's batch size and at our recipe's.

Every pipeline feeds the same model through the same training step, so only the input path
differs. Rounds alternate between pipelines (the machine is shared and noisy); the table gives
the median images/s of each and its ratio to the seed pipeline.

    python benchmarks/pipeline_speed.py --data-dir ~/data/cifar10 [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.network import InputTransform  # noqa: E402
from shared.preprocess import Preprocessing  # noqa: E402
from training.engine.batches import Augmentation, DeviceLoader, Sampling  # noqa: E402
from training.engine.data import channel_stats, load_dataset  # noqa: E402
from training.engine.device import describe_device, resolve_device  # noqa: E402
from training.engine.models import MODELS, build_model, is_convolutional  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SEED = {  # the seed studies' settings
    "cnn": {"batch_size": 200, "augment": True,
            "optimizer": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)},
    "mlp": {"batch_size": 64, "augment": False, "optimizer": lambda p: torch.optim.Adam(p, lr=1e-3)},
}


def seed_loader(data_dir: Path, model: str, workers: int, device: torch.device):
    from torchvision import datasets, transforms
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] \
        if SEED[model]["augment"] else []
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    dataset = datasets.ImageFolder(str(data_dir / "train"), transform=transforms.Compose(steps))
    return torch.utils.data.DataLoader(dataset, batch_size=SEED[model]["batch_size"], shuffle=True,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0, drop_last=True)


def our_loader(images, labels, model: str, batch_size: int, channels_last: bool, mean, std):
    augment = SEED[model]["augment"]
    prep = Preprocessing(32, 32, mean, std)
    augmentation = Augmentation(4, flip="random") if augment else Augmentation()
    return DeviceLoader(images, labels, batch_size, InputTransform(prep),
                        Sampling(shuffle=True, augmentation=augmentation, drop_last=True),
                        channels_last=channels_last)


def images_per_second(loader, model: nn.Module, optimizer, device: torch.device, batches: int,
                      warmup: int = 3) -> float:
    """Steady-state training throughput over `batches` batches after `warmup` batches."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    seen, start = 0, None
    iterator = iter(loader)
    for i in range(warmup + batches):
        try:
            x, y = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            x, y = next(iterator)
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            seen += y.shape[0]
    loss.item()  # waits for the device
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="CIFAR-10 as an image folder (train/<class>/*.png)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10_000,
                        help="images per timed measurement (after warm-up)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of the seed pipelines (the seed used 4)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = load_dataset(args.data_dir)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    mean, std = channel_stats(data.train_images)
    info = describe_device(device)
    print(f"device: {info['device_name']}; seed pipelines with {args.workers} DataLoader workers; "
          f"{args.rounds} alternating rounds of {args.images} images each")

    rows = []
    for name in args.models.split(","):
        seed_batch = SEED[name]["batch_size"]
        recipe_batch = MODELS[name].recipe["batch_size"]
        conv = is_convolutional(build_model(name, 10, 32))
        pipelines = {
            f"seed pipeline (batch {seed_batch})": seed_loader(args.data_dir, name, args.workers, device),
            f"ours (batch {seed_batch})": our_loader(images, labels, name, seed_batch, conv, mean, std)}
        if recipe_batch != seed_batch:
            pipelines[f"ours (batch {recipe_batch}, default recipe)"] = our_loader(
                images, labels, name, recipe_batch, conv, mean, std)
        results = {label: [] for label in pipelines}
        for _ in range(args.rounds):
            for label, loader in pipelines.items():
                torch.manual_seed(0)
                model = build_model(name, 10, 32).to(device)
                if conv and label.startswith("ours"):
                    model = model.to(memory_format=torch.channels_last)
                batches = max(5, args.images // loader.batch_size)
                results[label].append(images_per_second(
                    loader, model, SEED[name]["optimizer"](model.parameters()), device, batches))
        base = statistics.median(next(iter(results.values())))
        for label, values in results.items():
            rate = statistics.median(values)
            rows.append({"model": name, "pipeline": label, "images_per_s": round(rate),
                         "s_per_epoch_45k": round(45_000 / rate, 2), "ratio": round(rate / base, 2),
                         "spread": f"{min(values):.0f}-{max(values):.0f}"})

    print("\n| model | pipeline | images/s (median) | s per 45k-image epoch | vs seed | range |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['pipeline']} | {r['images_per_s']:,} | {r['s_per_epoch_45k']} | "
              f"{r['ratio']}x | {r['spread']} |")
    if args.out:
        args.out.write_text(json.dumps({"device": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
