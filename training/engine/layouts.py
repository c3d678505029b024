"""Where a dataset's images are and how they are labelled: the folder layouts recognised.

`find_layout` looks at a folder and names what it holds, first match wins:

- `torchvision`: torchvision's CIFAR-10 (ROOT/cifar-10-batches-py, or its archive). An empty
  or missing folder is the only one ever downloaded into.
- `split-folders`: ROOT/train/<class>/* and ROOT/test/<class>/*; a ROOT/val/ (or valid/)
  of the same form is the validation split, used as it is.
- `labels-file`: ROOT/train/* images and a CSV of file id and label (Kaggle's
  ROOT/trainLabels.csv is found by itself; --labels FILE names another). A test split is held
  out of the labelled images, as for class folders (Kaggle's test/ has no labels).
- `class-folders`: ROOT/<class>/* with no split (torchvision's ImageFolder, Keras'
  image_dataset_from_directory). A fixed, stratified test split is held out.

A held-out test split depends only on the file names and --test-fraction: per class, the files
whose hash of their path comes first. It is the same for every run, seed and model, and a
file added later does not move the others between splits.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shared.files import display_name
from shared.messages import BadInput
from shared.preprocess import IMAGE_SUFFIXES

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
KAGGLE_LABELS = "trainLabels.csv"
VAL_FOLDERS = ("val", "valid", "validation")
LAYOUTS = {
    "split-folders": "train/<class>/* and test/<class>/* (and val/<class>/* if you have one)",
    "class-folders": "<class>/* with no split: a test split is held out for you",
    "labels-file": f"train/* images with a CSV of id,label ({KAGGLE_LABELS} beside train/, "
                   "or --labels FILE)",
    "torchvision": f"torchvision's CIFAR-10 ({CIFAR10_FOLDER}/, or an empty folder to download "
                   "it into)",
    "shards": "WebDataset shards with their manifest.json (python -m training.shards SRC OUT "
              "writes them)",
}
CARVED = ("class-folders", "labels-file")  # the layouts whose test split this project holds out


class DatasetError(BadInput):
    """A dataset is missing, incomplete, unreadable or in no known layout; the message says
    how to fix it."""


@dataclass(frozen=True)
class Source:
    """What to read: a folder, an optional labels file, the share of a split-less dataset
    held out for testing."""

    root: Path
    labels: Path | None = None
    test_fraction: float = 0.1


@dataclass
class Found:
    """A dataset's files, labelled and split: `splits` maps "train", "test" and, when given,
    "val" to (path, class index) pairs in a fixed order."""

    layout: str
    root: Path
    classes: list[str] = field(default_factory=list)
    splits: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def carved(self) -> bool:
        return self.layout in CARVED

    def relative(self, path: Path) -> str:
        """A file's name in the run's lists: relative to the root, printable."""
        return display_name(path.relative_to(self.root).as_posix())

    def all_files(self) -> list[Path]:
        return [path for items in self.splits.values() for path, _ in items]


def find_layout(source: Source) -> Found:
    root = source.root
    if not root.exists() or not _visible(root):
        return Found("torchvision", root)
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder: --data-dir names the folder that "
                          "holds the dataset")
    if (root / CIFAR10_FOLDER).is_dir() or (root / CIFAR10_ARCHIVE).is_file():
        return Found("torchvision", root)
    if (root / "manifest.json").is_file():
        from training.engine.shards import found_shards  # shards.py builds on this module
        return found_shards(root)
    labels = source.labels or (root / KAGGLE_LABELS if (root / KAGGLE_LABELS).is_file() else None)
    train = root / "train"
    if train.is_dir() and labels is not None:
        return _labels_file(root, train, labels, source.test_fraction)
    if train.is_dir() and class_dirs(train):
        return _split_folders(root)
    if train.is_dir() and _images_in(train):
        raise DatasetError(f"{train} holds images but no class folders, and no labels file was "
                          f"found: put {KAGGLE_LABELS} (id,label) beside train/, or pass "
                          "--labels FILE, or sort the images into train/<class>/ folders")
    if source.labels is not None:
        raise DatasetError(f"--labels {source.labels} needs the images it labels in {train}, "
                          "which is not there")
    classes = class_dirs(root)
    if classes:
        return _class_folders(root, classes, source.test_fraction)
    raise DatasetError(_unknown_message(root))


def _visible(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if not n.startswith(".")] if folder.is_dir() else ["?"]


def _unknown_message(root: Path) -> str:
    entries = sorted(_visible(root))
    shown = ", ".join(display_name(n) for n in entries[:6]) + (", ..." if len(entries) > 6 else "")
    loose = len(_images_in(root))
    found = (f"{loose} image(s) with no class folders" if loose else
             f"{len(entries)} entries ({shown}) but no images in class folders")
    return f"{root} holds {found}. {layouts_read()}. Nothing was written into {root}."


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder` (hidden ones aside), sorted by name."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if not e.name.startswith(".")
                      and Path(e.name).suffix.lower() in IMAGE_SUFFIXES and not e.is_dir())


def _images_under(folder: Path) -> list[Path]:
    """The image files in `folder` and its sub-folders (hidden ones aside), sorted. Linked
    folders are followed, each real folder once and never one above `folder` (so a link loop
    ends there); a folder named like an image (`x.png`, or a link to a folder) is listed, not
    entered, so that the decoder skips it and says so."""
    found, seen, top = [], set(), os.path.realpath(folder)
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen or top.startswith(real.rstrip(os.sep) + os.sep):  # a way back up
            dirs[:] = []
            continue
        seen.add(real)
        named = [d for d in dirs if Path(d).suffix.lower() in IMAGE_SUFFIXES]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in named)
        found += [Path(here, f) for f in sorted([*files, *named]) if not f.startswith(".")
                  and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def class_dirs(folder: Path) -> dict[str, list[Path]]:
    """Each visible sub-folder that holds images (at any depth) -> its image files. A
    sub-folder holding no images is not a class."""
    classes = {}
    for entry in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images_under(entry)
        if files:
            classes[entry.name] = files
    return classes


def _split_folders(root: Path) -> Found:
    train = class_dirs(root / "train")
    if len(train) < 2:
        raise DatasetError(f"{root / 'train'} holds images for {len(train)} class folder(s); a "
                          "classifier needs at least 2 (one sub-folder of images per class)")
    classes = sorted(train)
    found = Found("split-folders", root, classes, {"train": _labelled(train, classes)})
    val = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if not (root / "test").is_dir():
        given = f" and {val.name}/" if val else ""
        raise DatasetError(f"{root} has train/<class>/{given} folders but no test/ folder. Add "
                          "test/<class>/* (the test set is used once, for the final "
                          "evaluation), or move the class folders up into the root to have "
                          "a test split held out for you")
    for split, folder in (("val", val), ("test", root / "test")):
        if folder is None:
            continue
        per_class = class_dirs(folder)
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise DatasetError(f"{folder} has classes that train/ lacks: {unknown}. Every class "
                              "needs training images under train/<class>/")
        if not per_class:
            raise DatasetError(f"{folder} holds no images in class sub-folders (expected "
                              f"{folder.name}/<class>/*.png or .jpg, with classes {classes})")
        found.splits[split] = _labelled(per_class, classes)
    if val is not None:
        found.notes.append(f"validation split: {val.name}/, as given")
    return found


def _labelled(per_class: dict[str, list[Path]], classes: list[str]) -> list[tuple[Path, int]]:
    return [(path, classes.index(name)) for name in sorted(per_class) for path in per_class[name]]


def _class_folders(root: Path, per_class: dict[str, list[Path]], test_fraction: float) -> Found:
    if len(per_class) < 2:
        only = next(iter(per_class))
        raise DatasetError(f"{root} holds one class folder ({only}/); a classifier needs at "
                          f"least 2 (one sub-folder of images per class). {layouts_read()}")
    classes = sorted(per_class)
    found = Found("class-folders", root, classes)
    found.splits = hold_out(found, _labelled(per_class, classes), test_fraction)
    found.notes.append(f"test split: {test_fraction:.0%} of each class held out (fixed by the "
                       "file names)")
    return found


def layouts_read() -> str:
    return "The layouts read are: " + "; ".join(f"{n}: {w}" for n, w in LAYOUTS.items())


# --- a labels file -----------------------------------------------------------------------

def _labels_file(root: Path, train: Path, labels: Path, test_fraction: float) -> Found:
    rows = read_labels(labels)
    images = _images_in(train)
    by_id = {}
    for path in images:
        by_id.setdefault(path.name, path)
        by_id.setdefault(path.stem, path)
    missing = [file_id for file_id, _ in rows if file_id not in by_id]
    if missing:
        present = {label for file_id, label in rows if file_id in by_id}
        empty = sorted({label for _, label in rows} - present)
        empty_note = f" Class(es) left with no images: {', '.join(empty)}." if empty else ""
        raise DatasetError(f"{labels} names {len(missing)} file(s) that {train} lacks: "
                          f"{some_names([display_name(m) for m in missing])}.{empty_note} Fix those "
                          "rows (an id is a file name, with or without its extension) or add "
                          "the files")
    classes = sorted({label for _, label in rows})
    if len(classes) < 2:
        raise DatasetError(f"{labels} has {len(classes)} label(s) ({classes}); a classifier "
                          "needs at least 2")
    items = sorted(((by_id[i], classes.index(label)) for i, label in rows),
                   key=lambda item: item[0].name)
    found = Found("labels-file", root, classes)
    found.splits = hold_out(found, items, test_fraction)
    unlabelled = len(images) - len({path for path, _ in items})
    found.notes.append(f"labels: {labels} ({len(rows)} rows)")
    if unlabelled:
        found.notes.append(f"{unlabelled} image(s) in {train} have no row in {labels.name}; "
                           "they are not used")
    return found


def read_labels(path: Path) -> list[tuple[str, str]]:
    """(file id, label) rows of a CSV; a header row (id,label or file,label ...) is skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"the labels file {path} could not be read ({exc}); it must be a "
                          "UTF-8 CSV of id,label rows") from None
    if table and table[0] and table[0][0].strip().lower() in ("id", "file", "filename", "image",
                                                               "name", "path"):
        table = table[1:]
    rows, seen = [], {}
    for number, row in enumerate(table, start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{path}, row {number}: {','.join(row)!r} is not id,label; every "
                              "row needs a file id and a label")
        file_id, label = row[0].strip(), row[1].strip()
        if seen.get(file_id, label) != label:
            raise DatasetError(f"{path}: {file_id} is labelled both {seen[file_id]!r} and "
                              f"{label!r}; keep one row per file")
        if file_id not in seen:
            rows.append((file_id, label))
        seen[file_id] = label
    if not rows:
        raise DatasetError(f"the labels file {path} has no rows; it must be a CSV of id,label")
    return rows


def some_names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --- holding out a test split ------------------------------------------------------------

def hold_out(found: Found, items: list[tuple[Path, int]],
             test_fraction: float) -> dict[str, list[tuple[Path, int]]]:
    """Train and test splits of labelled files: per class, the round(n x fraction) files (at
    least one) whose names hash first are held out for testing."""
    names = [found.relative(path) for path, _ in items]
    held = held_out([(name, label) for name, (_, label) in zip(names, items)], test_fraction,
                    found.classes, "test")
    return {"train": [i for i, name in zip(items, names) if name not in held],
            "test": [i for i, name in zip(items, names) if name in held]}


def held_out(items: list[tuple[str, int]], fraction: float, classes: list[str],
             split: str) -> set[str]:
    """The names of (name, label) items held out for `split`: per class, the round(n x
    fraction) names (at least one) whose hash comes first; a class left with none refused."""
    by_class: dict[int, list[str]] = {}
    for name, label in items:
        by_class.setdefault(label, []).append(name)
    held, small = set(), []
    for label, names in by_class.items():
        n_held = max(1, round(len(names) * fraction))
        if len(names) - n_held < 1:
            small.append(f"{classes[label]} ({len(names)})")
            continue
        held.update(sorted(names, key=_rank)[:n_held])
    if small:
        raise DatasetError(f"class(es) with too few images to appear in both the training and "
                          f"the {split} split: {', '.join(small)}. Add images (at least 2 per "
                          "class, 3 with a validation split) or remove those folders")
    return held


def _rank(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()


def class_counts(found_labels, classes: list[str]) -> dict[str, int]:
    counts = Counter(int(label) for label in found_labels)
    return {name: counts.get(i, 0) for i, name in enumerate(classes)}
