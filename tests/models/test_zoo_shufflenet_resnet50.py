"""ShuffleNetV1, ShuffleNetV2 and ResNet-50 of the CRD zoo: exact sizes, shapes and FX feature taps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from kd.errors import ConfigError
from kd.models.cifar.resnetv2 import ResNetV2, resnet50
from kd.models.cifar.shufflenetv1 import ChannelShuffle, ShuffleNetV1, shufflenet_v1
from kd.models.cifar.shufflenetv2 import ShuffleNetV2, shufflenet_v2
from kd.models.features import FeatureExtractor

MODELS: dict[str, Callable[..., nn.Module]] = {
    "shufflenet_v1": shufflenet_v1,
    "shufflenet_v2": shufflenet_v2,
    "resnet50": resnet50,
}
# Parameter counts at 100 classes, from /work/shared/REFERENCE.md (the CRD code's definitions).
PARAMS = {"shufflenet_v1": 949_258, "shufflenet_v2": 1_355_528, "resnet50": 23_705_252}

# The feature taps promised in the module docstrings, with their shapes on a 32x32 input:
# post-ReLU stage outputs, their pre-ReLU counterparts (same shapes), the pooled embedding.
TAPS: dict[str, dict[str, list]] = {
    "shufflenet_v1": {
        "post": ["layer1", "layer2", "layer3"],
        "pre": ["layer1.3.add", "layer2.7.add", "layer3.3.add"],
        "shapes": [(240, 16), (480, 8), (960, 4)],
        "embed": ["flatten", 960],
    },
    "shufflenet_v2": {
        "post": ["layer1", "layer2", "layer3"],
        "pre": ["layer1.3.shuffle.flatten", "layer2.7.shuffle.flatten", "layer3.3.shuffle.flatten"],
        "shapes": [(116, 16), (232, 8), (464, 4)],
        "embed": ["flatten", 1024],
    },
    "resnet50": {
        "post": ["layer1", "layer2", "layer3", "layer4"],
        "pre": ["layer1.2.add", "layer2.3.add", "layer3.5.add", "layer4.2.add"],
        "shapes": [(256, 32), (512, 16), (1024, 8), (2048, 4)],
        "embed": ["flatten", 2048],
    },
}


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_count_matches_the_reference(name: str) -> None:
    net = MODELS[name]()
    assert sum(p.numel() for p in net.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_shapes_and_in_channels(name: str) -> None:
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        logits = net(x)
        assert logits.shape == (2, 100)
        assert torch.isfinite(logits).all()
        feat = net.forward_features(x)
        assert feat.shape == (2, TAPS[name]["embed"][1], 4, 4)
        assert torch.equal(net.forward_head(feat), logits)
        gray = MODELS[name](num_classes=10, in_channels=1).eval()
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_fx_traces_and_the_promised_taps_exist(name: str) -> None:
    train, evaluation = get_graph_node_names(MODELS[name]())
    assert train == evaluation
    nodes = set(train)
    taps = TAPS[name]
    for tap in [*taps["post"], *taps["pre"], taps["embed"][0], "layer2"]:
        # a module name stands for the last node inside it
        assert tap in nodes or any(n.startswith(tap + ".") for n in nodes), tap


@pytest.mark.parametrize("name", list(MODELS))
def test_feature_taps_have_the_reference_shapes_and_relu_follows_preact(name: str) -> None:
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    taps = TAPS[name]
    embed, width = taps["embed"]
    extractor = FeatureExtractor(
        net, [*taps["post"], *taps["pre"], embed], key="test", input_shape=(3, 32, 32), tracer="fx"
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        assert torch.allclose(out.logits, net(x), atol=1e-5)
    for post, pre, (c, hw) in zip(taps["post"], taps["pre"], taps["shapes"], strict=True):
        assert out.features[post].shape == (2, c, hw, hw)
        assert torch.equal(out.features[post], out.features[pre].relu())
        assert (out.features[pre] < 0).any()  # the pre-activation was not overwritten in place
    assert out.features[embed].shape == (2, width)


def test_channel_shuffle_matches_the_reference_view_permute() -> None:
    x = torch.arange(2 * 12 * 2 * 2, dtype=torch.float32).reshape(2, 12, 2, 2)
    expected = x.view(2, 3, 4, 2, 2).permute(0, 2, 1, 3, 4).reshape(2, 12, 2, 2)
    assert torch.equal(ChannelShuffle(3)(x), expected)
    assert torch.equal(ChannelShuffle(1)(x), x)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of 4 \\* groups"):
        ShuffleNetV1((250, 480, 960), (4, 8, 4), groups=3)
    with pytest.raises(ConfigError, match="three positive widths"):
        ShuffleNetV1((240, 480), (4, 8), groups=3)
    with pytest.raises(ConfigError, match="even stage widths"):
        ShuffleNetV2((115, 232, 464, 1024), (3, 7, 3))
    with pytest.raises(ConfigError, match="block counts"):
        ShuffleNetV2((116, 232, 464, 1024), (3, 0, 3))
    with pytest.raises(ConfigError, match="four positive block counts"):
        ResNetV2((3, 4, 6))
    with pytest.raises(ConfigError, match="num_classes"):
        shufflenet_v2(num_classes=0)
