"""The divergence guard without a host synchronisation per step: a device-side record, read every few steps.

Reading a loss on the host (``bool(torch.isfinite(loss))``) makes the CPU wait for the GPU at
every step, and a small CIFAR model's step is then bound by that wait, not by its kernels. So the
training step only records, on the device, whether any term was non-finite, which step was the
first (a step counter on the device) and the terms' values there. The host reads that record
every ``every`` steps, and always before a checkpoint is written and at the end of training
(``DistillationModule.on_save_checkpoint``, ``on_train_end``), so the guarantee holds: the run stops
naming the first non-finite term, its step, epoch and batch, and no checkpoint holds weights from
that step or after. The steps between the NaN and the read train on (on NaN weights); a step that
fails because of them (an SVD that does not converge) is reported as the divergence that caused it
(``kd.training.fit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kd.errors import Diverged, check_int

# (global step, epoch, batch) of a watched step
Where = tuple[int, int, int]


class FiniteWatch:
    """Records non-finite loss terms on the device; ``check`` reads the record and raises ``Diverged``.

    Args:
        every: Steps between two reads of the record (1: read at every step, as a per-step check).
    """

    def __init__(self, every: int = 16) -> None:
        self.every = check_int("speed.finite_check_every", every, 1, valid=">= 1")
        self.names: tuple[str, ...] = ()
        self.where: list[Where] = []  # the steps recorded since the last read, in order
        self.first: Tensor | None = None  # () long: index into `where` of the first non-finite step, -1: none
        self.values: Tensor | None = None  # (T + 1,) the terms and their sum at that step
        self.count: Tensor | None = None  # () long: steps recorded since the last read

    def note(self, terms: dict[str, Tensor], loss: Tensor, where: Where,
             reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Records one step's terms and their sum (device operations only); reads every ``every`` steps.

        Args:
            terms: The step's named loss terms (0-dim tensors).
            loss: Their sum.
            where: The step's (global step, epoch, batch), for the message.
            reduce: Sums a tensor over the ranks (DDP), passed on to ``check``.
        """
        names = (*(f"train/loss_{k}" for k in terms), "train/loss")
        if names != self.names:  # another set of terms: read what the old one recorded first
            self.check(reduce)
            self.names, self.first = names, None
        values = torch.stack([*(v.detach().float() for v in terms.values()), loss.detach().float()])  # (T + 1,)
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.long, device=values.device)
            self.count = torch.zeros((), dtype=torch.long, device=values.device)
            self.values = torch.zeros_like(values)
        assert self.count is not None and self.values is not None
        first_here = (~torch.isfinite(values)).any() & (self.first < 0)
        self.first = torch.where(first_here, self.count, self.first)
        self.values = torch.where(first_here, values, self.values)
        self.count += 1
        self.where.append(where)
        if len(self.where) >= self.every:
            self.check(reduce)

    def check(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Reads the record (one host synchronisation) and forgets it.

        Args:
            reduce: Sums a tensor over the ranks: every rank raises when one has diverged (a rank
                going on alone would wait forever in the next all-reduce). All ranks must call
                ``check`` together when it is given; None reads this rank's record only.

        Raises:
            Diverged: Naming the first non-finite term (else the sum), its step, epoch and batch.
        """
        if self.first is None or not self.where:
            return
        first = self.first
        bad_here = (first >= 0).float()
        bad_anywhere = reduce(bad_here) if reduce is not None else bad_here
        where, self.where = self.where, []
        index = int(first)
        if index < 0 and not bool(bad_anywhere):
            assert self.count is not None
            self.count.zero_()
            return
        self.first = None  # raised once
        if index < 0:
            raise Diverged("a loss term on another rank", float("nan"), *where[-1])
        assert self.values is not None
        values = self.values.tolist()
        name, value = next(((n, v) for n, v in zip(self.names, values) if not math.isfinite(v)), (self.names[-1], values[-1]))
        raise Diverged(name, value, *where[index])
