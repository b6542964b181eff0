"""Features by node name, without model edits: FX extraction, the hook fallback, their traps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from kd.errors import ConfigError
from kd.models import ConvNet
from kd.models.features import FeatureExtractor, available_nodes


def _convnet() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(num_classes=10, in_channels=1, channels=(4, 8), depth=1, hidden=6, dropout=0.5)


def test_fx_features_are_the_exact_intermediate_values_even_before_an_inplace_relu() -> None:
    model = _convnet().eval()
    assert model.features[2].inplace  # the BN output (features.1) is overwritten by this ReLU
    fx = FeatureExtractor(model, ["features.1", "features.2", "head.0"], key="k", input_shape=(1, 8, 8))
    assert fx.mode == "fx"
    x = torch.randn(3, 1, 8, 8)
    out = fx(x)
    pre = model.features[1](model.features[0](x))  # (3, 4, 8, 8), BN output before the ReLU
    assert (pre < 0).any()
    torch.testing.assert_close(out.features["features.1"], pre)
    torch.testing.assert_close(out.features["features.2"], pre.relu())
    torch.testing.assert_close(out.features["head.0"], model.pool(model.features(x)).flatten(1))
    torch.testing.assert_close(out.logits, model(x))


def test_a_module_name_means_its_last_node_and_a_residual_add_is_the_preactivation() -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=5).eval()
    fx = FeatureExtractor(model, ["layer1", "layer1.1.add"], key="k", input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    out = fx(x)
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    block0 = model.layer1[0](stem)
    b = model.layer1[1]
    add = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(block0))))) + block0
    torch.testing.assert_close(out.features["layer1"], model.layer1(stem))
    torch.testing.assert_close(out.features["layer1.1.add"], add)
    assert (out.features["layer1.1.add"] < 0).any() and (out.features["layer1"] >= 0).all()
    torch.testing.assert_close(out.logits, model(x))


def test_hooks_give_the_same_module_outputs_as_fx() -> None:
    model = _convnet().eval()
    x = torch.randn(3, 1, 8, 8)
    nodes = ["features.1", "features.5", "head.2"]
    by_fx = FeatureExtractor(model, nodes, key="k", input_shape=(1, 8, 8), tracer="fx")(x)
    by_hooks = FeatureExtractor(model, nodes, key="k", input_shape=(1, 8, 8), tracer="hooks")(x)
    for n in nodes:
        torch.testing.assert_close(by_hooks.features[n], by_fx.features[n])
    torch.testing.assert_close(by_hooks.logits, by_fx.logits)


def test_hooks_collect_only_while_the_extractor_runs() -> None:
    model = _convnet().eval()
    fx = FeatureExtractor(model, ["features.1"], key="k", input_shape=(1, 8, 8), tracer="hooks")
    model(torch.randn(2, 1, 8, 8))  # a plain forward (validation) stores nothing
    assert fx._hooked == {}


class _DataDependent(nn.Module):
    """FX cannot trace a branch on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x.flatten(1))
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_untraceable_models_fall_back_to_hooks_and_fx_only_fails_clearly() -> None:
    model = _DataDependent()
    fx = FeatureExtractor(model, ["body"], key="k", input_shape=(4,))
    assert fx.mode == "hooks"
    x = torch.randn(2, 4)
    torch.testing.assert_close(fx(x).features["body"], model.body(x))
    assert available_nodes(model) == ("hooks", ["body", "head"])
    with pytest.raises(ConfigError, match="FX cannot trace _DataDependent"):
        FeatureExtractor(model, ["body"], key="k", input_shape=(4,), tracer="fx")


def test_an_unknown_name_fails_with_a_suggestion_and_every_available_name() -> None:
    with pytest.raises(ConfigError) as err:
        FeatureExtractor(_convnet(), ["features.99"], key="distill.student_nodes", input_shape=(1, 8, 8))
    message = str(err.value)
    assert message.startswith("distill.student_nodes: ConvNet has no node named 'features.99'")
    assert "did you mean" in message and "\n" not in message
    names = message.split("available: ")[1].split(", ")
    assert names == available_nodes(_convnet())[1]
    with pytest.raises(ConfigError, match="no module named 'nope'.*available: body, head"):
        FeatureExtractor(_DataDependent(), ["nope"], key="k", input_shape=(4,))


def test_features_carry_gradients_to_the_shared_weights_and_follow_train_eval_mode() -> None:
    model = _convnet()
    fx = FeatureExtractor(model, ["features.1"], key="k", input_shape=(1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    fx(x).features["features.1"].sum().backward()
    assert model.features[0].weight.grad is not None and model.features[0].weight.grad.abs().sum() > 0
    assert set(model.state_dict()) == set(ConvNet(10, 1, (4, 8), hidden=6).state_dict())  # nothing added
    model.eval()
    torch.testing.assert_close(fx(x).logits, model(x))  # eval: running stats, no dropout
    model.train()
    torch.manual_seed(1)
    a = fx(x).logits
    torch.manual_seed(1)
    b = model(x)
    torch.testing.assert_close(a, b)  # train mode: batch stats and the same dropout draw


def test_no_nodes_means_a_plain_forward() -> None:
    model = _convnet().eval()
    fx = FeatureExtractor(model, [], key="k", input_shape=())
    x = torch.randn(2, 1, 8, 8)
    out = fx(x)
    assert fx.mode == "none" and out.features == {}
    torch.testing.assert_close(out.logits, model(x))


@pytest.mark.parametrize("tracer", ["fx", "hooks"])
def test_sync_reattaches_to_replaced_submodules(tracer: str) -> None:
    # Lightning's sync_batchnorm swaps every BatchNorm for a new module object
    model = _convnet().eval()
    fx = FeatureExtractor(model, ["features.1"], key="k", input_shape=(1, 8, 8), tracer=tracer)
    x = torch.randn(2, 1, 8, 8)
    new_bn = nn.BatchNorm2d(4).eval()
    new_bn.bias.data.fill_(5.0)
    model.features[1] = new_bn
    fx.sync()
    torch.testing.assert_close(fx(x).features["features.1"], new_bn(model.features[0](x)))
    torch.testing.assert_close(fx(x).logits, model(x))


@pytest.mark.parametrize("tracer", ["fx", "hooks"])
def test_an_extractor_pickles_with_its_model(tracer: str) -> None:
    import pickle

    model = _convnet().eval()
    fx = FeatureExtractor(model, ["features.1"], key="k", input_shape=(1, 8, 8), tracer=tracer)
    x = torch.randn(2, 1, 8, 8)
    expected = fx(x).features["features.1"]
    model2, fx2 = pickle.loads(pickle.dumps((model, fx)))  # as ddp_spawn sends the module
    assert fx2.model is model2
    torch.testing.assert_close(fx2(x).features["features.1"], expected)


def test_hooks_on_a_module_forward_never_calls_fail_clearly() -> None:
    model = _DataDependent()
    model.spare = nn.Linear(4, 4)  # registered, never called
    fx = FeatureExtractor(model, ["spare"], key="distill.student_nodes", input_shape=(4,))
    with pytest.raises(ConfigError, match="spare never ran in _DataDependent.forward"):
        fx(torch.randn(2, 4))


def test_a_module_name_and_its_last_node_can_be_asked_for_together() -> None:
    model = resnet18(num_classes=5).eval()
    fx = FeatureExtractor(model, ["layer1", "layer1.1.relu_1", "fc"], key="k", input_shape=(3, 32, 32))
    out = fx(torch.randn(2, 3, 32, 32))
    assert set(out.features) == {"layer1", "layer1.1.relu_1", "fc"}
    torch.testing.assert_close(out.features["layer1"], out.features["layer1.1.relu_1"])
    torch.testing.assert_close(out.features["fc"], out.logits)
