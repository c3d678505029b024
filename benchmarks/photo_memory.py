"""Peak memory of preparing and training on a folder of photos, against the images' own size.

    python benchmarks/photo_memory.py --counts 2000,4000,8000 --side 224 --work /tmp/photo-mem \
        [--checkout /tmp/before] [--limit-gb 20] [--data-on-device yes,no] [--out photo_memory.json]

Generates (once) train/ and test/ class folders of N JPEG photos at SIDE px, then runs
`python -m training.train --model mlp --epochs 1 --image-size SIDE` on each, as a child process
with a fresh dataset cache (so the peak includes decoding) and an evaluation batch of 100
(--eval-batch-size), from this checkout and, with
--checkout, from another one (an older commit, for "before"). For each run: the process's
peak resident memory (ru_maxrss, from wait4) and its peak anonymous memory (RssAnon, polled).
Then the slope per image of a straight line through the counts, of peak RSS and of peak
anonymous memory, beside the image's own uint8 size (3 x SIDE x SIDE bytes). With the images
memory-mapped (--data-on-device no) RSS counts the cache file's pages the process has touched,
which the kernel reclaims under pressure; anonymous memory is what it cannot.
--limit-gb runs each child in a memory cgroup (v1) with that
limit, so a checkout that needs more is stopped (reported as killed) rather than the machine.
--data-on-device runs each count once per placement given (yes: the images held in memory; no:
read from the memory-mapped cache; stream: the photos written once as WebDataset shards, then
trained with --stream, the training images decoded each epoch and never cached), so they are
measured side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [f"class{i}" for i in range(10)]
CGROUP = Path("/sys/fs/cgroup/memory")


def make_photos(root: Path, n: int, side: int) -> Path:
    """N smooth-plus-noise JPEG photos (quality 90) in train/<class>/ and test/<class>/, 90/10."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        split = "test" if (i // len(CLASSES)) % 10 == 0 else "train"
        label = CLASSES[i % len(CLASSES)]
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6.3, 3)
        base = np.stack([np.sin(6 * (xx + yy) + p + i % 10) for p in phase], -1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def make_shards(photos: Path, checkout: Path) -> Path:
    """The photos as WebDataset shards beside them (once), for --stream."""
    out = photos.with_name(photos.name + "-shards")
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "training.shards", str(photos), str(out)],
                       cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                       check=True, stdout=subprocess.DEVNULL)
    return out


def anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(checkout: Path, photos: Path, side: int, limit_gb: float | None,
              eval_batch: int = 100, extra: tuple[str, ...] = ()) -> dict:
    """One training run; its peak memory in MB, or killed."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "training.train", "--model", "mlp", "--epochs", "1",
                   "--image-size", str(side), "--data-dir", str(photos), "--cache-dir",
                   f"{tmp}/cache", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
                   "--device", "cpu", "--no-register", "--no-progress", "--no-system-metrics",
                   "--patience", "0", "--eval-batch-size", str(eval_batch), *extra]
        group = None
        if limit_gb:
            group = CGROUP / f"photo-memory-{os.getpid()}"
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 2**30)))
        env = {**os.environ, "PYTHONPATH": str(checkout), "MLFLOW_TRACKING_URI": ""}
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        if group:
            (group / "cgroup.procs").write_text(str(child.pid))
        peak_anon = [0]

        def poll() -> None:
            while child.poll() is None:
                peak_anon[0] = max(peak_anon[0], anon_kb(child.pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        watcher.join()
        seconds = time.perf_counter() - start
        err = child.stderr.read().decode(errors="replace")
        if group:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    result = {"peak_rss_mb": round(usage.ru_maxrss / 1024), "peak_anon_mb": round(peak_anon[0] / 1024),
              "seconds": round(seconds, 1), "exit": child.returncode}
    if child.returncode != 0:
        result["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"
    return result


def slope(counts: list[int], peaks: list[float]) -> tuple[float, float]:
    """Least-squares MB per image and MB at zero images."""
    per_image, at_zero = np.polyfit(np.array(counts, float), np.array(peaks, float), 1)
    return float(per_image), float(at_zero)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="2000,4000,8000")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--work", type=Path, required=True, help="where the photo folders are made")
    parser.add_argument("--checkout", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--limit-gb", type=float, help="memory cgroup limit per run")
    parser.add_argument("--eval-batch-size", type=int, default=100,
                        help="evaluation batch (default 100): a batch as large as the whole "
                             "validation or test split grows with the dataset up to this size, "
                             "which would blur the slope per image")
    parser.add_argument("--data-on-device", default="",
                        help="placements to measure side by side, e.g. yes,no (default: the "
                             "checkout's own default, with no flag)")
    parser.add_argument("--batch-size", type=int, help="default: the mlp recipe's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    here = Path(__file__).resolve().parents[1]
    checkouts = {"this checkout": here} | ({"other checkout": args.checkout.resolve()}
                                           if args.checkout else {})
    placements = [p for p in args.data_on_device.split(",") if p]
    flags = {"": (), "stream": ("--data-on-device", "no", "--stream")}
    batch = ("--batch-size", str(args.batch_size)) if args.batch_size else ()
    runs = {(name if not p else f"{name}, --data-on-device {p}"):
            (checkout, flags.get(p, ("--data-on-device", p)) + batch)
            for name, checkout in checkouts.items() for p in placements or [""]}
    image_mb = 3 * args.side * args.side / 2**20
    report = {"side": args.side, "counts": counts, "image_mb": round(image_mb, 4), "runs": {}}
    print("| checkout | images | uint8 images MB | peak RSS MB | peak anonymous MB | s |\n"
          "|---|---|---|---|---|---|")
    for n in counts:
        photos = make_photos(args.work / f"photos-{n}-{args.side}", n, args.side)
        for name, (checkout, extra) in runs.items():
            data = make_shards(photos, checkout) if "--stream" in extra else photos
            result = run_child(checkout, data, args.side, args.limit_gb, args.eval_batch_size,
                               extra)
            report["runs"].setdefault(name, {})[n] = result
            peak = result["peak_rss_mb"] if result["exit"] == 0 else (
                "killed at the limit" if result["exit"] in (-9, 137) else f"failed: {result['error']}")
            print(f"| {name} | {n} | {n * image_mb:.0f} | {peak} | {result['peak_anon_mb']} | "
                  f"{result['seconds']} |", flush=True)
    for name, runs in report["runs"].items():
        done = [n for n in counts if runs[n]["exit"] == 0]
        if len(done) >= 2:
            per_image, at_zero = slope(done, [runs[n]["peak_rss_mb"] for n in done])
            anon_per_image, anon_at_zero = slope(done, [runs[n]["peak_anon_mb"] for n in done])
            report.setdefault("slope", {})[name] = {
                "mb_per_image": round(per_image, 4), "mb_at_zero": round(at_zero),
                "times_image_size": round(per_image / image_mb, 2),
                "anon_mb_per_image": round(anon_per_image, 4),
                "anon_times_image_size": round(anon_per_image / image_mb, 2)}
            print(f"{name}: {per_image * 1024:.0f} KB per image ({per_image / image_mb:.2f}x its "
                  f"{image_mb * 1024:.0f} KB of uint8), {at_zero:.0f} MB at zero images; "
                  f"anonymous {anon_per_image * 1024:.0f} KB per image "
                  f"({anon_per_image / image_mb:.2f}x), {anon_at_zero:.0f} MB at zero")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
