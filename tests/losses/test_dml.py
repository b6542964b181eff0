"""DML (Zhang et al. CVPR 2018, eq. 10) against the formula, computed by hand."""

from __future__ import annotations

import torch

from kd.losses.dml import DMLLoss
from kd.outputs import ModelOutput


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per batch, averaged over samples."""
    return (p * (p.log() - q.log())).sum(1).mean()


def test_each_network_learns_from_the_mean_kl_to_the_others_and_its_labels() -> None:
    g = torch.Generator().manual_seed(0)
    z = {n: (torch.randn(6, 5, generator=g) * 2).requires_grad_() for n in ("student", "a", "b")}
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out = ModelOutput(z["student"], members={n: ModelOutput(v) for n, v in z.items()})
    terms = DMLLoss(temperature=2.0, weight=0.5, ce_weight=0.3)(out, None, {"target": y})
    assert set(terms) == {"ce", "kl", "ce_a", "kl_a", "ce_b", "kl_b"}
    t = 2.0
    p = {n: torch.softmax(v.detach() / t, 1) for n, v in z.items()}
    for n, suffix in (("student", ""), ("a", "_a"), ("b", "_b")):
        others = [m for m in z if m != n]
        by_hand = 0.5 * t * t * sum(_kl(p[m], p[n]) for m in others) / 2
        torch.testing.assert_close(terms[f"kl{suffix}"], by_hand)
        torch.testing.assert_close(terms[f"ce{suffix}"], 0.3 * torch.nn.functional.cross_entropy(z[n], y))
    # a network's gradient comes from its own terms only: the others are fixed targets
    terms["kl_a"].backward()
    assert z["a"].grad is not None and z["student"].grad is None and z["b"].grad is None
    # at T = 1, d KL(p_l || p_k) / d z_k = (p_k - p_l) / B
    za, zs = torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(4, 3, generator=g)
    pair = {"student": ModelOutput(zs), "a": ModelOutput(za)}
    DMLLoss(ce_weight=0.0)(ModelOutput(zs, members=pair), None, {"target": torch.zeros(4, dtype=torch.long)})["kl_a"].backward()
    torch.testing.assert_close(za.grad, (torch.softmax(za.detach(), 1) - torch.softmax(zs, 1)) / 4)
