"""--stream: the training split read from its shards by DataLoader workers each epoch, each
process and worker its own shards, the same batches whenever an epoch is run (so a resumed
epoch goes on where it stopped), validation and test from their own shards."""
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.engine import build as build_module
from training.engine.build import build, prepare
from training.engine.config import ConfigError
from training.engine.data import DatasetError
from training.engine.shards import MANIFEST
from training.engine.stream import EpochPlan, SlotStream
from training.shards import main as shards_main
from training.train import train


def quiet(*_):
    pass


@pytest.fixture
def shards(image_folder, tmp_path):
    out = tmp_path / "shards"
    assert shards_main([str(image_folder), str(out), "--per-shard", "8"]) == 0
    return out


def stream_config(train_config, shards, **overrides):
    return train_config(**{"data_dir": str(shards), "stream": True, "batch_size": 8, **overrides})


def epoch_inputs(loader, n=None):
    batches = []
    for i, (x, y) in enumerate(loader):
        batches.append((x.clone(), y.clone()))
        if n is not None and i + 1 == n:
            break
    return batches


def test_a_streamed_run_trains_on_the_shards_and_validates_and_tests_on_their_own_splits(
        shards, train_config, tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "SAMPLE_IMAGES", 16)
    result = train(stream_config(train_config, shards, val_fraction=0.1), log=quiet)
    run = mlflow.get_run(result.run_id)
    manifest = json.loads((shards / MANIFEST).read_text())
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    params = run.data.params
    assert params["data_placement"] == "streamed from shards" and params["stream"] == "True"
    assert [params[f"{s}_size"] for s in ("train", "val", "test")] == [
        str(manifest["splits"][s]["count"]) for s in ("train", "val", "test")]
    assert run.data.tags["dataset_fingerprint"] == manifest["fingerprint"]
    (folder,) = (tmp_path / "cache" / "datasets").iterdir()
    assert np.load(folder / "train_images.npy", mmap_mode="r").shape[0] == 16  # a sample: 2 shards
    assert "data/files_train.txt" not in {f.path for f in mlflow.MlflowClient().list_artifacts(
        result.run_id, "data")}


def test_an_epoch_gives_each_image_at_most_once_across_processes_and_workers(shards, train_config):
    cfg = stream_config(train_config, shards, stream_workers=2)
    spec = prepare(cfg, log=quiet).stream
    rows = []
    for rank in range(2):
        batches = spec.batches_per_slot(4, 2)
        plan = EpochPlan(spec, seed=0, epoch=0, rank=rank, world=2, per_process=4,
                         batches=batches, done=0)
        for _, _, batch_rows, _, _ in DataLoader(SlotStream(plan), batch_size=None, num_workers=2):
            rows += batch_rows.tolist()
    assert len(rows) == len(set(rows)) == 2 * 2 * batches * 4
    assert set(rows) <= set(range(spec.total))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_mid_epoch_gives_the_batches_the_whole_epoch_gives(
        workers, shards, train_config):
    cfg = stream_config(train_config, shards, stream_workers=workers)
    splits = prepare(cfg, log=quiet)
    whole = build(cfg, splits, log=quiet).loaders.train
    first = epoch_inputs(whole)
    second = epoch_inputs(whole)
    assert len(first) == len(whole) and not torch.equal(first[0][0], second[0][0])
    stopped = build(cfg, splits, log=quiet).loaders.train
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_inputs(stopped), first))
    epoch_inputs(stopped, 3)  # epoch 2, stopped after its third batch
    state = stopped.state_dict()
    assert state["within"]["done"] == 3
    resumed = build(cfg, splits, log=quiet).loaders.train
    resumed.load_state_dict(state)
    rest = epoch_inputs(resumed)
    assert len(rest) == len(second) - 3
    for (x, y), (x2, y2) in zip(rest, second[3:]):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_stream_refusals_say_what_to_do(image_folder, shards, train_config, tmp_path):
    with pytest.raises(ConfigError, match="--stream reads WebDataset shards.*python -m training.shards"):
        prepare(train_config(stream=True), log=quiet)
    bare = tmp_path / "bare"
    assert shards_main([str(image_folder), str(bare), "--val-fraction", "0"]) == 0
    with pytest.raises(ConfigError, match="no validation split.*--val-fraction 0.1"):
        prepare(stream_config(train_config, bare), log=quiet)
    with pytest.raises(ConfigError, match="--sampler balanced"):
        stream_config(train_config, shards, sampler="balanced")
    with pytest.raises(ConfigError, match="feature cache"):
        stream_config(train_config, shards, model="efficientnet_lite0", weights="imagenet",
                      freeze="backbone")
    cfg = stream_config(train_config, shards, batch_size=32)
    with pytest.raises(DatasetError, match="fewer images than its batch of 32.*--per-shard"):
        build(cfg, prepare(cfg, log=quiet), log=quiet)


def test_a_stream_over_a_damaged_shard_ends_in_one_line_naming_it(shards, train_config):
    for name in ("train-000000.tar", "train-000002.tar", "train-000004.tar"):
        victim = shards / name
        victim.write_bytes(victim.read_bytes()[:1500])
    done = subprocess.run(
        [sys.executable, "-m", "training.train", "--data-dir", str(shards), "--stream",
         "--model", "mlp", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--max-skipped", "0.9",
         "--tracking-uri", train_config().tracking_uri, "--no-progress", "--no-system-metrics",
         "--cache-dir", train_config().cache_dir], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if "ran out" in line]
    assert "train-00000" in line and "without --stream" in line


@pytest.fixture
def one_bad_image(image_folder, tmp_path):
    """Shards of the tiny folder with one training image that cannot be decoded."""
    import shutil
    source = tmp_path / "photos"
    shutil.copytree(image_folder, source)
    (source / "train" / "cat" / "0003.png").write_bytes(b"not an image at all")
    assert shards_main([str(source), str(tmp_path / "bad-shards"), "--per-shard", "8"]) == 0
    return tmp_path / "bad-shards"


def test_an_image_that_cannot_be_decoded_is_left_out_of_the_stream_and_named(
        one_bad_image, train_config):
    said = []
    result = train(stream_config(train_config, one_bad_image, max_skipped=0.5, epochs=3),
                   log=said.append)
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
    (line,) = [line for line in said if "streamed image(s) could not be decoded" in line]
    assert line.startswith("warning: 1 streamed image(s)") and ".tar#" in line


def test_a_stream_resumed_past_an_undecodable_image_still_gives_the_whole_epochs_batches(
        one_bad_image, train_config):
    cfg = stream_config(train_config, one_bad_image, max_skipped=0.5, stream_workers=0)
    splits = prepare(cfg, log=quiet)
    whole = epoch_inputs(build(cfg, splits, log=quiet).loaders.train)
    stopped = build(cfg, splits, log=quiet).loaders.train
    epoch_inputs(stopped, len(whole) - 1)
    state = stopped.state_dict()
    assert state["within"]["consumed"][0] > state["within"]["done"] * 8  # the bad one was read
    resumed = build(cfg, splits, log=quiet).loaders.train
    resumed.load_state_dict(state)
    (last,) = epoch_inputs(resumed)
    assert torch.equal(last[0], whole[-1][0]) and torch.equal(last[1], whole[-1][1])
