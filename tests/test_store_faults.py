"""Nothing lost when the store's disk fills up or turns read-only: a real (tmpfs) filesystem.

Mounting needs root (CAP_SYS_ADMIN), as on the CI machines; elsewhere these tests are skipped.
"""
import errno
import shutil
import subprocess
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from training.cli import resume_config
from training.tracking.run import RunOptions, StoreError, StoreUnavailable
from training.train import train


class SmallDisk:
    """A 64 MB tmpfs that a test can fill up, free again, or remount read-only (only while no
    file on it is open for writing: Linux refuses that remount, EBUSY)."""

    def __init__(self, path):
        self.path, self.filler = path, path / "filler"
        path.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")

    def fill(self) -> None:
        """Fill the disk, and keep it full until `free`: space that others free later (SQLite
        removing a journal, say) is taken back within milliseconds, so a small checkpoint
        cannot slip into it (a flake seen under load)."""
        if getattr(self, "_full", None) is not None:
            return
        self._top_up()
        self._full = threading.Event()
        self._full.set()
        self._keeper = threading.Thread(target=self._keep_full, daemon=True)
        self._keeper.start()

    def _top_up(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:  # nothing left to flush on close
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    def _keep_full(self) -> None:
        while self._full.is_set():
            self._top_up()
            time.sleep(0.002)

    def free(self) -> None:
        self._stop_keeping()
        self.filler.unlink()

    def _stop_keeping(self) -> None:
        if getattr(self, "_full", None) is not None:
            self._full.clear()
            self._keeper.join()
            self._full = None

    def read_only(self, yes: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if yes else 'rw'}", str(self.path)],
                       check=True)

    def unmount(self) -> None:
        self._stop_keeping()
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.unmount()


@pytest.fixture
def disk_store(disk, _store_template) -> str:
    db = disk.path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(_store_template, db)
    return f"sqlite:///{db}"


def steps(store, run_id):
    return sorted(m.step for m in MlflowClient(store).get_metric_history(run_id, "val_acc"))


def only_run(store):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("training").experiment_id])
    return run


def champion_run(store):
    registry = MlflowClient(store, registry_uri=store)
    return registry.get_model_version_by_alias("tiny-cnn", "champion").run_id


def test_training_goes_on_through_a_full_disk_and_logs_every_epoch_once(disk, disk_store,
                                                                          train_config):
    def hook(epoch, metrics):
        if epoch == 2:
            disk.fill()
        if epoch == 4:  # checkpoints are written on a background thread: one must have failed
            deadline = time.monotonic() + 60
            while not any("cannot write" in m for m in messages) and time.monotonic() < deadline:
                time.sleep(0.05)
            disk.free()

    messages = []
    result = train(train_config(tracking_uri=disk_store, epochs=6, patience=0),
                   log=messages.append, options=RunOptions(epoch_hook=hook))
    assert steps(disk_store, result.run_id) == [1, 2, 3, 4, 5, 6]
    assert any("cannot write the checkpoint" in m and "training goes on" in m for m in messages)
    assert any("written again" in m for m in messages)
    assert MlflowClient(disk_store).get_run(result.run_id).info.status == "FINISHED"
    assert champion_run(disk_store) == result.run_id


def test_a_disk_still_full_at_the_end_keeps_the_last_checkpoint_and_resume_finishes_the_run(
        disk, disk_store, train_config):
    def hook(epoch, metrics):
        if epoch == 2:
            disk.fill()

    with pytest.raises(StoreUnavailable, match=r"--resume .* after epoch [12]"):
        train(train_config(tracking_uri=disk_store, epochs=4, patience=0), log=lambda *_: None,
              options=RunOptions(epoch_hook=hook))
    disk.free()
    run = only_run(disk_store)
    cfg, resume = resume_config(train_config(tracking_uri=disk_store, resume="last"))
    # the background writer may have met the full disk with epoch 2 already, and the store may
    # have refused the metrics of the last epoch the checkpoint holds: resume logs them
    assert resume.run_id == run.info.run_id and resume.checkpoint["epoch"] in (1, 2)
    logged = steps(disk_store, resume.run_id)
    assert logged == list(range(1, len(logged) + 1)) and len(logged) <= resume.checkpoint["epoch"]
    result = train(cfg, log=lambda *_: None, resume=resume)
    assert steps(disk_store, resume.run_id) == [1, 2, 3, 4] and result.epochs_run == 4
    assert MlflowClient(disk_store).get_run(resume.run_id).info.status == "FINISHED"
    assert champion_run(disk_store) == resume.run_id


def test_a_full_disk_when_the_model_is_saved_keeps_every_epoch_and_resume_only_stores_it(
        disk, disk_store, train_config, monkeypatch):
    import training.tracking.run

    real_log, full = training.tracking.run.log_classifier, [True]

    def log_classifier(*args, **kwargs):
        if full[0]:
            disk.fill()
        return real_log(*args, **kwargs)

    monkeypatch.setattr(training.tracking.run, "log_classifier", log_classifier)
    with pytest.raises(StoreUnavailable, match="could not be stored"):
        train(train_config(tracking_uri=disk_store, epochs=3, patience=0), log=lambda *_: None)
    full[0] = False
    disk.free()
    run_id = only_run(disk_store).info.run_id
    assert steps(disk_store, run_id) == [1, 2, 3]
    cfg, resume = resume_config(train_config(tracking_uri=disk_store, resume=run_id))
    assert resume.checkpoint["epoch"] == 3  # nothing to train again
    result = train(cfg, log=lambda *_: None, resume=resume)
    assert steps(disk_store, resume.run_id) == [1, 2, 3]
    assert result.model_uri and champion_run(disk_store) == resume.run_id


def test_a_read_only_store_is_refused_before_any_training(disk, disk_store, train_config):
    disk.read_only()  # before anything opens the database: Linux refuses while files are open
    with pytest.raises(StoreError, match="cannot take the run.*writable"):
        train(train_config(tracking_uri=disk_store), log=lambda *_: None)
