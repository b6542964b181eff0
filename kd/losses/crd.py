"""Contrastive Representation Distillation (CRD).

Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020,
arXiv:1910.10699. Student and teacher pooled features are embedded (linear + L2 norm) and
trained with noise-contrastive estimation (section 3): for each anchor, the embedding of the
same sample from the other network is the positive and K samples of other classes are the
negatives, scored by ``h = exp(v . m / T) / Z`` with ``m`` read from a momentum memory bank of
the other network's past embeddings. The loss is eq. 18 (RepDistiller's ``ContrastLoss``) with
noise ``P_n = 1 / N``, in both directions: student anchor against the teacher bank plus teacher
anchor against the student bank. ``Z`` is estimated once, on the first batch, as
``mean(exp(v . m / T)) * N``.

Follows HobbitLong/RepDistiller (``crd/criterion.py``, ``crd/memory.py``, the
``CIFAR100InstanceSample`` dataset in mode ``"exact"``): same embedding, bank initialisation
``U[-stdv, stdv]`` with ``stdv = 1 / sqrt(feat_dim / 3)`` (rows of expected norm 1, not
normalised until first updated), momentum update then renormalisation after the scores are
taken, positive = the bank row at the sample's own index. Deviations:

- Negatives are drawn here, on the device, with the global torch RNG, instead of by the
  dataset's workers with numpy. Same distribution: K distinct other-class samples, or K draws
  with replacement when an anchor's class leaves fewer than K (``np.random.choice(...,
  replace=K > len(negatives))``); ``replacement=True`` always draws with replacement (i.i.d.
  noise as in textbook NCE, O(B K) instead of O(B N) per step).
- Scores are taken from ``v @ bank.T`` (B x N) when that is smaller than gathering the
  ``B x (K+1) x feat_dim`` bank rows; the values are the same.
- Under DDP, the bank update uses every rank's embeddings and ``Z`` the mean over every rank's
  first batch, so all ranks keep identical state (the reference is single-process).
- A sample index repeated in one update keeps its last row (the reference's ``index_copy_``
  is nondeterministic there); the bank is left alone in eval mode; ``F.normalize`` (eps 1e-12)
  replaces the plain division by the norm.
- Precision: the math runs in fp32 out of autocast. The embeddings' linear layers run in their
  weights' dtype (bf16 once Lightning's ``bf16-true`` converts the module) and normalise in fp32;
  the banks and ``Z`` are buffers, so they take the module's dtype too: scores read the bank
  rows in the anchor's fp32, and updates are computed in fp32 and stored in the bank's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import DistillationLoss, check_pairs, check_positive, check_weight
from kd.losses.common import all_gather_rows, all_reduce_sum, feature, flat, full_precision
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput

EPS = 1e-7  # RepDistiller's eps in ContrastLoss


def contrast_loss(p: Tensor, num_samples: int, eps: float = EPS) -> Tensor:
    """NCE loss of eq. 18 (RepDistiller's ``ContrastLoss``), summed over pairs, averaged over anchors.

    With ``m = K`` negatives and noise ``P_n = 1 / N``, the positive contributes
    ``log(P_pos / (P_pos + m P_n + eps))`` and each negative ``log(m P_n / (P_neg + m P_n + eps))``.

    Args:
        p: ``(B, 1 + K)`` normalised scores ``exp(v . m / T) / Z``, the positive in column 0.
        num_samples: N, the size of the training set (of the memory bank).
        eps: Added to the denominators, as in the reference.

    Returns:
        A scalar tensor, ``-(sum log D1 + sum log D0) / B``.
    """
    m_pn = (p.shape[1] - 1) / num_samples
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + m_pn + eps))  # (B,)
    log_d0 = torch.log(m_pn / (p[:, 1:] + m_pn + eps))  # (B, K)
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def contrast_scores(anchor: Tensor, memory: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """``exp(anchor_b . memory[idx[b, j]] / T)``: the unnormalised scores (the critic before 1 / Z).

    Differentiable in ``anchor`` only. Keeps no reference to ``memory``, which the caller may
    update in place before the backward pass.

    Args:
        anchor: ``(B, D)`` embeddings.
        memory: ``(N, D)`` bank of the other network, any float dtype (read in ``anchor``'s).
        idx: ``(B, 1 + K)`` bank rows to score each anchor against.
        temperature: T > 0.

    Returns:
        ``(B, 1 + K)``.
    """
    (b, k1), (n, d) = idx.shape, memory.shape
    memory = memory.detach()
    if n * (d + b) <= b * k1 * d:  # the full score matrix holds fewer numbers than the gathered rows
        bank = memory.to(anchor.dtype, copy=True)  # (N, D), a copy in the anchor's dtype
        dots = (anchor @ bank.T).gather(1, idx)  # (B, N) -> (B, 1 + K)
    else:
        rows = memory.index_select(0, idx.reshape(-1)).view(b, k1, d).to(anchor.dtype)  # (B, 1 + K, D), a copy
        dots = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)  # (B, 1 + K)
    return torch.exp(dots / temperature)


def sample_negatives(
    labels: Tensor, order: Tensor, class_start: Tensor, class_count: Tensor, k: int, replacement: bool
) -> Tensor:
    """K training-sample indices per anchor, drawn uniformly among samples of other classes.

    Works in the positions of ``order`` (sample indices sorted by class), where each class is
    the contiguous run ``[class_start[c], class_start[c] + class_count[c])``. With replacement,
    a uniform position among the ``N - count`` others is shifted past the anchor's run (exact,
    no redraws). Without, each row takes the K smallest of uniform keys with its own class's
    keys set above 1; rows whose class leaves fewer than K others fall back to replacement.
    Nothing is read back from the device: keys are drawn for every row (so the draws of a row
    depend on whether an earlier row lacks K others only through its shape, never its values).

    Args:
        labels: ``(B,)`` the anchors' classes.
        order: ``(N,)`` sample indices sorted by class.
        class_start: ``(C,)`` first position of each class in ``order``.
        class_count: ``(C,)`` samples per class; every anchor's class must leave others.
        k: Negatives per anchor.
        replacement: Draw with replacement for every row.

    Returns:
        ``(B, k)`` sample indices, never of the anchor's class.
    """
    n = order.shape[0]
    start, count = class_start[labels][:, None], class_count[labels][:, None]  # (B, 1)
    others = n - count  # (B, 1)
    u = (torch.rand(labels.shape[0], k, device=order.device, dtype=torch.float64) * others).long()
    u = torch.minimum(u, others - 1)  # (B, k) in [0, others)
    pos = u + (u >= start) * count  # (B, k): skips the anchor's class
    if not replacement and k <= n:  # shapes only: no row count read back from the device
        distinct = others >= k  # (B, 1): rows with enough others; the rest keep the draw above
        chunk = max(1, (1 << 24) // n)  # bounds the (rows, N) keys to 64 MB
        arange = torch.arange(n, device=order.device)
        for lo in range(0, labels.shape[0], chunk):
            rows = slice(lo, lo + chunk)
            keys = torch.rand(pos[rows].shape[0], n, device=order.device, dtype=torch.float32)  # (b, N)
            own = (arange >= start[rows]) & (arange < start[rows] + count[rows])  # (b, N)
            keys.masked_fill_(own, 2.0)
            smallest = keys.topk(k, dim=1, largest=False, sorted=False).indices  # (b, K)
            pos[rows] = torch.where(distinct[rows], smallest, pos[rows])
    return order[pos]


@torch.no_grad()
def update_memory(memory: Tensor, index: Tensor, emb: Tensor, momentum: float) -> None:
    """In place: ``memory[i] <- normalise(momentum * memory[i] + (1 - momentum) * emb)``.

    ContrastMemory's update, computed in fp32 (at least) and stored in the bank's dtype. A
    repeated index keeps its last row.

    Args:
        memory: ``(N, D)`` bank.
        index: ``(n,)`` rows to update.
        emb: ``(n, D)`` new embeddings.
        momentum: Share of the old row, in ``[0, 1)``.
    """
    position = torch.arange(index.shape[0], device=index.device)
    # each row takes the embedding of the last occurrence of its index: a repeated index writes
    # one value however the copies are ordered (no unique(): its size would be read back)
    last = torch.where(index[:, None] == index[None, :], position, -1).amax(dim=1)  # (n,)
    emb = emb[last]
    dtype = torch.promote_types(memory.dtype, torch.float32)
    rows = memory.index_select(0, index).to(dtype).mul_(momentum).add_(emb.to(dtype), alpha=1 - momentum)  # (n, D)
    memory.index_copy_(0, index, F.normalize(rows, dim=1).to(memory.dtype))


class Embed(nn.Module):
    """RepDistiller's ``Embed``: flatten, linear to ``dim_out``, L2-normalise; out of autocast.

    The linear layer runs in its weights' dtype (fp32, or bf16 once the module is converted as
    Lightning's ``bf16-true`` does), the normalisation in fp32; the output is fp32.

    Args:
        dim_in: Input features per sample.
        dim_out: Embedding size.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        with full_precision(x):
            y = self.linear(flat(x).to(self.linear.weight.dtype))  # (B, dim_out)
            return F.normalize(y.to(torch.promote_types(y.dtype, torch.float32)), dim=1)  # (B, dim_out)


class CRDLoss(DistillationLoss):
    """CRD: ``ce_weight * CE + weight * (L_nce(student anchor) + L_nce(teacher anchor))``.

    Both embeddings train (with the student); the teacher and the memory banks get no gradient.
    Needs ``batch["index"]`` and the training labels (``DataInfo.targets``).

    Args:
        student_nodes: One student feature, the pooled embedding ``(B, C_s)`` (others are flattened).
        teacher_nodes: One teacher feature, likewise.
        feat_dim: Embedding size (128 in the paper).
        nce_k: Negatives per anchor, K (16,384).
        nce_t: Temperature T of the scores (0.07).
        nce_mom: Memory momentum, in ``[0, 1)`` (0.5).
        replacement: Always draw negatives with replacement (the reference does only when an
            anchor's class leaves fewer than K other samples).
        weight: Weight of the CRD term (0.8 in the paper's CIFAR-100 runs).
        ce_weight: Weight of the hard-label cross-entropy (1).

    Raises:
        ConfigError: On a bad hyperparameter or not exactly one node on each side.
    """

    requires_index = True

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_mom: float = 0.5,
        replacement: bool = False,
        weight: float | Schedule = 0.8,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes)
        check_pairs(self.student_nodes, self.teacher_nodes, count=1)
        self.feat_dim = check_int("feat_dim", feat_dim, 1, valid=">= 1")
        self.nce_k = check_int("nce_k", nce_k, 1, valid=">= 1")
        self.nce_t = check_positive("nce_t", nce_t)
        self.nce_mom = check_weight("nce_mom", nce_mom, 0.0, 1.0, high_open=True)
        if not isinstance(replacement, bool):
            raise ConfigError("replacement", f"must be true or false, got {replacement!r}")
        self.replacement = replacement
        self.num_samples = 0
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self._z_known = False  # host-side cache of "Z is set", to avoid a device sync per step

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds both embeddings, both memory banks and Z from the dry-run shapes and the labels.

        Raises:
            ConfigError: Without training labels, with labels of one class only, or with a
                missing feature.
        """
        if data.targets is None:
            raise ConfigError(
                "distill", "CRD needs the sample index of every training batch and the training labels "
                "in index order, and data=... does not provide it; use a datamodule that yields "
                "batch['index'] and DataInfo.targets (e.g. data=digits)"
            )
        targets = torch.as_tensor(data.targets).long().cpu()
        n = data.num_samples
        if targets.shape != (n,):
            raise ConfigError("data", f"DataInfo.targets must have shape ({n},), got {tuple(targets.shape)}")
        if targets.unique().numel() < 2:
            raise ConfigError("data", "CRD draws negatives from other classes, but the training labels hold one class")
        assert teacher is not None, "CRDLoss needs the teacher's output"
        f_s = feature(student, self.student_nodes[0], "student_nodes", dims=None)
        f_t = feature(teacher, self.teacher_nodes[0], "teacher_nodes", dims=None)
        device = f_s.device
        self.num_samples = n
        self.embed_s = Embed(flat(f_s).shape[1], self.feat_dim).to(device)
        self.embed_t = Embed(flat(f_t).shape[1], self.feat_dim).to(device)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_s", "memory_t"):  # student's and teacher's past embeddings
            self.register_buffer(name, torch.rand(n, self.feat_dim, device=device).mul_(2 * stdv).sub_(stdv))
        # Z of the student-anchor and teacher-anchor scores; 0 until the first batch sets them.
        self.register_buffer("z_s", torch.zeros((), device=device))
        self.register_buffer("z_t", torch.zeros((), device=device))
        self._z_known = False
        # Derived from the labels, not saved: sample indices sorted by class, each class's run.
        count = torch.bincount(targets, minlength=int(targets.max()) + 1)
        self.register_buffer("_targets", targets.to(device), persistent=False)
        self.register_buffer("_order", torch.argsort(targets, stable=True).to(device), persistent=False)
        self.register_buffer("_class_start", (count.cumsum(0) - count).to(device), persistent=False)
        self.register_buffer("_class_count", count.to(device), persistent=False)

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError("CRDLoss.setup(...) must run before the loss (it builds the memory banks)")
        assert teacher is not None, "CRDLoss needs the teacher's output"
        if "index" not in batch:
            raise ConfigError("data", "CRD needs batch['index'] (the sample's index in the training split)")
        v_s = self.embed_s(student.features[self.student_nodes[0]])  # (B, feat_dim), fp32
        v_t = self.embed_t(teacher.features[self.teacher_nodes[0]].detach())  # (B, feat_dim)
        with full_precision(v_s):
            index = batch["index"].to(self.memory_s.device).long()  # (B,)
            negatives = sample_negatives(
                self._targets[index], self._order, self._class_start, self._class_count, self.nce_k, self.replacement
            )  # (B, K)
            idx = torch.cat([index[:, None], negatives], dim=1)  # (B, 1 + K): positive first
            e_s = contrast_scores(v_s, self.memory_t, idx, self.nce_t)  # student anchor, teacher bank
            e_t = contrast_scores(v_t, self.memory_s, idx, self.nce_t)  # teacher anchor, student bank
            self._set_z(e_s, e_t)
            loss = contrast_loss(e_s / self.z_s, self.num_samples) + contrast_loss(e_t / self.z_t, self.num_samples)
            if self.training:
                d = self.feat_dim
                index, rows = all_gather_rows(index, torch.cat([v_s, v_t], dim=1).detach())  # (n,), (n, 2D)
                update_memory(self.memory_s, index, rows[:, :d], self.nce_mom)
                update_memory(self.memory_t, index, rows[:, d:], self.nce_mom)
        return {"crd": loss}

    @torch.no_grad()
    def _set_z(self, e_s: Tensor, e_t: Tensor) -> None:
        """Sets Z = mean(exp score) * N from the first batch (of all ranks); fixed afterwards."""
        if self._z_known:
            return
        if bool(self.z_s > 0):  # restored from a checkpoint
            self._z_known = True
            return
        stats = torch.stack([e_s.sum(), e_t.sum(), e_s.new_tensor(e_s.numel())]).double()
        all_reduce_sum(stats)
        self.z_s.copy_(stats[0] / stats[2] * self.num_samples)
        self.z_t.copy_(stats[1] / stats[2] * self.num_samples)
        self._z_known = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._z_known = False  # the loaded Z may be unset
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t:g}, nce_mom={self.nce_mom:g}, "
            f"replacement={self.replacement}, {super().extra_repr()}"
        )
