"""Models: shapes, and the builder that fits them to the data."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kd.errors import ConfigError
from kd.models import ConvNet, build_model, count_parameters


def test_convnet_shapes_and_parameter_count() -> None:
    net = ConvNet(num_classes=10, in_channels=1, channels=(8, 16))
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert net.forward_features(torch.zeros(3, 1, 8, 8)).shape == (3, 16, 2, 2)
    # conv 1->8 (72) + BN (16) + conv 8->16 (1152) + BN (32) + linear 16->10 (170)
    assert count_parameters(net) == 72 + 16 + 1152 + 32 + 170 == 1442
    assert ConvNet(num_classes=5, in_channels=3)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_build_model_takes_classes_and_channels_from_the_data() -> None:
    node = OmegaConf.create({"_target_": "kd.models.ConvNet", "channels": [4]})
    net = build_model(node, key="model.student", num_classes=7, input_shape=(3, 16, 16))
    assert net(torch.zeros(1, 3, 16, 16)).shape == (1, 7)


def test_build_model_refuses_a_model_with_the_wrong_output() -> None:
    node = OmegaConf.create({"_target_": "torch.nn.Flatten"})
    with pytest.raises(ConfigError, match=r"outputs \(1, 64\) for one input, but the data has 10"):
        build_model(node, key="model.student", num_classes=10, input_shape=(1, 8, 8))
    node = OmegaConf.create({"_target_": "kd.models.Nope"})
    with pytest.raises(ConfigError, match="cannot import kd.models.Nope"):
        build_model(node, key="model.student", num_classes=10, input_shape=(1, 8, 8))
