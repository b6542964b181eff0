"""OFD: the margin formula, the partial L2 mask by cases, the margin buffers, gradients, bad input."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kd.errors import ConfigError
from kd.losses.ofd import OFDLoss, channel_mean_std, ofd_loss, ofd_margin
from kd.outputs import DataInfo, ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf" / "distill" / "ofd.yaml"
DATA = DataInfo(num_classes=5, num_samples=10)


def _margin_by_hand(m: float, s: float) -> float:
    """The authors' get_margin_from_BN for one channel, with Phi written through erfc."""
    s = abs(s)
    cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))  # Phi(-m / s)
    if cdf > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return -3 * s


def test_margin_matches_the_authors_formula() -> None:
    mean = [0.0, 1.0, -1.0, 0.5, 2.0, 3.5, 0.2, 0.0]
    std = [1.0, 1.0, 2.0, -0.5, 0.4, 1.0, 3.0, 1e-3]  # -0.5: the sign of gamma is ignored
    got = ofd_margin(torch.tensor(mean), torch.tensor(std))
    expected = [_margin_by_hand(m, s) for m, s in zip(mean, std)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # A standard normal: E[x | x < 0] = -phi(0) / Phi(0) = -sqrt(2 / pi).
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)
    # mean 2, std 0.4: Phi(-5) ~ 3e-7 < 0.001, so -3 sigma.
    assert got[4].item() == pytest.approx(-1.2)
    assert (got < 0).all()


def test_margin_is_the_conditional_mean_of_a_known_gaussian() -> None:
    # E[x | x < 0] = int_{-inf}^0 x p(x) dx / int_{-inf}^0 p(x) dx, by the trapezoid rule.
    for mu, sigma in [(0.3, 1.5), (-0.5, 0.7), (1.0, 1.0), (2.5, 1.0)]:
        x = torch.linspace(mu - 12 * sigma, 0.0, 20_001, dtype=torch.float64)
        p = torch.exp(-0.5 * ((x - mu) / sigma) ** 2)
        expected = (torch.trapezoid(x * p, x) / torch.trapezoid(p, x)).item()
        assert ofd_margin(torch.tensor([mu]), torch.tensor([sigma])).item() == pytest.approx(expected, rel=1e-5)


def test_margins_estimated_from_a_bn_output_equal_the_papers_from_gamma_and_beta() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.5, -2.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))
    f = bn(torch.randn(16, 3, 4, 4) * 3 + 1).detach()  # BN under batch statistics
    mean, std = channel_mean_std(f)
    torch.testing.assert_close(mean, bn.bias.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, bn.weight.detach().abs(), atol=1e-4, rtol=1e-4)
    paper = [_margin_by_hand(b, g) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
    torch.testing.assert_close(ofd_margin(mean, std), torch.tensor(paper), atol=2e-4, rtol=1e-4)


def _case_by_hand(s: float, t: float, m: float) -> float:
    """Eq. 4 of the paper for one position, with the margin ReLU max(t, m) as the target."""
    target = max(t, m)
    if s <= target and target <= 0:
        return 0.0  # the ReLU would hide this error
    return (s - target) ** 2


def test_partial_l2_mask_by_case_analysis() -> None:
    m = -0.5
    cases = [  # (student, teacher)
        (1.0, -2.0),  # t below the margin, s above it: (s - m)^2
        (-1.0, -2.0),  # t below the margin, s below it: 0
        (-0.2, -0.3),  # m < t <= 0, s > t: (s - t)^2
        (-0.4, -0.3),  # m < t <= 0, s < t: 0
        (-0.4, 0.7),  # t > 0, s below: (s - t)^2
        (1.5, 0.7),  # t > 0, s above: (s - t)^2
        (-0.3, -0.3),  # equal: 0
        (0.0, 0.0),  # t = 0 is not > 0 and s = t: 0
    ]
    s = torch.tensor([[[[a for a, _ in cases]]]]).reshape(1, 1, 1, -1)
    t = torch.tensor([[[[b for _, b in cases]]]]).reshape(1, 1, 1, -1)
    expected = [_case_by_hand(a, b, m) for a, b in cases]
    assert expected[:6] == pytest.approx([2.25, 0.0, 0.01, 0.0, 1.21, 0.64])
    assert ofd_loss(s, t, torch.tensor([m])).item() == pytest.approx(sum(expected), rel=1e-6)
    # mdistiller's three-case form gives the same value.
    md = (
        (s - m) ** 2 * ((s > m) & (t <= m))
        + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
        + (s - t) ** 2 * (t > 0)
    ).sum()
    assert ofd_loss(s, t, torch.tensor([m])).item() == pytest.approx(md.item(), rel=1e-6)


def test_partial_l2_sums_over_positions_and_averages_over_the_batch() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    margin = torch.tensor([-0.4, -1.0])
    total = sum(
        _case_by_hand(s[b, c, i, j].item(), t[b, c, i, j].item(), margin[c].item())
        for b in range(3) for c in range(2) for i in range(2) for j in range(2)
    )
    assert ofd_loss(s, t, margin).item() == pytest.approx(total / 3, rel=1e-5)
    assert ofd_loss(t, t, margin).item() == 0.0


def _outputs(shapes_s: list[tuple[int, ...]], shapes_t: list[tuple[int, ...]], grad: bool = False):
    fs = {f"s{i}": torch.randn(*shape, requires_grad=grad) for i, shape in enumerate(shapes_s)}
    ft = {f"t{i}": torch.randn(*shape, requires_grad=grad) for i, shape in enumerate(shapes_t)}
    b = shapes_s[0][0]
    return ModelOutput(torch.randn(b, 5, requires_grad=grad), fs), ModelOutput(torch.randn(b, 5), ft)


def _ofd(n: int, **kwargs) -> OFDLoss:
    return OFDLoss([f"s{i}" for i in range(n)], [f"t{i}" for i in range(n)], **kwargs)


@contextmanager
def _bf16_true() -> Iterator[None]:
    """As Lightning's ``bf16-true`` forward context: tensors created without a dtype are bf16."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _bf16(out: ModelOutput) -> ModelOutput:
    """A copy of ``out`` in bf16, as a ``bf16-true`` model gives, with fresh leaf features."""
    features = {k: v.detach().bfloat16().requires_grad_() for k, v in out.features.items()}
    return ModelOutput(out.logits.detach().bfloat16(), features)


def _make_identity(loss: OFDLoss) -> None:
    with torch.no_grad():
        for conv, bn in loss.connectors:
            conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
            bn.running_var.fill_(1.0 - bn.eps)
            bn.eval()


def test_setup_builds_connectors_and_margin_buffers_for_mismatched_channels() -> None:
    s, t = _outputs([(2, 3, 8, 8), (2, 5, 4, 4)], [(2, 6, 8, 8), (2, 7, 8, 8)])
    loss = _ofd(2)
    loss.setup(s, t, DATA)
    assert [(c[0].in_channels, c[0].out_channels) for c in loss.connectors] == [(3, 6), (5, 7)]
    state = loss.state_dict()
    assert state["margin0"].shape == (6,) and state["margin1"].shape == (7,)
    assert "connectors.1.1.running_var" in state and not state["margins_estimated"]
    terms = loss(s, t, {"target": torch.tensor([0, 4])})
    assert set(terms) == {"ce", "ofd"} and terms["ofd"].item() > 0


def test_margins_come_from_the_first_training_batch_and_are_kept() -> None:
    s, t = _outputs([(4, 2, 4, 4)], [(4, 3, 4, 4)])
    loss = _ofd(1)
    loss.setup(s, t, DATA)
    loss.eval()  # before training: the batch's own estimate, not stored
    loss.loss_terms(s, t, {})
    assert not loss.margins_estimated and (loss.margin0 == 0).all()
    loss.train()
    loss.loss_terms(s, t, {})
    first = ofd_margin(*channel_mean_std(t.features["t0"]))
    assert loss.margins_estimated
    torch.testing.assert_close(loss.margin0, first)
    t.features["t0"] = t.features["t0"] * 5 + 3  # a later batch does not move them
    loss.loss_terms(s, t, {})
    torch.testing.assert_close(loss.margin0, first)
    fresh = _ofd(1)  # a checkpoint restores them
    fresh.setup(s, t, DATA)
    fresh.load_state_dict(loss.state_dict())
    fresh.train().loss_terms(s, t, {})
    torch.testing.assert_close(fresh.margin0, first)


def test_loss_is_zero_at_student_equal_teacher_with_identity_connectors() -> None:
    s, t = _outputs([(2, 3, 4, 4), (2, 4, 2, 2)], [(2, 3, 4, 4), (2, 4, 2, 2)])
    loss = _ofd(2)
    loss.setup(s, t, DATA)
    _make_identity(loss)
    t.features = {"t0": s.features["s0"].clone(), "t1": s.features["s1"].clone()}
    assert loss.loss_terms(s, t, {})["ofd"].item() == pytest.approx(0.0, abs=1e-9)


def test_layers_are_weighted_by_powers_of_two_and_the_teacher_is_pooled_to_the_student() -> None:
    torch.manual_seed(1)
    s, t = _outputs([(2, 3, 4, 4), (2, 4, 2, 2), (2, 2, 2, 2)], [(2, 3, 8, 8), (2, 4, 2, 2), (2, 2, 2, 2)])
    loss = _ofd(3)
    loss.setup(s, t, DATA)
    _make_identity(loss)
    got = loss.loss_terms(s, t, {})["ofd"].item()
    margins = [loss.margin0, loss.margin1, loss.margin2]
    parts = []
    for i in range(3):
        f_t = t.features[f"t{i}"]
        f_t = F.avg_pool2d(f_t, 2) if i == 0 else f_t  # 8x8 teacher -> the student's 4x4
        parts.append(ofd_loss(s.features[f"s{i}"].detach(), f_t, margins[i]).item())
    assert got == pytest.approx(parts[0] / 4 + parts[1] / 2 + parts[2], rel=1e-5)
    assert loss(s, t, {"target": torch.tensor([0, 1])})["ofd"].item() == pytest.approx(got * 1e-3, rel=1e-5)


def test_gradients_reach_student_features_and_connectors_never_the_teacher() -> None:
    s, t = _outputs([(2, 3, 4, 4), (2, 5, 2, 2)], [(2, 6, 4, 4), (2, 8, 2, 2)], grad=True)
    loss = _ofd(2)
    loss.setup(s, t, DATA)
    loss(s, t, {"target": torch.tensor([1, 2])})["ofd"].backward()
    for f in s.features.values():
        assert f.grad is not None and f.grad.abs().sum() > 0
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad is None for f in t.features.values())


def test_half_precision_inputs_give_an_fp32_loss() -> None:
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    m = ofd_margin(*channel_mean_std(t))
    low = ofd_loss(s.bfloat16(), t.bfloat16(), m)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ofd_loss(s.bfloat16().float(), t.bfloat16().float(), m).item(), rel=1e-6)


def test_config_reads_the_preact_taps_with_the_authors_weights() -> None:
    taps = {"stages": ["a", "b"], "preact": ["a_pre", "b_pre"], "pooled": "pool"}
    cfg = OmegaConf.merge(
        {"model": {"student": {"_nodes_": taps}, "teacher": {"_nodes_": taps}}},
        {"distill": OmegaConf.load(CONF)},
    )
    loss = instantiate(cfg.distill)
    assert isinstance(loss, OFDLoss)
    assert loss.student_nodes == ("a_pre", "b_pre") and loss.teacher_nodes == ("a_pre", "b_pre")
    assert loss.ce_weight == 1.0 and loss.weight(0) == pytest.approx(1e-3)


def test_a_bf16_module_runs_forward_and_backward_on_bf16_features() -> None:
    # precision="bf16-true" converts the loss (connectors, BN, margins) to bf16 and feeds bf16 features.
    torch.manual_seed(7)
    student, teacher = _outputs([(4, 3, 4, 4), (4, 5, 2, 2)], [(4, 6, 4, 4), (4, 8, 2, 2)])
    loss = _ofd(2, weight=1.0)
    loss.setup(student, teacher, DATA)
    reference = copy.deepcopy(loss)
    expected = reference.loss_terms(student, teacher, {})["ofd"].item()  # the fp32 module on fp32 features
    loss = loss.to(torch.bfloat16)
    s, t = _bf16(student), _bf16(teacher)
    with _bf16_true():
        value = loss(s, t, {"target": torch.arange(4)})["ofd"]
    value.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=2e-2)
    for p in loss.connectors.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
    assert bool(loss.margins_estimated) and loss.margin0.dtype == torch.bfloat16
    assert all(f.grad.abs().sum() > 0 for f in s.features.values())


def test_channel_statistics_do_not_depend_on_the_default_dtype() -> None:
    # bf16-true makes bf16 the default dtype in the forward; the count B * H * W = 273 is not a
    # bf16 number, so it must not be created in the default dtype.
    f = torch.randn(3, 2, 7, 13) * 2 + 1
    expected = channel_mean_std(f)
    with _bf16_true():
        got = channel_mean_std(f)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"student_nodes": ["a", "b"], "teacher_nodes": ["a"]}, "student_nodes"),
        ({"student_nodes": [], "teacher_nodes": []}, "student_nodes"),
        ({"student_nodes": [""], "teacher_nodes": ["a"]}, "student_nodes"),
        ({"weight": -1e-3}, "weight"),
        ({"ce_weight": float("nan")}, "ce_weight"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        OFDLoss(**{"student_nodes": ["a"], "teacher_nodes": ["b"], **kwargs})
    assert err.value.key == key


def test_setup_rejects_features_that_are_not_maps() -> None:
    s, t = _outputs([(2, 3, 4, 4)], [(2, 6)])
    with pytest.raises(ConfigError) as err:
        _ofd(1).setup(s, t, DATA)
    assert err.value.key == "teacher_nodes"


def test_setup_names_a_missing_node() -> None:
    s, t = _outputs([(2, 3, 4, 4)], [(2, 3, 4, 4)])
    with pytest.raises(ConfigError, match="nope") as err:
        OFDLoss(["s0"], ["nope"]).setup(s, t, DATA)
    assert err.value.key == "teacher_nodes"


def test_repr_shows_the_pairs_the_margins_state_and_weights() -> None:
    s, t = _outputs([(4, 3, 4, 4)], [(4, 6, 4, 4)])
    loss = _ofd(1)
    loss.setup(s, t, DATA)
    assert "pairs=1, margins=pending, ce_weight=1, weight=0.001" in repr(loss)
    loss.train().loss_terms(s, t, {})
    assert "margins=estimated" in repr(loss)


def test_loss_before_setup_says_so() -> None:
    s, t = _outputs([(2, 3, 4, 4)], [(2, 3, 4, 4)])
    with pytest.raises(RuntimeError, match="setup"):
        _ofd(1).loss_terms(s, t, {})
