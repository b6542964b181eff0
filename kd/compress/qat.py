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

Freezing BN in the exported graph follows PyTorch's PT2E QAT tutorial ("PyTorch 2 Export
Quantization-Aware Training"): the ``training`` flag of the graph's batch-norm calls is set to
False. Train/eval mode of the exported student follows its ``training`` flag at every call: an
exported graph has no modules to switch, and Lightning's validation loop restores the flag
without calling ``train()``.

The int8 model does not compute exactly what the fake-quantized one did: torch's fused
observer/fake-quant op scales symmetric int8 weights by ``max(-min / 128, max / 127)`` where
``convert_pt2e`` uses ``max(-min, max) / 127.5``, which moves some weights by one int8 step (in
the tests, top-1 predictions still agree on >= 98% of the digits test set).
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import fx, nn

from kd.compress.artifacts import drop_unused_attributes
from kd.compress.base import Compression
from kd.errors import ConfigError, check_int
from kd.features import FeatureExtractor

FLOWS = ("auto", "pt2e", "linear")
_CONV_KINDS = {"conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"}
_WEIGHT_OPS = _CONV_KINDS | {"conv3d", "conv_transpose3d", "convolution", "linear"}
# index of the `training` argument of the train/eval-dependent ops of an exported graph
_BN_OPS = {"batch_norm": 5, "_native_batch_norm_legit": 5, "cudnn_batch_norm": 5}
_DROPOUT_OPS = {"dropout": 2}
_STATE = "kd_qat"  # key in GraphModule.meta (deep-copied with the graph): flags and current mode
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
        if isinstance(student, fx.GraphModule) and _STATE in student.meta:
            state = student.meta[_STATE]
            state["freeze_bn"] = self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch
            frozen = self.freeze_observer_epoch
            state["freeze_observers"] = frozen is not None and epoch >= frozen
            set_graph_mode(student)

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


# --- the pt2e flow ------------------------------------------------------------------------------


def prepare_pt2e(student: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """The student exported (any batch size) and prepared for QAT with the X86 inductor quantizer.

    The result holds the student's own ``nn.Parameter`` objects and follows its ``training``
    flag (see ``set_graph_mode``); it starts in the student's mode.
    """
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    first = next(iter(student.parameters()), None)
    x = torch.randn(2, *input_shape, device=first.device if first is not None else "cpu")  # (2, C, H, W)
    exported = torch.export.export(student, (x,), dynamic_shapes=({0: Dim("batch", min=1)},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    with _only_present_conv_kinds(exported):
        prepared = prepare_qat_pt2e(exported, quantizer)
    for name in ("train", "eval"):  # torchao forbids them on exported models; here they set the flag
        prepared.__dict__.pop(name, None)
    prepared.meta[_STATE] = {"freeze_bn": False, "freeze_observers": False, "mode": None}
    _follow_training_flag(prepared)
    prepared.train(student.training)
    set_graph_mode(prepared)
    return prepared


def _follow_training_flag(gm: fx.GraphModule) -> None:
    # An instance `forward` that syncs the graph, then runs the class's forward: a forward
    # pre-hook would be one call late, since nn.Module picks `self.forward` before running hooks
    # and recompile() replaces the class's forward.
    gm.forward = types.MethodType(_forward_in_current_mode, gm)
    register = getattr(gm, "_register_deepcopy_hook", None)  # GraphModule deep copies drop instance attributes
    if register is not None and _follow_training_flag not in getattr(gm, "_deepcopy_hooks", []):
        register(_follow_training_flag)


def _stop_following_training_flag(gm: fx.GraphModule) -> None:
    gm.__dict__.pop("forward", None)
    hooks = getattr(gm, "_deepcopy_hooks", [])
    if _follow_training_flag in hooks:
        hooks.remove(_follow_training_flag)
    gm.meta.pop(_STATE, None)


def _forward_in_current_mode(gm: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    set_graph_mode(gm)
    return type(gm).forward(gm, *args, **kwargs)


def set_graph_mode(gm: fx.GraphModule) -> None:
    """Makes a prepared graph compute in its ``training`` mode, with its frozen parts frozen.

    Batch norms use batch statistics only when training and not frozen; dropout is active when
    training; observers update ranges only on training batches, and never once frozen. Cheap
    when nothing changed (the prepared student runs it at the start of every forward).
    """
    from torchao.quantization.pt2e import FakeQuantizeBase

    state = gm.meta[_STATE]
    mode = (gm.training, state["freeze_bn"], state["freeze_observers"])
    if state["mode"] == mode:
        return
    training, freeze_bn, freeze_observers = mode
    bn_training = training and not freeze_bn
    _rewrite_modes(gm, bn=bn_training, dropout=training, count_batches=bn_training)
    for module in gm.modules():
        if isinstance(module, FakeQuantizeBase):
            module.enable_observer(training and not freeze_observers)
    state["mode"] = mode


def _rewrite_modes(gm: fx.GraphModule, *, bn: bool, dropout: bool, count_batches: bool) -> None:
    """Sets the ``training`` literal of batch-norm and dropout calls, and whether BN counts batches.

    Eager BatchNorm increments ``num_batches_tracked`` only in training; the exported graph
    does it in an ``add_(num_batches_tracked, 1)`` node whatever the mode: 0 turns it off.
    """
    changed = False
    for node in gm.graph.nodes:
        name = _op_name(node)
        if name in _BN_OPS:
            index, want = _BN_OPS[name], bn
        elif name in _DROPOUT_OPS:
            index, want = _DROPOUT_OPS[name], dropout
        elif name == "add_" and _counts_bn_batches(node):
            index, want = 1, int(count_batches)
        else:
            continue
        if len(node.args) > index and (type(node.args[index]), node.args[index]) != (type(want), want):
            node.args = (*node.args[:index], want, *node.args[index + 1:])
            changed = True
    if changed:
        gm.recompile()


def _counts_bn_batches(node: fx.Node) -> bool:
    target = node.args[0] if node.args else None
    return isinstance(target, fx.Node) and target.op == "get_attr" and str(target.target).endswith(
        "num_batches_tracked"
    )


def convert_pt2e_int8(prepared: fx.GraphModule) -> fx.GraphModule:
    """A copy of a trained prepared graph converted to int8, on the CPU, in eval mode.

    Conv+BN are folded, weights become int8 constants, and the fp32 parameters no node reads
    any more are deleted so that a saved program stores only the int8 weights.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model = copy.deepcopy(prepared).cpu()
    _stop_following_training_flag(model)
    model.train(False)
    # BN on running statistics and dropout off, the form the int8 graph keeps; the batch counter
    # in the form convert_pt2e recognizes and removes
    _rewrite_modes(model, bn=False, dropout=False, count_batches=True)
    with _only_present_conv_kinds(model):
        model = convert_pt2e(model)
    drop_unused_attributes(model)  # the fp32 leftovers of conversion
    model.delete_all_unused_submodules()
    allow_exported_model_train_eval(model)
    setattr(model, _EXPORTED_TRAINING_ATTR, False)  # already in eval form: torchao's eval() has nothing to do
    model.eval()
    return model


@contextlib.contextmanager
def _only_present_conv_kinds(model: fx.GraphModule) -> Iterator[None]:
    """Skips torchao's conv-BN pattern rewrites for conv kinds the graph does not have.

    ``prepare_qat_pt2e`` fuses and ``convert_pt2e`` folds BN into conv1d, conv2d and both
    transposed convs, exporting each pattern (~0.5 s apiece; convert has 24 per kind, 45-120 s
    in all on a small CPU). Patterns of an absent kind cannot match, so skipping them changes
    nothing but the time: for a conv2d net, 7 s instead of 49 s and the same graph. The helpers
    are swapped in torchao's module for the duration (not thread-safe).
    """
    from torchao.quantization.pt2e import qat_utils

    present = {_op_name(n) for n in model.graph.nodes}
    names = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    originals = {name: getattr(qat_utils, name, None) for name in names}
    if None in originals.values() or "convolution" in present:  # a generic convolution may be any kind
        yield
        return

    def skipping(original: Any) -> Any:
        def helper(m: fx.GraphModule, conv_fn: Any, example_inputs: Any, is_cuda: bool) -> fx.GraphModule:
            kind = getattr(conv_fn, "__name__", "")
            if kind in _CONV_KINDS and kind not in present:
                return m
            return original(m, conv_fn, example_inputs, is_cuda=is_cuda)

        return helper

    for name, original in originals.items():
        setattr(qat_utils, name, skipping(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(qat_utils, name, original)


def lower_for_x86(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The int8 model compiled for x86 CPUs by inductor with freezing (int8 kernels, folded constants).

    Not part of ``finalize``: compiling takes seconds to a minute per batch size. As in torchao's
    X86 inductor tutorial, ``torch._inductor.config.freezing`` is on while inductor compiles, for
    the first call here (batch 1) and for each new batch size later (``options={"freezing":
    True}`` in ``torch.compile`` fails: the PT2E prepack ops break fake-tensor propagation).
    Shapes are static: each batch size compiles its own graph (with dynamic shapes torch 2.15's
    quantized-conv lowering fails a stride assertion). The result runs under ``torch.no_grad()``.

    Args:
        model: The output of ``QuantizationAwareTraining.finalize`` (either flow).
        input_shape: Shape of one input ``(C, H, W)``.

    Returns:
        The compiled model.
    """
    lowered = _FrozenInductor(model)
    lowered(torch.randn(1, *input_shape))  # (1, C, H, W): compiles now
    return lowered


class _FrozenInductor(nn.Module):
    """Runs ``torch.compile(model)`` with inductor's freezing on, without grad."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), torch.no_grad():
            return self.compiled(x)


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
    from torchao.quantization.pt2e import FakeQuantizeBase
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    if not isinstance(model, fx.GraphModule):
        return _count(model, FakeQuantizedLinear)
    count = 0
    for node in model.graph.nodes:
        weight = node.args[1] if _op_name(node) in _WEIGHT_OPS and len(node.args) > 1 else None
        if isinstance(weight, fx.Node) and weight.op == "call_module":
            count += isinstance(model.get_submodule(str(weight.target)), FakeQuantizeBase)
    return count


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _op_name(node: fx.Node) -> str:
    """``conv2d`` for a call of ``aten.conv2d.default``; ``""`` for anything else."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return str(schema.name).split("::")[-1] if schema is not None else ""
