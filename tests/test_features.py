"""Frozen features computed once and cached; the head trained on them; the whole network logged."""
import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch

from shared.inference import load_classifier
from tests.test_finetune import fake_imagenet_checkpoint
from training.engine.backbone import torch_backbone
from training.engine.batches import Sampling
from training.engine.build import prepare, preprocessing
from training.engine.config import ConfigError
from training.engine.features import FeatureLoader, Views, cache_key, frozen_features, head_inputs
from training.engine.models import build_model, get_spec
from training.train import train

QUIET = dict(log=lambda *_: None)


@pytest.fixture
def fake_weights(tmp_path):
    def save(model: str):
        path = tmp_path / f"{model}.pth"
        torch.save(fake_imagenet_checkpoint(model), path)
        return str(path)
    return save


def frozen(train_config, **overrides):
    settings = dict(model="efficientnet_lite0", weights="imagenet", freeze="backbone",
                    input_size=32, epochs=2)
    return train_config(**{**settings, **overrides})


def test_features_are_built_once_then_read_from_the_cache(train_config):
    cfg = frozen(train_config)
    first, second = train(cfg, **QUIET), train(cfg, **QUIET)
    params = [mlflow.get_run(r.run_id).data.params for r in (first, second)]
    assert [p["feature_cache"] for p in params] == ["built", "hit"]
    assert params[0]["feature_views"] == "2"
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in second.history]
    assert first.test_acc == second.test_acc


def test_the_logged_model_is_the_whole_network_and_scores_as_the_cached_head(train_config):
    result = train(frozen(train_config, epochs=3), **QUIET)
    clf = load_classifier(f"models:/{result.registered_name}/{result.version}")
    splits = prepare(frozen(train_config))
    images, labels = splits.test
    predicted = clf.probabilities(images).argmax(1)
    assert (predicted == labels).float().mean().item() == pytest.approx(result.test_acc)
    assert len(list(clf.module.parameters()) or clf.module.state_dict()) > 2  # backbone too


@pytest.mark.parametrize("model, input_size", [("resnet18", 32), ("alexnet", 64), ("vgg16", 32)])
def test_torchvision_models_train_their_head_on_cached_features(train_config, fake_weights,
                                                                 model, input_size):
    cfg = train_config(model=model, weights=fake_weights(model), freeze="backbone",
                       input_size=input_size, epochs=1, batch_size=8)
    result = train(cfg, **QUIET)
    params = mlflow.get_run(result.run_id).data.params
    assert params["feature_cache"] == "built"
    state = fake_imagenet_checkpoint(model)
    own = result.model.state_dict()
    backbone = [k for k in state if not k.startswith(("fc.", "classifier.6."))
                and own[k].shape == state[k].shape]  # resnet18's stem is cropped to 3x3
    assert len(backbone) > 10
    assert all(torch.equal(own[k].cpu(), state[k]) for k in backbone)


def test_without_a_frozen_backbone_or_with_the_cache_off_nothing_is_cached(train_config):
    for cfg in (frozen(train_config, feature_cache=False), train_config(epochs=1)):
        run = mlflow.get_run(train(cfg, **QUIET).run_id)
        assert run.data.params["feature_cache"] == "off" and run.data.params["feature_views"] == "0"


def prep_of(cfg, splits):
    return preprocessing(cfg, splits, get_spec(cfg.model))


def test_the_cache_key_follows_the_weights_the_input_size_the_views_and_the_images(train_config):
    cfg = frozen(train_config)
    splits = prepare(cfg)
    model = build_model(cfg.model, 3, 32, weights="imagenet", freeze="backbone")
    key = cache_key(cfg, model, "classifier", prep_of(cfg, splits), splits)
    model2 = build_model(cfg.model, 3, 32, weights="imagenet", freeze="backbone")
    torch.nn.init.zeros_(model2.classifier.weight)  # the head is not part of the features
    assert cache_key(cfg, model2, "classifier", prep_of(cfg, splits), splits) == key
    with torch.no_grad():
        model2.conv_stem.weight[0, 0, 0, 0] += 1
    assert cache_key(cfg, model2, "classifier", prep_of(cfg, splits), splits) != key
    for changed in (dataclasses.replace(cfg, input_size=48), dataclasses.replace(cfg, feature_views=1)):
        assert cache_key(changed, model, "classifier", prep_of(changed, splits), splits) != key
    fewer = dataclasses.replace(splits, train=(splits.train[0][1:], splits.train[1][1:]))
    assert cache_key(cfg, model, "classifier", prep_of(cfg, fewer), fewer) != key


def test_a_damaged_cache_file_is_computed_again(train_config):
    cfg = frozen(train_config)
    splits = prepare(cfg)
    model = build_model(cfg.model, 3, 32, weights="imagenet", freeze="backbone")
    first = frozen_features(cfg, model, "classifier", prep_of(cfg, splits), splits, **QUIET)
    first.path.write_bytes(first.path.read_bytes()[:100])
    again = frozen_features(cfg, model, "classifier", prep_of(cfg, splits), splits, **QUIET)
    assert again.status == "built" and torch.equal(again.train, first.train)


def test_views_are_the_image_its_mirror_and_random_crops(train_config):
    cfg = frozen(train_config)
    splits = prepare(cfg)
    model = build_model(cfg.model, 3, 32, weights="imagenet", freeze="backbone").eval()
    transform = prep_of(cfg, splits)
    from shared.network import InputTransform
    images = splits.train[0][:4]
    views = Views(batch_size=2, seed=0, crop_padding=4, crop_fill="zeros")
    net = torch_backbone(model, "classifier", InputTransform(transform))
    plain, mirror, crop = (head_inputs(net, images, v, views) for v in (0, 1, 2))
    assert plain.shape == (4, 1280)
    assert torch.equal(mirror, head_inputs(net, images.flip(3), 0, views))
    assert not torch.equal(crop, plain)


def test_a_feature_loader_draws_one_view_per_image_each_epoch_and_resumes_exactly():
    features = torch.stack([torch.zeros(10, 2), torch.ones(10, 2)]).half()
    loader = FeatureLoader(features, torch.arange(10), 4, Sampling(shuffle=True, seed=1))
    state = loader.state_dict()
    epoch = [(x.clone(), y.clone()) for x, y in loader]
    assert sorted(torch.cat([y for _, y in epoch]).tolist()) == list(range(10))
    assert {float(v) for x, _ in epoch for v in x[:, 0]} == {0.0, 1.0}
    loader.load_state_dict(state)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch, loader))


def test_the_cache_with_test_time_augmentation_is_refused(train_config):
    with pytest.raises(ConfigError, match="--tta flip.*--no-feature-cache"):
        frozen(train_config, tta="flip")


def test_an_int8_backbone_is_checked_kept_and_then_chosen_by_auto(train_config, capsys):
    asked = train(frozen(train_config, feature_runtime="onnx-int8", epochs=1), **QUIET)
    again = train(frozen(train_config, epochs=1), **QUIET)  # auto
    plain = train(frozen(train_config, feature_runtime="pt2", epochs=1), **QUIET)
    params = [mlflow.get_run(r.run_id).data.params for r in (asked, again, plain)]
    assert [p["feature_backbone_runtime"] for p in params] == ["onnx-int8", "onnx-int8", "pt2"]
    assert [p["feature_cache"] for p in params] == ["built", "hit", "built"]
    assert params[1]["feature_runtime_reason"].startswith("auto: the fastest checked export")
    assert float(params[0]["feature_check_agreement"]) >= 0.98
    folder = next((Path(frozen(train_config).cache_dir) / "backbones").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["onnx-int8.json", "onnx-int8.onnx"]
    assert asked.test_acc == plain.test_acc  # validation and test features are PyTorch's


def test_a_backbone_export_that_fails_its_check_leaves_the_features_to_pytorch(train_config,
                                                                               monkeypatch):
    monkeypatch.setattr("training.engine.backbone.MIN_AGREEMENT", 1.01)
    result = train(frozen(train_config, feature_runtime="onnx", epochs=1), **QUIET)
    params = mlflow.get_run(result.run_id).data.params
    assert params["feature_backbone_runtime"] == "pt2"
    assert params["feature_runtime_reason"].startswith("the onnx export of this backbone failed its check")
    auto = train(frozen(train_config, epochs=1), **QUIET)
    assert mlflow.get_run(auto.run_id).data.params["feature_backbone_runtime"] == "pt2"  # never a failed one


def test_without_a_checked_export_auto_runs_pytorch_and_says_why(train_config):
    result = train(frozen(train_config, epochs=1), **QUIET)
    params = mlflow.get_run(result.run_id).data.params
    assert params["feature_backbone_runtime"] == "pt2"
    assert "no checked ONNX export of this backbone yet" in params["feature_runtime_reason"]


def test_an_onnx_backbone_on_a_gpu_is_refused_and_auto_keeps_pytorch_there(tmp_path):
    from shared.messages import BadInput
    from training.engine.backbone import choose

    with pytest.raises(BadInput, match="--device cpu, or --feature-runtime pt2"):
        choose("onnx-int8", torch.device("cuda"), tmp_path)
    runtime, reason, _ = choose("auto", torch.device("cuda"), tmp_path)
    assert runtime == "pt2" and reason == "auto: the backbone runs on cuda"


def features_of(cfg):
    """The training images' features as the cache gives them, and the log's lines."""
    lines = []
    splits = prepare(cfg, log=lines.append)
    spec = get_spec(cfg.model)
    model = build_model(cfg.model, splits.num_classes, splits.data.image_size, weights=cfg.weights,
                        freeze="backbone")
    torch.manual_seed(0)
    features = frozen_features(cfg, model, spec.head, preprocessing(cfg, splits, spec), splits,
                               lines.append)
    return splits, features, lines


def test_a_folder_with_one_image_more_reuses_every_other_images_features(train_config, image_folder,
                                                                         tmp_path):
    import shutil

    folder = Path(shutil.copytree(image_folder, tmp_path / "photos"))
    cfg = frozen(train_config, data_dir=str(folder), val_fraction=0.0, patience=0)
    _, before, _ = features_of(cfg)
    shutil.copy(folder / "test" / "cat" / "0000.png", folder / "train" / "dog" / "extra.png")
    splits, after, lines = features_of(cfg)
    assert after.status == "built" and after.path != before.path
    (train_line,) = [line for line in lines if line.startswith("features: train")]
    # the new image is a test image's copy: its plain view is known, its mirror computed
    assert train_line.startswith("features: train, 61 images x 2 view(s), 121 reused from an "
                                 "earlier cache, 1 computed at ")
    assert "features: test, 18 images x 1 view(s), 18 reused" in "\n".join(lines)
    fresh = dataclasses.replace(cfg, cache_dir=str(tmp_path / "fresh-cache"))
    _, computed, _ = features_of(fresh)
    assert torch.allclose(after.train.float(), computed.train.float(), atol=2e-3)
    assert torch.equal(after.test, computed.test)


def test_an_earlier_cache_whose_image_digests_were_changed_is_not_reused(train_config, image_folder,
                                                                        tmp_path):
    import shutil

    folder = Path(shutil.copytree(image_folder, tmp_path / "photos"))
    cfg = frozen(train_config, data_dir=str(folder), val_fraction=0.0, patience=0)
    _, before, _ = features_of(cfg)
    saved = torch.load(before.path, weights_only=True)
    saved["digests"]["train"][0, 0] ^= 1
    torch.save(saved, before.path)
    shutil.copy(folder / "test" / "cat" / "0000.png", folder / "train" / "dog" / "extra.png")
    _, _, lines = features_of(cfg)
    assert not any("reused" in line for line in lines)
