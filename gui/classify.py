"""Classify a folder without a window, with the app's inference code:

    python -m gui.classify FOLDER [--model NAME@ALIAS | NAME/VERSION | NAME] [--csv FILE]

One CSV row per file found: the predicted class and confidence, or why the file could not be
read. Exit status 0 once the batch has finished, even if some files were unreadable.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gui.export import write_csv
from shared.files import image_files
from shared.inference import ModelLoadError, classify_files, load_classifier
from shared.registry import RegistryError, resolve_model_uri
from shared.store import StoreBroken, tracking_uri, use_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gui.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of images (not searched recursively)")
    parser.add_argument("--model", help="NAME@ALIAS, NAME/VERSION or NAME (its champion); "
                                        "default: the champion of the newest registered model")
    parser.add_argument("--csv", type=Path, help="write the CSV here instead of to standard output")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlruns)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    uri = tracking_uri(args.tracking_uri)
    try:
        use_store(uri)
        clf = load_classifier(resolve_model_uri(args.model, uri))
    except (RegistryError, ModelLoadError, StoreBroken) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = image_files(args.folder)
    predictions = [p for batch in classify_files(clf, files, args.batch_size) for p in batch]
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as out:
            write_csv(predictions, out)
    else:
        write_csv(predictions, sys.stdout)
    failed = sum(p.error is not None for p in predictions)
    print(f"{clf.uri}: {len(predictions) - failed} of {len(predictions)} files classified"
          + (f", {failed} unreadable" if failed else "")
          + (f"; CSV in {args.csv}" if args.csv else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
