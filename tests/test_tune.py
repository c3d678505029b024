"""Optuna tuning: trials as child MLflow runs, pruning, resuming, several processes, bad input."""
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

import training.tracking.run
import training.tune
from training.engine.config import ConfigError, resolve
from training.tune import TuneConfig, main, tune

State = optuna.trial.TrialState


def quiet(*_):
    pass


@pytest.fixture
def tune_config(image_folder, store, tmp_path):
    def make(**overrides):
        settings = dict(model="mlp", data_dir=str(image_folder), cache_dir=str(tmp_path / "cache"),
                        tracking_uri=store, batch_size=16, val_fraction=0.2, progress=False,
                        system_metrics=False, device="cpu", trials=3, epochs_range="1,2",
                        pruner="none", final=False, experiment="tuning")
        settings.update(overrides)
        return resolve(settings, cls=TuneConfig)
    return make


def children(store, parent_id):
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tuning")
    return client.search_runs([experiment.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_id}'")


def load(cfg):
    return optuna.load_study(study_name=f"{cfg.model}-{cfg.objective}",
                             storage=training.tune.default_storage(cfg.tracking_uri))


def test_a_three_trial_study_logs_one_parent_and_three_child_runs(tune_config, store):
    cfg = tune_config()
    summary = tune(cfg, log=quiet)
    parent = MlflowClient(store).get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search"] == "lr,epochs"
    assert {"best_val_acc", "trials_complete", "epochs_saved_by_pruning"} <= set(parent.data.metrics)
    assert "best_lr" in parent.data.tags and "best_epochs" in parent.data.tags
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in artifacts
    runs = children(store, parent.info.run_id)
    assert len(runs) == 3
    for run in runs:
        assert run.data.tags["optuna_state"] == "COMPLETE"
        assert {"lr", "epochs", "epochs_run"} <= set(run.data.params)
        assert 1 <= int(run.data.params["epochs"]) <= 2
    trial_runs = {t.user_attrs["mlflow_run_id"] for t in load(cfg).trials}
    assert trial_runs == {r.info.run_id for r in runs}


def test_trials_never_touch_the_test_set(tune_config, store):
    summary = tune(tune_config(trials=2), log=quiet)
    for run in children(store, summary["parent_run_id"]):
        assert "test_acc" not in run.data.metrics


def test_a_pruned_trial_is_marked_pruned_in_optuna_and_mlflow(tune_config, store, monkeypatch):
    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1

    monkeypatch.setattr(training.tune, "make_pruner", lambda cfg: PruneTrialOne())
    cfg = tune_config(epochs_range="2,3")
    summary = tune(cfg, log=quiet)
    trial = load(cfg).trials[1]
    assert trial.state == State.PRUNED
    run = MlflowClient(store).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna_state"] == "PRUNED" and run.info.status == "KILLED"
    assert run.data.tags["epochs_run"] == "1"
    assert summary["trials_pruned"] == 1 and summary["epochs_saved_by_pruning"] >= 1
    assert summary["trials_complete"] == 2  # --trials counts finished trials, pruned ones too


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(tune_config, store,
                                                                           monkeypatch):
    real_suggest = training.tune.suggest

    def first_trial_diverges(trial, space):
        params = real_suggest(trial, space)
        return {**params, "lr": 1e30} if trial.number == 0 else params

    monkeypatch.setattr(training.tune, "suggest", first_trial_diverges)
    cfg = tune_config(optimizer="sgd", schedule="none", trials=2)
    summary = tune(cfg, log=quiet)
    failed = load(cfg).trials[0]
    assert failed.state == State.FAIL and "NonFiniteLossError" in failed.user_attrs["fail_reason"]
    run = MlflowClient(store).get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "lower the learning rate" in run.data.tags["failure_reason"]
    assert summary["trials_complete"] == 2 and summary["trials_failed"] == 1


def test_resuming_an_interrupted_study_keeps_the_finished_trials(tune_config, store, monkeypatch):
    cfg = tune_config(trials=4)
    original = training.tracking.run.epoch_line
    calls = []

    def interrupt_third_trial(epoch, epochs, metrics):
        calls.append(epoch)
        if epoch == 1 and calls.count(1) == 3:
            raise KeyboardInterrupt
        return original(epoch, epochs, metrics)

    monkeypatch.setattr(training.tracking.run, "epoch_line", interrupt_third_trial)
    with pytest.raises(training.tracking.run.TrainingInterrupted):
        tune(cfg, log=quiet)
    before = load(cfg).trials
    assert [t.state for t in before] == [State.COMPLETE, State.COMPLETE, State.FAIL]
    parent_id = load(cfg).user_attrs["mlflow_parent_run_id"]
    assert MlflowClient(store).get_run(parent_id).info.status == "KILLED"

    monkeypatch.setattr(training.tracking.run, "epoch_line", original)
    summary = tune(cfg, log=quiet)
    after = load(cfg).trials
    assert [(t.params, t.value) for t in after[:2]] == [(t.params, t.value) for t in before[:2]]
    assert summary["trials_complete"] == 4 and summary["parent_run_id"] == parent_id
    assert MlflowClient(store).get_run(parent_id).info.status == "FINISHED"
    assert len(children(store, parent_id)) == 5  # 4 complete + the interrupted one, once each


def test_final_run_retrains_the_best_settings_tests_once_and_registers(tune_config, store):
    summary = tune(tune_config(trials=2, final=True), log=quiet)
    final = MlflowClient(store).get_run(summary["final_run_id"])
    assert "test_acc" in final.data.metrics
    assert final.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    best = summary["best_params"]
    assert int(final.data.params["epochs"]) == best["epochs"]
    assert float(final.data.params["lr"]) == pytest.approx(best["lr"])
    name, version, promoted = summary["registered"]
    assert name == "tiny-mlp" and version == "1" and promoted


def test_two_processes_share_one_study_without_losing_or_duplicating_trials(tune_config, store,
                                                                            image_folder, tmp_path):
    cfg = tune_config(trials=6)
    storage = training.tune.default_storage(store)
    args = [sys.executable, "-m", "training.tune", "--model", "mlp", "--data-dir", str(image_folder),
            "--cache-dir", str(tmp_path / "cache"), "--tracking-uri", store, "--storage", storage,
            "--experiment", "tuning", "--batch-size", "16", "--val-fraction", "0.2",
            "--no-progress", "--no-system-metrics", "--device", "cpu", "--trials", "6",
            "--epochs-range", "1,3", "--pruner", "none", "--no-final"]
    lead = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = subprocess.Popen(args + ["--worker"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=240)[0] for p in (lead, worker)]
    assert lead.returncode == 0, outputs[0][-2000:]
    assert worker.returncode == 0, outputs[1][-2000:]
    study = load(cfg)
    trials = study.get_trials(states=(State.COMPLETE,))
    assert len(trials) >= 6
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == len(run_ids)
    runs = children(store, study.user_attrs["mlflow_parent_run_id"])
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids)
    numbers = sorted(int(r.data.tags["optuna_trial"]) for r in runs)
    assert numbers == sorted(t.number for t in trials)


@pytest.mark.parametrize("flags, message", [
    (["--search", "lr,momentum"], "unknown parameter(s) ['momentum']"),
    (["--lr-range", "0.1,0.01"], "empty or inverted"),
    (["--epochs-range", "5,5"], "empty or inverted"),
    (["--lr-range", "0,0.1"], "LOW must be positive"),
    (["--trials", "0"], "trials must be at least 1"),
    (["--search", "muon_lr"], "--search muon_lr needs --optimizer muon"),
])
def test_bad_search_settings_are_refused_before_any_work(flags, message, capsys, store):
    assert main(["--tracking-uri", store, *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_muon_study_searches_the_muon_rate_around_the_recipes(tune_config):
    cfg = tune_config(optimizer="muon", muon_lr=0.05, search="muon_lr,epochs", trials=2)
    assert cfg.space()["muon_lr"] == pytest.approx((0.005, 0.5))
    assert tune(cfg, log=quiet)["trials_complete"] == 2


def test_an_unreachable_storage_is_refused_before_any_work(tune_config, tmp_path, capsys, store):
    url = f"sqlite:///{tmp_path}/no/such/folder/optuna.db"
    assert main(["--tracking-uri", store, "--storage", url, "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "cannot open the Optuna storage" in err and "no/such/folder" in err


def test_a_worker_without_a_lead_says_what_to_start(tune_config, monkeypatch):
    monkeypatch.setattr(training.tune, "WORKER_WAIT_SECONDS", 0)
    with pytest.raises(ConfigError, match="start the lead tuner"):
        tune(tune_config(worker=True), log=quiet)


def test_an_epoch_budget_stops_the_study_once_spent(tune_config):
    summary = tune(tune_config(trials=20, epochs_range="2,3", epoch_budget=5), log=quiet)
    finished = summary["trials_complete"] + summary["trials_pruned"]
    assert 2 <= finished <= 3 and 5 <= summary["epochs_trained"] <= 8
