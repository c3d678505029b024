"""Latency of a registered model served by `mlflow models serve` (through shared.serving):
one client posting one image per request, `--requests` times, after `--warmup` requests;
p50/p95/mean in milliseconds, beside the same image classified in-process (decode + model),
so the HTTP server's share is the difference.

    python benchmarks/serving_latency.py --tracking-uri sqlite:///mlruns/mlflow.db \
        --model cifar10-cnn@champion --image inputs/dog.png --requests 100
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.inference import classify_files, load_classifier  # noqa: E402
from shared.store import tracking_uri, use_store  # noqa: E402
from training.servers import ModelServer  # noqa: E402


def request(url: str, body: bytes) -> float:
    started = time.perf_counter()
    req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as response:
        json.load(response)
    return (time.perf_counter() - started) * 1000


def percentiles(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": statistics.median(ms), "p95_ms": q[94], "mean_ms": statistics.fmean(ms)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    uri = tracking_uri(args.tracking_uri)
    use_store(uri)
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(args.image.read_bytes()).decode()]]}}).encode()
    with tempfile.TemporaryDirectory() as tmp, \
            ModelServer(f"models:/{args.model}", uri, Path(tmp) / "serve.log") as server:
        for _ in range(args.warmup):
            request(server.url, body)
        served = [request(server.url, body) for _ in range(args.requests)]
    clf = load_classifier(f"models:/{args.model}")
    for _ in range(args.warmup):
        next(classify_files(clf, [args.image]))
    local = []
    for _ in range(args.requests):
        started = time.perf_counter()
        next(classify_files(clf, [args.image]))
        local.append((time.perf_counter() - started) * 1000)
    figures = {"model": args.model, "image": args.image.name, "requests": args.requests,
               "served": percentiles(served), "in_process": percentiles(local)}
    print("| path | p50 ms | p95 ms | mean ms |\n|---|---|---|---|")
    for path in ("served", "in_process"):
        f = figures[path]
        print(f"| {path.replace('_', '-')} | {f['p50_ms']:.1f} | {f['p95_ms']:.1f} | {f['mean_ms']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
