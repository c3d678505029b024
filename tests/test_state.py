"""The training state and the fit loop, without tracking: one object saved and restored whole."""
import dataclasses

import pytest
import torch

from training.engine.build import build, prepare
from training.engine.loop import Callbacks, StopRequested, Validation, fit, train_epoch
from training.engine.state import FitResult, TrainingState, snapshot

from datagen import CLASSES

# every stateful option on: lookahead, one-cycle schedule, alternating flips, random crops
OPTIONS = dict(model="cnn", epochs=4, lookahead=True, schedule="onecycle", flip="alternate",
               crop_padding=2)


def quiet(*_):
    pass


def built(train_config, **overrides):
    cfg = train_config(**{**OPTIONS, **overrides})
    return build(cfg, prepare(cfg, log=quiet), log=quiet)


def run_fit(setup, epochs, **options):
    return fit(setup.network, setup.state, setup.loss_fn,
               Validation(setup.loaders.val, len(CLASSES)), epochs=epochs, **options)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_every_stateful_part_is_saved_under_its_own_name(train_config):
    state = built(train_config).state
    saved = state.state_dict()
    for part in dataclasses.fields(TrainingState):
        assert getattr(state, part.name) is None or saved[part.name] is not None, part.name
    assert "rng" in saved


def test_a_restored_state_trains_on_exactly_as_the_one_it_was_saved_from(train_config):
    first = built(train_config)
    train_epoch(first.network, first.state, first.loss_fn)
    saved = snapshot(first.state.state_dict())
    train_epoch(first.network, first.state, first.loss_fn)

    second = built(train_config)  # as new: weights, momentum, schedule, loader at their start
    second.state.load_state_dict(saved)
    train_epoch(second.network, second.state, second.loss_fn)
    for name, value in weights(first.model).items():
        assert torch.equal(value, second.model.state_dict()[name]), name


def test_fit_tells_each_epoch_once_in_order(train_config):
    setup = built(train_config)
    told = []
    result = run_fit(setup, 3, callbacks=Callbacks(on_epoch=lambda e, m: told.append((e, m))))
    assert [e for e, _ in told] == [1, 2, 3] and result.epochs_run == 3
    assert [m for _, m in told] == result.history
    assert {"train_loss", "val_acc", "lr", "epoch_seconds"} <= set(told[0][1])


def test_fit_goes_on_after_the_history_it_starts_from(train_config):
    setup = built(train_config)
    done = run_fit(setup, 2)
    told = []
    start = FitResult(history=list(done.history), train_seconds=done.train_seconds)
    result = run_fit(setup, 4, start=start,
                     callbacks=Callbacks(on_epoch=lambda e, m: told.append(e)))
    assert told == [3, 4] and result.epochs_run == 4


def test_fit_stops_after_the_step_in_progress_when_asked(train_config):
    setup = built(train_config)
    steps = []

    def requested():
        steps.append(1)
        return len(steps) == 2

    with pytest.raises(StopRequested):
        run_fit(setup, 3, callbacks=Callbacks(stop_requested=requested))
    assert len(steps) == 2 and setup.state.averager.steps == 2


def test_a_stopped_early_run_restores_its_best_weights(train_config):
    setup = built(train_config, model="mlp", patience=1, lr=1e-9, schedule="none",
                  lookahead=False)
    result = run_fit(setup, 6)
    assert result.stopped_epoch == result.best_epoch + 1
    assert all(torch.equal(v, setup.state.stopper.best_state[k])
               for k, v in setup.model.state_dict().items())


def test_optional_parts_may_be_missing_from_a_saved_state_but_the_model_may_not(train_config):
    setup = built(train_config)
    saved = snapshot(setup.state.state_dict())
    setup.state.load_state_dict({k: v for k, v in saved.items() if k != "averager"})
    with pytest.raises(KeyError, match="model"):
        setup.state.load_state_dict({k: v for k, v in saved.items() if k != "model"})
