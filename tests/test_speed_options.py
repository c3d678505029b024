"""The pieces of the fast recipe, as general training options: each does what it says."""
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from shared.inference import load_classifier
from shared.network import InputTransform, tta_logits
from training.engine.averaging import Lookahead
from training.engine.build import optimizer_for, schedule_for, whitening_sample
from training.engine.config import ConfigError, resolve
from training.engine.models import build_model, get_spec
from training.engine.whiten import first_conv, whiten_first_conv
from training.train import train


def quiet(*_):
    pass


def test_whitened_first_conv_decorrelates_the_patches_it_sees():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.7], [0.0, 0.0, 0.3]])
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(200, 3, 8, 8))  # correlated channels
    model = build_model("fast", 10, 8)
    assert whiten_first_conv(model, images) == 24
    conv = first_conv(model)
    out = nn.functional.conv2d(images, conv.weight[:12])  # the 12 positive filters
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert not conv.weight.requires_grad and conv.bias.requires_grad


def test_whitening_sees_images_from_the_whole_split_not_only_its_first_classes():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2)
    sample = whitening_sample(images, seed=0, n=10)
    assert sample.shape == (10, 3, 2, 2) and sample.max() <= 1
    assert (sample[:, 0, 0, 0] * 255).round().max() >= 50  # not the first ten images


def test_whitening_a_wider_first_conv_sets_some_filters_and_keeps_it_trainable():
    model = build_model("cnn", 10, 32)  # 32 filters of 3x3x3 = 27 dims: 2 x 16 set
    assert whiten_first_conv(model, torch.randn(20, 3, 32, 32)) == 32
    model = nn.Sequential(nn.Conv2d(3, 64, 2))  # 2 x 12 set, 40 left to train
    assert whiten_first_conv(model, torch.randn(20, 3, 8, 8)) == 24
    assert model[0].weight.requires_grad


def test_lookahead_ends_training_on_its_average_and_pulls_the_weights_every_5_steps():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    averager = Lookahead(model, total_steps=10)
    for step in range(1, 11):
        with torch.no_grad():
            model.weight += 1.0  # an optimizer step
        averager.step()
        if step == 5:
            decay = 0.95 ** 5 * (5 / 10) ** 3
            assert torch.allclose(model.weight, torch.full((1, 2), 5 * (1 - decay)))
    assert torch.equal(model.weight, averager.average["weight"])
    assert model.weight[0, 0] < 10  # the average lags the raw weights


def test_flip_tta_averages_the_scores_of_an_image_and_its_mirror():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(3, 3, 4, 4)
    assert torch.allclose(tta_logits(net, x, "flip"), (net(x) + net(x.flip(3))) / 2)
    assert tta_logits(net, x, "flip-translate").shape == (3, 5)


def test_bias_lr_scale_speeds_up_biases_and_keeps_their_decay_per_step(train_config):
    cfg = train_config(bias_lr_scale=8.0, lr=0.1, weight_decay=0.01)
    optimizer = optimizer_for(cfg, build_model("cnn", 3, 32), None)
    weights, biases = optimizer.param_groups
    assert all(p.dim() > 1 for p in weights["params"]) and all(p.dim() == 1 for p in biases["params"])
    assert biases["lr"] == pytest.approx(0.8) and biases["weight_decay"] == pytest.approx(0.01 / 8)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(weights["lr"] * weights["weight_decay"])


def test_linear_schedule_warms_up_from_a_fifth_then_falls_to_7_percent(train_config):
    cfg = train_config(schedule="linear", lr=1.0, epochs=1)
    model = nn.Linear(2, 2)
    optimizer = optimizer_for(cfg, model, get_spec(cfg.model).head)
    scheduler = schedule_for(cfg, optimizer, 100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.2) and max(rates) == pytest.approx(1.0)
    assert rates.index(max(rates)) == 23 and rates[-1] < 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.07)  # after the last step


def test_fast_recipe_options_train_and_every_one_is_logged(train_config, store):
    result = train(train_config(model="fast", epochs=2, batch_size=16, val_fraction=0.2), log=quiet)
    params = MlflowClient(store).get_run(result.run_id).data.params
    expected = {"whiten_init": "True", "optimizer": "muon", "muon_lr": "0.24",
                "tta": "flip-translate", "flip": "alternate", "crop_fill": "reflect",
                "bias_lr_scale": "64.0", "schedule": "decay", "compile": "auto",
                "label_smoothing": "0.2"}
    assert {k: params[k] for k in expected} == expected
    assert 0 <= result.test_acc <= 1


def test_the_logged_model_applies_the_runs_test_time_augmentation(train_config, store):
    result = train(train_config(tta="flip-translate", epochs=1), log=quiet)
    mlflow.set_tracking_uri(store)
    clf = load_classifier(result.model_uri)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        inputs = InputTransform(result.prep)(images.float() / 255)
        scores = tta_logits(result.model.cpu().eval(), inputs, "flip-translate")
        expected = torch.softmax(scores / result.calibration.temperature, 1)
    assert clf.prep.tta == "flip-translate"
    assert torch.allclose(clf.probabilities(images), expected, atol=1e-5)


def test_training_on_every_image_has_no_validation_and_registers_by_test_accuracy(train_config,
                                                                                   store):
    result = train(train_config(val_fraction=0.0, patience=0, epochs=2), log=quiet)
    run = MlflowClient(store).get_run(result.run_id)
    assert "val_acc" not in run.data.metrics and "best_val_acc" not in run.data.metrics
    assert "test_acc" in run.data.metrics
    version = MlflowClient(store, registry_uri=store).get_model_version("tiny-cnn", result.version)
    assert version.tags["score_source"].startswith("test")


def test_early_stopping_without_a_validation_split_is_refused():
    with pytest.raises(ConfigError, match="--patience 0"):
        resolve({"model": "cnn", "val_fraction": 0.0, "patience": 5})


def test_a_compiled_model_trains_and_saves_like_an_eager_one(train_config, store):
    result = train(train_config(model="mlp", compile="default", epochs=1), log=quiet)
    assert MlflowClient(store).get_run(result.run_id).info.status == "FINISHED"
    assert not any(k.startswith("_orig_mod") for k in result.model.state_dict())


@pytest.mark.parametrize("optimizer_name", ["sgd", "muon"])
def test_warming_up_a_compiled_model_leaves_no_trace_in_weights_or_optimizer(train_config,
                                                                            optimizer_name):
    from shared.preprocess import Preprocessing
    from training.engine.batches import DeviceLoader
    from training.engine.loop import warm_up

    model = build_model("cnn", 3, 32)
    cfg = train_config(optimizer=optimizer_name)
    optimizer = optimizer_for(cfg, model, get_spec(cfg.model).head)
    prep = Preprocessing(32, 32, (0.5,) * 3, (0.25,) * 3)
    loader = DeviceLoader(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
                          torch.randint(0, 3, (8,)), 4, InputTransform(prep))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert warm_up(model, model, optimizer, loader, nn.CrossEntropyLoss()) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {}


def test_a_model_that_fails_to_compile_trains_without_compiling_and_says_so(train_config, store,
                                                                             monkeypatch):
    def broken_compile(model, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler found\nlong details")
        return type("Broken", (nn.Module,), {"forward": fails})()

    monkeypatch.setattr(torch, "compile", broken_compile)
    messages = []
    result = train(train_config(compile="default", epochs=1), log=messages.append)
    assert any("torch.compile (default) failed" in m and "no C++ compiler" in m for m in messages)
    params = MlflowClient(store).get_run(result.run_id).data.params
    assert params["compile"] == "default" and params["compile_resolved"] == "none"
