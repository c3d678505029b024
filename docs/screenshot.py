"""The README's screenshot: the app on a folder, classified with a registered model, one photo
selected; the window rendered to a PNG (QT_QPA_PLATFORM=offscreen works without a display).

    QT_QPA_PLATFORM=offscreen python docs/screenshot.py --tracking-uri sqlite:///mlruns/mlflow.db \
        --model cifar10-efficientnet_lite0@champion --folder inputs --select bird.png [--heatmap]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gui.main_window import MainWindow  # noqa: E402


def wait(app: QApplication, done, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            raise TimeoutError("the app did not finish classifying in time")
        app.processEvents()
        time.sleep(0.02)


def settle(app: QApplication, seconds: float = 1.0) -> None:
    """Let queued signals (thumbnails, the selected preview) reach the widgets."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--folder", type=Path, default=Path("inputs"))
    parser.add_argument("--select", help="file name of the image to show in the detail pane")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("app-screenshot.png"))
    parser.add_argument("--size", default="1200x760")
    parser.add_argument("--heatmap", action="store_true", help="tick the heatmap box first")
    args = parser.parse_args(argv)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    with tempfile.TemporaryDirectory() as home:
        settings = QSettings(str(Path(home) / "settings.ini"), QSettings.Format.IniFormat)
        window = MainWindow(args.tracking_uri, settings, args.folder, args.model)
        window.resize(*map(int, args.size.split("x")))
        window.show()
        count = len(window.images.paths())
        wait(app, lambda: window.model_uri and not window.running
             and len(window.images.predictions()) == count)
        if args.select:
            row = [Path(p).name for p in window.images.paths()].index(args.select)
            window.grid.setCurrentIndex(window.images.index(row))
        if args.heatmap:
            window.heatmap_box.setChecked(True)
            wait(app, lambda: window.heatmap_note.text().startswith("Heatmap"))
        window.thumbnails.waitForDone()
        settle(app)
        window.grab().save(str(args.out))
        window.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
