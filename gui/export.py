"""Predictions as CSV: one row per file, shared by the app's export and gui.classify."""
from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
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


def submission_ids(paths: Iterable[str | Path]) -> dict[str, str]:
    """Each file's id in a competition submission: its name without the extension. Raises
    ValueError naming two files that would share an id."""
    ids: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in ids:
            raise ValueError(f"{display_name(ids[stem])} and {display_name(str(path))} would share "
                             f"the id {display_name(stem)}")
        ids[stem] = str(path)
    return {str(path): stem for stem, path in ids.items()}


def write_submission(predictions: Iterable[Prediction], out: TextIO) -> list[str]:
    """Kaggle's submission format: id,label rows (id = the file's name without extension),
    numeric ids in numeric order. Returns the files left out because they could not be read."""
    rows, unreadable = [], []
    for p in predictions:
        if p.error is not None:
            unreadable.append(p.path)
        else:
                    rows.append((Path(p.path).stem, p.label))
    rows.sort(key=lambda row: (0, int(row[0]), "") if row[0].isdigit() else (1, 0, row[0]))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows((cell(file_id), cell(label)) for file_id, label in rows)
    return unreadable
