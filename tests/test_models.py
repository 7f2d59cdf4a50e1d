"""Every registered model: forward shape and parameter count; registry errors."""

from __future__ import annotations

import pytest
import torch

from lowbit import models

# Parameter counts (weights + biases + BatchNorm affine) of the registered architectures.
PARAMS = {"resnet20": 272_474, "resnet32": 466_906, "resnet44": 661_338, "resnet56": 855_770,
          "wide_resnet20": 1_084_586, "digits_cnn": 24_058, "vit_tiny": 545_930}


@pytest.mark.parametrize("name", models.list())
def test_forward_shape_and_params(name):
    model = models.create(name, num_classes=7, **({"in_channels": 1} if "digits" in name else {}))
    size = (1, 8, 8) if "digits" in name else (3, 32, 32)
    assert model(torch.randn(2, *size)).shape == (2, 7)
    ten_class = models.create(name)
    assert sum(p.numel() for p in ten_class.parameters()) == PARAMS[name]
    assert ten_class.lowbit_arch == {"name": name, "kwargs": {}}


def test_resnet20_matches_he_et_al():
    model = models.create("resnet20")
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
    # 19 3x3 convs + 2 projection shortcuts + fc: the 270,896 quantizable weights of ResNet20.
    assert weights == 270_896
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


def test_wide_resnet_multiplies_channels():
    model = models.create("wide_resnet20", width=4)
    assert model.fc.in_features == 256 and model.conv1.out_channels == 64


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20"):
        models.create("resnet21")
    with pytest.raises(ValueError, match="6n\\+2"):
        models._resnet.CifarResNet(21)
