"""Finding mislabelled training images: out-of-fold heads on frozen features and confident
learning find labels flipped on purpose; the command ranks a real folder's images from a
registered frozen-backbone version and changes nothing in the folder."""
import csv

import torch
from mlflow.tracking import MlflowClient

from tests.test_features import frozen
from training.engine.label_issues import find_issues, out_of_fold
from training.label_issues import COLUMNS, main
from training.train import train


def registered(cfg, result) -> tuple[str, str]:
    (version,) = MlflowClient(cfg.tracking_uri).search_model_versions(f"run_id='{result.run_id}'")
    return version.name, str(version.version)


def test_labels_flipped_on_purpose_are_ranked_first():
    g = torch.Generator().manual_seed(0)
    classes, n = 10, 1000
    labels = torch.arange(n) % classes
    features = (torch.randn(classes, 32, generator=g) * 2)[labels] + torch.randn(n, 32, generator=g) * 1.5
    flipped = torch.randperm(n, generator=g)[:50]
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + 1 + torch.randint(0, classes - 1, (50,), generator=g)) % classes
    issues = find_issues(out_of_fold(features, noisy, classes), noisy)
    top = set(issues.order[:50].tolist())
    assert len(top & set(flipped.tolist())) / 50 >= 0.8
    assert issues.flagged[issues.order[0]] and not issues.flagged[issues.order[-1]]
    assert (issues.suggested[flipped] == labels[flipped]).float().mean() >= 0.6


def test_the_command_ranks_every_training_image_and_leaves_the_folder_alone(
        train_config, image_folder, tmp_path, capsys):
    cfg = frozen(train_config, epochs=1)
    result = train(cfg, log=lambda *_: None)
    name, version = registered(cfg, result)
    before = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*"))
    out = tmp_path / "issues.csv"
    code = main(["--model", f"{name}/{version}", "--data-dir", str(image_folder), "--out",
                 str(out), "--tracking-uri", cfg.tracking_uri, "--cache-dir", cfg.cache_dir,
                 "--folds", "3"])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 60
    assert [int(r["rank"]) for r in rows] == list(range(1, 61))
    assert {r["file"].split("/")[0] for r in rows} == {"train"}
    flags = [r["flagged"] == "True" for r in rows]
    assert flags == sorted(flags, reverse=True)
    assert "training images flagged" in capsys.readouterr().out
    assert sorted(p.relative_to(image_folder) for p in image_folder.rglob("*")) == before


def test_a_version_without_a_frozen_pretrained_backbone_is_refused_in_one_line(
        train_config, image_folder, tmp_path, capsys):
    cfg = train_config(epochs=1)
    result = train(cfg, log=lambda *_: None)
    capsys.readouterr()
    code = main(["--model", "/".join(registered(cfg, result)), "--data-dir",
                 str(image_folder), "--tracking-uri", cfg.tracking_uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a version with a frozen pretrained backbone" in err[0]
