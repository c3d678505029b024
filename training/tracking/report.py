"""Figures and tables of a finished run: learning curves, confusion matrix, per-class scores."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from training.engine.models import count_parameters  # noqa: E402


def curves_figure(history: list[dict[str, float]], best_epoch: int) -> plt.Figure:
    epochs = range(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], label="train")
        if all(f"val_{metric}" in h for h in history):
            ax.plot(epochs, [h[f"val_{metric}"] for h in history], label="validation")
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def class_counts_figure(counts: dict[str, dict[str, int]]) -> plt.Figure:
    """Images per class, one bar per split (counts: split -> class -> images)."""
    classes = list(next(iter(counts.values())))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.45 * len(classes)), 3.8))
    bottom = [0] * len(classes)
    for split, per_class in counts.items():
        heights = [per_class[c] for c in classes]
        ax.bar(range(len(classes)), heights, bottom=bottom, label=split)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set(ylabel="images", title="images per class")
    ax.legend()
    fig.tight_layout()
    return fig


def class_counts_csv(counts: dict[str, dict[str, int]]) -> str:
    splits = list(counts)
    rows = ["class," + ",".join(splits)]
    rows += [f"{c}," + ",".join(str(counts[s][c]) for s in splits) for c in next(iter(counts.values()))]
    return "\n".join(rows) + "\n"


def confusion_figure(confusion: torch.Tensor, classes: list[str],
                     title: str = "test set confusion matrix") -> plt.Figure:
    n = len(classes)
    side = max(4.5, 1.5 + 0.6 * n)
    fig, ax = plt.subplots(figsize=(side, side - 0.4))
    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def confusion_csv(confusion: torch.Tensor, classes: list[str]) -> str:
    rows = ["true\\predicted," + ",".join(classes)]
    rows += [f"{c}," + ",".join(str(int(v)) for v in confusion[i]) for i, c in enumerate(classes)]
    return "\n".join(rows) + "\n"


def per_class_scores(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class."""
    c = confusion.double()
    tp = c.diag()
    precision = tp / c.sum(0).clamp_min(1)
    recall = tp / c.sum(1).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return [{"class": name, "precision": round(precision[i].item(), 4),
             "recall": round(recall[i].item(), 4), "f1": round(f1[i].item(), 4),
             "support": int(c[i].sum())} for i, name in enumerate(classes)]


def skipped_csv(skipped: list[list[str]]) -> str:
    """The files that could not be read, with why: file,reason rows, quoted where needed."""
    import csv
    import io
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([("file", "reason"), *skipped])
    return out.getvalue()


def scores_csv(scores: list[dict]) -> str:
    header = list(scores[0])
    return "\n".join([",".join(header)] + [",".join(str(s[k]) for k in header) for s in scores]) + "\n"


def reliability_figure(bins: list[dict], ece: float, ece_raw: float) -> plt.Figure:
    """Accuracy against confidence per bin (a calibrated model follows the diagonal), with
    how many images each bin holds."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"]
    filled = [b for b in bins if b["count"]]
    top.bar([(b["low"] + b["high"]) / 2 for b in filled], [b["accuracy"] for b in filled],
            width=width * 0.95, color="tab:blue", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o-",
             color="tab:orange", markersize=3, label="mean confidence")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
            title=f"reliability: ECE {ece:.4f} (before temperature {ece_raw:.4f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, [b["count"] for b in bins], width=width * 0.95, color="tab:grey")
    bottom.set(xlabel="confidence (top probability)", ylabel="images")
    fig.tight_layout()
    return fig


def mistakes_figure(images: torch.Tensor, captions: list[str], columns: int = 6) -> plt.Figure:
    """A gallery of uint8 (N, 3, H, W) images, each with its caption."""
    rows = max(1, -(-len(captions) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    return fig


def confused_pairs(confusion: torch.Tensor, classes: list[str], top: int = 10) -> list[dict]:
    """The class pairs most often mistaken for each other, both directions added up."""
    n = len(classes)
    pairs = [{"first": classes[i], "second": classes[j], "first_as_second": int(confusion[i, j]),
              "second_as_first": int(confusion[j, i]), "total": int(confusion[i, j] + confusion[j, i])}
             for i in range(n) for j in range(i + 1, n)]
    return sorted((p for p in pairs if p["total"]), key=lambda p: -p["total"])[:top]


def model_summary(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    trainable, total = count_parameters(model)
    out = io.StringIO()
    out.write(f"input: {input_shape}\nparameters: {total:,} total, {trainable:,} trainable\n\n")
    out.write(f"{'layer':<40} {'parameters':>12} {'trainable':>10}\n")
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            count = sum(p.numel() for p in own)
            out.write(f"{name:<40} {count:>12,} {str(all(p.requires_grad for p in own)):>10}\n")
    out.write(f"\n{model}\n")
    return out.getvalue()
