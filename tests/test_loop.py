import torch
from torch import nn

from training.engine.state import EarlyStopping


def set_weight(model: nn.Linear, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


def run_stopper(stopper, values, model):
    for epoch, value in enumerate(values, start=1):
        set_weight(model, float(epoch))
        if stopper.step(epoch, {stopper.monitor: value}, model):
            return epoch
    return None


def test_early_stopping_triggers_after_patience_epochs_on_a_plateau():
    stopper = EarlyStopping("val_acc", patience=3)
    stopped = run_stopper(stopper, [0.5, 0.6, 0.6, 0.6, 0.6, 0.7], nn.Linear(2, 2))
    assert stopped == 5 and stopper.best_epoch == 2


def test_early_stopping_restores_the_best_weights():
    model = nn.Linear(2, 2)
    stopper = EarlyStopping("val_acc", patience=2)
    run_stopper(stopper, [0.5, 0.9, 0.4, 0.3], model)
    stopper.restore(model)
    assert torch.all(model.weight == 2.0)


def test_improvements_smaller_than_min_delta_do_not_count():
    stopper = EarlyStopping("val_acc", patience=2, min_delta=0.05)
    stopped = run_stopper(stopper, [0.5, 0.52, 0.54, 0.6], nn.Linear(2, 2))
    assert stopped == 3 and stopper.best_epoch == 1


def test_a_loss_is_monitored_downwards():
    stopper = EarlyStopping("val_loss", patience=2)
    stopped = run_stopper(stopper, [0.9, 0.5, 0.6, 0.7], nn.Linear(2, 2))
    assert stopped == 4 and stopper.best_epoch == 2


def test_patience_zero_never_stops_but_keeps_the_best():
    stopper = EarlyStopping("val_acc", patience=0)
    assert run_stopper(stopper, [0.9, 0.1, 0.1, 0.1, 0.1], nn.Linear(2, 2)) is None
    assert stopper.best_epoch == 1
