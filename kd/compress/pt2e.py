"""The PT2E side of quantization-aware training: an exported student prepared for QAT, kept
in step with Lightning's train/eval flags, converted to int8 and lowered for x86.

torchao's flow: ``torch.export``, ``prepare_qat_pt2e`` with the ``X86InductorQuantizer``,
``convert_pt2e``. The callback that drives it through training is ``kd.compress.qat.QuantizationAwareTraining``.

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

import torch
from torch import fx, nn

from kd.compress.artifacts import drop_unused_attributes

_CONV_KINDS = {"conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"}
_WEIGHT_OPS = _CONV_KINDS | {"conv3d", "conv_transpose3d", "convolution", "linear"}
# index of the `training` argument of the train/eval-dependent ops of an exported graph
_BN_OPS = {"batch_norm": 5, "_native_batch_norm_legit": 5, "cudnn_batch_norm": 5}
_DROPOUT_OPS = {"dropout": 2}
_STATE = "kd_qat"  # key in GraphModule.meta (deep-copied with the graph): flags and current mode


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


def set_freezing(gm: fx.GraphModule, *, freeze_bn: bool, freeze_observers: bool) -> None:
    """Freezes (or not) the batch norms and the observers of a prepared graph, from now on."""
    state = gm.meta[_STATE]
    state["freeze_bn"], state["freeze_observers"] = freeze_bn, freeze_observers
    set_graph_mode(gm)


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` is a graph made by ``prepare_pt2e`` and still in training form."""
    return isinstance(model, fx.GraphModule) and _STATE in model.meta


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


def count_fake_quantized_graph(gm: fx.GraphModule) -> int:
    """Conv and linear calls of a prepared graph whose weight goes through a fake-quantize module."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    count = 0
    for node in gm.graph.nodes:
        weight = node.args[1] if _op_name(node) in _WEIGHT_OPS and len(node.args) > 1 else None
        if isinstance(weight, fx.Node) and weight.op == "call_module":
            count += isinstance(gm.get_submodule(str(weight.target)), FakeQuantizeBase)
    return count


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


def _op_name(node: fx.Node) -> str:
    """``conv2d`` for a call of ``aten.conv2d.default``; ``""`` for anything else."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return str(schema.name).split("::")[-1] if schema is not None else ""
