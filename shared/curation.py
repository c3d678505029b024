"""Changes the app makes to a user's training folder, and only these: a corrected photo copied
into a class folder (undone by removing that copy), and label decisions applied on
confirmation (relabelled images copied to their class, then the original moved to
`excluded/`; excluded images moved there). Nothing is deleted that the app did not write, and
nothing is overwritten: a name already taken gets a number.
"""
from __future__ import annotations

import csv
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shared.messages import BadInput

DECISIONS = ("keep", "relabel", "exclude")
LOG_COLUMNS = ("time", "file", "given", "decision", "new_label", "moved_to", "copied_to")


class CurationError(BadInput):
    """A change the folder cannot take; the message says why and what to do."""


def free_name(path: Path) -> Path:
    """`path`, or `stem-2.ext`, `stem-3.ext`… : the first name not taken."""
    if not os.path.lexists(path):
        return path
    n = 2
    while os.path.lexists(candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")):
        n += 1
    return candidate


def class_root(folder: Path) -> Path:
    """Where class folders go: `train/` for a folder split into train/ and test/."""
    return folder / "train" if (folder / "train").is_dir() else folder


def valid_class(name: str) -> str:
    name = name.strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise CurationError(f"{name!r} cannot be a class name: use a plain folder name "
                            "(letters, digits, spaces), no '/' and not starting with '.'")
    return name


@dataclass(frozen=True)
class Correction:
    """A photo copied into a class folder; `created_folder` when the class folder is new."""

    source: Path
    copy: Path
    label: str
    created_folder: Path | None


def add_to_class(photo: Path, folder: Path, label: str) -> Correction:
    """Copy `photo` into `label`'s folder of the training folder `folder` (never a move)."""
    label = valid_class(label)
    if not Path(folder).is_dir():
        raise CurationError(f"the training folder {folder} does not exist: choose it again")
    if not Path(photo).is_file():
        raise CurationError(f"{photo} is gone; it cannot be added")
    target_folder = class_root(Path(folder)) / label
    created = None if target_folder.is_dir() else target_folder
    try:
        target_folder.mkdir(parents=True, exist_ok=True)
        copy = free_name(target_folder / Path(photo).name)
        shutil.copy2(photo, copy)
    except OSError as exc:
        raise CurationError(f"cannot copy {Path(photo).name} into {target_folder}: "
                            f"{exc.strerror or exc}") from None
    return Correction(Path(photo), copy, label, created)


def undo(correction: Correction) -> None:
    """Remove the copy a correction made (and the class folder it made, if left empty)."""
    try:
        correction.copy.unlink(missing_ok=True)
        if correction.created_folder and not any(correction.created_folder.iterdir()):
            correction.created_folder.rmdir()
    except OSError as exc:
        raise CurationError(f"cannot undo: {correction.copy}: {exc.strerror or exc}") from None


@dataclass
class Decision:
    file: str  # relative to the dataset folder, as training.label_issues writes it
    given: str
    decision: str = "keep"
    new_label: str = ""


def excluded_folder(dataset: Path) -> Path:
    """`excluded/<dataset name>/` beside the dataset: out of its reach, never deleted."""
    return Path(dataset).parent / "excluded" / Path(dataset).name


def decisions_log(dataset: Path) -> Path:
    return Path(dataset).parent / f"{Path(dataset).name}-label-decisions.csv"


def check(dataset: Path, decisions: list[Decision]) -> None:
    """Every change possible before any is made: files present, relabelled ones in a folder
    named for their class."""
    for d in decisions:
        if d.decision not in DECISIONS:
            raise CurationError(f"{d.file}: decision {d.decision!r} is not one of {', '.join(DECISIONS)}")
        if d.decision == "keep":
            continue
        path = Path(dataset) / d.file
        if not path.is_file():
            raise CurationError(f"{d.file} is no longer in {dataset}: look again (find the "
                                "mislabelled images anew)")
        if d.decision == "relabel":
            valid_class(d.new_label)
            if path.parent.name != d.given:
                raise CurationError(f"{d.file} is not in a folder named for its class {d.given!r}: "
                                    "relabel it in your labels file instead")


def apply(dataset: Path, decisions: list[Decision]) -> list[dict]:
    """Carry out the decisions (all checked first); each change appended to the log beside the
    dataset. The log's rows come back."""
    dataset = Path(dataset)
    check(dataset, decisions)
    aside = excluded_folder(dataset)
    rows = []
    for d in decisions:
        row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "file": d.file, "given": d.given,
               "decision": d.decision, "new_label": d.new_label, "moved_to": "", "copied_to": ""}
        path = dataset / d.file
        try:
            if d.decision == "relabel":
                target = free_name(path.parent.parent / valid_class(d.new_label) / path.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                row["copied_to"] = str(target.relative_to(dataset))
            if d.decision in ("relabel", "exclude"):
                moved = free_name(aside / d.file)
                moved.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, moved)
                row["moved_to"] = str(moved)
        except OSError as exc:
            _append_log(dataset, rows)
            raise CurationError(f"{d.file}: {exc.strerror or exc}; the {len(rows)} change(s) "
                                f"before it are done and listed in {decisions_log(dataset)}") from None
        rows.append(row)
    _append_log(dataset, rows)
    return rows


def _append_log(dataset: Path, rows: list[dict]) -> None:
    log = decisions_log(dataset)
    new = not log.exists()
    with log.open("a", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_decisions(path: Path, decisions: list[Decision]) -> Path:
    """The decisions as a CSV (the run's artifact), keep included."""
    with Path(path).open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("file", "given", "decision", "new_label"))
        writer.writerows((d.file, d.given, d.decision, d.new_label) for d in decisions)
    return Path(path)
