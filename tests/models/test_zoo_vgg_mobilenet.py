"""The CRD CIFAR zoo's VGG-BN and MobileNetV2 (mobile_half): exact sizes, shapes, FX feature nodes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from kd.errors import ConfigError
from kd.models.cifar.mobilenetv2 import MobileNetV2, mobile_half
from kd.models.cifar.vgg import VGG, vgg8, vgg11, vgg13, vgg16, vgg19
from kd.models.features import FeatureExtractor

VGG_NODES = ["relu0", "relu1", "relu2", "relu3", "relu4", "block1", "block2", "block3", "block4", "flatten"]
MOBILE_NODES = ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "blocks.1.1.add", "conv2", "flatten"]

# (constructor, parameters at 100 classes from REFERENCE.md, feature nodes it promises)
ZOO: list[tuple[Callable[..., nn.Module], int, list[str]]] = [
    (vgg8, 3_965_028, VGG_NODES),
    (vgg11, 9_277_284, VGG_NODES),
    (vgg13, 9_462_180, VGG_NODES),
    (vgg16, 14_774_436, VGG_NODES),
    (vgg19, 20_086_692, VGG_NODES),
    (mobile_half, 812_836, MOBILE_NODES),
]
IDS = [make.__name__ for make, _, _ in ZOO]


@pytest.mark.parametrize(("make", "params", "nodes"), ZOO, ids=IDS)
def test_parameter_count_matches_the_crd_code(make: Callable[..., nn.Module], params: int, nodes: list[str]) -> None:
    assert sum(p.numel() for p in make(num_classes=100).parameters()) == params


@pytest.mark.parametrize(("make", "params", "nodes"), ZOO, ids=IDS)
@torch.no_grad()
def test_logits_shape_and_finite(make: Callable[..., nn.Module], params: int, nodes: list[str]) -> None:
    torch.manual_seed(0)
    net = make(num_classes=100)
    out = net(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 100)
    assert torch.isfinite(out).all()
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net.forward_head(net.forward_features(x)), net(x))


@pytest.mark.parametrize(("make", "params", "nodes"), ZOO, ids=IDS)
@torch.no_grad()
def test_one_input_channel(make: Callable[..., nn.Module], params: int, nodes: list[str]) -> None:
    net = make(num_classes=10, in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("make", "params", "nodes"), ZOO, ids=IDS)
def test_fx_traces_and_promised_nodes_exist(make: Callable[..., nn.Module], params: int, nodes: list[str]) -> None:
    train, evaluation = get_graph_node_names(make())
    assert train == evaluation
    for name in nodes:
        assert name in train or any(n.startswith(name + ".") for n in train), name


def test_vgg_features_before_and_after_relu() -> None:
    torch.manual_seed(0)
    net = vgg8().eval()
    fx = FeatureExtractor(net, VGG_NODES, key="nodes", input_shape=(3, 32, 32), tracer="fx")
    x = torch.randn(2, 3, 32, 32)
    out = fx(x)
    torch.testing.assert_close(out.logits, net(x))
    shapes = {"relu0": (64, 32, 32), "relu1": (128, 16, 16), "relu2": (256, 8, 8), "relu3": (512, 4, 4),
              "relu4": (512, 4, 4), "flatten": (512,)}
    for name, shape in shapes.items():
        assert out.features[name].shape == (2, *shape), name
    for i in range(1, 5):
        pre, post = out.features[f"block{i}"], out.features[f"relu{i}"]
        assert (pre < 0).any()  # the pre-activation keeps its negative part
        torch.testing.assert_close(pre.relu(), post)


def test_mobile_half_stage_features() -> None:
    torch.manual_seed(0)
    net = mobile_half().eval()
    # Not "blocks.1.1.add" too: a module name and its own last node name the same FX node.
    nodes = [n for n in MOBILE_NODES if n != "blocks.1.1.add"]
    fx = FeatureExtractor(net, nodes, key="nodes", input_shape=(3, 32, 32), tracer="fx")
    x = torch.randn(2, 3, 32, 32)
    out = fx(x)
    torch.testing.assert_close(out.logits, net(x))
    shapes = {"conv1": (16, 16, 16), "blocks.1": (12, 16, 16), "blocks.2": (16, 8, 8), "blocks.4": (48, 4, 4),
              "blocks.6": (160, 2, 2), "conv2": (1280, 2, 2), "flatten": (1280,)}
    for name, shape in shapes.items():
        assert out.features[name].shape == (2, *shape), name
    # Linear bottlenecks: the stage features are pre-activations, with negative values.
    assert all((out.features[f"blocks.{i}"] < 0).any() for i in (1, 2, 4, 6))


def test_state_dict_keys_follow_the_crd_code() -> None:
    # Checkpoints of the CRD code load by key: same module names and nesting.
    keys = set(vgg8().state_dict())
    assert {"block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block4.1.weight", "classifier.weight"} <= keys
    keys = set(mobile_half().state_dict())
    assert {"conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.running_var", "classifier.0.bias"} <= keys


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="depth must be one of"):
        VGG(depth=10)
    with pytest.raises(ConfigError, match="num_classes"):
        vgg8(num_classes=0)
    with pytest.raises(ConfigError, match="width_mult"):
        MobileNetV2(width_mult=0.01)
