"""FitNet hints: regressor shapes, the MSE, its zero, gradients and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kd.errors import ConfigError
from kd.losses.fitnet import FitNetLoss, hint_loss, hint_regressor
from kd.outputs import DataInfo, ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf"
DATA = DataInfo(num_classes=3, num_samples=10)


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "layer", "kernel", "stride"),
    [
        ((2, 8, 8, 8), (2, 64, 4, 4), nn.Conv2d, (3, 3), (2, 2)),  # student 2x larger
        ((2, 8, 4, 4), (2, 64, 8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),  # student 2x smaller
        ((2, 8, 8, 8), (2, 64, 8, 8), nn.Conv2d, (1, 1), (1, 1)),  # equal
        ((2, 8, 7, 7), (2, 64, 4, 4), nn.Conv2d, (4, 4), (1, 1)),  # larger, not 2x: kernel 1 + 7 - 4
        ((2, 8, 8, 6), (2, 64, 4, 4), nn.Conv2d, (5, 3), (1, 1)),  # non-square
        ((2, 8, 2, 2), (2, 64, 1, 1), nn.Conv2d, (3, 3), (2, 2)),
    ],
)
def test_regressor_maps_student_maps_to_the_teacher_shape(s_shape, t_shape, layer, kernel, stride) -> None:
    r = hint_regressor(s_shape, t_shape)
    conv, bn, relu = r
    assert type(conv) is layer and conv.kernel_size == kernel and conv.stride == stride
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    out = r(torch.randn(*s_shape))
    assert out.shape == t_shape and (out >= 0).all()


@pytest.mark.parametrize(("s_shape", "in_features"), [((2, 16), 16), ((2, 4, 3, 3), 36)])
def test_regressor_for_a_teacher_embedding_is_linear(s_shape, in_features) -> None:
    r = hint_regressor(s_shape, (2, 128), relu=False)
    linear = [m for m in r if isinstance(m, nn.Linear)]
    assert len(linear) == 1 and linear[0].in_features == in_features and linear[0].out_features == 128
    assert not any(isinstance(m, nn.ReLU) for m in r)
    assert r(torch.randn(*s_shape)).shape == (2, 128)


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [
        ((2, 8, 4, 4), (2, 64, 6, 6)),  # smaller, not half
        ((2, 8, 4, 8), (2, 64, 8, 4)),  # smaller in one dimension
        ((2, 16), (2, 64, 4, 4)),  # embedding to map
        ((2, 8, 4), (2, 64, 4)),  # neither
    ],
)
def test_regressor_refuses_shapes_it_cannot_map(s_shape, t_shape) -> None:
    with pytest.raises(ConfigError) as err:
        hint_regressor(s_shape, t_shape)
    assert err.value.key == "student_nodes" and "\n" not in str(err.value)


def test_setup_error_names_the_sizes() -> None:
    student = ModelOutput(torch.randn(2, 3), {"s": torch.randn(2, 8, 3, 3)})
    teacher = ModelOutput(torch.randn(2, 3), {"t": torch.randn(2, 64, 8, 8)})
    with pytest.raises(ConfigError, match="3x3.*8x8"):
        FitNetLoss(["s"], ["t"]).setup(student, teacher, DATA)


def test_hint_loss_is_the_mean_squared_error() -> None:
    # ((1-0)^2 + (2-4)^2 + (3-3)^2 + (0-(-2))^2) / 4 = (1 + 4 + 0 + 4) / 4 = 9/4
    a, b = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[0.0, 4.0], [3.0, -2.0]])
    assert hint_loss(a, b).item() == pytest.approx(2.25)


def _pair(seed: int = 0, s_shape=(4, 8, 8, 8), t_shape=(4, 16, 4, 4)):
    torch.manual_seed(seed)
    f_s = torch.randn(*s_shape, requires_grad=True)
    student = ModelOutput(torch.randn(s_shape[0], 3, requires_grad=True), {"s": f_s})
    teacher = ModelOutput(torch.randn(s_shape[0], 3), {"t": torch.randn(*t_shape)})
    return student, teacher, {"target": torch.tensor([0, 1, 2, 1][: s_shape[0]])}


def test_loss_is_zero_when_the_teacher_equals_the_regressed_student_and_grows_with_the_gap() -> None:
    student, teacher, batch = _pair()
    loss = FitNetLoss(["s"], ["t"])
    loss.setup(student, teacher, DATA)
    with torch.no_grad():
        target = loss.regressors[0](student.features["s"])  # (4, 16, 4, 4), train-mode BN as in the loss
    teacher.features["t"] = target
    assert loss.loss_terms(student, teacher, batch)["fitnet"].item() == pytest.approx(0.0, abs=1e-12)
    teacher.features["t"] = target + 0.5  # MSE of a constant gap d is d^2
    assert loss.loss_terms(student, teacher, batch)["fitnet"].item() == pytest.approx(0.25, rel=1e-6)


def test_identity_regressor_gives_the_mse_of_the_raw_features() -> None:
    # Equal shapes: set the 1x1 conv to the identity and BN (eval) to x -> x, then the loss is
    # MSE(relu(f_s), f_t), which for f_s >= 0 and f_t = f_s + 1 is exactly 1.
    student, teacher, batch = _pair(1, (2, 4, 3, 3), (2, 4, 3, 3))
    f_s = student.features["s"].detach().abs().requires_grad_()
    student.features["s"], teacher.features["t"] = f_s, f_s.detach() + 1.0
    loss = FitNetLoss(["s"], ["t"], weight=1.0, ce_weight=0.0)
    loss.setup(student, teacher, DATA)
    conv, bn, _ = loss.regressors[0]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4)[:, :, None, None])
        conv.bias.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    loss.eval()
    terms = loss(student, teacher, batch)
    assert set(terms) == {"fitnet"}
    assert terms["fitnet"].item() == pytest.approx(1.0, rel=1e-5)


def test_module_weights_the_term_and_gradients_reach_student_and_regressor_not_teacher() -> None:
    student, teacher, batch = _pair(2)
    teacher.features["t"].requires_grad_()
    loss = FitNetLoss(["s"], ["t"])
    loss.setup(student, teacher, DATA)
    terms = loss(student, teacher, batch)
    assert set(terms) == {"ce", "fitnet"}
    with torch.no_grad():
        mse = ((loss.regressors[0](student.features["s"]) - teacher.features["t"]) ** 2).mean().item()
    assert terms["fitnet"].item() == pytest.approx(100.0 * mse, rel=1e-5)
    sum(terms.values()).backward()
    assert student.features["s"].grad.abs().sum() > 0 and student.logits.grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.regressors.parameters())
    assert teacher.features["t"].grad is None


def test_regressors_are_registered_submodules_one_per_pair() -> None:
    torch.manual_seed(3)
    student = ModelOutput(torch.randn(2, 3), {"a": torch.randn(2, 4, 8, 8), "b": torch.randn(2, 8, 4, 4)})
    teacher = ModelOutput(torch.randn(2, 3), {"A": torch.randn(2, 16, 8, 8), "B": torch.randn(2, 32)})
    loss = FitNetLoss(["a", "b"], ["A", "B"], weight=1.0)
    loss.setup(student, teacher, DATA)
    assert len(loss.regressors) == 2 and isinstance(loss.regressors[1][1], nn.Linear)
    assert any(k.startswith("regressors.0.") for k in loss.state_dict())
    assert {id(p) for p in loss.regressors.parameters()} <= {id(p) for p in loss.parameters()}
    terms = loss.loss_terms(student, teacher, {})
    expected = sum(hint_loss(r(student.features[s]), teacher.features[t])
                   for r, s, t in zip(loss.regressors, "ab", "AB"))
    assert terms["fitnet"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_before_setup_fails_clearly() -> None:
    student, teacher, batch = _pair()
    with pytest.raises(RuntimeError, match="setup"):
        FitNetLoss(["s"], ["t"])(student, teacher, batch)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"student_nodes": ["a", "b"], "teacher_nodes": ["A"]}, "student_nodes"),
        ({"student_nodes": [], "teacher_nodes": []}, "student_nodes"),
        ({"relu": "no"}, "relu"),
        ({"weight": -100.0}, "weight"),
        ({"ce_weight": float("inf")}, "ce_weight"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["a"], "teacher_nodes": ["A"], **kwargs}
    with pytest.raises(ConfigError) as err:
        FitNetLoss(**args)
    assert err.value.key == key


def test_config_builds_with_the_recipe_defaults() -> None:
    taps = OmegaConf.load(CONF / "model" / "student" / "digits_cnn.yaml")["_nodes_"]  # model/teacher=digits_cnn too
    model = {r: {"_nodes_": taps} for r in ("student", "teacher")}
    cfg = OmegaConf.create({"model": model, "distill": OmegaConf.load(CONF / "distill" / "fitnet.yaml")})
    loss = instantiate(cfg.distill)
    assert isinstance(loss, FitNetLoss) and loss.relu
    assert loss.student_nodes == (model["student"]["_nodes_"]["hint"],)
    assert loss.teacher_nodes == (model["teacher"]["_nodes_"]["hint"],)
    assert loss.weight(0) == 100.0 and loss.ce_weight == 1.0
