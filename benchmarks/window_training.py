"""Time from "New model from a folder" to a registered, selected model, as the app does it:
the real dialog (offscreen), its default start (EfficientNet-Lite0, ImageNet weights, frozen
backbone), a `training.train` child process, its stages timed from the progress events.

    python benchmarks/window_training.py --images ~/data/cifar10/test --per-class 100 \\
        --work /tmp/window-training

The folder is made of --per-class images of each class folder under --images (copied, so the
dataset cache starts cold). Prints the seconds spent decoding, computing features (every
training view, validation and test), in epochs, testing and registering, and in all. Then
--corrections more images (one per class in turn, not yet in the folder) are copied in, as the
app's "This is…" does, and Retrain is timed the same way: the version's recipe on the changed
folder, each image the earlier run saw taken from its features.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_folder(images: Path, per_class: int, folder: Path) -> int:
    count = 0
    for source in sorted(p for p in images.iterdir() if p.is_dir()):
        target = folder / source.name
        target.mkdir(parents=True)
        for path in sorted(source.iterdir())[:per_class]:
            shutil.copy(path, target / path.name)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of class folders")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/window-training"))
    parser.add_argument("--more", default="", help="more training flags for the dialog")
    parser.add_argument("--corrections", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    shutil.rmtree(args.work, ignore_errors=True)
    folder = args.work / "photos"
    count = make_folder(args.images.expanduser(), args.per_class, folder)
    uri = f"sqlite:///{args.work / 'mlflow.db'}"
    app = QApplication.instance() or QApplication([sys.argv[0]])
    settings = QSettings(str(args.work / "settings.ini"), QSettings.Format.IniFormat)
    more = f"--cache-dir {args.work / 'cache'} {args.more}".strip()
    if timed(app, folder, uri, settings, more, None, f"{count} images") != 0:
        return 1
    from shared.registry import list_versions

    classes = sorted(p for p in args.images.expanduser().iterdir() if p.is_dir())
    for n in range(args.corrections):
        source = classes[n % len(classes)]
        extra = sorted(source.iterdir())[args.per_class + n // len(classes)]
        shutil.copy(extra, folder / source.name / extra.name)
    (version,) = list_versions(uri)
    print(f"\nretrain after {args.corrections} corrections:")
    return timed(app, folder, uri, settings, more, version, f"{count + args.corrections} images")


def timed(app, folder: Path, uri: str, settings, more: str, improves, what: str) -> int:
    """One run of the dialog, its stages timed; 0 when a version was registered."""
    from gui.train_dialog import TrainDialog

    dialog = TrainDialog(uri, [improves] if improves else [], settings, folder=folder,
                         improves=improves)
    dialog.more_edit.setText(more)
    marks: dict[str, float] = {}

    def note(event: dict) -> None:
        stage = event.get("stage", event.get("event", ""))
        kind = stage.split(":")[0].split(" ")[0]  # decoding, features, epoch, testing, ...
        marks.setdefault(kind + ":first", time.perf_counter())
        marks[kind + ":last"] = time.perf_counter()

    dialog.job.event.connect(note)
    registered = []
    dialog.registered.connect(registered.append)
    start = time.perf_counter()
    dialog.train()
    while dialog.state in ("running", "stopping"):
        app.processEvents()
        time.sleep(0.02)
    total = time.perf_counter() - start
    if dialog.state != "done":
        print(dialog.log.toPlainText()[-3000:])
        return 1

    def span(first: str, last: str) -> float:
        return marks[last + ":last"] - marks[first + ":first"]

    print(f"{what} in {len(os.listdir(folder))} classes, {dialog.epochs_seen} epochs; "
          f"registered {registered[0] if registered else '?'}")
    print(f"starting, checking the store and decoding {marks['decoding:last'] - start:.1f} s")
    features = marks['features:last'] - marks['decoding:last']
    print(f"features (backbone export and check included) {features:.1f} s")
    print(f"epochs {span('epoch', 'epoch'):.1f} s")
    print(f"testing, storing and registering {start + total - marks['epoch:last']:.1f} s")
    print(f"total {total:.1f} s")
    for line in dialog.log.toPlainText().splitlines():
        if line.startswith(("features:", "run ", "registered")):
            print("  " + line)
    dialog.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
