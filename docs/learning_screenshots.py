"""Screenshots of the app's learning views, in a real window under Xvfb: the New model dialog
after a run, the "This is…" menu on a photo, and the mislabelled-images gallery.

    xvfb-run -a -s "-screen 0 1400x900x24" python docs/learning_screenshots.py \\
        --images ~/data/cifar10/test --per-class 30 --work /tmp/learning-shots

A folder of --per-class images of each class under --images is made, with 5% of them moved to
a wrong class folder (seeded), so the gallery has real mistakes to show. The dialog trains its
default start (EfficientNet-Lite0, ImageNet weights, frozen backbone) in a real training
process; the images land in docs/ (app-train.png, app-correct.png, app-gallery.png).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

from PySide6.QtCore import QPoint, QSettings, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docs.screenshot import settle, wait  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402

DOCS = Path(__file__).resolve().parent


def make_folder(images: Path, per_class: int, folder: Path, flip: float, seed: int) -> int:
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    for name in classes:
        (folder / name).mkdir(parents=True)
        for path in sorted((images / name).iterdir())[:per_class]:
            shutil.copy(path, folder / name / path.name)
    files = sorted(folder.rglob("*.png"))
    rng = random.Random(seed)
    moved = rng.sample(files, round(flip * len(files)))
    for path in moved:
        wrong = rng.choice([c for c in classes if c != path.parent.name])
        shutil.move(path, folder / wrong / path.name)
    return len(moved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/learning-shots"))
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    folder = args.work / "my-photos"
    flipped = make_folder(args.images.expanduser(), args.per_class, folder, 0.05, 0)
    print(f"{flipped} images moved to a wrong class folder")
    app = QApplication.instance() or QApplication([sys.argv[0]])
    for kind in ("information", "warning"):  # a message box would wait for a click: printed
        setattr(QMessageBox, kind, lambda parent, title, text: print(f"{title}: {text}"))
    settings = QSettings(str(args.work / "settings.ini"), QSettings.Format.IniFormat)
    uri = f"sqlite:///{args.work / 'mlflow.db'}"
    window = MainWindow(uri, settings, DOCS.parent / "inputs")
    window.resize(1200, 760)
    window.show()
    settle(app, 3)

    dialog = window.open_training(folder)
    dialog.more_edit.setText(f"--cache-dir {args.work / 'cache'}")
    dialog.train()
    wait(app, lambda: dialog.state in ("done", "failed"), timeout=1200)
    if dialog.state != "done":
        print(dialog.log.toPlainText()[-3000:])
        return 1
    wait(app, lambda: window.model_uri and not window.loading and not window.running)
    settle(app)
    dialog.grab().save(str(args.out / "app-train.png"))
    dialog.close()
    print("trained", flush=True)

    names = [Path(p).name for p in window.images.paths()]
    window.grid.setCurrentIndex(window.images.index(names.index("horse.png")))
    settings.setValue("training/folder", str(folder))
    settle(app)
    button = window.correct_button
    QTimer.singleShot(500, lambda: save_screen(app, window, args.out / "app-correct.png"))
    QTimer.singleShot(900, lambda: window.correct_menu.close())
    window.correct_menu.exec(button.mapToGlobal(QPoint(0, button.height())))
    print("menu shot", flush=True)

    gallery = window.find_label_issues()
    gallery.resize(1000, 800)
    wait(app, lambda: not gallery.job.running and gallery.stage.text().endswith("confirm)."),
         timeout=1200)
    gallery.thumbnails.waitForDone()
    settle(app, 2)
    gallery.grab().save(str(args.out / "app-gallery.png"))
    print(gallery.stage.text())
    hits = sum(Path(r["file"]).name in moved_names(folder, args) for r in gallery.rows)
    print(f"{hits} of the {len(gallery.rows)} shown were moved on purpose")
    gallery.close()
    window.close()
    print(f"wrote {', '.join(f'app-{n}.png' for n in ('train', 'correct', 'gallery'))} in {args.out}")
    return 0


def moved_names(folder: Path, args) -> set[str]:
    """The files standing in a class folder that is not their CIFAR-10 class."""
    return {p.name for p in folder.rglob("*.png")
            if not (args.images.expanduser() / p.parent.name / p.name).exists()}


def save_screen(app: QApplication, window, path: Path) -> None:
    """The window with its open menu (a window of its own): the screen's part that holds both."""
    app.processEvents()
    time.sleep(0.2)
    frame = window.frameGeometry()
    window.screen().grabWindow(0, frame.x(), frame.y(), frame.width(), frame.height()).save(str(path))


if __name__ == "__main__":
    sys.exit(main())
