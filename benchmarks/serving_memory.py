"""The model server's memory under concurrent large images: `--clients` clients at once, each
posting one `--side`x`--side` PNG (a flat colour, so the file is small and the decoded image
is not), to `mlflow models serve` of a registered model; the server's resident and anonymous
memory (all its processes) sampled every 20 ms. Side by side in one run: one client, then
`--clients` at once; the bound holds when the second peak is no higher than the first.

    python benchmarks/serving_memory.py --tracking-uri sqlite:///mlruns/mlflow.db \
        --model cifar10-cnn@champion --clients 8 --side 8000
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.store import tracking_uri, use_store  # noqa: E402
from training.servers import ModelServer  # noqa: E402


def anon_and_rss(root: psutil.Process) -> tuple[int, int]:
    anon = rss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
        rss += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return anon, rss


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def measure(model: str, uri: str, body: bytes, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, \
            ModelServer(f"models:/{model}", uri, Path(tmp) / "serve.log") as server:
        root = psutil.Process(server.process.pid)
        post(server.url, body)  # warm: the first decode and forward pass
        idle = anon_and_rss(root)
        peak, done = [idle], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(anon_and_rss(root))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(lambda _: post(server.url, body), range(clients)))
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    mib = 1024 * 1024
    return {"statuses": sorted(set(statuses)), "seconds": round(seconds, 2),
            "idle_anon_mib": round(idle[0] / mib), "peak_anon_mib": round(max(a for a, _ in peak) / mib),
            "idle_rss_mib": round(idle[1] / mib), "peak_rss_mib": round(max(r for _, r in peak) / mib)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--side", type=int, default=8000, help="each image's width and height")
    args = parser.parse_args(argv)
    uri = tracking_uri(args.tracking_uri)
    use_store(uri)
    png = io.BytesIO()
    Image.new("RGB", (args.side, args.side), (40, 90, 200)).save(png, "PNG")
    body = json.dumps({"inputs": {"image": [base64.b64encode(png.getvalue()).decode()]}}).encode()
    image_mp = args.side * args.side / 1e6
    results = {"image": {"side": args.side, "megapixels": round(image_mp, 1),
                         "png_kib": round(len(png.getvalue()) / 1024)},
               "1 client": measure(args.model, uri, body, 1),
               f"{args.clients} clients": measure(args.model, uri, body, args.clients)}
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
