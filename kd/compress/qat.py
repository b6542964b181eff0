"""Quantization-aware training (QAT) while distilling, as a ``Compression`` callback.

From ``start_epoch`` on the student trains with fake quantization (int8 weights and activations
simulated in the forward pass, straight-through gradients) while the full-precision teacher keeps
distilling into it; ``finalize`` converts it to a real int8 model. This is the recipe of Jacob et
al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018, arXiv:1712.05877 (section 3): simulated quantization of weights and
activations, activation ranges as moving averages, BatchNorm folded into the conv weights before
they are quantized. Freezing BN statistics and then ranges for the last epochs
(``freeze_bn_epoch``, ``freeze_observer_epoch``) follows Krishnamoorthi, "Quantizing deep
convolutional networks for efficient inference: A whitepaper", arXiv:1806.08342, and PyTorch's
QAT reference recipe. It runs on torchao:

- ``flow="pt2e"`` (conv nets): the student is captured with ``torch.export`` and prepared with
  ``prepare_qat_pt2e`` and the ``X86InductorQuantizer``: int8 per-channel symmetric weights,
  uint8 per-tensor affine activations whose ranges moving-average observers learn on the
  training batches, conv+BN fused as in the paper. ``convert_pt2e`` gives the int8 graph.
- ``flow="linear"`` (MLPs): ``quantize_`` with ``QATConfig`` swaps each ``nn.Linear`` for a
  ``FakeQuantizedLinear``: int8 per-channel weights, int8 per-token activations computed from
  each input (dynamic: there are no ranges to learn or freeze). Conv layers stay fp32.

The parameter objects of the student survive both flows, so the optimizer built on them and any
other callback holding them (pruning masks) keep working after the student is replaced.

The graph work of the pt2e flow (export, train/eval following, int8 conversion, lowering) is in
``kd.compress.pt2e``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import fx, nn

from kd.compress.base import Compression
from kd.compress.pt2e import convert_pt2e_int8, count_fake_quantized_graph, is_prepared, prepare_pt2e, set_freezing
from kd.errors import ConfigError, check_int
from kd.models.features import FeatureExtractor

FLOWS = ("auto", "pt2e", "linear")
ACTIVATIONS = {
    "pt2e": "uint8 static per-tensor affine (observed ranges)",
    "linear": "int8 dynamic per-token asymmetric",
}


class QuantizationAwareTraining(Compression):
    """Trains the student with fake int8 quantization from ``start_epoch``; ``finalize`` makes it int8.

    Args:
        start_epoch: The epoch at whose start fake quantization begins (QAT fine-tunes the end
            of training; earlier epochs train in fp32).
        flow: ``"pt2e"`` (export + X86 inductor quantizer; for conv nets), ``"linear"``
            (torchao ``QATConfig`` on ``nn.Linear`` layers; for MLPs) or ``"auto"``: pt2e when
            the student has a conv layer, else linear.
        freeze_bn_epoch: From this epoch the folded BatchNorms use and keep their running
            statistics (pt2e only; may equal ``start_epoch``); None never freezes them.
        freeze_observer_epoch: From this epoch the activation and weight ranges (scale and zero
            point) stop updating (pt2e only: the linear flow computes them from each input); after
            ``start_epoch``, so they learn the ranges first; None never freezes them.

    Raises:
        ConfigError: On a negative or non-integer epoch, an unknown flow, or a freeze epoch
            before ``start_epoch`` (observers: not after it).

    Example:
        >>> qat = QuantizationAwareTraining(start_epoch=20, freeze_bn_epoch=25, freeze_observer_epoch=26)
        >>> trainer = L.Trainer(max_epochs=30, callbacks=[qat])
    """

    order = 10
    changes_structure = True

    def __init__(
        self,
        start_epoch: int = 0,
        flow: str = "auto",
        freeze_bn_epoch: int | None = None,
        freeze_observer_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self._start = check_int(self.at("start_epoch"), start_epoch, 0, valid=">= 0")
        if flow not in FLOWS:
            raise ConfigError(self.at("flow"), f"must be one of {', '.join(FLOWS)}, got {flow!r}")
        self.flow = flow
        start = self._start
        if freeze_bn_epoch is not None:
            check_int(self.at("freeze_bn_epoch"), freeze_bn_epoch, start, valid=f">= start_epoch ({start}) or null")
        if freeze_observer_epoch is not None:  # the observers need one epoch of QAT to learn the ranges
            check_int(self.at("freeze_observer_epoch"), freeze_observer_epoch, start + 1,
                      valid=f"> start_epoch ({start}) or null")
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_observer_epoch = freeze_observer_epoch
        self.resolved_flow: str | None = None
        self.input_shape: tuple[int, ...] | None = None  # from check(), else the datamodule's
        self.quantized_layers: int | None = None
        self.prepared_epoch: int | None = None

    @property
    def start_epoch(self) -> int:
        return self._start

    @property
    def final_epoch(self) -> int:
        return self._start  # fake-quantized from its first epoch on: the form it is deployed in

    # --- before training -----------------------------------------------------------------------

    def resolve_flow(self, student: nn.Module) -> str:
        """The flow this callback runs on ``student``: ``flow``, or for ``"auto"`` pt2e when it has a conv."""
        if self.flow != "auto":
            return self.flow
        return "pt2e" if _count(student, nn.modules.conv._ConvNd) else "linear"

    def check(
        self, student: nn.Module, *, max_epochs: int, reads_features: bool, input_shape: tuple[int, ...]
    ) -> None:
        flow = self.resolved_flow = self.resolve_flow(student)
        self.input_shape = tuple(input_shape)
        epochs = {"start_epoch": self._start, "freeze_bn_epoch": self.freeze_bn_epoch,
                  "freeze_observer_epoch": self.freeze_observer_epoch}
        for arg, epoch in epochs.items():
            if epoch is not None and epoch >= max_epochs:
                what = "QAT start epoch" if arg == "start_epoch" else arg
                raise ConfigError(self.at(arg), f"{what} beyond max_epochs: {epoch} >= trainer.max_epochs "
                                  f"{max_epochs}; set {arg} below {max_epochs} (epochs count from 0) or raise "
                                  "trainer.max_epochs")
        convs, linears = _count(student, nn.modules.conv._ConvNd), _count(student, nn.Linear)
        name = type(student).__name__
        if not convs and not linears:
            raise ConfigError(self.key or "callbacks", f"nothing to quantize: {name} has no Linear or Conv layer; "
                              "drop the QAT callback")
        if flow == "linear" and convs:
            raise ConfigError(self.at("flow"), f"linear leaves the {convs} Conv layers of {name} in fp32 (torchao's "
                              "QATConfig only replaces nn.Linear); use flow=pt2e or auto")
        if reads_features:  # the FeatureExtractor's FX graph cannot be rebuilt on either fake-quantized student
            why = ("the exported student does not expose the intermediate features the method reads" if flow == "pt2e"
                   else "FX cannot trace torchao's FakeQuantizedLinear to collect the features the method reads")
            raise ConfigError(self.at("flow"), f"{flow}: {why}; use a logit method (distill=kd)")
        if flow == "linear":
            for arg in ("freeze_bn_epoch", "freeze_observer_epoch"):
                if getattr(self, arg) is not None:
                    raise ConfigError(self.at(arg), "applies to flow=pt2e only: the linear flow folds no BatchNorm and "
                                      "computes scales from each input (dynamic), it has no observers; set it to null")
            return
        try:  # a dry run on a copy, so a student torch.export cannot capture fails now, not at start_epoch
            prepare_pt2e(copy.deepcopy(student).train(), input_shape)
        except Exception as e:  # noqa: BLE001 - any export or preparation failure
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(self.at("flow"), f"pt2e cannot export and prepare {name}: {type(e).__name__}: "
                              f"{first}; make its forward exportable (no data-dependent control flow)"
                              + ("" if convs else " or use flow=linear")) from e

    # --- during training -----------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        epoch = int(trainer.current_epoch)
        if epoch == self._start and self.prepared_epoch is None:
            self._prepare(trainer, pl_module)
        student = pl_module.student
        if is_prepared(student):
            bn, observers = self.freeze_bn_epoch, self.freeze_observer_epoch
            set_freezing(student, freeze_bn=bn is not None and epoch >= bn,  # type: ignore[arg-type]
                         freeze_observers=observers is not None and epoch >= observers)

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student: nn.Module = pl_module.student  # type: ignore[assignment]
        flow = self.resolved_flow = self.resolved_flow or self.resolve_flow(student)
        self.take_dense_snapshot(trainer, student)
        if flow == "pt2e":
            shape = self.input_shape or getattr(trainer.datamodule, "input_shape", None)  # type: ignore[attr-defined]
            if shape is None:
                raise ConfigError(self.key or "callbacks", "pt2e needs the input shape: call check() before fit, "
                                  "or give the datamodule an input_shape")
            prepared = prepare_pt2e(student, tuple(shape))
            pl_module.student = prepared
            pl_module.student_features = FeatureExtractor(prepared, [], key="", input_shape=())
        else:
            prepare_linear(student)
            pl_module.student_features.sync()  # type: ignore[operator]
        self.quantized_layers = count_fake_quantized(pl_module.student)  # type: ignore[arg-type]
        self.prepared_epoch = int(trainer.current_epoch)

    # --- after training ------------------------------------------------------------------------

    def finalize(self, student: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """The int8 student, on the CPU in eval mode (the trained ``student`` is left as it is).

        Raises:
            ConfigError: When training stopped (early stopping) before QAT began.
        """
        if not count_fake_quantized(student):
            raise ConfigError(self.at("start_epoch"), f"QAT never began: training stopped before epoch "
                              f"{self._start} (early stopping?); lower start_epoch or raise early_stopping.patience")
        if isinstance(student, fx.GraphModule):
            return convert_pt2e_int8(student)
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        model = copy.deepcopy(student).cpu().eval()
        quantize_(model, QATConfig(_linear_base_config(), step="convert"))
        return model

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "flow": self.resolved_flow or self.flow,
            "start_epoch": self._start,
            "freeze_bn_epoch": self.freeze_bn_epoch,
            "freeze_observer_epoch": self.freeze_observer_epoch,
            "quantized_layers": self.quantized_layers,
            "weight_dtype": "int8",
            "weights": "per-channel symmetric",
            "activations": ACTIVATIONS.get(self.resolved_flow or "", None),
        }


# --- the linear flow ----------------------------------------------------------------------------


def _linear_base_config() -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def prepare_linear(student: nn.Module) -> None:
    """Swaps the student's ``nn.Linear`` layers for torchao's ``FakeQuantizedLinear``, in place.

    The new layers hold the original ``weight`` and ``bias`` Parameter objects (torchao keeps
    them today; they are put back if a version does not).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    originals = {n: (m.weight, m.bias) for n, m in student.named_modules() if isinstance(m, nn.Linear)}
    quantize_(student, QATConfig(_linear_base_config(), step="prepare"))
    for name, (weight, bias) in originals.items():
        layer = student.get_submodule(name)
        if layer.weight is not weight:
            layer.weight = weight
        if bias is not None and layer.bias is not bias:
            layer.bias = bias


# --- shared helpers -----------------------------------------------------------------------------


def count_fake_quantized(model: nn.Module) -> int:
    """Linear and conv layers whose weight is fake-quantized (either flow); 0 for a plain model."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    if isinstance(model, fx.GraphModule):
        return count_fake_quantized_graph(model)
    return _count(model, FakeQuantizedLinear)


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())
