"""Deployable forms of a trained student (or teacher): a ``torch.export`` program and an ONNX model.

- ``.pt2``: ``torch.export.save`` of the model with a dynamic batch dimension. It serves every
  kind of student kd trains: fp32, int8 from PT2E quantization (a ``torch.fx.GraphModule``) and
  int8 from torchao's ``QATConfig`` (Linear weights held as torchao tensor subclasses). Loading an
  int8 program needs torchao installed, which registers its ops and tensor subclasses.
- ``.onnx``: ``torch.onnx.export(..., dynamo=True)`` of an fp32 model, run with onnxruntime. int8
  models are served by the ``.pt2`` program.

Both are written atomically (a temporary file beside the target, then renamed), so a reader never
sees half a file. ``load_artifact`` turns either back into a callable from an input batch to
logits; ``input_shape_of`` says which per-sample shape it expects.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path

import torch
from torch import Tensor, fx, nn

from kd.errors import ConfigError
from kd.results import _write_atomic

SUPPORTED = (".pt2", ".onnx")
KEY = "artifact"
# dtypes only quantized weights and their zero points are held in (not num_batches_tracked's int64)
_QUANTIZED_DTYPES = {torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.qint32, torch.int4, torch.uint4}


def file_size(path: Path) -> int:
    """Size of a file in bytes."""
    return Path(path).stat().st_size


def drop_unused_attributes(gm: fx.GraphModule) -> list[str]:
    """Deletes the parameters and buffers of ``gm`` that no node of its graph reads.

    After PT2E's ``convert_pt2e`` the int8 weights are new constants (``_frozen_param*``), while
    the fp32 weights they came from (and the folded BatchNorm's) stay attached to the module,
    unused. ``torch.export`` lifts every attribute into the program, so without this the saved
    program would carry both.

    Args:
        gm: The graph module, changed in place.

    Returns:
        The dotted names of the deleted attributes.
    """
    # a call_module node (a graph from fx.symbolic_trace) reads every attribute of its submodule
    read = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    dead = sorted(
        name for name in {name for name, _ in named}
        if not any(name == r or name.startswith(r + ".") for r in read)
    )
    for name in dead:
        owner, _, leaf = name.rpartition(".")
        delattr(gm.get_submodule(owner), leaf)
    return dead


def _for_export(model: nn.Module) -> nn.Module:
    """``model`` in eval mode on the CPU, without dead attributes when it is a graph module."""
    model = model.to("cpu")
    try:
        model.eval()
    except NotImplementedError:
        # a graph from torch.export refuses .eval(): it keeps the mode it was exported in (PT2E
        # models made switchable with allow_exported_model_train_eval do not get here)
        pass
    if isinstance(model, fx.GraphModule):
        drop_unused_attributes(model)
    return model


def _batch_dims() -> tuple[dict[int, torch.export.Dim]]:
    # min=1: a batch of one must run too; the example batch of 2 keeps export from specializing it
    return ({0: torch.export.Dim("batch", min=1)},)


def export_program(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Exports ``model`` with ``torch.export`` (dynamic batch) and saves the program to ``path``.

    The model is put in eval mode on the CPU in place; an ``fx.GraphModule`` (an int8 PT2E
    model) first loses the attributes its graph does not read (``drop_unused_attributes``).

    Args:
        model: An fp32 model, a PT2E-converted graph module or a model with torchao int8 weights.
        input_shape: Shape of one input, ``(C, H, W)``.
        path: Where to write the program (``student.pt2``).

    Returns:
        ``path``.
    """
    path = Path(path)
    model = _for_export(model)
    example = torch.randn(2, *input_shape)  # (2, C, H, W)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=_batch_dims())
    _write_atomic(path, lambda f: torch.export.save(program, f))
    return path


def quantized_part(model: nn.Module) -> str | None:
    """Names a part of ``model`` that is quantized (or fake-quantized), or None for a float model.

    Looks at parameters, buffers, the constants a graph module reads (``get_attr``: where PT2E's
    int8 conversion keeps its weights), torchao's quantized tensor subclasses and fake-quant modules.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    if isinstance(model, fx.GraphModule):
        tensors += [(str(n.target), attrgetter(str(n.target))(model)) for n in model.graph.nodes if n.op == "get_attr"]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):  # a submodule read by get_attr
            continue
        if type(t) not in (torch.Tensor, nn.Parameter):  # torchao's int8 weights are tensor subclasses
            return f"{name} is a {type(t).__name__}"
        if t.dtype in _QUANTIZED_DTYPES:
            return f"{name} is {t.dtype}"
    for name, module in model.named_modules():
        if "FakeQuant" in type(module).__name__:
            return f"{name} is a {type(module).__name__}"
    return None


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Exports an fp32 ``model`` to ONNX (dynamo exporter, dynamic batch) at ``path``.

    The model is put in eval mode on the CPU in place. Weights are embedded in the file, which
    limits it to models under ONNX's 2 GB protobuf limit.

    Args:
        model: A float model.
        input_shape: Shape of one input, ``(C, H, W)``.
        path: Where to write the model (``student.onnx``).

    Returns:
        ``path``.

    Raises:
        ConfigError: For a quantized model: its deployable form is the ``.pt2`` program.
    """
    path = Path(path)
    part = quantized_part(model)
    if part is not None:
        raise ConfigError(
            KEY, f"cannot export a quantized model to ONNX ({part}); int8 models are served by "
            "the torch.export program: use export_program(...) / student.pt2"
        )
    model = _for_export(model)
    example = torch.randn(2, *input_shape)  # (2, C, H, W)
    program = torch.onnx.export(
        model, (example,), dynamo=True, dynamic_shapes=_batch_dims(), input_names=["input"],
        output_names=["logits"], verbose=False,
    )
    data = program.model_proto.SerializeToString()
    _write_atomic(path, lambda f: f.write(data))
    return path


class OnnxModel:
    """An ONNX model run by onnxruntime on the CPU, called like a model: ``(B, ...) -> (B, classes)``.

    Args:
        session: An ``onnxruntime.InferenceSession`` of a model with one input and whose first
            output is the logits.
    """

    def __init__(self, session: object) -> None:
        self.session = session
        self.input = session.get_inputs()[0]  # type: ignore[attr-defined]

    def __call__(self, x: Tensor) -> Tensor:
        feed = {self.input.name: x.detach().to("cpu", torch.float32).numpy()}
        logits = self.session.run(None, feed)[0]  # type: ignore[attr-defined]  # (B, classes)
        return torch.from_numpy(logits)


def _missing(path: Path) -> ConfigError:
    return ConfigError(
        KEY, f"file not found: {path} (kd-train writes student.pt2 in the run directory; give "
        "the path of an exported .pt2 or .onnx file)"
    )


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Raises a logger's level to ERROR for the duration (warnings meant for torch developers)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def import_torchao() -> None:
    """Imports torchao, registering its tensor subclasses (QATConfig int8 weights) and the
    quantize ops of PT2E int8 graphs, which loading such a program needs."""
    with _quiet_logger("torch.utils._pytree"):  # torchao registers enums the old way, with a warning
        import torchao  # noqa: F401
        import torchao.quantization.pt2e  # noqa: F401


def _load_program(path: Path) -> nn.Module:
    import_torchao()
    bad = f"{path} is not a valid torch.export program"
    if not zipfile.is_zipfile(path):  # truncated or another format: torch.export.load would log a traceback
        raise ConfigError(KEY, f"{bad} (not a complete zip archive); re-export it with kd.compress.artifacts.export_program")
    try:
        with _quiet_logger("torch.export"):  # it logs the failure of each format it tries as a warning
            program = torch.export.load(path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            KEY, f"{bad} ({type(e).__name__}: {first}); re-export it with kd.compress.artifacts.export_program"
        ) from e
    return program.module()


def _load_onnx(path: Path) -> OnnxModel:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(KEY, f"running {path} needs onnxruntime: pip install onnxruntime") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            KEY, f"{path} is not a valid ONNX model ({first}); re-export it with kd.compress.artifacts.export_onnx"
        ) from e
    return OnnxModel(session)


def load_artifact(path: Path) -> Callable[[Tensor], Tensor]:
    """Loads an exported model: an ``nn.Module`` for ``.pt2``, an ``OnnxModel`` for ``.onnx``.

    Args:
        path: The artifact file.

    Returns:
        A callable from an input batch ``(B, C, H, W)`` to logits ``(B, num_classes)``.

    Raises:
        ConfigError: If the file is missing, has another extension, is corrupt or truncated, or
            is ONNX and onnxruntime is not installed.
    """
    path = Path(path)
    if path.suffix not in SUPPORTED:
        kind = path.suffix or "(no extension)"
        raise ConfigError(KEY, f"{path}: unknown artifact type {kind!r}; supported: {', '.join(SUPPORTED)}")
    if not path.is_file():
        raise _missing(path)
    return _load_program(path) if path.suffix == ".pt2" else _load_onnx(path)


def input_shape_of(artifact: Callable[[Tensor], Tensor]) -> tuple[int, ...] | None:
    """The per-sample input shape a loaded artifact expects, ``(C, H, W)``.

    Read from the input placeholder of an exported program's graph, or from the ONNX graph's
    first input; the batch dimension is left out.

    Returns:
        The shape, or None when the artifact does not fix it (a plain module, a symbolic size).
    """
    if isinstance(artifact, OnnxModel):
        dims = tuple(artifact.input.shape[1:])
    elif isinstance(artifact, fx.GraphModule):
        inputs = [n for n in artifact.graph.nodes if n.op == "placeholder"]
        value = inputs[0].meta.get("val") if inputs else None
        if not isinstance(value, Tensor):
            return None
        dims = tuple(value.shape[1:])
    else:
        return None
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)
