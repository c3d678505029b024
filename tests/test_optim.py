"""Optimizers and schedules are registered by name: the config's choices are the registries,
every entry builds, and a name outside them is refused (never silently replaced)."""
import pytest
import torch

from training.engine.build import optimizer_for, schedule_for
from training.engine.config import ConfigError, TrainConfig, resolve
from training.engine.models import build_model, get_spec
from training.engine.optim import OPTIMIZERS, SCHEDULES


def test_the_config_offers_exactly_the_registered_names():
    fields = TrainConfig.__dataclass_fields__
    assert fields["optimizer"].metadata["choices"] == tuple(OPTIMIZERS)
    assert fields["schedule"].metadata["choices"] == tuple(SCHEDULES)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_optimizer_and_schedule_builds_and_steps(optimizer, schedule):
    cfg = resolve({"model": "cnn", "optimizer": optimizer, "schedule": schedule, "epochs": 2})
    model = build_model("cnn", 3, 32)
    opt = optimizer_for(cfg, model, get_spec(cfg.model).head)
    scheduler = schedule_for(cfg, opt, 5)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    if scheduler is not None:
        scheduler.step()
    assert (scheduler is None) == (schedule == "none")


@pytest.mark.parametrize("setting", [{"optimizer": "lion"}, {"schedule": "warmup"}])
def test_a_name_outside_the_registries_is_refused(setting):
    with pytest.raises(ConfigError, match="is not one of"):
        resolve(setting)
