"""Find the training images a frozen-backbone model's features say are probably mislabelled,
and write them ranked to a CSV (flagged first, the least likely given label first):

    python -m training.label_issues --model NAME/VERSION --data-dir DIR [--out label_issues.csv]

The version's own recipe (its model, weights, input size) computes the features of every
labelled training image (the feature cache makes a second pass free); k heads, each trained on
the other folds, score each image out of fold; confident learning flags the images whose
likeliest class is not their label (training/engine/label_issues.py). Nothing in DIR is
changed: the CSV says which files to look at, and which class each probably is.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from shared.command import run_command
from shared.messages import BadInput
from shared.registry import registered_version
from shared.store import tracking_uri, use_store
from training.engine.build import prepare, preprocessing
from training.engine.config import TrainConfig
from training.engine.data import DEFAULT_CACHE_DIR
from training.engine.features import frozen_features
from training.engine.label_issues import find_issues, out_of_fold
from training.engine.models import build_model, get_spec

COLUMNS = ("rank", "file", "given", "suggested", "flagged", "given_probability",
           "suggested_probability")


def version_config(client: MlflowClient, model: str, data_dir: str, cache_dir: str | None,
                   uri: str) -> TrainConfig:
    """The settings the version was trained with, on `data_dir`, every labelled training image
    in one split (no validation carved out). Refused unless its backbone was frozen: only then
    are its features the recipe's, computable without the version's own weights."""
    version = registered_version(f"models:/{model}", client)
    try:
        saved = client.download_artifacts(version.run_id, "config.yaml")
        import yaml

        settings = yaml.safe_load(Path(saved).read_text())
    except Exception as exc:  # noqa: BLE001 - a run without its config, an unreadable one
        raise BadInput(f"the run of {model} has no readable config.yaml ({type(exc).__name__}); "
                       "it was not trained by this project") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in known})
    if cfg.freeze != "backbone" or cfg.weights == "none":
        raise BadInput(f"{model} was trained with freeze={cfg.freeze}, weights={cfg.weights}: "
                       "finding label issues needs a version with a frozen pretrained backbone "
                       "(train one with --weights imagenet --freeze backbone, e.g. "
                       "--model efficientnet_lite0)")
    return dataclasses.replace(cfg, data_dir=data_dir, cache_dir=cache_dir or cfg.cache_dir,
                               tracking_uri=uri,
                               val_fraction=0.0, patience=0, feature_views=1, resume=None,
                               feature_cache=True).validate()


def rank(cfg: TrainConfig, folds: int, log=print) -> list[dict]:
    """Every labelled training image with its given and likeliest class, ranked."""
    splits = prepare(cfg, log=log)
    spec = get_spec(cfg.model)
    model = build_model(cfg.model, splits.num_classes, splits.data.image_size, weights=cfg.weights,
                        freeze="backbone")
    features = frozen_features(cfg, model, spec.head, preprocessing(cfg, splits, spec), splits, log)
    labels = splits.train[1].cpu()
    if len(labels) < folds * 2:
        raise BadInput(f"{len(labels)} training images are too few for {folds} folds")
    probabilities = out_of_fold(features.train[0].cpu(), labels, splits.num_classes, folds, cfg.seed)
    issues = find_issues(probabilities, labels)
    names, classes = splits.files.get("train") or [str(i) for i in range(len(labels))], splits.data.classes
    rows = []
    for place, i in enumerate(issues.order.tolist(), start=1):
        given, suggested = int(labels[i]), int(issues.suggested[i])
        rows.append({"rank": place, "file": names[i], "given": classes[given],
                     "suggested": classes[suggested], "flagged": bool(issues.flagged[i]),
                     "given_probability": round(float(probabilities[i, given]), 4),
                     "suggested_probability": round(float(probabilities[i, suggested]), 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.label_issues",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="NAME/VERSION or NAME@ALIAS of a version "
                        "trained with a frozen pretrained backbone")
    parser.add_argument("--data-dir", required=True, help="the labelled images to check")
    parser.add_argument("--out", type=Path, default=Path("label_issues.csv"),
                        help="the ranked CSV to write (default: label_issues.csv)")
    parser.add_argument("--folds", type=int, default=5, help="heads trained out of fold (default 5)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--cache-dir", help="decoded images and features (default: the "
                        f"version's own, else {DEFAULT_CACHE_DIR})")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.folds < 2:
            raise BadInput(f"--folds must be at least 2 (got {args.folds})")
        uri = tracking_uri(args.tracking_uri)
        use_store(uri)
        cfg = version_config(MlflowClient(uri, registry_uri=uri), args.model, args.data_dir,
                             args.cache_dir, uri)
        torch.manual_seed(cfg.seed)
        rows = rank(cfg, args.folds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        flagged = sum(r["flagged"] for r in rows)
        print(f"{flagged} of {len(rows)} training images flagged as probably mislabelled; "
              f"ranked in {args.out}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
