"""Fine-tuning from pretrained weights, with checkpoints placed locally (no network)."""
import os
from pathlib import Path

import mlflow
import pytest
import torch
import torchvision

from training.engine.models import ModelError, build_model
from training.train import train


def fake_imagenet_checkpoint(name: str) -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's ImageNet checkpoint (1000 classes), random values."""
    torch.manual_seed(123)
    return getattr(torchvision.models, name)(num_classes=1000).state_dict()


def place_in_hub_cache(state: dict, weights_enum) -> Path:
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    path = checkpoints / weights_enum.url.rsplit("/", 1)[-1]
    torch.save(state, path)
    return path


def test_imagenet_weights_are_read_from_the_torch_hub_cache():
    state = fake_imagenet_checkpoint("resnet18")
    place_in_hub_cache(state, torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    model = build_model("resnet18", 3, 32, weights="imagenet")
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert model.fc.out_features == 3
    # the 7x7 ImageNet stem is center-cropped into the 3x3 CIFAR stem
    assert torch.equal(model.conv1.weight, state["conv1.weight"][:, :, 2:5, 2:5])


def test_missing_imagenet_weights_offline_say_where_to_put_the_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError) as err:
        build_model("alexnet", 10, 32, weights="imagenet")
    message = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in message and "--weights PATH" in message
    assert str(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints") in message


def test_a_checkpoint_path_that_does_not_fit_is_refused(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(fake_imagenet_checkpoint("vgg16"), path)
    with pytest.raises(ModelError, match="does not fit"):
        build_model("alexnet", 10, 32, weights=str(path))


def test_a_missing_checkpoint_path_is_refused():
    with pytest.raises(ModelError, match="neither"):
        build_model("alexnet", 10, 32, weights="no/such/file.pth")


def test_fine_tuning_with_a_frozen_backbone_trains_only_the_head(train_config, tmp_path):
    path = tmp_path / "resnet18.pth"
    state = fake_imagenet_checkpoint("resnet18")
    torch.save(state, path)
    cfg = train_config(model="resnet18", weights=str(path), freeze="backbone", epochs=1)
    result = train(cfg, log=lambda *_: None)
    assert torch.equal(result.model.layer4[1].conv2.weight.cpu(), state["layer4.1.conv2.weight"])
    params = mlflow.get_run(result.run_id).data.params
    assert params["fine_tuned"] == "True"
    assert params["weights_source"] == f"checkpoint:{path}"
    assert params["frozen_layers"] == "all but fc"
    assert int(params["trainable_params"]) == 512 * 3 + 3
    assert params["normalize_mean"] == "[0.485, 0.456, 0.406]"  # ImageNet statistics
    assert float(params["lr"]) == pytest.approx(0.01)  # the fine-tuning recipe


def test_backbone_and_head_learn_at_their_own_rates(train_config):
    from training.engine.build import optimizer_for
    from training.engine.models import get_spec

    cfg = train_config(model="resnet18", backbone_lr_scale=0.1, lr=0.02, optimizer="sgd")
    model = build_model("resnet18", 3, 32)
    groups = optimizer_for(cfg, model, get_spec(cfg.model).head).param_groups
    head = {id(p) for p in model.fc.parameters()}
    assert {g["lr"] for g in groups if id(g["params"][0]) in head} == {0.02}
    assert [g["lr"] for g in groups if id(g["params"][0]) not in head] == [pytest.approx(0.002)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_unfreezing_trains_the_backbone_only_after_the_head_only_epochs(train_config, tmp_path):
    path = tmp_path / "resnet18.pth"
    state = fake_imagenet_checkpoint("resnet18")
    torch.save(state, path)
    cfg = train_config(model="resnet18", weights=str(path), freeze="backbone", unfreeze_after=1,
                       epochs=2, backbone_lr_scale=0.1)
    result = train(cfg, log=lambda *_: None)
    params = mlflow.get_run(result.run_id).data.params
    assert params["frozen_layers"] == "all but fc for 1 epoch(s)"
    assert params["feature_cache"] == "off"
    assert float(params["backbone_lr"]) == pytest.approx(float(params["head_lr"]) * 0.1)
    assert not torch.equal(result.model.layer4[1].conv2.weight.cpu(), state["layer4.1.conv2.weight"])


def test_the_unfreezer_lets_the_backbone_train_from_the_epoch_after(train_config):
    from training.engine.state import Unfreezer

    model = build_model("resnet18", 3, 32, freeze="backbone")
    unfreezer = Unfreezer.of(model, after=2)
    unfreezer.begin(2)
    assert not model.layer1[0].conv1.weight.requires_grad
    unfreezer.begin(3)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"unfreeze_after": 1}, "add --freeze backbone"),
    ({"unfreeze_after": 2, "freeze": "backbone", "epochs": 2}, "less than --epochs"),
    ({"model": "mlp", "backbone_lr_scale": 0.1}, "mlp has no separate head"),
])
def test_fine_tuning_settings_that_cannot_work_are_refused(train_config, overrides, message):
    from training.engine.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        train_config(**{"model": "resnet18", **overrides})
