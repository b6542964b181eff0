"""CRD against values worked by hand from the paper's NCE loss and RepDistiller's ContrastMemory."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from kd.errors import ConfigError
from kd.losses import common as common_module
from kd.losses.common import all_gather_rows
from kd.losses.crd import CRDLoss, contrast_loss, contrast_scores, sample_negatives, update_memory
from kd.outputs import DataInfo, ModelOutput


def _outputs(f_s: torch.Tensor, f_t: torch.Tensor, classes: int = 3) -> tuple[ModelOutput, ModelOutput]:
    b = f_s.shape[0]
    return ModelOutput(torch.zeros(b, classes), {"s": f_s}), ModelOutput(torch.zeros(b, classes), {"t": f_t})


def _crd(targets: torch.Tensor | None, d_s: int = 4, d_t: int = 6, **kwargs) -> CRDLoss:
    loss = CRDLoss(["s"], ["t"], **{"feat_dim": 8, "nce_k": 5, **kwargs})
    n = 0 if targets is None else len(targets)
    loss.setup(*_outputs(torch.randn(2, d_s), torch.randn(2, d_t)), DataInfo(3, n, targets))
    return loss


def _class_index(targets: torch.Tensor):
    order = torch.argsort(targets, stable=True)
    count = torch.bincount(targets)
    return order, count.cumsum(0) - count, count


# --- the NCE loss (eq. 18) ---------------------------------------------------------------------


def test_contrast_loss_matches_the_formula_worked_by_hand() -> None:
    p = [[0.9, 0.1, 0.3], [0.05, 0.4, 0.02]]  # B = 2, K = 2, positive first
    n = 4  # m * P_n = 2 / 4
    expected = 0.0
    for row in p:
        expected += math.log(row[0] / (row[0] + 0.5 + 1e-7))
        for q in row[1:]:
            expected += math.log(0.5 / (q + 0.5 + 1e-7))
    expected = -expected / 2
    got = contrast_loss(torch.tensor(p, dtype=torch.float64), n)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_contrast_loss_is_K_plus_1_log_2_at_chance_and_vanishes_with_perfect_separation() -> None:
    k, n = 7, 70
    chance = torch.full((3, k + 1), k / n, dtype=torch.float64)  # every P equals m * P_n
    assert contrast_loss(chance, n, eps=0.0).item() == pytest.approx((k + 1) * math.log(2), rel=1e-12)
    separated = torch.cat([torch.full((3, 1), 1e9), torch.full((3, k), 1e-12)], 1).double()
    assert 0 <= contrast_loss(separated, n, eps=0.0).item() < 1e-9


# --- scores against the memory bank ------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 200])  # the full-matrix path, then the gathered-rows path
def test_contrast_scores_are_exp_of_dot_over_T_by_hand(n: int) -> None:
    torch.manual_seed(0)
    anchor = torch.randn(2, 2, dtype=torch.float64)
    memory = torch.randn(n, 2, dtype=torch.float64)
    idx = torch.tensor([[0, 2, 1], [1, 0, 0]])
    got = contrast_scores(anchor, memory, idx, 0.5)
    for b in range(2):
        for j in range(3):
            dot = sum(anchor[b, d].item() * memory[idx[b, j], d].item() for d in range(2))
            assert got[b, j].item() == pytest.approx(math.exp(dot / 0.5), rel=1e-12)


def test_contrast_scores_keep_no_reference_to_the_bank_updated_before_backward() -> None:
    for n in (3, 200):
        anchor = torch.randn(2, 2, requires_grad=True)
        memory = torch.randn(n, 2)
        out = contrast_scores(anchor, memory, torch.tensor([[0, 1], [2, 0]]), 0.1)
        expected = torch.autograd.grad(out.sum(), anchor, retain_graph=True)[0]
        memory.mul_(0)  # as the bank update does, after the scores
        torch.testing.assert_close(torch.autograd.grad(out.sum(), anchor)[0], expected)


# --- memory update (ContrastMemory) --------------------------------------------------------------


def test_memory_update_is_momentum_then_renormalise() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    update_memory(memory, torch.tensor([0, 2]), torch.tensor([[0.0, 1.0], [0.0, 2.0]]), momentum=0.5)
    r = 1 / math.sqrt(2)
    # row 0: 0.5 (1, 0) + 0.5 (0, 1) = (0.5, 0.5) -> (1/sqrt2, 1/sqrt2); row 2: (1.5, 3) -> /(1.5 sqrt5)
    expected = torch.tensor([[r, r], [0.0, 1.0], [1 / math.sqrt(5), 2 / math.sqrt(5)]])
    torch.testing.assert_close(memory, expected)
    update_memory(memory, torch.tensor([1]), torch.tensor([[5.0, 0.0]]), momentum=0.0)  # momentum 0: the new row
    torch.testing.assert_close(memory[1], torch.tensor([1.0, 0.0]))


def test_memory_update_keeps_the_last_row_of_a_repeated_index() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    update_memory(memory, torch.tensor([0, 1, 0]), torch.tensor([[9.0, 9.0], [0.0, 1.0], [-1.0, 0.0]]), 0.0)
    torch.testing.assert_close(memory, torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))


# --- negatives ------------------------------------------------------------------------------------


@pytest.mark.parametrize("replacement", [False, True])
def test_negatives_never_share_the_anchor_class_and_lie_in_range(replacement: bool) -> None:
    torch.manual_seed(0)
    targets = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2, 2, 0, 1, 1, 2, 0, 0, 1])  # N = 20
    labels = torch.tensor([0, 1, 2, 1, 0])
    neg = sample_negatives(labels, *_class_index(targets), k=11, replacement=replacement)
    assert neg.shape == (5, 11) and neg.dtype == torch.long
    assert neg.min() >= 0 and neg.max() < 20
    assert (targets[neg] != labels[:, None]).all()
    if not replacement:  # every class leaves >= 13 others, so 11 distinct ones
        assert all(len(set(row.tolist())) == 11 for row in neg)


def test_negatives_cover_every_other_sample_uniformly_and_fall_back_to_replacement() -> None:
    torch.manual_seed(1)
    targets = torch.tensor([0, 1, 1, 0, 2, 1, 2, 0, 1])  # class 1 leaves 5 others, class 0 leaves 6
    index = _class_index(targets)
    for replacement in (False, True):  # K = 6000 > others: the reference draws with replacement too
        neg = sample_negatives(torch.tensor([1, 0]), *index, k=6000, replacement=replacement)
        for row, label, others in zip(neg, (1, 0), (5, 6)):
            counts = torch.bincount(row, minlength=9)
            assert (counts[targets == label] == 0).all()
            assert counts[targets != label].sub(6000 / others).abs().max() < 200  # ~5 sigma


def test_distinct_negatives_are_a_uniform_subset() -> None:
    torch.manual_seed(2)
    targets = torch.tensor([0] * 4 + [1] * 6)
    neg = sample_negatives(torch.zeros(3000, dtype=torch.long), *_class_index(targets), k=3, replacement=False)
    assert all(len(set(r)) == 3 for r in neg.tolist())
    counts = torch.bincount(neg.flatten(), minlength=10)[4:]  # each of 6 in a row with prob 1/2
    assert counts.sub(1500).abs().max() < 150  # ~5 sigma


def test_negatives_follow_the_global_seed() -> None:
    targets = torch.arange(30) % 4
    draws = []
    for _ in range(2):
        torch.manual_seed(5)
        draws.append(sample_negatives(torch.tensor([0, 3]), *_class_index(targets), k=9, replacement=False))
    torch.testing.assert_close(draws[0], draws[1])


# --- the module -------------------------------------------------------------------------------


def test_setup_builds_embeddings_banks_and_Z_as_state() -> None:
    torch.manual_seed(0)
    loss = _crd(torch.tensor([0, 1, 2, 0, 1, 2, 0]), d_s=4, d_t=6, feat_dim=48)
    assert loss.embed_s.linear.weight.shape == (48, 4) and loss.embed_t.linear.weight.shape == (48, 6)
    stdv = 1 / math.sqrt(48 / 3)
    for bank in (loss.memory_s, loss.memory_t):
        assert bank.shape == (7, 48) and not bank.requires_grad
        assert bank.abs().max() <= stdv and bank.abs().max() > 0.8 * stdv
    state = loss.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t", "embed_s.linear.weight", "embed_t.linear.bias"} <= set(state)
    assert not any(k.startswith("_") for k in state)  # the class index is derived, not saved
    assert loss.z_s.item() == 0 and loss.z_t.item() == 0


def test_loss_and_bank_update_match_a_hand_computation() -> None:
    # N = 2 of two classes: each sample's only negative is the other one, so idx is known.
    torch.manual_seed(3)
    targets = torch.tensor([0, 1])
    loss = _crd(targets, nce_k=3, nce_t=0.5, nce_mom=0.5)
    f_s, f_t = torch.randn(2, 4), torch.randn(2, 6)
    mem_s, mem_t = loss.memory_s.clone(), loss.memory_t.clone()
    with torch.no_grad():
        v_s = F.normalize(f_s @ loss.embed_s.linear.weight.T + loss.embed_s.linear.bias, dim=1)
        v_t = F.normalize(f_t @ loss.embed_t.linear.weight.T + loss.embed_t.linear.bias, dim=1)
    index = torch.tensor([1, 0])
    idx = [[1, 0, 0, 0], [0, 1, 1, 1]]

    def scores(v: torch.Tensor, bank: torch.Tensor) -> list[list[float]]:
        return [[math.exp(float(v[b] @ bank[j]) / 0.5) for j in idx[b]] for b in range(2)]

    e_s, e_t = scores(v_s, mem_t), scores(v_t, mem_s)
    z_s = sum(map(sum, e_s)) / 8 * 2  # mean over B (K + 1) scores, times N
    z_t = sum(map(sum, e_t)) / 8 * 2

    def nce(e: list[list[float]], z: float) -> float:
        total = 0.0
        for row in e:
            p = [x / z for x in row]
            total += math.log(p[0] / (p[0] + 3 / 2 + 1e-7)) + sum(math.log(1.5 / (q + 1.5 + 1e-7)) for q in p[1:])
        return -total / 2

    terms = loss(*_outputs(f_s, f_t), {"index": index, "target": targets[index]})
    assert set(terms) == {"ce", "crd"}
    assert terms["crd"].item() == pytest.approx(0.8 * (nce(e_s, z_s) + nce(e_t, z_t)), rel=1e-5)
    assert loss.z_s.item() == pytest.approx(z_s, rel=1e-5) and loss.z_t.item() == pytest.approx(z_t, rel=1e-5)
    for bank, old, v in ((loss.memory_s, mem_s, v_s), (loss.memory_t, mem_t, v_t)):
        for b, i in enumerate(index.tolist()):
            torch.testing.assert_close(bank[i], F.normalize(0.5 * old[i] + 0.5 * v[b], dim=0))


def test_Z_is_fixed_after_the_first_batch_and_survives_a_checkpoint() -> None:
    torch.manual_seed(4)
    targets = torch.arange(40) % 3
    loss = _crd(targets)
    batch = {"index": torch.arange(8), "target": targets[:8]}
    loss(*_outputs(torch.randn(8, 4), torch.randn(8, 6)), batch)
    z = (loss.z_s.item(), loss.z_t.item())
    assert z[0] > 0 and z[1] > 0
    for _ in range(3):
        loss(*_outputs(10 * torch.randn(8, 4), 10 * torch.randn(8, 6)), batch)
        assert (loss.z_s.item(), loss.z_t.item()) == z
    restored = _crd(targets)
    restored.load_state_dict(loss.state_dict())
    restored(*_outputs(torch.randn(8, 4), torch.randn(8, 6)), batch)
    assert (restored.z_s.item(), restored.z_t.item()) == z


def test_the_bank_is_left_alone_in_eval_mode() -> None:
    loss = _crd(torch.arange(12) % 3).eval()
    before = loss.memory_s.clone(), loss.memory_t.clone()
    loss(*_outputs(torch.randn(4, 4), torch.randn(4, 6)), {"index": torch.arange(4), "target": torch.zeros(4).long()})
    torch.testing.assert_close((loss.memory_s, loss.memory_t), before)


def test_gradients_reach_student_features_and_both_embeddings_never_teacher_or_banks() -> None:
    torch.manual_seed(5)
    targets = torch.arange(30) % 3
    loss = _crd(targets)
    f_s = torch.randn(6, 4, requires_grad=True)
    f_t = torch.randn(6, 6, requires_grad=True)  # the method must detach it
    terms = loss(*_outputs(f_s, f_t), {"index": torch.arange(6), "target": targets[:6]})
    banks = loss.memory_s.clone(), loss.memory_t.clone()
    terms["crd"].backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    for p in (*loss.embed_s.parameters(), *loss.embed_t.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not b.requires_grad and b.grad is None for b in loss.buffers())
    torch.testing.assert_close((loss.memory_s, loss.memory_t), banks)  # backward does not touch them


def test_bf16_autocast_features_give_an_fp32_loss() -> None:
    torch.manual_seed(6)
    targets = torch.arange(30) % 3
    f_s, f_t = torch.randn(6, 4).bfloat16(), torch.randn(6, 6).bfloat16()
    batch = {"index": torch.arange(6), "target": targets[:6]}
    values = []
    for low in (True, False):
        torch.manual_seed(7)
        loss = _crd(targets)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            feats = (f_s, f_t) if low else (f_s.float(), f_t.float())
            values.append(loss.loss_terms(*_outputs(*feats), batch)["crd"])
    assert values[0].dtype == torch.float32
    assert values[0].item() == pytest.approx(values[1].item(), rel=1e-6)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """As Lightning's ``bf16-true`` forward context: tensors created without a dtype get ``dtype``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("nce_k", [5, 20])  # scores from gathered bank rows / from the full (B, N) matrix
def test_a_bf16_module_runs_forward_and_backward_on_bf16_features(nce_k: int) -> None:
    # precision="bf16-true" converts the whole module (embeddings, banks, Z) to bf16 and feeds bf16
    # features; the loss must run, train the bf16 embeddings and match the fp32 module closely.
    targets = torch.arange(30) % 3
    f_s, f_t = torch.randn(6, 4).bfloat16(), torch.randn(6, 6).bfloat16()
    batch = {"index": torch.arange(6), "target": targets[:6]}
    torch.manual_seed(9)
    full = _crd(targets, nce_k=nce_k, weight=1.0)
    low = CRDLoss(["s"], ["t"], feat_dim=8, nce_k=nce_k, weight=1.0)
    low.setup(*_outputs(torch.randn(2, 4), torch.randn(2, 6)), DataInfo(3, 30, targets))
    low.load_state_dict(full.state_dict())
    low = low.to(torch.bfloat16).train()
    assert low.embed_s.linear.weight.dtype == low.memory_s.dtype == low.z_s.dtype == torch.bfloat16
    s = f_s.clone().requires_grad_()
    torch.manual_seed(10)
    expected = full.loss_terms(*_outputs(f_s.float(), f_t.float()), batch)["crd"]
    torch.manual_seed(10)  # the same negatives
    with _default_dtype(torch.bfloat16):
        terms = low(*_outputs(s, f_t), batch)
    terms["crd"].backward()
    assert terms["crd"].dtype == torch.float32
    assert terms["crd"].item() == pytest.approx(expected.item(), rel=1e-2)
    assert s.grad is not None and s.grad.dtype == torch.bfloat16 and s.grad.abs().sum() > 0
    for p in (*low.embed_s.parameters(), *low.embed_t.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
    assert low.memory_s.dtype == low.memory_t.dtype == torch.bfloat16  # updated in place, dtype kept
    for bank in (low.memory_s, low.memory_t):
        torch.testing.assert_close(bank[:6].float().norm(dim=1), torch.ones(6), atol=1e-2, rtol=0)
    assert low.z_s.item() > 0 and low.z_t.item() > 0


def test_negatives_do_not_depend_on_the_default_dtype() -> None:
    # bf16-true makes bf16 the default dtype in the forward; the sampling keys must stay fp32 (bf16
    # keys tie often among hundreds of samples, and ties are not broken uniformly).
    targets = torch.arange(400) % 4
    order, start, count = _class_index(targets)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(11)
    expected = sample_negatives(labels, order, start, count, 150, replacement=False)
    torch.manual_seed(11)
    with _default_dtype(torch.bfloat16):
        got = sample_negatives(labels, order, start, count, 150, replacement=False)
    torch.testing.assert_close(got.sort(dim=1).values, expected.sort(dim=1).values)


# --- bad input --------------------------------------------------------------------------------------


def test_setup_without_targets_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="CRD needs the sample index") as e:
        _crd(None)
    assert e.value.key == "distill"


def test_setup_with_a_single_class_or_a_missing_feature_raises() -> None:
    with pytest.raises(ConfigError, match="one class"):
        _crd(torch.zeros(5, dtype=torch.long))
    loss = CRDLoss(["s"], ["nope"])
    with pytest.raises(ConfigError, match="nope") as e:
        loss.setup(*_outputs(torch.randn(2, 4), torch.randn(2, 6)), DataInfo(3, 3, torch.tensor([0, 1, 2])))
    assert e.value.key == "teacher_nodes"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"nce_t": 0.0}, "nce_t"),
        ({"nce_t": -0.07}, "nce_t"),
        ({"nce_mom": 1.0}, "nce_mom"),
        ({"nce_mom": -0.1}, "nce_mom"),
        ({"nce_k": 0}, "nce_k"),
        ({"nce_k": 2.5}, "nce_k"),
        ({"feat_dim": 0}, "feat_dim"),
        ({"replacement": "yes"}, "replacement"),
        ({"weight": -1.0}, "weight"),
        ({"student_nodes": ["a", "b"], "teacher_nodes": ["c", "d"]}, "student_nodes"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["s"], "teacher_nodes": ["t"], **kwargs}
    with pytest.raises(ConfigError) as e:
        CRDLoss(**args)
    assert e.value.key == key


# --- DDP gather ------------------------------------------------------------------------------------


def test_gather_is_the_identity_on_one_process() -> None:
    index, rows = torch.tensor([3, 1]), torch.randn(2, 4)
    got = all_gather_rows(index, rows)
    assert got[0] is index and got[1] is rows


class _FakeTwoRanks:
    """A 2-rank process group seen from rank 0, whose peer holds ``other`` (index, rows)."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, other: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.other = other

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_reduce(self, t: torch.Tensor, op) -> None:
        assert op == self.ReduceOp.MAX
        t.fill_(max(int(t), len(self.other[0])))

    def all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> None:
        assert all(o.shape == t.shape for o in out)  # equal sizes, as real collectives need
        pad = len(t) - len(self.other[0])
        peer = self.other[0] if t.dtype == torch.long else self.other[1]
        peer = F.pad(peer, (0, pad), value=-1) if t.dim() == 1 else F.pad(peer, (0, 0, 0, pad))
        out[0].copy_(t)
        out[1].copy_(peer)


@pytest.mark.parametrize("sizes", [(2, 3), (3, 2), (2, 2)])
def test_gather_pads_unequal_batches_and_drops_the_padding(monkeypatch, sizes) -> None:
    mine = torch.arange(sizes[0]), torch.randn(sizes[0], 4)
    peer = torch.arange(10, 10 + sizes[1]), torch.randn(sizes[1], 4)
    monkeypatch.setattr(common_module, "dist", _FakeTwoRanks(peer))
    index, rows = all_gather_rows(*mine)
    torch.testing.assert_close(index, torch.cat([mine[0], peer[0]]))
    torch.testing.assert_close(rows, torch.cat([mine[1], peer[1]]))
