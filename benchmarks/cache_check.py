"""What checking the dataset cache costs a run: a cache hit read with its checksum verified
against the same read without the check, side by side, in alternating rounds (the machine is
shared and noisy), in memory and memory-mapped. Prints the median of each and the ratio.

    python benchmarks/cache_check.py --data-dir ~/data/cifar10 --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine import data  # noqa: E402


def unchecked(arrays: dict, carved: bool) -> tuple[str, str]:
    """_digests without hashing: the stored values, so the check always passes."""
    return arrays["checksum"], arrays["fingerprint"]


def timed_read(root: Path, cache: Path, mapped: bool, check: bool) -> float:
    with mock.patch.object(data, "_digests", unchecked) if not check else contextlib.nullcontext():
        start = time.perf_counter()
        loaded = data.load_dataset(root, cache_dir=cache, log=lambda *_: None, mapped=mapped)
        if mapped:  # what a run reads anyway: every image once (an epoch)
            for split in (loaded.train_images, loaded.test_images):
                for i in range(0, len(split), 4096):
                    split[i:i + 4096].sum()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        data.load_dataset(args.data_dir, cache_dir=cache, log=print)  # builds the cache once
        results = {}
        for mapped in (False, True):
            times = {True: [], False: []}
            for _ in range(args.rounds):
                for check in (False, True):
                    times[check].append(timed_read(args.data_dir, Path(cache), mapped, check))
            plain, checked = (statistics.median(times[c]) for c in (False, True))
            results["mapped" if mapped else "in memory"] = {
                "read_s": round(plain, 3), "read_and_check_s": round(checked, 3),
                "check_s": round(checked - plain, 3), "ratio": round(checked / plain, 2)}
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
