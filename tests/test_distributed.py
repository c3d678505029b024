"""Training on several processes: real torchrun, gloo on the CPU, one MLflow run per training."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from shared.network import InputTransform
from shared.preprocess import Preprocessing
from training.engine import distributed
from training.engine.batches import DeviceLoader, Sampling, Shard
from training.engine.build import check_world, prepare
from training.engine.config import ConfigError
from training.servers import free_port
from training.tracking import checkpoint
from training.train import train

from datagen import make_image_folder

IDENTITY = Preprocessing(4, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def shares(world_size, n=24, batch=8, **options):
    """The labels each process draws in one epoch, batch by batch."""
    out = []
    for rank in range(world_size):
        loader = DeviceLoader(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n), batch,
                              InputTransform(IDENTITY), Sampling(seed=5, **options),
                              shard=Shard(rank, world_size))
        out.append([y.tolist() for _, y in loader])
    return out


def test_an_epoch_visits_every_image_once_across_processes():
    ranks = shares(3, shuffle=True, drop_last=True)
    drawn = [i for batches in ranks for batch in batches for i in batch]
    assert sorted(drawn) == list(range(24))
    assert all(len(batch) == 8 // 3 or len(batch) == 3 for batches in ranks for batch in batches)


def test_the_processes_of_a_global_batch_hold_a_single_process_batch():
    (single,) = shares(1, shuffle=True, drop_last=True)
    two = shares(2, shuffle=True, drop_last=True)
    for i, batch in enumerate(single):
        assert sorted(two[0][i] + two[1][i]) == sorted(batch)


def test_evaluation_shares_skip_a_process_left_without_images():
    ranks = shares(4, n=9, batch=8)  # the last batch holds one image, for rank 0 alone
    assert [len(batches) for batches in ranks] == [2, 1, 1, 1]
    assert sorted(i for batches in ranks for b in batches for i in b) == list(range(9))


@pytest.fixture
def world_of(monkeypatch):
    def make(size):
        monkeypatch.setattr(distributed, "_world", distributed.World(0, 0, size, size, "gloo"))
    return make


def test_a_global_batch_that_does_not_split_across_processes_is_refused(world_of, train_config):
    cfg = train_config(batch_size=16)
    splits = prepare(cfg, log=lambda *_: None)
    world_of(3)
    with pytest.raises(ConfigError, match="global batch.*divide by 3"):
        check_world(cfg, splits)


def test_every_process_needs_a_training_image(world_of, train_config):
    cfg = train_config(batch_size=64)
    splits = prepare(cfg, log=lambda *_: None).subset(3)
    world_of(4)
    with pytest.raises(ConfigError, match="3 training image.*4 processes"):
        check_world(cfg, splits)


def test_the_tuner_refuses_to_run_under_torchrun(monkeypatch, capsys):
    from training import tune

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert tune.main(["--trials", "1"]) == 2
    assert "one process per trial" in capsys.readouterr().err


# --- real torchrun processes -----------------------------------------------------------------

def torchrun(*launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "training.train"]


def training_args(data, store, tmp_path, *extra):
    return ["--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--tracking-uri", store, "--batch-size", "16", "--val-fraction", "0.2",
            "--no-system-metrics", "--no-progress", "--device", "cpu", "--patience", "0", *extra]


def run(cmd, timeout=240):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def only_run(store):
    client = MlflowClient(store)
    (run_,) = client.search_runs([client.get_experiment_by_name("training").experiment_id])
    return run_


def history(store, run_id, key):
    return [(m.step, m.value) for m in sorted(MlflowClient(store).get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


CACHED_HEAD = {"model": "efficientnet_lite0", "weights": "imagenet", "freeze": "backbone",
               "input_size": 32}


@pytest.mark.parametrize("settings, tolerance", [({"model": "mlp"}, 1e-4), ({"model": "cnn"}, 0.15),
                                                 (CACHED_HEAD, 1e-4),
                                                 ({"model": "mlp", "data_on_device": "no"}, 1e-4)],
                         ids=["mlp", "cnn", "head-on-cached-features", "mlp-data-in-mapped-cache"])
def test_two_processes_train_one_run_that_matches_one_process(
        settings, tolerance, image_folder, store, tmp_path, train_config):
    """mlp and a head on cached features: the same steps as one process (the gradient of a
    batch is the mean of its shares' gradients), up to summation order. cnn: BatchNorm
    normalises each process's 8 images with their own statistics, not the 16 of the batch, so
    the losses differ (by 0.02-0.05 here)."""
    model = settings["model"]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()] + ["--epochs", "2",
                                                                            "--no-augment"]
    run(torchrun("--standalone", "--nproc-per-node", "2")
        + training_args(image_folder, store, tmp_path, *args))
    ddp = only_run(store)
    assert ddp.info.status == "FINISHED" and "test_acc" in ddp.data.metrics
    params = ddp.data.params
    assert (params["world_size"], params["nodes"], params["backend"]) == ("2", "1", "gloo")
    mapped = settings.get("data_on_device") == "no"
    assert params["data_placement"] == ("memory-mapped cache" if mapped else "device")
    assert (params["batch_size"], params["batch_size_per_process"]) == ("16", "8")
    assert [step for step, _ in history(store, ddp.info.run_id, "train_loss")] == [1, 2]
    registry = MlflowClient(store, registry_uri=store)
    assert registry.get_model_version_by_alias("tiny-" + model, "champion").run_id == ddp.info.run_id
    single = train(train_config(**settings, epochs=2, augment=False, no_register=True),
                   log=lambda *_: None)
    ddp_loss = [v for _, v in history(store, ddp.info.run_id, "train_loss")]
    print("train loss, 2 processes:", ddp_loss, "1 process:", [h["train_loss"] for h in single.history])
    assert ddp_loss == pytest.approx([h["train_loss"] for h in single.history], abs=tolerance)
    val = [v for _, v in history(store, ddp.info.run_id, "val_loss")]
    assert val == pytest.approx([h["val_loss"] for h in single.history], abs=tolerance)


def test_two_nodes_on_one_machine_train_one_run(image_folder, store, tmp_path):
    port = free_port()
    cmds = [torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}")
            + training_args(image_folder, store, tmp_path, "--model", "mlp", "--epochs", "2")
            for rank in (0, 1)]
    nodes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for c in cmds]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ddp = only_run(store)
    assert ddp.info.status == "FINISHED"
    assert (ddp.data.params["world_size"], ddp.data.params["nodes"]) == ("2", "2")
    assert ddp.data.params["node_devices"].count("node ") == 2
    assert [step for step, _ in history(store, ddp.info.run_id, "val_acc")] == [1, 2]


@pytest.fixture(scope="module")
def larger_folder(tmp_path_factory):
    """600 images: an epoch of two processes lasts about a second, long enough to be stopped in."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "larger", n_train=200, n_test=10)


def start_until_epoch_one(cmd):
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("epoch   1/"):
            return process, seen
    process.wait()
    pytest.fail("torchrun ended before epoch 1: " + "".join(seen)[-3000:])


def workers(launcher_pid):
    """{local rank: pid} of torchrun's worker processes (its children holding LOCAL_RANK)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0") if ppid == launcher_pid else []
        except (OSError, ValueError, IndexError):
            continue
        for item in env:
            if item.startswith(b"LOCAL_RANK="):
                found[int(item.split(b"=")[1])] = int(proc.name)
    return found


def resume_and_finish(store, data, tmp_path, run_id, epochs):
    run(torchrun("--standalone", "--nproc-per-node", "2")
        + training_args(data, store, tmp_path, "--resume", "last"))
    client = MlflowClient(store)
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and "test_acc" in finished.data.metrics
    for key in ("train_loss", "val_acc"):
        assert [step for step, _ in history(store, run_id, key)] == list(range(1, epochs + 1))


def test_sigterm_to_torchrun_stops_every_process_and_the_run_resumes_under_torchrun(
        larger_folder, store, tmp_path):
    cmd = torchrun("--standalone", "--nproc-per-node", "2") + training_args(
        larger_folder, store, tmp_path, "--model", "cnn", "--epochs", "4", "--no-register")
    process, _ = start_until_epoch_one(cmd)
    time.sleep(0.3)  # mid-epoch 2
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    killed = only_run(store)
    assert killed.info.status == "KILLED", output[-3000:]
    reason = killed.data.tags["stop_reason"]
    resume = f"torchrun --standalone --nproc-per-node 2 -m training.train --resume {killed.info.run_id}"
    assert resume in reason
    resume_and_finish(store, larger_folder, tmp_path, killed.info.run_id, 4)


def test_a_killed_process_ends_the_job_and_the_run_resumes(larger_folder, store, tmp_path):
    cmd = torchrun("--standalone", "--nproc-per-node", "2") + training_args(
        larger_folder, store, tmp_path, "--model", "cnn", "--epochs", "4", "--no-register")
    process, _ = start_until_epoch_one(cmd)
    time.sleep(0.3)
    os.kill(workers(process.pid)[1], signal.SIGKILL)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    failed = only_run(store)
    assert failed.info.status == "FAILED", output[-3000:]
    assert "another process of this training stopped" in failed.data.tags["failure_reason"]
    assert "--resume" in failed.data.tags["failure_reason"]
    resume_and_finish(store, larger_folder, tmp_path, failed.info.run_id, 4)


@pytest.mark.parametrize("data", ["folder", "stream"])
def test_a_process_killed_mid_epoch_resumes_after_its_last_step_with_every_image_seen_once(
        data, larger_folder, store, tmp_path):
    """The interrupted epoch's training loss and accuracy are sums over its images: equal to
    an uninterrupted run's, each image was trained on once, none twice or never. Streamed
    from shards, each process reads its own and goes on past the batches it trained."""
    args = ("--model", "mlp", "--epochs", "3", "--no-register", "--batch-size", "8",
            "--checkpoint-steps", "1")
    if data == "stream":
        from training.shards import main as shards_main
        assert shards_main([str(larger_folder), str(tmp_path / "shards"), "--per-shard", "30"]) == 0
        larger_folder = tmp_path / "shards"
        args += ("--stream", "--stream-workers", "1")
    other = f"sqlite:///{tmp_path / 'whole.db'}"
    run(torchrun("--standalone", "--nproc-per-node", "2")
        + training_args(larger_folder, other, tmp_path, *args))
    process, _ = start_until_epoch_one(torchrun("--standalone", "--nproc-per-node", "2")
                                       + training_args(larger_folder, store, tmp_path, *args))
    time.sleep(0.5)
    os.kill(workers(process.pid)[1], signal.SIGKILL)
    process.communicate(timeout=120)
    failed = only_run(store)
    saved = torch.load(checkpoint.checkpoint_path(store, failed.info.run_id), weights_only=False)
    assert saved["loader"].get("within"), "the kill did not land within an epoch"
    resume_and_finish(store, larger_folder, tmp_path, failed.info.run_id, 3)
    whole = only_run(other)
    if data == "stream":
        assert whole.data.params["data_placement"] == "streamed from shards"
    for key in ("train_loss", "train_acc"):
        assert [v for _, v in history(store, failed.info.run_id, key)] == pytest.approx(
            [v for _, v in history(other, whole.info.run_id, key)], abs=1e-5), key


def test_a_checkpoint_from_before_sync_bn_existed_still_resumes(train_config, store):
    from training.cli import resume_config
    from training.tracking import checkpoint
    from training.tracking.run import TrainingInterrupted

    calls = []
    with pytest.raises(TrainingInterrupted):
        train(train_config(epochs=3), log=lambda *_: None,
              stop_requested=lambda: calls.append(1) or len(calls) > 4)
    path = next((checkpoint.store_folder(store) / "checkpoints").glob("*/last.pt"))
    old = torch.load(path, weights_only=True)
    del old["config"]["sync_bn"]
    checkpoint.save(path, old)
    cfg, resume = resume_config(train_config(resume="last"))
    assert cfg.sync_bn is False and resume.checkpoint["epoch"] == 1
