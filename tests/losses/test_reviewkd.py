"""ReviewKD: the HCL against a hand computation, the ABF review path, gradients, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kd.errors import ConfigError
from kd.losses.reviewkd import ABF, ReviewKDLoss, hcl_loss
from kd.losses.schedules import LinearWarmup
from kd.outputs import DataInfo, ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf" / "distill" / "reviewkd.yaml"
DATA = DataInfo(num_classes=5, num_samples=10)


def _mse(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def _pool(m: list[list[float]], size: int) -> list[float]:
    """Average pooling of a square ``n x n`` map to ``size x size`` (size divides n), row-major."""
    k = len(m) // size
    return [
        sum(m[i * k + a][j * k + b] for a in range(k) for b in range(k)) / (k * k)
        for i in range(size)
        for j in range(size)
    ]


def _hcl_by_hand(s: list[list[float]], t: list[float]) -> float:
    n = len(s)
    terms = [(1.0, _mse(sum(s, []), sum(t, [])))]
    w = 1.0
    for level in (4, 2, 1):
        if level < n:
            w /= 2
            terms.append((w, _mse(_pool(s, level), _pool(t, level))))
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_hcl_matches_the_pyramid_worked_by_hand(n: int) -> None:
    # n = 4: levels 2 and 1 only (4 is not below 4): (mse + mse_2 / 2 + mse_1 / 4) / 1.75.
    g = torch.Generator().manual_seed(n)
    s = torch.randn(1, 1, n, n, generator=g)
    t = torch.randn(1, 1, n, n, generator=g)
    expected = _hcl_by_hand(s[0, 0].tolist(), t[0, 0].tolist())
    assert hcl_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_hcl_on_a_2x2_map_by_hand() -> None:
    # Full MSE = (1 + 0 + 0 + 9) / 4 = 2.5; 1x1 level: means 1 and 0 -> 1; (2.5 + 1/2) / 1.5 = 2.
    s = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]])
    t = torch.zeros(1, 1, 2, 2)
    assert hcl_loss(s, t).item() == pytest.approx(2.0)


def test_hcl_averages_over_batch_and_channels_and_is_zero_at_equality() -> None:
    s, t = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    per = [hcl_loss(s[b : b + 1, c : c + 1], t[b : b + 1, c : c + 1]) for b in range(3) for c in range(2)]
    assert hcl_loss(s, t).item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)
    assert hcl_loss(s, s.clone()).item() == 0.0


def _outputs(shapes_s: list[tuple[int, ...]], shapes_t: list[tuple[int, ...]], grad: bool = False):
    names_s = [f"s{i}" for i in range(len(shapes_s) - 1)] + ["s_pool"]
    names_t = [f"t{i}" for i in range(len(shapes_t) - 1)] + ["t_pool"]
    fs = {n: torch.randn(*shape, requires_grad=grad) for n, shape in zip(names_s, shapes_s)}
    ft = {n: torch.randn(*shape, requires_grad=grad) for n, shape in zip(names_t, shapes_t)}
    return ModelOutput(torch.randn(shapes_s[0][0], 5, requires_grad=grad), fs), ModelOutput(torch.randn(shapes_s[0][0], 5), ft)


def _loss(n_stages: int, **kwargs) -> ReviewKDLoss:
    return ReviewKDLoss(
        student_nodes=[f"s{i}" for i in range(n_stages)],
        teacher_nodes=[f"t{i}" for i in range(n_stages)],
        student_pooled="s_pool",
        teacher_pooled="t_pool",
        **kwargs,
    )


# Three stages whose channels and sizes differ from the teacher's both ways, plus pooled embeddings.
STUDENT = [(2, 4, 16, 16), (2, 6, 8, 8), (2, 10, 4, 4), (2, 10)]
TEACHER = [(2, 12, 8, 8), (2, 20, 8, 8), (2, 24, 2, 2), (2, 32)]


def test_setup_builds_one_abf_per_level_and_outputs_match_the_teacher() -> None:
    s, t = _outputs(STUDENT, TEACHER)
    loss = _loss(3)
    assert loss.student_nodes == ("s0", "s1", "s2", "s_pool")
    assert loss.teacher_nodes == ("t0", "t1", "t2", "t_pool")
    loss.setup(s, t, DATA)
    assert len(loss.abfs) == 4
    for abf, c_in, c_out in zip(loss.abfs, [4, 6, 10, 10], [12, 20, 24, 32]):
        assert abf.conv1[0].in_channels == c_in
        assert abf.conv1[0].out_channels == 10  # min(512, channels of the student's pooled embedding)
        assert abf.conv2[0].out_channels == c_out
    assert [abf.att_conv is None for abf in loss.abfs] == [False, False, False, True]  # deepest has no residual
    maps_s = [s.features[n] if s.features[n].dim() == 4 else s.features[n][:, :, None, None] for n in loss.student_nodes]
    outs = loss.review(maps_s, [(8, 8), (8, 8), (2, 2), (1, 1)])
    assert [tuple(o.shape) for o in outs] == [(2, 12, 8, 8), (2, 20, 8, 8), (2, 24, 2, 2), (2, 32, 1, 1)]
    terms = loss(s, t, {"target": torch.tensor([0, 3])}, epoch=0)
    assert set(terms) == {"ce", "reviewkd"} and terms["reviewkd"].item() > 0


def test_mid_channels_are_capped() -> None:
    s, t = _outputs(STUDENT, TEACHER)
    loss = _loss(3, max_mid_channels=3)
    loss.setup(s, t, DATA)
    assert {abf.conv1[0].out_channels for abf in loss.abfs} == {3}


def test_abf_fuses_the_upsampled_residual_by_its_attention_maps() -> None:
    abf = ABF(3, 2, 5, fuse=True).eval()
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)
    out, res = abf(x, residual, (8, 8))
    assert out.shape == (2, 5, 8, 8) and res.shape == (2, 2, 8, 8)
    with torch.no_grad():
        y = abf.conv1(x)
        up = residual.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest 2x2 -> 4x4
        att = abf.att_conv(torch.cat([y, up], 1))
        fused = y * att[:, 0:1] + up * att[:, 1:2]
        expected = fused.repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(res, expected)
    torch.testing.assert_close(out, abf.conv2(expected))


def _make_identity(loss: ReviewKDLoss, c: int) -> None:
    """ABFs that pass the student's own feature through: identity convs, attention (1, 0)."""
    eye = torch.eye(c)
    with torch.no_grad():
        for abf in loss.abfs:
            abf.conv1[0].weight.copy_(eye[:, :, None, None])
            abf.conv2[0].weight.zero_()
            abf.conv2[0].weight[:, :, 1, 1] = eye
            for bn in (abf.conv1[1], abf.conv2[1]):
                bn.running_var.fill_(1.0 - bn.eps)
            if abf.att_conv is not None:
                abf.att_conv[0].weight.zero_()
                abf.att_conv[0].bias.copy_(torch.tensor([60.0, -60.0]))
    loss.eval()


def test_loss_is_zero_when_the_identity_review_reproduces_the_teacher() -> None:
    shapes = [(2, 4, 8, 8), (2, 4, 4, 4), (2, 4)]
    s, t = _outputs(shapes, shapes)
    loss = _loss(2)
    loss.setup(s, t, DATA)
    _make_identity(loss, 4)
    t.features = {n.replace("s", "t", 1): f.clone() for n, f in s.features.items()}
    assert loss.loss_terms(s, t, {})["reviewkd"].item() == pytest.approx(0.0, abs=1e-10)
    t.features["t1"] = t.features["t1"] + 1.0  # HCL of a constant offset is 1 at every level
    assert loss.loss_terms(s, t, {})["reviewkd"].item() == pytest.approx(1.0, rel=1e-5)


def test_gradients_reach_student_features_and_every_abf_never_the_teacher() -> None:
    s, t = _outputs(STUDENT, TEACHER, grad=True)
    loss = _loss(3)
    loss.setup(s, t, DATA)
    loss(s, t, {"target": torch.tensor([1, 2])}, epoch=30)["reviewkd"].backward()
    for f in s.features.values():
        assert f.grad is not None and f.grad.abs().sum() > 0
    for name, p in loss.named_parameters():
        assert p.grad is not None, name
    assert all(f.grad is None for f in t.features.values())


def test_weight_schedule_warms_up() -> None:
    s, t = _outputs(STUDENT, TEACHER)
    loss = _loss(3, weight=LinearWarmup(2.0, 20)).eval()
    loss.setup(s, t, DATA)
    batch = {"target": torch.tensor([0, 1])}
    full = loss(s, t, batch, epoch=25)["reviewkd"]
    assert loss(s, t, batch, epoch=0)["reviewkd"].item() == pytest.approx(full.item() / 20, rel=1e-5)
    assert full.item() == pytest.approx(2 * loss.loss_terms(s, t, batch)["reviewkd"].item(), rel=1e-5)


def test_config_interpolates_the_model_taps_and_gives_the_warmup() -> None:
    taps = {"stages": ["a", "b"], "preact": ["a_pre", "b_pre"], "pooled": "pool"}
    cfg = OmegaConf.merge(
        {"model": {"student": {"_nodes_": taps}, "teacher": {"_nodes_": taps}}},
        {"distill": OmegaConf.load(CONF)},
    )
    loss = instantiate(cfg.distill)
    assert isinstance(loss, ReviewKDLoss)
    assert loss.student_nodes == ("a", "b", "pool") and loss.teacher_nodes == ("a_pre", "b_pre", "pool")
    assert loss.ce_weight == 1.0 and isinstance(loss.weight, LinearWarmup)
    assert (loss.weight.value, loss.weight.epochs) == (1.0, 20)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"student_nodes": ["a", "b"], "teacher_nodes": ["a"]}, "student_nodes"),
        ({"student_nodes": [], "teacher_nodes": []}, "student_nodes"),
        ({"student_pooled": ""}, "student_pooled"),
        ({"teacher_pooled": ["p"]}, "teacher_pooled"),
        ({"max_mid_channels": 0}, "max_mid_channels"),
        ({"weight": -1.0}, "weight"),
        ({"ce_weight": -0.5}, "ce_weight"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["a"], "teacher_nodes": ["b"], "student_pooled": "p", "teacher_pooled": "q"}
    with pytest.raises(ConfigError) as err:
        ReviewKDLoss(**{**args, **kwargs})
    assert err.value.key == key


@pytest.mark.parametrize(
    "student, key",
    [
        ([(2, 4), (2, 8)], "student_nodes"),  # a stage that is not a map
        ([(2, 4, 8, 8), (2, 8, 8, 8), (2, 8, 2, 2)], "student_pooled"),  # a "pooled" map with space
    ],
)
def test_setup_rejects_features_of_the_wrong_kind(student: list, key: str) -> None:
    n = len(student) - 1
    teacher = [(2, 4, 8, 8)] * n + [(2, 8)]
    s, t = _outputs(student, teacher)
    with pytest.raises(ConfigError) as err:
        _loss(n).setup(s, t, DATA)
    assert err.value.key == key


def test_loss_before_setup_says_so() -> None:
    s, t = _outputs(STUDENT, TEACHER)
    with pytest.raises(RuntimeError, match="setup"):
        _loss(3).loss_terms(s, t, {})


def test_abfs_are_saved_in_the_state_dict() -> None:
    s, t = _outputs(STUDENT, TEACHER)
    loss = _loss(3)
    loss.setup(s, t, DATA)
    keys = loss.state_dict().keys()
    assert "abfs.0.conv1.0.weight" in keys and "abfs.3.conv2.1.running_mean" in keys
    assert isinstance(loss.abfs[0], nn.Module)
