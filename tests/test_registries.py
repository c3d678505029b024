"""Every registry entry works, and every flag's choices are its registry's names."""
import dataclasses

import optuna
import pytest
import torch
from torch import nn

from shared.network import TTA, tta_logits
from training.engine.batches import FLIPS
from training.engine.config import COMPILE_MODES, TrainConfig
from training.engine.optim import OPTIMIZERS, SCHEDULES
from training.tune import PRUNERS, SEARCHABLE, TuneConfig, suggest


def choices(cls, name):
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["choices"]


@pytest.mark.parametrize("cls, name, registry", [
    (TrainConfig, "flip", FLIPS), (TrainConfig, "tta", TTA), (TrainConfig, "compile", COMPILE_MODES),
    (TrainConfig, "optimizer", OPTIMIZERS), (TrainConfig, "schedule", SCHEDULES),
    (TuneConfig, "pruner", PRUNERS)])
def test_a_flags_choices_are_its_registrys_names(cls, name, registry):
    assert choices(cls, name) == tuple(registry)


@pytest.mark.parametrize("mode", sorted(TTA))
def test_every_tta_mode_gives_one_score_per_class_and_none_is_the_plain_network(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    x = torch.rand(2, 3, 8, 8)
    scores = tta_logits(net, x, mode)
    assert scores.shape == (2, 5)
    if mode == "none":
        assert torch.equal(scores, net(x))
    if mode == "flip":
        assert torch.allclose(tta_logits(net, x.flip(3), mode), scores, atol=1e-5)
    if mode == "flip-translate":
        assert not torch.allclose(scores, tta_logits(net, x, "flip"))


@pytest.mark.parametrize("name", sorted(FLIPS))
def test_every_flip_keeps_the_batch_and_mirrors_only_whole_images(name):
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    flip = FLIPS[name]
    sides = torch.tensor([True, False]) if flip.alternates else None
    out = flip.apply(x, torch.Generator().manual_seed(0), sides, 0)
    assert out.shape == x.shape
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))


@pytest.mark.parametrize("name", sorted(SEARCHABLE))
def test_every_searchable_setting_is_drawn_within_its_bounds(name, train_config):
    cfg = TuneConfig(**{**dataclasses.asdict(train_config()), "optimizer": "muon", "search": name,
                        "trials": 1}).validate()
    space = cfg.space()
    study = optuna.create_study()
    value = suggest(study.ask(), space)[name]
    bounds = space[name]
    assert value in bounds if name == "batch_size" else bounds[0] <= value <= bounds[1]


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_builds(name):
    assert isinstance(PRUNERS[name](10), optuna.pruners.BasePruner)
