"""Start the desktop app: python -m gui [--folder DIR] [--tracking-uri URI]"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

from gui.main_window import MainWindow
from gui.preload import SETTINGS
from shared.store import tracking_uri

# what Qt's xcb platform (a window on X11) loads, with the Debian package of each
XCB_LIBRARIES = {
    "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1", "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0", "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0", "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0",
}


def loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def uses_xcb() -> bool:
    """Whether Qt will open the window through X11 (xcb) on this Linux session."""
    platform = os.environ.get("QT_QPA_PLATFORM", "").split(":")[0]
    if platform:
        return platform == "xcb"
    return sys.platform.startswith("linux") and bool(os.environ.get("DISPLAY")) \
        and not os.environ.get("WAYLAND_DISPLAY")


def missing_window_libraries() -> list[str]:
    """The xcb libraries this machine lacks, when the window would need them. Qt itself aborts
    without them, naming xcb-cursor whichever one is missing."""
    return [lib for lib in XCB_LIBRARIES if not loadable(lib)] if uses_xcb() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gui", description=__doc__)
    parser.add_argument("--folder", type=Path, help="folder to open (default: the last one, "
                                                     "else inputs/)")
    parser.add_argument("--model", help="NAME@ALIAS or NAME/VERSION to select (default: the last "
                                        "one used, else the newest champion)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlruns)")
    args, qt_args = parser.parse_known_args(argv)
    missing = missing_window_libraries()
    if missing:
        print(f"error: the window cannot open: Qt's xcb platform needs system libraries this "
              f"machine lacks: {', '.join(missing)}. On Debian or Ubuntu: sudo apt-get install "
              f"{' '.join(XCB_LIBRARIES[lib] for lib in missing)}. Without a window: "
              f"python -m gui.classify FOLDER", file=sys.stderr)
        return 2
    app = QApplication.instance() or QApplication([sys.argv[0], *qt_args])
    app.setApplicationName("cifarlab")
    window = MainWindow(tracking_uri(args.tracking_uri), QSettings(*SETTINGS), args.folder,
                        args.model)
    window.show()
    return app.exec()
