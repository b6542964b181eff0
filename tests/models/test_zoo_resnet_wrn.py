"""The CIFAR ResNets and wide ResNets of the CRD zoo: exact sizes, shapes and FX feature taps."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from kd.errors import ConfigError
from kd.models.cifar import resnet, wrn
from kd.models.features import FeatureExtractor

# Parameter counts at 100 classes, from /work/shared/REFERENCE.md (the CRD code's definitions).
PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
}
BLOCKS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5, "resnet44": 7,
          "resnet56": 9, "resnet110": 18, "resnet8x4": 1, "resnet32x4": 5,
          "wrn_16_1": 2, "wrn_16_2": 2, "wrn_40_1": 6, "wrn_40_2": 6}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Batch-2 forwards of deep nets: extra CPU threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _constructor(name: str) -> Callable[..., nn.Module]:
    return getattr(resnet if name.startswith("resnet") else wrn, name)


def _taps(name: str) -> dict[str, list[str]]:
    """The feature taps promised in the module docstrings: stages, pre-ReLU, embedding."""
    last = BLOCKS[name] - 1
    if name.startswith("resnet"):
        return {
            "post": ["layer1", "layer2", "layer3"],
            "pre": [f"layer{i}.{last}.add" for i in (1, 2, 3)],
            "embed": ["flatten"],
        }
    return {
        "post": ["block2.layer.0.relu1", "block3.layer.0.relu1", "relu"],
        "pre": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
        "stage": ["block1", "block2", "block3"],
        "embed": ["flatten"],
    }


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count_matches_the_reference(name: str) -> None:
    net = _constructor(name)()
    assert sum(p.numel() for p in net.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list(PARAMS))
def test_forward_shapes_and_in_channels(name: str) -> None:
    torch.manual_seed(0)
    net = _constructor(name)().eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 100)
        assert torch.isfinite(logits).all()
        feat = net.forward_features(torch.randn(2, 3, 32, 32))
        assert feat.shape[2:] == (8, 8)
        assert net.forward_head(feat).shape == (2, 100)
        gray = _constructor(name)(num_classes=10, in_channels=1).eval()
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list(PARAMS))
def test_fx_traces_and_the_promised_taps_exist(name: str) -> None:
    net = _constructor(name)()
    train, evaluation = get_graph_node_names(net)
    assert train == evaluation
    taps = [t for group in _taps(name).values() for t in group]
    nodes = set(train)
    for tap in taps:
        # a module name stands for the last node inside it
        assert tap in nodes or any(n.startswith(tap + ".") for n in nodes), tap


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2"])
def test_feature_taps_have_the_reference_shapes_and_relu_follows_preact(name: str) -> None:
    torch.manual_seed(0)
    net = _constructor(name)().eval()
    taps = _taps(name)
    nodes = taps["post"] + taps["pre"] + taps["embed"]
    extractor = FeatureExtractor(net, nodes, key="test", input_shape=(3, 32, 32), tracer="fx")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        assert torch.allclose(out.logits, net(x), atol=1e-5)
    width = net.num_features
    sizes = [(width // 4, 32), (width // 2, 16), (width, 8)]
    for post, pre, (c, hw) in zip(taps["post"], taps["pre"], sizes, strict=True):
        assert out.features[post].shape == (2, c, hw, hw)
        assert torch.equal(out.features[post], out.features[pre].relu())
        assert (out.features[pre] < 0).any()  # the pre-activation was not overwritten in place
    assert out.features["flatten"].shape == (2, width)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        resnet.CifarResNet(10, (16, 16, 32, 64))
    with pytest.raises(ConfigError, match="four positive widths"):
        resnet.CifarResNet(8, (16, 32, 64))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="6n \\+ 4"):
        wrn.WideResNet(18, 1)
    with pytest.raises(ConfigError, match="dropout"):
        wrn.WideResNet(16, 1, dropout=1.0)
