"""Caches are checked before they are believed: a dataset or feature cache that was tampered
with, truncated or written wrong is said, rebuilt in place and clean on the next run; the
dataset fingerprint a run logs is computed from the arrays it uses."""
import json

import numpy as np
import pytest
import torch

from tests.test_features import frozen, prep_of
from training.engine.build import prepare
from training.engine.data import load_dataset
from training.engine.features import frozen_features
from training.engine.models import build_model


def tamper_labels(folder):
    labels = np.load(folder / "train_labels.npy")
    np.save(folder / "train_labels.npy", np.roll(labels, 7))


def zero_test_images(folder):
    images = np.load(folder / "test_images.npy", mmap_mode="r+")
    images[:] = 0
    images.flush()


def empty_file(folder):
    (folder / "train_images.npy").write_bytes(b"")


def labels_out_of_range(folder):
    labels = np.load(folder / "train_labels.npy")
    labels[0] = 99
    np.save(folder / "train_labels.npy", labels)


def meta_without_classes(folder):
    meta = json.loads((folder / "meta.json").read_text())
    del meta["classes"]
    (folder / "meta.json").write_text(json.dumps(meta))


def wrong_shape(folder):
    np.save(folder / "test_images.npy", np.zeros((18, 32, 32), dtype=np.uint8))


@pytest.mark.parametrize("damage, says", [
    (tamper_labels, "its checksum does not match its arrays"),
    (zero_test_images, "its checksum does not match its arrays"),
    (empty_file, "unreadable: EOFError"),
    (labels_out_of_range, "train labels outside 0..2"),
    (meta_without_classes, "unreadable: KeyError"),
    (wrong_shape, "test arrays of shapes (18, 32, 32)"),
])
@pytest.mark.parametrize("mapped", [False, True])
def test_a_damaged_dataset_cache_is_said_rebuilt_in_place_and_clean_next_time(
        image_folder, tmp_path, damage, says, mapped):
    genuine = load_dataset(image_folder, cache_dir=tmp_path, log=lambda *_: None, mapped=mapped)
    labels, images = genuine.train_labels.clone(), genuine.test_images.clone()  # mapped: the file's
    (folder,) = (tmp_path / "datasets").iterdir()
    damage(folder)
    said = []
    again = load_dataset(image_folder, cache_dir=tmp_path, log=said.append, mapped=mapped)
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 1 and says in warnings[0] and str(folder) in warnings[0]
    assert any(line.startswith("decoded ") for line in said)
    assert again.fingerprint == genuine.fingerprint
    assert torch.equal(again.train_labels, labels) and torch.equal(again.test_images, images)
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [folder.name]
    said.clear()
    load_dataset(image_folder, cache_dir=tmp_path, log=said.append, mapped=mapped)
    assert not [line for line in said if line.startswith(("warning:", "decoded "))]


def test_a_cache_from_before_checksums_is_rebuilt_once(image_folder, tmp_path):
    load_dataset(image_folder, cache_dir=tmp_path, log=lambda *_: None)
    (folder,) = (tmp_path / "datasets").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("checksum", "carved", "derived"):
        del meta[key]
    (folder / "meta.json").write_text(json.dumps(meta))
    said = []
    load_dataset(image_folder, cache_dir=tmp_path, log=said.append)
    assert any("no checksum: written by an older version" in line for line in said)
    assert "checksum" in json.loads((folder / "meta.json").read_text())


def zero_rows(saved):
    saved["train"][:, :5] = 0


def half_the_rows(saved):
    saved["train"] = saved["train"][:, : saved["train"].shape[1] // 2]


def no_checksum(saved):
    del saved["checksum"]


@pytest.mark.parametrize("damage, says", [
    (zero_rows, "its checksum does not match its contents"),
    (half_the_rows, "train features of shape"),
    (no_checksum, "no checksum"),
])
def test_damaged_features_under_the_right_key_are_computed_again(train_config, damage, says):
    cfg = frozen(train_config)
    splits = prepare(cfg)
    model = build_model(cfg.model, 3, 32, weights="imagenet", freeze="backbone")
    first = frozen_features(cfg, model, "classifier", prep_of(cfg, splits), splits,
                            log=lambda *_: None)
    saved = torch.load(first.path, weights_only=True)
    damage(saved)
    torch.save(saved, first.path)
    said = []
    again = frozen_features(cfg, model, "classifier", prep_of(cfg, splits), splits, log=said.append)
    assert again.status == "built" and torch.equal(again.train, first.train)
    assert any(line.startswith("warning: the feature cache") and says in line for line in said)
    third = frozen_features(cfg, model, "classifier", prep_of(cfg, splits), splits,
                            log=lambda *_: None)
    assert third.status == "hit"
