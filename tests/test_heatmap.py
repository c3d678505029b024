"""Grad-CAM heatmaps over exported networks: every built-in conv model has one, the MLP none,
and the heat lies where the evidence is."""
import numpy as np
import pytest
import torch
from torch import nn

from shared.heatmap import Explainer, NoHeatmap, overlay
from shared.network import Classifier
from shared.preprocess import Preprocessing
from training.engine.models import MODELS, build_model, input_size_for

CONV_MODELS = [name for name in MODELS if name != "mlp"]


def exported(net: nn.Module, size: int, input_size: int | None = None, tta: str = "none"):
    """The network as the app holds it: preprocessing in front, exported, unlifted."""
    prep = Preprocessing(size, input_size or size, (0.5,) * 3, (0.25,) * 3, tta)
    model = Classifier(net, prep, temperature=1.5).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.rand(2, 3, size, size),),
                                  dynamic_shapes={"x": {0: batch}})
    return program.module()


@pytest.mark.parametrize("name", CONV_MODELS)
def test_every_conv_model_gets_a_heatmap_per_image(name):
    torch.manual_seed(0)
    net = build_model(name, num_classes=4, image_size=32).eval()
    module = exported(net, 32, input_size_for(name, 32))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    heat = Explainer(module).heatmaps(images)
    assert heat.shape == (2, 32, 32)
    assert heat.min() >= 0 and heat.max() <= 1 + 1e-6


def test_the_mlp_has_no_heatmap_and_says_why():
    module = exported(build_model("mlp", num_classes=4, image_size=32).eval(), 32)
    with pytest.raises(NoHeatmap, match="no convolutional layers"):
        Explainer(module)


class RedDetector(nn.Module):
    """Class 0's score is the mean redness of the image, through one conv feature map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.bias.zero_()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def red_corner(size=16):
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    image[:, 0, : size // 4, : size // 4] = 255
    return image


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_heat_is_brightest_where_the_evidence_is(tta):
    heat = Explainer(exported(RedDetector(), 16, tta=tta)).heatmaps(red_corner(), torch.tensor([0]))[0]
    corner, rest = heat[:4, :4].mean(), heat[8:, 8:].mean()
    assert corner > 0.8 and rest < 0.1


def test_the_chosen_feature_map_is_the_last_convolutions_block():
    net = build_model("cnn", num_classes=4, image_size=32).eval()
    explainer = Explainer(exported(net, 32))
    assert tuple(explainer.node.meta["val"].shape[1:]) == (128, 8, 8)


def test_overlay_keeps_the_picture_size_and_colours_hot_areas_red():
    picture = np.full((64, 48, 3), 128, dtype=np.uint8)
    heat = np.zeros((8, 8))
    heat[:2, :2] = 1.0
    out = overlay(picture, heat)
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8
    assert out[2, 2, 0] > out[2, 2, 2] and out[60, 40, 2] > out[60, 40, 0]
