"""Predictions as CSV: one row per file, shared by the app's export and gui.classify."""
from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from shared.files import display_name

if TYPE_CHECKING:
    from shared.inference import Prediction

HEADER = ["file", "predicted_class", "confidence", "unsure", "top5", "error"]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def cell(text: str) -> str:
    """Text a spreadsheet shows as text: any name is printable (display_name), and a cell that
    would start a formula (=, +, -, @) is prefixed with an apostrophe."""
    text = display_name(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_csv(predictions: Iterable[Prediction], out: TextIO) -> int:
    """Write the rows; returns how many. unsure is "yes" when the confidence is under the
    model's unsure threshold (maybe none of its classes); top5 reads 'class:probability; ...'."""
    writer = csv.writer(out)
    writer.writerow(HEADER)
    count = 0
    for p in predictions:
        top = "; ".join(f"{name}:{prob:.4f}" for name, prob in p.top)
        unsure = ("yes" if p.unsure else "no") if p.top else ""
        writer.writerow([cell(p.path), cell(p.label), f"{p.confidence:.4f}" if p.top else "",
                         unsure, cell(top), cell(p.error or "")])
        count += 1
    return count
