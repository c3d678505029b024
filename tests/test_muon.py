"""The Muon optimizer option: orthogonalised steps for hidden weights, SGD for the rest."""
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from training.engine.build import optimizer_for, schedule_for
from training.engine.config import ConfigError, resolve
from training.engine.models import build_model, get_spec
from training.engine.muon import Muon, muon_groups, normalized_weights, orthogonalize
from training.train import train


def quiet(*_):
    pass


@pytest.mark.parametrize("shape", [(16, 72), (72, 16)])
def test_orthogonalize_gives_the_polar_factor_with_singular_values_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    o = orthogonalize(g)
    singular = torch.linalg.svdvals(o)
    assert o.shape == g.shape and singular.min() > 0.6 and singular.max() < 1.2
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    assert torch.nn.functional.cosine_similarity(o.flatten(), polar.flatten(), dim=0) > 0.97


def test_hidden_weights_go_to_muon_and_the_output_layer_and_biases_to_sgd():
    model = build_model("cnn", 10, 32)
    groups, rest = muon_groups(model, lr=0.02, momentum=0.9, weight_decay=0.0)
    in_muon = {id(p) for g in groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_muon}
    assert names == {"features.0.weight", "features.4.weight", "features.8.weight",
                     "classifier.1.weight", "classifier.4.weight"}
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - in_muon


def test_only_weights_followed_by_normalization_are_kept_at_a_fixed_norm():
    model = build_model("fast", 10, 32)  # conv, max-pool, BatchNorm: still scale-free
    scale_free = normalized_weights(model)
    named = {n for n, p in model.named_parameters() if id(p) in scale_free}
    assert named == {f"features.{g}.{i}.weight" for g in (2, 3, 4) for i in (0, 4)}
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2))
    assert normalized_weights(mlp) == set()  # the ReLU in between changes with the scale


def test_a_muon_step_is_the_orthogonalised_gradient_and_an_sgd_step_matches_torch():
    torch.manual_seed(0)
    hidden, out = nn.Linear(6, 12), nn.Linear(12, 3)
    hidden_w, out_w = hidden.weight.detach().clone(), out.weight.detach().clone()
    reference = nn.Linear(12, 3)
    reference.load_state_dict(out.state_dict())
    optimizer = Muon([{"params": [hidden.weight], "muon": True, "lr": 0.1},
                      {"params": [out.weight, out.bias], "weight_decay": 0.01}],
                     lr=0.5, momentum=0.9)
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9, nesterov=True,
                                weight_decay=0.01)
    x = torch.randn(32, 6)
    for _ in range(3):
        for opt in (optimizer, torch_sgd):
            opt.zero_grad()
        out(hidden(x)).square().mean().backward()
        reference(hidden(x).detach()).square().mean().backward()
        grad = hidden.weight.grad.clone()
        first = len(optimizer.state) == 0
        optimizer.step()
        torch_sgd.step()
        if first:  # momentum buffer = grad; Nesterov update = grad * (1 + momentum)
            step = orthogonalize(1.9 * grad) * 0.1 * (12 / 6) ** 0.5
            assert torch.allclose(hidden.weight, hidden_w - step, atol=1e-5)
    assert torch.allclose(out.weight, reference.weight, atol=1e-6)
    assert not torch.allclose(out.weight, out_w)


@pytest.mark.parametrize("normalize", [True, False])
def test_a_normalized_muon_weight_is_brought_back_to_a_fixed_norm(normalize):
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight.mul_(5 * 8 ** 0.5 / conv.weight.norm())  # five times sqrt(outputs)
    optimizer = Muon([{"params": [conv.weight], "muon": True, "normalize": normalize}], lr=1e-6)
    conv(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    expected = 8 ** 0.5 if normalize else 5 * 8 ** 0.5
    assert conv.weight.norm().item() == pytest.approx(expected, rel=1e-4)


def test_onecycle_leaves_muon_momentum_alone_and_decay_falls_from_full_to_zero(train_config):
    cfg = train_config(optimizer="muon", muon_momentum=0.6, momentum=0.85, lr=1.0, epochs=1)
    model = build_model("cnn", 3, 32)
    optimizer = optimizer_for(cfg, model, get_spec(cfg.model).head)
    schedule_for(cfg, optimizer, 10)
    assert [g["momentum"] for g in optimizer.param_groups if g["muon"]] == [0.6, 0.6]
    cfg = train_config(optimizer="muon", schedule="decay", lr=1.0, epochs=1)
    optimizer = optimizer_for(cfg, model, get_spec(cfg.model).head)
    scheduler = schedule_for(cfg, optimizer, 10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[-1]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert rates == sorted(rates, reverse=True)


def test_training_with_muon_learns_and_logs_its_settings(train_config, store):
    result = train(train_config(optimizer="muon", muon_lr=0.05, epochs=3), log=quiet)
    run = MlflowClient(store).get_run(result.run_id)
    assert run.data.params["optimizer"] == "muon" and run.data.params["muon_lr"] == "0.05"
    losses = [m.value for m in MlflowClient(store).get_metric_history(result.run_id, "train_loss")]
    assert losses[-1] < losses[0]
    assert run.info.status == "FINISHED"


def test_a_muon_rate_that_is_not_positive_is_refused():
    with pytest.raises(ConfigError, match="muon_lr must be a positive number"):
        resolve({"model": "cnn", "optimizer": "muon", "muon_lr": 0.0})
