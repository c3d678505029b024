"""Predictions as CSV: one row per file, shared by the app's export and gui.classify."""
from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from shared.inference import Prediction

HEADER = ["file", "predicted_class", "confidence", "top5", "error"]


def write_csv(predictions: Iterable[Prediction], out: TextIO) -> int:
    """Write the rows; returns how many. top5 reads 'class:probability; ...'."""
    writer = csv.writer(out)
    writer.writerow(HEADER)
    count = 0
    for p in predictions:
        top = "; ".join(f"{name}:{prob:.4f}" for name, prob in p.top)
        writer.writerow([p.path, p.label, f"{p.confidence:.4f}" if p.top else "", top, p.error or ""])
        count += 1
    return count
