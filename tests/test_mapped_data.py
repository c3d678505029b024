"""Datasets left in the memory-mapped cache: the same batches as in memory, the cache
written in place by the decoding processes, damaged caches rebuilt, killed decoders named and
what they decoded kept."""
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from training.engine import data as data_module
from training.engine.batches import HostImages
from training.engine.build import make_loaders, prepare, preprocessing
from training.engine.data import DecodeKilled, decode_files, load_dataset
from training.engine.device import data_placement
from training.engine.models import get_spec
from training.train import train

from datagen import make_image_folder


def quiet(*_):
    pass


def cache_folder(cache_dir):
    (folder,) = (cache_dir / "datasets").glob("tiny-*")
    return folder


def test_a_mapped_load_gives_the_same_arrays_read_from_the_cache_file(image_folder, tmp_path):
    in_memory = load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    mapped = load_dataset(image_folder, cache_dir=tmp_path, log=quiet, mapped=True)
    assert torch.equal(in_memory.train_images, mapped.train_images)
    assert torch.equal(in_memory.test_labels, mapped.test_labels)
    assert in_memory.fingerprint == mapped.fingerprint
    before = (cache_folder(tmp_path) / "train_images.npy").read_bytes()
    mapped.train_images[:] = 0  # copy-on-write: the process's own pages, never the file
    assert (cache_folder(tmp_path) / "train_images.npy").read_bytes() == before


def test_a_first_load_can_be_mapped_and_with_no_cache_folder_too(image_folder, tmp_path):
    reference = load_dataset(image_folder, cache_dir=None, log=quiet)
    for cache_dir in (tmp_path, None):
        mapped = load_dataset(image_folder, cache_dir=cache_dir, log=quiet, mapped=True)
        assert torch.equal(reference.train_images, mapped.train_images)
        assert reference.fingerprint == mapped.fingerprint


def splits_and_loaders(train_config, placement):
    cfg = train_config(data_on_device=placement, augment=True, crop_padding=4, flip="alternate")
    splits = prepare(cfg, log=quiet)
    return splits, make_loaders(cfg, splits, preprocessing(cfg, splits, get_spec(cfg.model)), False)


def test_mapped_batches_are_bit_identical_to_in_memory_ones_for_a_seed(train_config):
    held, held_loaders = splits_and_loaders(train_config, "yes")
    mapped, mapped_loaders = splits_and_loaders(train_config, "no")
    assert held.on_device and not mapped.on_device
    assert isinstance(mapped.train[0], HostImages) and not isinstance(held.train[0], HostImages)
    assert held.scratch_stats == mapped.scratch_stats
    assert held.files == mapped.files
    for name in ("train", "val", "test"):
        a, b = getattr(held_loaders, name), getattr(mapped_loaders, name)
        for _ in range(2):  # two epochs: the alternating flip turns every image over
            pairs = list(zip(a, b, strict=True))
            assert pairs
            for (xa, ya), (xb, yb) in pairs:
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_auto_holds_a_small_dataset_on_the_device_and_leaves_a_huge_one_on_disk():
    cpu = torch.device("cpu")
    small, why_small = data_placement("auto", 1 << 20, cpu)
    huge, why_huge = data_placement("auto", 1 << 50, cpu)
    assert small and "within half" in why_small
    assert not huge and "memory-mapped cache" in why_huge
    assert data_placement("yes", 1 << 50, cpu) == (True, "--data-on-device yes")
    assert data_placement("no", 1, cpu) == (False, "--data-on-device no")


def test_a_run_with_its_data_on_disk_trains_and_logs_where_the_data_was(train_config):
    result = train(train_config(data_on_device="no"), log=quiet)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data_placement"] == "memory-mapped cache"
    assert run.data.params["data_placement_reason"] == "--data-on-device no"
    assert run.data.params["data_on_device"] == "no"
    assert 0 <= run.data.metrics["test_acc"] <= 1


@pytest.mark.parametrize("damage", ["empty images file", "meta without classes",
                                    "fewer image rows than labels"])
def test_a_damaged_cache_is_decoded_again_and_replaced(damage, image_folder, tmp_path,
                                                       monkeypatch):
    first = load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    folder = cache_folder(tmp_path)
    if damage == "empty images file":
        (folder / "train_images.npy").write_bytes(b"")
    elif damage == "meta without classes":
        meta = (folder / "meta.json").read_text().replace('"classes"', '"klasses"')
        (folder / "meta.json").write_text(meta)
    else:
        np.save(folder / "test_images.npy", np.zeros((2, 3, 32, 32), np.uint8))
    again = load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    assert torch.equal(first.train_images, again.train_images)
    assert first.fingerprint == again.fingerprint and first.classes == again.classes
    monkeypatch.setattr("training.engine.data._decode_found",
                        lambda *a, **k: pytest.fail("the rebuilt cache was not kept"))
    third = load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    assert torch.equal(first.test_images, third.test_images)
    assert len(list((tmp_path / "datasets").iterdir())) == 1  # no stale folder left


def test_a_killed_decoding_process_gives_one_line_saying_what_to_do(image_folder, tmp_path):
    paths = sorted((image_folder / "train").rglob("*.png"))
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=os.abort)  # the worker dies as a killed one does
    try:
        with pytest.raises(DecodeKilled) as caught:
            decode_files(paths, 32, pool, tmp_path / "images.npy")
    finally:
        pool.shutdown(cancel_futures=True)
    message = str(caught.value)
    assert "\n" not in message and "killed" in message
    assert "--decode-workers 1" in message and "--data-on-device no" in message
    assert sorted((image_folder / "train").rglob("*.png")) == paths


def die_after(images: int) -> None:
    """A decoding worker's initializer: the process dies, as a killed one does, when it
    starts on image `images` + 1."""
    real, calls = data_module.decode_image, []

    def decode(*args):
        calls.append(1)
        if len(calls) > images:
            os.abort()
        return real(*args)
    data_module.decode_image = decode


def test_a_decoding_killed_midway_keeps_what_it_decoded_and_the_next_run_goes_on_from_it(
        tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "many", n_train=50, n_test=2)  # 150 + 6 images
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_after, initargs=(100,))
    monkeypatch.setattr(data_module, "decode_pool", lambda *_: pool)
    try:
        with pytest.raises(DecodeKilled, match="the images decoded are kept"):
            load_dataset(root, cache_dir=tmp_path / "cache", log=quiet)
    finally:
        pool.shutdown(cancel_futures=True)
    (partial,) = (tmp_path / "cache" / "datasets").glob(".*.partial")
    monkeypatch.setattr(data_module, "decode_pool", lambda *_: None)
    real, calls = data_module.decode_image, []
    monkeypatch.setattr(data_module, "decode_image", lambda *args: calls.append(1) or real(*args))
    said = []
    resumed = load_dataset(root, cache_dir=tmp_path / "cache", log=said.append)
    assert any("going on from the images an interrupted decoding left" in line for line in said)
    assert len(calls) == 150 + 6 - 64  # the first task's 64 images were kept
    fresh = load_dataset(root, cache_dir=None, log=quiet)
    for split in ("train", "test"):
        assert torch.equal(getattr(resumed, f"{split}_images"), getattr(fresh, f"{split}_images"))
        assert torch.equal(getattr(resumed, f"{split}_labels"), getattr(fresh, f"{split}_labels"))
    assert resumed.fingerprint == fresh.fingerprint and not partial.exists()
    assert not list((tmp_path / "cache").rglob("*.journal"))


CGROUP = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(not os.access(CGROUP, os.W_OK), reason="needs a writable cgroup v1 memory controller")
def test_free_memory_on_the_cpu_is_what_the_memory_cgroup_leaves(tmp_path):
    group = CGROUP / f"cifarlab-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(512 << 20))
        code = ("import torch; from training.engine.device import data_placement, free_memory; "
                "print(free_memory(torch.device('cpu'))); "
                "print(data_placement('auto', 300 << 20, torch.device('cpu')))")
        done = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs; exec "$0" -c "$1"',
                               sys.executable, code], capture_output=True, text=True, timeout=120)
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert done.returncode == 0, done.stderr[-2000:]
    room, placement = done.stdout.strip().splitlines()
    assert "its cgroup" in room and int(room.split(",")[0].strip("(")) < 512 << 20
    assert "False" in placement and "memory-mapped cache" in placement
