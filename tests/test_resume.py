"""Nothing lost: checkpoints, resume, and real processes interrupted by signals."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

import training.tracking.run
from shared.store import store_folder
from training.cli import resume_config
from training.engine.config import TrainConfig, added_settings
from training.tracking import checkpoint
from training.tracking.run import RunOptions, TrainingInterrupted
from training.train import train


def quiet(*_):
    pass


def steps(store, run_id, key="val_acc"):
    return [m.step for m in sorted(MlflowClient(store).get_metric_history(run_id, key),
                                   key=lambda m: m.step)]


def values(store, run_id, key):
    return [m.value for m in sorted(MlflowClient(store).get_metric_history(run_id, key),
                                    key=lambda m: m.step)]


def stop_after_steps(n):
    calls = []

    def requested():
        calls.append(1)
        return len(calls) > n
    return requested


LITE0 = {"model": "efficientnet_lite0", "weights": "imagenet", "freeze": "backbone",
         "input_size": 32}


@pytest.mark.parametrize("options", [{}, {"model": "fast", "val_fraction": 0.2}, LITE0,
                                     {**LITE0, "unfreeze_after": 2}],
                         ids=["cnn", "fast-lookahead-alternate-flip", "cached-features",
                              "unfrozen-after-2"])
def test_a_resumed_run_matches_an_uninterrupted_one(options, train_config, store):
    cfg = train_config(epochs=4, seed=3, **options)
    whole = train(cfg, log=quiet)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cfg, log=quiet, stop_requested=stop_after_steps(8))  # 3 steps per epoch: mid-epoch 3
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("training").experiment_id
    (killed,) = [r for r in client.search_runs([experiment]) if r.info.status == "KILLED"]
    assert steps(store, killed.info.run_id) == [1, 2]
    resumed_cfg, resume = resume_config(train_config(resume="last"))
    assert resume.run_id == killed.info.run_id and resume.checkpoint["epoch"] == 2
    result = train(resumed_cfg, log=quiet, resume=resume)
    assert MlflowClient(store).get_run(resume.run_id).info.status == "FINISHED"
    assert steps(store, resume.run_id) == [1, 2, 3, 4]
    assert values(store, resume.run_id, "val_loss") == pytest.approx(values(store, whole.run_id, "val_loss"),
                                                              abs=1e-5)
    assert result.test_acc == pytest.approx(whole.test_acc)
    assert not checkpoint.checkpoint_path(store, resume.run_id).exists()  # removed once finished


def test_a_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "run" / "last.pt"
    checkpoint.save(path, {"epoch": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, {"epoch": 2})
    assert checkpoint.load(path) == {"epoch": 1}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_resuming_a_finished_run_is_refused(train_config, store):
    result = train(train_config(epochs=1), log=quiet)
    with pytest.raises(checkpoint.ResumeError, match="already finished"):
        resume_config(train_config(resume=result.run_id))


def test_resume_last_without_any_checkpoint_says_so(train_config):
    with pytest.raises(checkpoint.ResumeError, match="no unfinished run"):
        resume_config(train_config(resume="last"))


def command(image_folder, store, tmp_path, *extra):
    return [sys.executable, "-m", "training.train", "--model", "cnn", "--data-dir", str(image_folder),
            "--cache-dir", str(tmp_path / "cache"), "--tracking-uri", store, "--batch-size", "16",
            "--val-fraction", "0.2", "--no-system-metrics", "--no-progress", "--device", "cpu",
            "--patience", "0", *extra]


def run_until_epoch(cmd, epoch):
    """Start a training process and return it once it has printed `epoch`'s line."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith(f"epoch {epoch:>3}/"):
            return process
    process.wait()
    pytest.fail(f"the process ended before epoch {epoch}")


def wait_for_first_checkpoint(store, timeout=60):
    deadline = time.monotonic() + timeout
    while not list((store_folder(store) / "checkpoints").glob("*/last.pt")):
        assert time.monotonic() < deadline, "no checkpoint written after epoch 1"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_training_process_killed_at_a_random_step_resumes_with_no_gap_or_duplicate(
        sig, code, image_folder, store, tmp_path):
    epochs = 30
    process = run_until_epoch(command(image_folder, store, tmp_path, "--epochs", str(epochs)), 1)
    wait_for_first_checkpoint(store)  # before it, a kill -9 leaves nothing to resume (and says so)
    delay = random.uniform(0, 1.0)  # anywhere: a step, a checkpoint write, a metrics write
    time.sleep(delay)
    process.send_signal(sig)
    output = process.communicate(timeout=60)[0]
    where = f"signal {delay:.3f} s after epoch 1"
    assert process.returncode == code, (where, output[-1500:])
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("training").experiment_id])
    if sig != signal.SIGKILL:
        assert run.info.status == "KILLED" and "--resume" in run.data.tags["stop_reason"], where
    else:
        assert run.info.status == "RUNNING", where  # no chance to clean up
    resumed = subprocess.run(command(image_folder, store, tmp_path, "--resume", "last"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (where, resumed.stdout[-1500:] + resumed.stderr[-1500:])
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics, where
    for key in ("train_loss", "val_acc", "epoch_seconds"):
        assert steps(store, run.info.run_id, key) == list(range(1, epochs + 1)), where
    registry = MlflowClient(store, registry_uri=store)
    assert registry.get_model_version_by_alias("tiny-cnn", "champion").run_id == run.info.run_id


def test_four_concurrent_runs_on_one_store_lose_no_metric(image_folder, store, tmp_path):
    from training.tracking.publish import ensure_experiment
    ensure_experiment("training", store)  # as the README says: create the store before workers
    cmds = [command(image_folder, store, tmp_path, "--model", "mlp", "--epochs", "5", "--seed", str(i),
                    "--no-register") for i in range(4)]
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in cmds]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [o[-800:] for o in outputs]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("training").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        for key in ("train_loss", "val_acc", "epoch_seconds"):
            assert steps(store, run.info.run_id, key) == [1, 2, 3, 4, 5]
        assert "test_acc" in run.data.metrics


class Outage:
    """Epoch metrics fail to log while `down` is true, as with a tracking server gone away."""

    def __init__(self, monkeypatch):
        import training.tracking.run_log
        self.down, self.real = False, training.tracking.run_log.log_epoch
        monkeypatch.setattr(training.tracking.run_log, "log_epoch", self)

    def __call__(self, *args, **kwargs):
        if self.down:
            raise ConnectionError("tracking server unreachable")
        return self.real(*args, **kwargs)


def test_training_goes_on_while_the_store_is_down_and_logs_every_epoch_once_it_is_back(
        train_config, store, monkeypatch):
    outage = Outage(monkeypatch)
    messages = []

    def hook(epoch, metrics):
        outage.down = epoch in (1, 2)  # fails while logging epochs 2 and 3

    result = train(train_config(epochs=5, patience=0), log=messages.append,
                   options=RunOptions(epoch_hook=hook))
    assert steps(store, result.run_id) == [1, 2, 3, 4, 5]
    assert any("did not take epoch" in m and "training goes on" in m for m in messages)
    assert any("answers again" in m for m in messages)
    assert MlflowClient(store).get_run(result.run_id).info.status == "FINISHED"


def test_a_store_still_down_at_the_end_keeps_the_checkpoint_and_resume_finishes_the_run(
        train_config, store, monkeypatch):
    outage = Outage(monkeypatch)

    def hook(epoch, metrics):
        outage.down = epoch >= 2

    with pytest.raises(training.tracking.run.StoreUnavailable, match="--resume"):
        train(train_config(epochs=4, patience=0), log=quiet, options=RunOptions(epoch_hook=hook))
    outage.down = False
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("training").experiment_id])
    cfg, resume = resume_config(train_config(resume=run.info.run_id))
    logged = steps(store, run.info.run_id)  # the writer may have logged epoch 2 before the outage
    assert logged in ([1], [1, 2]) and resume.checkpoint["epoch"] == 4
    result = train(cfg, log=quiet, resume=resume)
    assert steps(store, resume.run_id) == [1, 2, 3, 4] and result.epochs_run == 4
    assert client.get_run(resume.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("setting", added_settings())
def test_a_checkpoint_written_before_a_setting_existed_still_resumes(setting, train_config, store):
    cfg = train_config(epochs=2)
    with pytest.raises(TrainingInterrupted):
        train(cfg, log=quiet, stop_requested=stop_after_steps(4))  # 3 steps per epoch: in epoch 2
    run_id = checkpoint.find_resumable(store, "last")
    path = checkpoint.checkpoint_path(store, run_id)
    older = checkpoint.load(path)
    del older["config"][setting]  # as a version before the setting wrote it
    checkpoint.save(path, older)
    resumed, resume = resume_config(train_config(resume="last"))
    assert getattr(resumed, setting) == getattr(TrainConfig, setting)
    result = train(resumed, log=quiet, resume=resume)
    assert result.epochs_run == 2
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"


def test_a_checkpoint_lacking_a_setting_that_is_not_marked_added_is_refused(train_config, store):
    with pytest.raises(TrainingInterrupted):
        train(train_config(epochs=2), log=quiet, stop_requested=stop_after_steps(4))
    path = checkpoint.checkpoint_path(store, checkpoint.find_resumable(store, "last"))
    older = checkpoint.load(path)
    del older["config"]["label_smoothing"]
    checkpoint.save(path, older)
    with pytest.raises(checkpoint.ResumeError, match="lacks some it needs \\(label_smoothing\\)"):
        resume_config(train_config(resume="last"))


@pytest.mark.parametrize("options", [{}, LITE0], ids=["cnn-augmented", "cached-features"])
def test_a_run_stopped_mid_epoch_resumes_after_its_last_step_and_matches_an_uninterrupted_one(
        options, train_config, store):
    cfg = train_config(epochs=3, seed=3, checkpoint_steps=1, **options)
    whole = train(cfg, log=quiet)
    with pytest.raises(TrainingInterrupted):
        train(cfg, log=quiet, stop_requested=stop_after_steps(4))  # 3 steps an epoch: epoch 2, step 2
    resumed_cfg, resume = resume_config(train_config(resume="last"))
    assert resume.checkpoint["epoch"] == 1
    assert resume.checkpoint["loader"]["within"]["done"] == 2
    train(resumed_cfg, log=quiet, resume=resume)
    assert steps(store, resume.run_id, "train_loss") == [1, 2, 3]
    for key in ("train_loss", "train_acc", "val_loss"):
        assert values(store, resume.run_id, key) == pytest.approx(values(store, whole.run_id, key),
                                                                  abs=1e-6), key
