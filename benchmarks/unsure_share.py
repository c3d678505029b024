"""How the unsure flag does: the share of images each model flags on in-domain test images
against out-of-domain ones, and the AUROC of its top probability separating the two (1.0:
perfectly apart, 0.5: no better than chance).

    python benchmarks/unsure_share.py --tracking-uri sqlite:///mlruns/mlflow.db \
        --models cifar10-cnn/2 --in-domain ~/data/cifar10/test --every 10 --ood ~/data/ood

Out-of-domain sets: the images in --ood (real photos of other things), and three made from
nothing but a seed: uniform noise, smooth random colour fields, and the in-domain images with
their 8x8 patches shuffled (same colours and textures, no object). The AUROC of the energy
score (log-sum-exp of the scores) is given beside the top probability's, for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.files import image_files  # noqa: E402
from shared.inference import load_classifier  # noqa: E402
from shared.preprocess import IMAGE_SUFFIXES  # noqa: E402
from shared.store import tracking_uri, use_store  # noqa: E402


def noise(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def smooth(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 255
    return F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 255).to(torch.uint8)


def shuffled(images: torch.Tensor, g: torch.Generator, patch: int = 8) -> torch.Tensor:
    n, c, s, _ = images.shape
    k = s // patch
    tiles = images[:, :, :k * patch, :k * patch].unfold(2, patch, patch).unfold(3, patch, patch)
    tiles = tiles.reshape(n, c, k * k, patch, patch)
    order = torch.stack([torch.randperm(k * k, generator=g) for _ in range(n)])
    tiles = tiles[torch.arange(n)[:, None], :, order].permute(0, 2, 1, 3, 4)
    grid = tiles.reshape(n, c, k, k, patch, patch).permute(0, 1, 2, 4, 3, 5)
    return grid.reshape(n, c, k * patch, k * patch)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an in-domain image's top probability > an out-of-domain one's), ties half."""
    greater = (inside[:, None] > outside[None, :]).double().mean()
    ties = (inside[:, None] == outside[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def scores(clf, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's top probability (the unsure rule's score) and negative energy, the
    log-sum-exp of its calibrated scores (Liu et al., 2020), for comparison."""
    logits = clf.scores(images)
    return torch.softmax(logits, 1).max(1).values, torch.logsumexp(logits, 1)


def rows_for(name: str, in_files: list[Path], ood_files: list[Path], n_made: int) -> list[dict]:
    clf = load_classifier(f"models:/{name}")
    below = clf.calibration.unsure_below
    if below is None:
        raise SystemExit(f"{name} has no unsure threshold (trained without a validation split)")
    g = torch.Generator().manual_seed(0)
    size = clf.prep.image_size
    inside = clf.load_images(in_files)
    sets = {"in-domain test": inside, "shuffled 8x8 patches": shuffled(inside, g),
            "uniform noise": noise(n_made, size, g), "smooth colour fields": smooth(n_made, size, g)}
    if ood_files:
        sets["real photos of other things"] = clf.load_images(ood_files)
    both = {label: scores(clf, images) for label, images in sets.items()}
    tops = {label: top for label, (top, _) in both.items()}
    labels = torch.tensor([clf.classes.index(p.parent.name) for p in in_files])
    right = clf.scores(inside).argmax(1) == labels
    flagged_in = tops["in-domain test"] < below
    rows = []
    for label, top in tops.items():
        row = {"model": name, "threshold": below, "set": label, "images": len(top),
               "flagged": float((top < below).double().mean())}
        if label != "in-domain test":
            row["auroc"] = auroc(tops["in-domain test"], top)
            row["auroc_energy"] = auroc(both["in-domain test"][1], both[label][1])
        else:
            row["error_rate_flagged"] = float((~right[flagged_in]).double().mean())
            row["error_rate_kept"] = float((~right[~flagged_in]).double().mean())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--models", required=True, help="comma-separated NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--in-domain", type=Path, required=True, help="a folder of <class>/<image>")
    parser.add_argument("--every", type=int, default=10, help="use every Nth in-domain image")
    parser.add_argument("--ood", type=Path, help="a folder of out-of-domain images")
    parser.add_argument("--made", type=int, default=1000, help="images per generated set")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    use_store(tracking_uri(args.tracking_uri))
    in_files = sorted(p for p in args.in_domain.glob("*/*")
                      if p.suffix.lower() in IMAGE_SUFFIXES)[::args.every]
    ood_files = [p for p in image_files(args.ood) if p.suffix.lower() in IMAGE_SUFFIXES] if args.ood else []
    rows = [r for name in args.models.split(",") for r in rows_for(name, in_files, ood_files, args.made)]
    print("| model | threshold | images | flagged unsure | AUROC vs in-domain | AUROC, energy score "
          "| notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        note = (f"error rate {r['error_rate_flagged']:.1%} among flagged, "
                f"{r['error_rate_kept']:.1%} among kept" if "error_rate_kept" in r else "")
        auc = f"{r['auroc']:.3f} | {r['auroc_energy']:.3f}" if "auroc" in r else " | "
        print(f"| {r['model']} | {r['threshold']:.3f} | {r['set']} ({r['images']}) | "
              f"{r['flagged']:.1%} | {auc} | {note} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
