"""Classify a folder without a window, with the app's inference code:

    python -m gui.classify FOLDER [--model NAME@ALIAS | NAME/VERSION | NAME] [--csv FILE]
                                  [--heatmaps DIR] [--submission FILE] [--runtime RUNTIME]

One CSV row per file found: the predicted class, confidence and whether it is unsure (under
the model's threshold: maybe none of its classes), or why the file could not be read. With
--heatmaps, DIR/<name>_heatmap.png shows where the model looked (Grad-CAM of the predicted
class over the square it sees). With --submission, FILE is a competition submission
(Kaggle's CIFAR-10: `id,label`, id = the file's name without its extension), for a folder of
unlabelled test images such as its test/. Exit status 0 once the batch has finished, even if
some files were unreadable.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from gui.export import submission_ids, write_csv, write_submission
from shared.command import run_command
from shared.files import display_name, image_files
from shared.heatmap import Explainer, NoHeatmap, photo_with_heatmap
from shared.inference import LoadedClassifier, Prediction, classify_files, load_classifier
from shared.messages import BadInput
from shared.onnx_model import RUNTIME_HELP, RUNTIMES
from shared.registry import resolve_model_uri
from shared.store import tracking_uri, use_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gui.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of images (not searched recursively)")
    parser.add_argument("--model", help="NAME@ALIAS, NAME/VERSION or NAME (its champion); "
                                        "default: the champion of the newest registered model")
    parser.add_argument("--runtime", choices=RUNTIMES, default="pt2", help=RUNTIME_HELP)
    parser.add_argument("--csv", type=Path, help="write the CSV here instead of to standard output")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlruns)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--heatmaps", type=Path, metavar="DIR",
                        help="write a heatmap of each classified image here")
    parser.add_argument("--heatmap-size", type=int, default=256, metavar="PIXELS",
                        help="side of the heatmap images (default 256)")
    parser.add_argument("--submission", type=Path, metavar="FILE",
                        help="also write Kaggle's submission format here: id,label rows")
    args = parser.parse_args(argv)
    if not 16 <= args.heatmap_size <= 2048:
        parser.error(f"--heatmap-size must be between 16 and 2048 (got {args.heatmap_size})")
    uri = tracking_uri(args.tracking_uri)

    def body() -> int:
        if not args.folder.is_dir():
            raise BadInput(f"{args.folder} is not a folder")
        files = image_files(args.folder)
        if args.submission:
            try:
                submission_ids(files)
            except ValueError as exc:
                raise BadInput(f"--submission needs one id per file, and {exc}; keep one of "
                               "them") from None
        use_store(uri)
        clf = load_classifier(resolve_model_uri(args.model, uri), args.runtime)
        try:
            explainer = Explainer(clf.module) if args.heatmaps else None
        except NoHeatmap as exc:
            raise BadInput(f"no heatmaps for {clf.uri}: {exc}; run without --heatmaps") from None
        predictions = [p for batch in classify_files(clf, files, args.batch_size)
                       for p in batch]
        if explainer is not None:
            written = write_heatmaps(clf, explainer, predictions, args.heatmaps, args.heatmap_size)
            print(f"{written} heatmap(s) in {args.heatmaps}", file=sys.stderr)
        if args.csv:
            with open(args.csv, "w", newline="", encoding="utf-8") as out:
                write_csv(predictions, out)
        else:
            write_csv(predictions, sys.stdout)
        if args.submission:
            write_submission_file(predictions, args.submission)
        failed = sum(p.error is not None for p in predictions)
        print(f"{clf.uri}: {len(predictions) - failed} of {len(predictions)} files classified"
              + (f", {failed} unreadable" if failed else "")
              + (f"; CSV in {args.csv}" if args.csv else ""), file=sys.stderr)
        return 0

    return run_command(body)


def write_submission_file(predictions: list[Prediction], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as out:
        unreadable = write_submission(predictions, out)
    print(f"submission: {len(predictions) - len(unreadable)} rows in {path}", file=sys.stderr)
    if unreadable:
        names = ", ".join(display_name(p) for p in unreadable[:5])
        print(f"warning: {len(unreadable)} unreadable file(s) have no row (a competition may "
              f"refuse the file): {names}", file=sys.stderr)


def write_heatmaps(clf: LoadedClassifier, explainer: Explainer, predictions: list[Prediction],
                   folder: Path, side: int, batch_size: int = 16) -> int:
    """DIR/<stem>_heatmap.png for every classified file (<name>_heatmap.png when two files
    share a stem); returns how many were written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [Path(p.path) for p in predictions if p.error is None]
    stems = Counter(p.stem for p in paths)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        for path, heat in zip(chunk, explainer.heatmaps(clf.load_images(chunk))):
            picture = photo_with_heatmap(path, heat, side)
            name = path.stem if stems[path.stem] == 1 else path.name
            Image.fromarray(picture).save(folder / f"{name}_heatmap.png")
    return len(paths)


if __name__ == "__main__":
    sys.exit(main())
