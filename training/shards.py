"""Write a dataset, in any layout training reads, as WebDataset shards with a manifest:

    python -m training.shards ~/photos/pets ~/shards/pets --per-shard 1000
    python -m training.train --data-dir ~/shards/pets --model efficientnet_lite0

Each shard is a plain tar of the images' own bytes (never re-encoded), their class indices and
their file names; manifest.json names the classes, each split's shards and counts, and a
fingerprint of every image and label, which training logs as the dataset's digest. Layouts with
no test split of their own get theirs held out here, by file name, as training would; those
with no validation split get one the same way (--val-fraction), so that a streamed training
(--stream) validates on images of its own. The training images are written in a fixed shuffled
order: every shard holds every class.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.command import run_command
from training.engine.data import cifar10_files
from training.engine.layouts import Source, find_layout
from training.engine.shards import write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.shards",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the dataset's folder, in any layout training reads")
    parser.add_argument("out", help="a new or empty folder for the shards and manifest.json")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard")
    parser.add_argument("--labels", help="a CSV of file id,label for SRC/train/")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="layouts with no test split: share of each class held out")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="layouts with no validation split: share of each class's training "
                             "images held out for validation (0: none)")
    args = parser.parse_args(argv)
    if args.per_shard < 1 or not 0 < args.test_fraction < 1 or not 0 <= args.val_fraction < 1:
        parser.error("--per-shard must be 1 or more, --test-fraction between 0 and 1 and "
                     "--val-fraction from 0 to below 1")

    def body() -> int:
        root = Path(args.src).expanduser().resolve()
        labels = Path(args.labels).expanduser().resolve() if args.labels else None
        found = find_layout(Source(root, labels, args.test_fraction))
        if found.layout == "torchvision":
            cifar10_files(root, False, print)
        manifest = write_shards(found, Path(args.out).expanduser().resolve(), args.per_shard,
                                args.val_fraction)
        counts = ", ".join(f"{info['count']} {split}" for split, info in manifest["splits"].items())
        print(f"wrote {counts} images of {len(manifest['classes'])} classes to {args.out} "
              f"(fingerprint {manifest['fingerprint']}); train with --data-dir {args.out}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
