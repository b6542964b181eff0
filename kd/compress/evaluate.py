"""Evaluating a deployable student: top-1 accuracy of a model, and loading one from a file.

``.pt2`` (a ``torch.export`` program) and ``.onnx`` run as exported (``kd.compress.artifacts``);
``.pt`` (the ``student.pt`` state_dict kd-train writes) and ``.ckpt`` (a kd checkpoint) are loaded
into the student rebuilt from the ``results.json`` of their run. ``kd-eval`` (``kd.cli.eval``) is
the command over these; the compression report (``kd.compress.deploy``) measures with
``evaluate_model`` too. Nothing here imports the training stack.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from kd.compress.artifacts import KEY, input_shape_of, load_artifact
from kd.errors import ConfigError
from kd.models.build import build_model
from kd.models.weights import load_checkpoint, load_weights
from kd.results import RESULTS_FILE

EXTENSIONS = (".pt2", ".onnx", ".pt", ".ckpt")


@torch.no_grad()
def evaluate_model(
    model: Callable[[Tensor], Tensor], dataloader: Iterable[dict[str, Tensor]], device: str | torch.device | None = None
) -> dict[str, float | int]:
    """Top-1 accuracy of ``model`` over every batch of ``dataloader``.

    An ``nn.Module`` is evaluated in eval mode (a graph exported by ``torch.export`` keeps the
    mode it was exported in) and put back in its previous mode afterwards.

    Args:
        model: A callable from inputs ``(B, ...)`` to logits ``(B, num_classes)`` (or an object
            with ``.logits``).
        dataloader: Batches as kd datamodules yield them, dicts with ``input`` and ``target``.
        device: Where the inputs go; default: the module's device, else the CPU.

    Returns:
        ``{"test/acc": correct / n, "test/errors": n - correct, "test/n": n}``.
    """
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        _set_eval(model, True)
        if device is None:
            device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
    device = torch.device(device or "cpu")
    correct = n = 0
    try:
        for batch in dataloader:
            out = model(batch["input"].to(device))
            logits = getattr(out, "logits", out)  # (B, num_classes)
            target = batch["target"].to(logits.device)  # (B,)
            correct += int((logits.argmax(dim=1) == target).sum())
            n += int(target.numel())
    finally:
        if was_training:
            _set_eval(model, False)
    return {"test/acc": correct / n if n else 0.0, "test/errors": n - correct, "test/n": n}


def _set_eval(model: nn.Module, eval_mode: bool) -> None:
    try:
        model.train(not eval_mode)
    except NotImplementedError:  # an exported graph: no train/eval switch
        pass


# --- loading the model --------------------------------------------------------------------------


def _run_dir(path: Path) -> Path:
    """The run directory of a state_dict or checkpoint: the one holding results.json."""
    # <run>/student.pt, <run>/checkpoints/x.ckpt, <run>/peers/<name>/student.pt
    for candidate in (path.parent, path.parent.parent, path.parent.parent.parent):
        if (candidate / RESULTS_FILE).is_file():
            return candidate
    raise ConfigError(
        KEY, f"{path} holds weights only, and no {RESULTS_FILE} of its run is next to it to rebuild "
        "the model from; evaluate the exported student.pt2 artifact instead"
    )


def rebuild_student(path: Path, allow_pickle: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """The student of a kd-train run with the weights of ``path`` (its student.pt or a checkpoint).

    The model is built from the resolved config in the run's ``results.json``
    (``model.student``, or ``model.peers.<name>`` for a peer's ``peers/<name>/student.pt``; the data's
    classes and input shape) and the weights loaded with
    ``kd.models.weights.load_weights``, which takes the student's out of a Lightning checkpoint.

    Returns:
        The model, and the per-sample input shape of the data it was trained on.

    Args:
        path: The weights.
        allow_pickle: Load a file that needs pickle (it can run code): ``checkpoint.allow_pickle``.

    Raises:
        ConfigError: For a file that is not a readable checkpoint, without a ``results.json``, or
            when the weights do not fit the model it describes (a pruned or quantized student:
            evaluate its ``.pt2``).
    """
    # the file first: a text file or a truncated copy is called that, not "weights without results.json"
    load_checkpoint(path, allow_pickle=allow_pickle, key=KEY, mmap=zipfile.is_zipfile(path))
    run_dir = _run_dir(path)
    results_path = run_dir / RESULTS_FILE
    # a peer's weights (<run>/peers/<name>/student.pt) are rebuilt from model.peers.<name>
    peer = path.parent.name if path.parent.parent.name == "peers" and path.parents[2] == run_dir else None
    try:
        results = json.loads(results_path.read_text())
        node = results["config"]["model"]["peers"][peer] if peer else results["config"]["model"]["student"]
        data = results["data"]
        num_classes, shape = int(data["num_classes"]), tuple(int(d) for d in data["input_shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            KEY, f"{results_path} is not the results.json of a kd-train run ({type(e).__name__}: {e}); "
            "evaluate the exported student.pt2 artifact instead"
        ) from None
    model = build_model(node, key="model.student", num_classes=num_classes, input_shape=shape)
    try:
        load_weights(model, path, key=KEY, allow_pickle=allow_pickle)
    except ConfigError as e:
        if " does not fit " not in e.message:  # unreadable, or no state_dict: said as it is
            raise
        detail = e.message.split("): ", 1)[-1].rsplit("; pick", 1)[0]  # load_weights' advice is for teachers
        raise ConfigError(
            KEY, f"{path} does not fit the model.student of {results_path} ({detail}); a compressed "
            "student (pruned, quantized) is deployed as student.pt2: evaluate that instead"
        ) from None
    return model.eval(), shape


def check_path(path: Path) -> None:
    """Refuses a missing file or one kd-eval cannot read, before anything is loaded.

    Raises:
        ConfigError: Naming the path, or the supported extensions.
    """
    if path.suffix not in EXTENSIONS:
        kind = path.suffix or "(no extension)"
        raise ConfigError(KEY, f"{path}: unknown artifact type {kind!r}; supported: {', '.join(EXTENSIONS)}")
    if not path.is_file():
        raise ConfigError(KEY, f"file not found: {path} (kd-train writes student.pt2 in the run directory)")


def load_model(path: Path, allow_pickle: bool = False) -> tuple[Callable[[Tensor], Tensor], tuple[int, ...] | None]:
    """The model in ``path`` and the per-sample input shape it expects (None when unknown).

    ``allow_pickle``: a ``.pt``/``.ckpt`` that needs pickle is loaded (``checkpoint.allow_pickle``).

    Raises:
        ConfigError: For a missing file, an unsupported extension or a file that cannot be loaded.
    """
    check_path(path)
    if path.suffix in (".pt", ".ckpt"):
        return rebuild_student(path, allow_pickle)
    artifact = load_artifact(path)
    return artifact, input_shape_of(artifact)
