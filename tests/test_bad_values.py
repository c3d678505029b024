"""Values no run should start from are refused before a run exists, with the limit; a resumed
checkpoint is checked like a new config; a version scored NaN never becomes champion."""
import re

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_errors import args, runs
from test_resume import quiet, stop_after_steps

import training.tune
from shared.store import CHAMPION
from training.cli import resume_config
from training.tracking import checkpoint
from training.tracking.publish import register_version
from training.tracking.run import TrainingInterrupted
from training.train import main, train


@pytest.mark.parametrize("flag", ["--momentum", "--weight-decay", "--lr", "--label-smoothing",
                                  "--min-delta", "--bias-lr-scale", "--muon-momentum"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_float_setting_that_is_not_finite_is_refused_before_a_run(flag, value, image_folder,
                                                                     store, tmp_path, capsys):
    assert main(args(image_folder, store, tmp_path, flag, value)) == 2
    assert "must be a finite number" in capsys.readouterr().err
    assert runs(store) == []


def test_a_nan_in_a_config_file_is_refused(image_folder, store, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("momentum = nan\n")
    assert main(args(image_folder, store, tmp_path, "--config", str(tmp_path / "bad.toml"))) == 2
    assert "momentum must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--image-size", "--input-size"])
def test_an_absurd_image_size_is_refused_with_the_limit(flag, image_folder, store, tmp_path,
                                                        capsys):
    assert main(args(image_folder, store, tmp_path, flag, "100000")) == 2
    assert "must be 8 to 1024 pixels" in capsys.readouterr().err
    assert runs(store) == []


@pytest.mark.parametrize("name", ["it's-mine", 'say "hi"', "a/b", "x@champion", ""])
def test_a_register_name_that_would_break_model_uris_is_refused(name, image_folder, store,
                                                               tmp_path, capsys):
    assert main(args(image_folder, store, tmp_path, "--register", name)) == 2
    assert "register name" in capsys.readouterr().err
    assert runs(store) == []


def test_a_nan_search_range_is_refused(store, capsys, tmp_path):
    code = training.tune.main(["--tracking-uri", store, "--lr-range", "nan,1",
                               "--data-dir", str(tmp_path / "none")])
    assert code == 2 and "two finite numbers" in capsys.readouterr().err


def test_a_version_scored_nan_never_becomes_champion(registered, registered_store):
    from shared.store import use_store

    use_store(registered_store)
    _, result = registered
    version, promoted = register_version(result.model_uri, "tiny-cnn", float("nan"))
    assert not promoted
    assert str(MlflowClient(registered_store).get_model_version_by_alias("tiny-cnn", CHAMPION).version) == "1"
    _, promoted = register_version(result.model_uri, "only-nan", float("nan"))
    assert not promoted and not MlflowClient(registered_store).get_registered_model("only-nan").aliases


@pytest.fixture
def interrupted(train_config, store):
    """The checkpoint of a run stopped after epoch 1: (config, its path)."""
    cfg = train_config(epochs=3)
    with pytest.raises(TrainingInterrupted):
        train(cfg, log=quiet, stop_requested=stop_after_steps(4))
    run_id = checkpoint.find_resumable(store, "last")
    return cfg, checkpoint.checkpoint_path(store, run_id)


def edit_checkpoint(path, change):
    ckpt = torch.load(path, weights_only=True)
    change(ckpt["config"])
    torch.save(ckpt, path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(momentum=float("nan")), "momentum must be a finite number"),
    (lambda c: c.update(surprise=1), "does not know (surprise)"),
    (lambda c: c.pop("lr"), "lacks some it needs (lr)"),
])
def test_a_resumed_checkpoint_with_bad_settings_is_refused(change, message, interrupted,
                                                           train_config):
    _, path = interrupted
    edit_checkpoint(path, change)
    with pytest.raises(checkpoint.ResumeError, match=re.escape(message)):
        resume_config(train_config(resume="last"))


def test_an_empty_checkpoint_says_why_it_cannot_be_read(interrupted, train_config):
    _, path = interrupted
    path.write_bytes(b"")
    with pytest.raises(checkpoint.ResumeError, match=r"empty \(0 bytes\)"):
        resume_config(train_config(resume="last"))


def test_an_untouched_checkpoint_still_resumes(interrupted, train_config):
    cfg, resume = resume_config(train_config(resume="last"))
    assert resume.checkpoint["epoch"] >= 1 and cfg.epochs == 3


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) \
    + "experiment: *i\n"


@pytest.mark.parametrize("name, content, says", [
    ("bomb.yaml", BOMB.encode(), "aliases (*name) are not accepted"),
    ("list.yaml", b"experiment: [a, b]\n", "experiment must be a single value, not a list"),
    ("nested.toml", b"[experiment]\nname = 'x'\n", "experiment must be a single value, not a dict"),
    ("intkey.yaml", b"1: 2\n", "setting names are text; 1 is not"),
    ("nullkey.yaml", b"~: 2\n", "setting names are text; None is not"),
    ("digits.toml", b"epochs = " + b"9" * 5000 + b"\n", "cannot be read as TOML"),
    ("deep.toml", b"epochs = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "cannot be read as TOML"),
    ("latin1.yaml", "experiment: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 15)"),
    ("long.yaml", b"model: " + b"m" * 5000 + b"\n", "... (5,002 characters)"),
])
def test_a_config_file_no_run_should_read_is_one_short_line(name, content, says, image_folder,
                                                            store, tmp_path, capsys):
    (tmp_path / name).write_bytes(content)
    assert main(args(image_folder, store, tmp_path, "--config", str(tmp_path / name))) == 2
    err = capsys.readouterr().err
    assert says in err and len(err) < 1000 and len(err.strip().splitlines()) == 1, err[:2000]
    assert runs(store) == []
