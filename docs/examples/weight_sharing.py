"""Weight sharing (k-means quantization of the weights) while distilling, as a ``Compression`` callback.

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding", ICLR 2016, arXiv:1510.00149, section 3. The weights of each
layer are clustered into ``k = 2**bits`` values with 1-D k-means (linear initialisation between
the layer's smallest and largest weight, which the paper found best, section 3.1); every weight
then stores only a ``bits``-bit index into its layer's codebook. The shared values keep training
(section 3.3): after every optimizer step each weight is set back to the mean of its cluster, so
the codebook follows the gradients while the student keeps distilling from the teacher. (The
paper adds the gradients of a cluster; this projection is the same update with the gradient
averaged, for any optimizer.) Exact zeros when clustering starts (pruned weights) stay zero and
are no cluster's member, the paper's pruning-then-sharing pipeline.

Storage of a layer of ``n`` weights at ``b = 32`` bits (the paper's eq. 1): ``n * b`` dense,
``n * bits + k * b`` shared; ``summary()`` reports that ratio. The exported artifact still holds
fp32 tensors (with at most ``k`` distinct values each): the saving is the codebook encoding's.

The worked example of ``docs/writing-a-compression-callback.md``; ``tests/test_guides_extend.py``
runs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from kd.compress.base import Compression
from kd.compress.pruning import PRUNABLE
from kd.errors import ConfigError, check_int

ZERO = -1  # the cluster index of a weight held at exactly zero


@torch.no_grad()
def kmeans_1d(values: Tensor, k: int, iterations: int) -> tuple[Tensor, Tensor]:
    """1-D k-means with linear initialisation (Deep Compression, section 3.1).

    Args:
        values: ``(n,)`` the weights to cluster.
        k: Number of clusters, >= 1.
        iterations: Lloyd iterations.

    Returns:
        ``(centroids (k,), assignment (n,))``: the sorted centroids and each value's cluster.
    """
    centroids = torch.linspace(float(values.min()), float(values.max()), k, dtype=values.dtype, device=values.device)
    for _ in range(iterations + 1):
        # in 1-D the nearest centroid is found by the midpoints between sorted centroids
        assignment = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)  # (n,) in [0, k)
        sums = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=k)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort().values
    return centroids, assignment


class WeightSharing(Compression):
    """Shares the weights of each conv/linear layer among ``2**bits`` values from ``start_epoch`` on.

    Args:
        bits: Bits of a weight's index into its layer's codebook, in ``[1, 8]``: each layer keeps
            at most ``2**bits`` distinct non-zero values. The paper uses 5 for fully connected
            layers, 8 for convolutions (4 and 5 lose nothing on AlexNet, its table 7).
        start_epoch: The epoch at whose start the weights are clustered, >= 0; the student
            fine-tunes its codebooks from then on. Must be < ``trainer.max_epochs``.
        iterations: Lloyd iterations of k-means, >= 0.
        modules: Layer types whose ``.weight`` is shared: ``conv``, ``linear``, or ``torch.nn``
            class names (``Conv2d``, ``Linear``), as ``kd.compress.pruning.MagnitudePruning``.

    Raises:
        ConfigError: Naming the argument, for a value out of range or an unknown layer type.

    Example:
        >>> share = WeightSharing(bits=4, start_epoch=20)
        >>> trainer = L.Trainer(max_epochs=30, callbacks=[share])
    """

    order = 5  # finalized after pruning (0), whose zeros it keeps; before quantization (10)

    def __init__(
        self, bits: int = 5, start_epoch: int = 0, iterations: int = 20, modules: Sequence[str] = ("conv", "linear")
    ) -> None:
        super().__init__()
        self.bits = check_int(self.at("bits"), bits, 1, 9, valid="in [1, 8]")
        self._start_epoch = check_int(self.at("start_epoch"), start_epoch, 0, valid=">= 0")
        self.iterations = check_int(self.at("iterations"), iterations, 0, valid=">= 0")
        modules = [modules] if isinstance(modules, str) else list(modules)
        unknown = [m for m in modules if m not in PRUNABLE]
        if not modules or unknown:
            raise ConfigError(self.at("modules"), f"must be a non-empty list of {', '.join(PRUNABLE)}, got {modules!r}")
        self.modules = modules
        self.types = tuple({t for m in modules for t in PRUNABLE[m]})
        self.params: dict[str, nn.Parameter] = {}  # parameter name -> the Parameter itself
        self.assignments: dict[str, Tensor] = {}  # parameter name -> (numel,) cluster index, ZERO for 0
        self._pending: dict[str, Tensor] | None = None  # assignments from a checkpoint, not yet bound

    # --- the schedule: one event, at the start of start_epoch --------------------------------

    @property
    def start_epoch(self) -> int:
        return self._start_epoch

    @property
    def final_epoch(self) -> int:
        return self._start_epoch  # shared from its first step: checkpoints from here on are candidates

    # --- what run() calls before anything trains ----------------------------------------------

    def shared_weights(self, student: nn.Module) -> dict[str, nn.Parameter]:
        """The weights this callback shares in ``student``, by parameter name."""
        return {f"{name}.weight": m.weight for name, m in student.named_modules()
                if isinstance(m, self.types) and isinstance(getattr(m, "weight", None), nn.Parameter)}

    def check(
        self, student: nn.Module, *, max_epochs: int, reads_features: bool, input_shape: tuple[int, ...]
    ) -> None:
        """Refuses a start epoch the run never reaches and a student with no layer to share.

        Raises:
            ConfigError: Naming ``<key>.start_epoch`` or ``<key>.modules``.
        """
        if self.start_epoch >= max_epochs:
            raise ConfigError(self.at("start_epoch"), f"is {self.start_epoch} but trainer.max_epochs is {max_epochs}; "
                              f"weight sharing must start in a trained epoch (0 to {max_epochs - 1})")
        if not self.shared_weights(student):
            raise ConfigError(self.at("modules"), f"{type(student).__name__} has no {'/'.join(self.modules)} "
                              "weight to share")

    # --- Lightning's hooks -----------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self.params = self.shared_weights(pl_module.student)  # type: ignore[arg-type]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # restores the dense snapshot of a resumed run
        if self._pending is not None:  # resumed after clustering: the same clusters, by name
            self.assignments = {n: a.to(self.params[n].device) for n, a in self._pending.items()}
            self._pending = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # checkpoint selection forgets earlier epochs
        if trainer.current_epoch >= self.start_epoch and not self.assignments:
            self.take_dense_snapshot(trainer, pl_module.student)  # type: ignore[arg-type]
            self.cluster()
            self.project()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.project()  # the optimizer moved each weight alone: back to its cluster's mean

    # --- the compression itself --------------------------------------------------------------

    @torch.no_grad()
    def cluster(self) -> None:
        """Clusters each weight tensor's non-zero values into ``2**bits`` (k-means)."""
        for name, p in self.params.items():
            flat = p.detach().flatten()  # (n,)
            assignment = torch.full_like(flat, ZERO, dtype=torch.long)
            live = flat != 0
            if live.any():
                k = min(2**self.bits, int(live.sum()))
                _, assignment[live] = kmeans_1d(flat[live].float(), k, self.iterations)
            self.assignments[name] = assignment

    @torch.no_grad()
    def project(self) -> None:
        """Sets every shared weight to the mean of its cluster, and the zeros back to zero."""
        for name, assignment in self.assignments.items():
            p = self.params[name]
            flat = p.detach().reshape(-1)  # (n,) in logical order, whatever the memory format
            live = assignment != ZERO
            index = assignment.clamp(min=0)  # (n,) zeros point at cluster 0 but count for none
            k = 2**self.bits  # an upper bound of the clusters: no device sync to find their number
            sums = torch.zeros(k, dtype=flat.dtype, device=flat.device).index_add_(0, index[live], flat[live])
            means = sums / torch.bincount(index[live], minlength=k).clamp(min=1)  # (k,)
            p.detach().copy_(torch.where(live, means[index], 0.0).view(p.shape))

    # --- checkpoints: the clusters travel with them, so a resumed run continues them -------------

    def state_dict(self) -> dict[str, Any]:
        assignments = self._pending if self._pending is not None else self.assignments
        return {**super().state_dict(), "assignments": {n: a.cpu().clone() for n, a in assignments.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("assignments"):
            self._pending = dict(state_dict["assignments"])

    # --- the end of the run -----------------------------------------------------------------

    def finalize(self, student: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """The student as trained, its sharing checked: at most ``2**bits`` non-zero values per layer.

        Raises:
            RuntimeError: If a layer has more distinct values (weights loaded from before
                ``start_epoch``, or another callback changed them after this one).
        """
        self.params = self.shared_weights(student)
        for name, p in self.params.items():
            distinct = int(torch.unique(p.detach()[p.detach() != 0]).numel())
            if distinct > 2**self.bits:
                raise RuntimeError(f"{name} has {distinct} distinct non-zero values, more than 2**{self.bits}: "
                                   "the student was not trained with these clusters")
        return student.eval().cpu()

    def summary(self) -> dict[str, Any]:
        """Settings, and measured: each layer's distinct non-zero values and the storage ratio.

        ``compression_rate`` is eq. 1 of the paper over all shared layers, ``n * 32`` bits dense
        over ``n * ceil(log2(v)) + k * 32`` shared, for each layer's ``k`` distinct non-zero
        values (``v = k``, or ``k + 1`` when the layer also holds zeros).
        """
        out: dict[str, Any] = {**super().summary(), "bits": self.bits, "start_epoch": self.start_epoch,
                               "iterations": self.iterations, "modules": self.modules}
        if not self.params:
            return out
        layers, dense, shared = {}, 0, 0
        for name, p in self.params.items():
            w = p.detach()
            k = layers[name] = int(torch.unique(w[w != 0]).numel())
            values = k + int(bool((w == 0).any()))
            dense += w.numel() * 32
            shared += w.numel() * max(1, math.ceil(math.log2(max(values, 1)))) + k * 32
        return {**out, "distinct_values": layers, "shared_weights": dense // 32, "compression_rate": round(dense / shared, 3)}
