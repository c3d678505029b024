import pytest
import torch

from training.engine.models import (
    MODELS,
    ModelError,
    build_model,
    count_parameters,
    describe_models,
    get_spec,
    input_size_for,
)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_outputs_one_score_per_class(name):
    model = build_model(name, num_classes=7, image_size=32).eval()
    side = input_size_for(name, 32)
    with torch.no_grad():
        out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 7)


def test_alexnet_and_vgg16_take_224_pixel_inputs_like_the_seed_studies():
    assert input_size_for("alexnet", 32) == 224
    assert input_size_for("vgg16", 32) == 224
    assert input_size_for("cnn", 32) == 32


def test_mlp_is_exactly_the_seed_mlp():
    model = build_model("mlp", 10, 32)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(3072, 128), (128, 64), (64, 10)]
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    out = model(torch.randn(4, 3, 32, 32))
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)  # log-softmax output


def test_cnn_has_three_conv_blocks_of_32_64_128_channels_then_fc_512_256():
    model = build_model("cnn", 10, 32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3)), (128, (3, 3))]
    linear = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [512, 256, 10]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_resnet18_has_a_cifar_stem():
    model = build_model("resnet18", 10, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_unknown_model_error_lists_the_valid_names():
    with pytest.raises(ModelError) as err:
        get_spec("vgg19")
    for name in MODELS:
        assert name in str(err.value)


def test_list_models_describes_every_model():
    text = describe_models()
    assert all(name in text for name in MODELS)


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = build_model("alexnet", 10, 32, freeze="backbone")
    trainable, total = count_parameters(model)
    assert trainable == 4096 * 10 + 10 < total


def test_freeze_is_refused_for_a_model_without_a_head():
    with pytest.raises(ModelError, match="backbone"):
        build_model("cnn", 10, 32, freeze="backbone")


def test_weights_are_refused_for_a_model_without_pretrained_weights():
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_model("mlp", 10, 32, weights="imagenet")
