"""The desktop app's speed: launch to usable window, model load, images classified per second.

    python benchmarks/app_speed.py --tracking-uri sqlite:///mlruns/mlflow.db \\
        --models cifar10-cnn@champion,cifar10-resnet18@champion --images ~/data/cifar10/test/cat

- launch: a fresh `python` process (imports included) until the window is shown, and until the
  model list is shown and the champion model is loaded (the window is usable); median of 3;
  for each of --runtimes (pt2, or a checked export: onnx, onnx-int8), with whether PyTorch was
  imported by then.
  First launches start with no settings and an empty app cache (the registry is asked, the
  model fetched); later launches find what the previous one kept (the listing, the model's
  files) and ask the registry only after the window is usable.
- load: `load_classifier` (download the pt2 archive, torch.export load); median of 3.
- classify: files per second through `classify_files` (decode + preprocessing + forward, batch
  64, the app's path) and forward-only images per second, on the CPU, over every file in
  --images.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def probe(start: float, uri: str, folder: str, scratch: str, preload: bool, runtime: str) -> None:
    """Runs in a fresh process: print seconds from `start` to shown and to usable, and whether
    PyTorch was imported by then. Starts as `python -m gui` does (gui/__main__.py), or without
    its preloading thread; the window runs its champion by `runtime`."""
    from gui.preload import start_preloading

    if preload:
        start_preloading(runtime)
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from gui.main_window import MainWindow

    app = QApplication([sys.argv[0]])
    # the window's settings in a folder of its own: the photo folder is the user's, left as it is
    settings = QSettings(str(Path(scratch) / "settings.ini"), QSettings.Format.IniFormat)
    if settings.value("runtime") is None:
        settings.setValue("runtime", runtime)
    window = MainWindow(uri, settings, Path(folder))
    window.show()
    app.processEvents()
    shown = time.time() - start
    while window.model_uri is None or window.loading:
        app.processEvents()
        time.sleep(0.005)
    usable = time.time() - start
    if window.runtime != runtime:
        sys.exit(f"the window runs its model by {window.runtime}, not {runtime}: "
                 f"export the champion first (python -m training.export --format {runtime})")
    print(f"{shown:.3f} {usable:.3f} {int('torch' in sys.modules)}")
    window.close()


def launch_times(uri: str, folder: str, rounds: int, runtime: str
                 ) -> dict[str, tuple[float, float, bool]]:
    """{kind: (shown, usable, PyTorch imported)}, medians over `rounds` each: a first launch in
    a fresh settings and cache folder, then later ones in the same folder, without and with
    preloading."""
    kinds = {"first": True, "later, no preloading": False, "later": True}
    times = {kind: [] for kind in kinds}
    for _ in range(rounds):
        scratch = tempfile.mkdtemp(prefix="cifarlab-app-speed-")
        env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen"),
               "XDG_CACHE_HOME": str(Path(scratch) / "cache")}
        for kind in times:
            done = subprocess.run([sys.executable, __file__, "--probe", str(time.time()), uri,
                                   folder, scratch, str(int(kinds[kind])), runtime],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(done.stderr.strip().splitlines()[-1])
            times[kind].append(tuple(map(float, done.stdout.split()[-3:])))
        shutil.rmtree(scratch, ignore_errors=True)
    return {kind: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs),
                   any(t[2] for t in runs))
            for kind, runs in times.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1",
              sys.argv[7])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--models", required=True, help="comma-separated NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--images", required=True, type=Path, help="a folder of images")
    parser.add_argument("--launch-folder", type=Path,
                        default=Path(__file__).resolve().parents[1] / "inputs",
                        help="folder the launched window opens (default: inputs/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", default="pt2",
                        help="comma-separated runtimes the launched window runs the champion by: "
                             "pt2, onnx, onnx-int8 (an export needs training.export first)")
    args = parser.parse_args()

    import torch

    from shared.files import image_files
    from shared.inference import classify_files, load_classifier
    from shared.registry import resolve_model_uri
    from shared.store import use_store

    use_store(args.tracking_uri)
    files = image_files(args.images)
    launches = {runtime: launch_times(args.tracking_uri, str(args.launch_folder), args.rounds,
                                      runtime) for runtime in args.runtimes.split(",")}
    print(f"device: CPU, {torch.get_num_threads()} threads; {len(files)} files in {args.images}")
    print(f"launch on {args.launch_folder} (median of {args.rounds}, imports included):\n")
    print("| launch | runtime | window shown (s) | usable: model list shown, champion loaded (s) "
          "| PyTorch imported |")
    print("|---|---|---|---|---|")
    for runtime, kinds in launches.items():
        for kind, (shown, usable, torch_imported) in kinds.items():
            print(f"| {kind} | {runtime} | {shown:.2f} | {usable:.2f} | "
                  f"{'yes' if torch_imported else 'no'} |")
    print()
    print("| model | load (s) | files/s (decode + classify) | images/s (forward only) |")
    print("|---|---|---|---|")
    for spec in args.models.split(","):
        uri = resolve_model_uri(spec, args.tracking_uri)
        loads = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            clf = load_classifier(uri)
            loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        count = sum(len(b) for b in classify_files(clf, files, 64))
        end_to_end = count / (time.perf_counter() - start)
        batch = clf.load_images(files[:256])
        clf.probabilities(batch[:8])
        start = time.perf_counter()
        for _ in range(3):
            clf.probabilities(batch)
        forward = 3 * len(batch) / (time.perf_counter() - start)
        print(f"| {spec} | {statistics.median(loads):.2f} | {end_to_end:,.0f} | {forward:,.0f} |")


if __name__ == "__main__":
    main()
