"""Start the desktop app: python -m gui [--folder DIR] [--tracking-uri URI]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

from gui.main_window import MainWindow
from shared.store import tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gui", description=__doc__)
    parser.add_argument("--folder", type=Path, help="folder to open (default: the last one, "
                                                     "else inputs/)")
    parser.add_argument("--model", help="NAME@ALIAS or NAME/VERSION to select (default: the last "
                                        "one used, else the newest champion)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlruns)")
    args, qt_args = parser.parse_known_args(argv)
    app = QApplication.instance() or QApplication([sys.argv[0], *qt_args])
    app.setApplicationName("cifarlab")
    window = MainWindow(tracking_uri(args.tracking_uri), QSettings("cifarlab", "gui"), args.folder,
                        args.model)
    window.show()
    return app.exec()
