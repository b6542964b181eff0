"""KD-SVD against mdistiller's code (the CRD/DKD lineage's implementation) and values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.errors import ConfigError
from kd.losses.kdsvd import KDSVDLoss, align, kdsvd_loss, leading_vectors
from kd.outputs import ModelOutput


# --- mdistiller/distillers/KDSVD.py (megvii-research/mdistiller @ a08d46f), as released ---
def _md_svd(feat, n=1):
    size = feat.shape
    x = feat.view(size[0], size[1] * size[2], size[3]).float()
    u, s, v = torch.svd(x)
    u, s, v = (torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in (u, s, v))
    if n > 0:
        u = F.normalize(u[:, :, :n], dim=1)
        s = F.normalize(s[:, :n], dim=1)
        v = F.normalize(v[:, :, :n], dim=1)
    return u, s, v


def _md_align_rsv(a, b):
    cosine = torch.matmul(a.transpose(-2, -1), b)
    max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
    mask = torch.where(torch.eq(max_abs_cosine, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
    return torch.matmul(a, mask), b


def _md_kdsvd_loss(g_s, g_t, k):
    v_sb = v_tb = None
    losses = []
    for i, f_s, f_t in zip(range(len(g_s)), g_s, g_t):
        u_t, s_t, v_t = _md_svd(f_t, k)
        u_s, s_s, v_s = _md_svd(f_s, k + 3)
        v_s, v_t = _md_align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            l2loss = torch.where(torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss))
            losses.append(l2loss.sum())
        v_tb, v_sb = v_t, v_s
    bsz = g_s[0].shape[0]
    return sum(loss / bsz for loss in losses)
# --- end of mdistiller's code ---


def maps(seed: int, widths=((8, 16), (16, 8), (32, 4))) -> list[torch.Tensor]:
    """A resnet-like stack of (B, C, H, W) maps: channels grow as the maps shrink."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, c, w, w, generator=g).relu() for c, w in widths]


@pytest.mark.parametrize("k", [1, 2])
def test_the_loss_equals_mdistillers(k: int) -> None:
    student, teacher = maps(0), maps(1)
    want = _md_kdsvd_loss(student, teacher, k)
    got = kdsvd_loss(student, teacher, k)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 0


def test_the_vectors_run_over_the_width_and_a_rank_one_map_gives_its_factor() -> None:
    # (C*H) x W = a b^T: the leading right-singular vector is b / |b|, up to its sign
    a, b = torch.randn(3 * 5), torch.tensor([1.0, 2.0, 2.0, 4.0])
    feat = torch.outer(a, b).reshape(1, 3, 5, 4)
    v, s = leading_vectors(feat, 1)
    assert v.shape == (1, 4, 1) and torch.allclose(v[0, :, 0].abs(), b / 5.0, atol=1e-5)
    assert s.tolist() == [[pytest.approx(1.0)]]  # normalised over k = 1 singular value


def test_alignment_picks_the_most_parallel_student_vector_with_the_teachers_sign() -> None:
    e = torch.eye(4).unsqueeze(0)  # (1, W=4, 4): four orthonormal student vectors
    teacher = torch.tensor([[0.1], [-0.9], [0.3], [0.3]]).unsqueeze(0)  # most parallel to -e_1
    assert torch.equal(align(e, teacher), -e[:, :, 1:2])


def test_the_rbf_relation_worked_by_hand() -> None:
    # two layers whose leading vectors are known: rank-one maps with factors b1 (W=2) and b2 (W=2)
    b1, b2 = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    t1, t2 = (torch.outer(torch.ones(2), b).reshape(1, 1, 2, 2) for b in (b1, b2))
    v1, v2 = leading_vectors(t1, 1)[0][0, :, 0], leading_vectors(t2, 1)[0][0, :, 0]
    assert torch.allclose(v1.abs(), torch.tensor([0.6, 0.8])) and torch.allclose(v2.abs(), torch.tensor([1.0, 0.0]))
    # the student's second layer is the first's factor: its relation to its first layer differs
    s1, s2 = t1.clone(), torch.outer(torch.ones(2), b1).reshape(1, 1, 2, 2)
    got = kdsvd_loss([s1, s2], [t1, t2], k=1).item()
    vs1 = v1  # the same map as the teacher's first layer: aligned to it exactly
    vs2 = leading_vectors(s2, 4)[0][0]  # (2, 2): its right-singular vectors
    vs2 = align(vs2.unsqueeze(0), v2.view(1, 2, 1))[0, :, 0]
    want = sum((math.exp(-(vs2[i] - vs1[j]).item() ** 2 / 8) - math.exp(-(v2[i] - v1[j]).item() ** 2 / 8)) ** 2
               for i in range(2) for j in range(2))
    assert got == pytest.approx(want, rel=1e-5) and want > 0


def test_the_same_maps_give_no_loss_and_the_gradient_reaches_only_the_student() -> None:
    teacher = maps(3)
    student = [t.clone().requires_grad_(True) for t in teacher]
    assert kdsvd_loss(student, teacher, 1).item() == pytest.approx(0.0, abs=1e-10)
    other = [m.requires_grad_(True) for m in maps(4)]
    loss = kdsvd_loss(other, [t.requires_grad_(True) for t in teacher], 1)
    loss.backward()
    assert all(torch.isfinite(m.grad).all() and m.grad.abs().sum() > 0 for m in other)
    assert all(t.grad is None for t in teacher)


def test_the_method_checks_its_maps_and_weighs_its_term() -> None:
    with pytest.raises(ConfigError, match="at least two maps"):
        KDSVDLoss(["a"], ["a"])
    with pytest.raises(ConfigError, match="k"):
        KDSVDLoss(["a", "b"], ["a", "b"], k=0)
    loss = KDSVDLoss(["a", "b", "c"], ["a", "b", "c"], weight=2.0, ce_weight=0.0)
    s, t = maps(5), maps(6)
    out = lambda m: ModelOutput(torch.zeros(4, 10), dict(zip("abc", m)))  # noqa: E731
    with pytest.raises(ConfigError, match="needs \\(B, C, H, W\\) maps"):
        loss.setup(ModelOutput(torch.zeros(4, 10), {"a": torch.zeros(4, 8), "b": s[1], "c": s[2]}), out(t), None)
    terms = loss(out(s), out(t), {"target": torch.zeros(4, dtype=torch.long)})
    assert terms["kdsvd"].item() == pytest.approx(2.0 * _md_kdsvd_loss(s, t, 1).item(), rel=1e-5)
