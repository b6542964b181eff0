"""``kd-eval``: the test accuracy of a deployable model, in a process that knows nothing of its training.

Examples:
    kd-eval outputs/2026-11-22/12-00-00/student.pt2                   # on digits, the default data
    kd-eval run/student.pt2 data=mnist data.root=/data                # Hydra overrides of conf/eval.yaml
    kd-eval run/student.onnx batch_size=256                           # through onnxruntime
    kd-eval run/student.pt                                            # rebuilt from run/results.json
    kd-eval run/checkpoints/epoch004-step90.ckpt                      # a kd Lightning checkpoint

Artifacts: ``.pt2`` (a ``torch.export`` program) and ``.onnx`` run as exported
(``kd.compress.artifacts``); ``.pt`` (the ``student.pt`` state_dict kd-train writes) and ``.ckpt``
(a kd checkpoint) are loaded into the student rebuilt from the ``results.json`` of their run.
The output is a one-line summary, then one line of JSON with the artifact, the data and the
metrics. Bad input is one line on stderr, ``kd-eval: error: <key>: <message>``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from kd.compress.artifacts import KEY, file_size, input_shape_of, load_artifact
from kd.errors import ConfigError, check_int, instantiate_checked
from kd.results import RESULTS_FILE
from kd.train import config_dir

EXTENSIONS = (".pt2", ".onnx", ".pt", ".ckpt")
EXAMPLES = """examples:
  kd-eval outputs/2026-11-22/12-00-00/student.pt2
  kd-eval run/student.pt2 data=mnist data.root=/data
  kd-eval run/student.onnx batch_size=256
  kd-eval run/student.pt                  (rebuilt from run/results.json)

config: conf/eval.yaml (data, batch_size, device); bad input: one line on stderr, exit status 2"""


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


# --- composing conf/eval.yaml -----------------------------------------------------------------


def compose_eval(overrides: Sequence[str]) -> tuple[DictConfig, str]:
    """``conf/eval.yaml`` with ``overrides``, and the name of the chosen data config.

    Raises:
        ConfigError: For an override Hydra refuses (an unknown option or key, bad syntax),
            in one line naming the options there are.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("eval", overrides=list(overrides), return_hydra_config=True)
    except HydraException as e:
        raise _override_error(str(e), overrides) from None
    data = str(cfg.hydra.runtime.choices.get("data"))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, data


def _override_error(text: str, overrides: Sequence[str]) -> ConfigError:
    """One line from Hydra's multi-line composition error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    missing = re.match(r"In '\w+': Could not find '([^']+)'", lines[0])
    if missing:  # data=digitz: Hydra lists the group's options on the following lines
        group = missing.group(1).rpartition("/")[0]
        at = [i for i, line in enumerate(lines) if line.startswith("Available options")]
        listed = lines[at[0] + 1:] if at else []
        options = [line for line in listed if not line.startswith(("Config search path", "provider="))]
        return ConfigError(group.replace("/", "."), f"no config {missing.group(1)}; options: {', '.join(options)}")
    unknown = re.match(r"Could not override '([^']+)'", lines[0])
    if unknown:  # data.batchsize=8: list the keys of the node it was meant for
        key = unknown.group(1)
        parent = key.rpartition(".")[0]
        try:
            rest, _ = compose_eval([o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
            node = OmegaConf.select(rest, parent) if parent else rest
            known = f"; {parent or 'kd-eval'} has: {', '.join(str(k) for k in node)}" if isinstance(node, DictConfig) else ""
        except ConfigError:
            known = ""
        return ConfigError(key, f"no such option{known}")
    return ConfigError("overrides", ": ".join(lines[:2]))


# --- loading the model --------------------------------------------------------------------------


def _run_dir(path: Path) -> Path:
    """The run directory of a state_dict or checkpoint: the one holding results.json."""
    for candidate in (path.parent, path.parent.parent):  # <run>/student.pt, <run>/checkpoints/x.ckpt
        if (candidate / RESULTS_FILE).is_file():
            return candidate
    raise ConfigError(
        KEY, f"{path} holds weights only, and no {RESULTS_FILE} of its run is next to it to rebuild "
        "the model from; evaluate the exported student.pt2 artifact instead"
    )


def rebuild_student(path: Path) -> tuple[nn.Module, tuple[int, ...]]:
    """The student of a kd-train run with the weights of ``path`` (its student.pt or a checkpoint).

    The model is built from the resolved config in the run's ``results.json``
    (``model.student``, the data's classes and input shape) and the weights loaded with
    ``kd.teacher.load_weights``, which takes the student's out of a Lightning checkpoint.

    Returns:
        The model, and the per-sample input shape of the data it was trained on.

    Raises:
        ConfigError: Without a ``results.json``, or when the weights do not fit the model it
            describes (a pruned or quantized student: evaluate its ``.pt2``).
    """
    from kd.models.build import build_model
    from kd.teacher import load_weights

    results_path = _run_dir(path) / RESULTS_FILE
    try:
        results = json.loads(results_path.read_text())
        node = results["config"]["model"]["student"]
        data = results["data"]
        num_classes, shape = int(data["num_classes"]), tuple(int(d) for d in data["input_shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            KEY, f"{results_path} is not the results.json of a kd-train run ({type(e).__name__}: {e}); "
            "evaluate the exported student.pt2 artifact instead"
        ) from None
    model = build_model(node, key="model.student", num_classes=num_classes, input_shape=shape)
    try:
        load_weights(model, path, key=KEY)
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


def load_model(path: Path) -> tuple[Callable[[Tensor], Tensor], tuple[int, ...] | None]:
    """The model in ``path`` and the per-sample input shape it expects (None when unknown).

    Raises:
        ConfigError: For a missing file, an unsupported extension or a file that cannot be loaded.
    """
    check_path(path)
    if path.suffix in (".pt", ".ckpt"):
        return rebuild_student(path)
    artifact = load_artifact(path)
    return artifact, input_shape_of(artifact)


# --- the command --------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError("device", f"{e}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} asked for but CUDA is not available; use device=cpu")
    return device


def evaluate_artifact(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Tests the model in ``path`` on the test split of the data ``overrides`` choose.

    Everything is checked before the test set is read: the file, the overrides, and that the
    model takes the data's input shape and gives its number of classes.

    Args:
        path: A ``.pt2``, ``.onnx``, ``.pt`` or ``.ckpt`` file.
        overrides: Hydra overrides of ``conf/eval.yaml`` (``data=mnist``, ``data.root=/data``).

    Returns:
        ``artifact``, ``data``, ``datamodule``, ``bytes`` (the file's size) and the metrics of
        ``evaluate_model``.

    Raises:
        ConfigError: On bad input, in one line.
    """
    path = Path(path)
    check_path(path)
    cfg, data = compose_eval(overrides)
    if cfg.batch_size is not None:
        check_int("batch_size", cfg.batch_size, 1, valid=">= 1 or null")
        if "eval_batch_size" not in cfg.data:
            raise ConfigError("batch_size", f"data={data} has no eval_batch_size to set; leave batch_size=null")
        with open_dict(cfg):
            cfg.data.eval_batch_size = cfg.batch_size
    device = _device(str(cfg.device))
    datamodule = instantiate_checked(cfg.data, "data")
    model, shape = load_model(path)
    given = tuple(datamodule.input_shape)
    if shape is not None and tuple(shape) != given:
        raise ConfigError(
            KEY, f"{path.name} expects inputs of shape {tuple(shape)} but data={data} gives {given}; "
            "pass the data the model was trained on"
        )
    if isinstance(model, nn.Module):
        model = model.to(device)
    with torch.no_grad():
        out = model(torch.zeros(1, *given, device=device if isinstance(model, nn.Module) else "cpu"))
    classes = getattr(out, "logits", out).shape[-1]
    if classes != datamodule.num_classes:
        raise ConfigError(
            KEY, f"{path.name} outputs {classes} classes but data={data} has {datamodule.num_classes}; "
            "pass the data the model was trained on"
        )
    datamodule.prepare_data()
    datamodule.setup("test")
    metrics = evaluate_model(model, datamodule.test_dataloader(), device=device if isinstance(model, nn.Module) else None)
    return {
        "artifact": str(path), "data": data, "datamodule": type(datamodule).__name__, "bytes": file_size(path),
        **metrics,
    }


def summary_line(result: dict[str, Any]) -> str:
    """``kd-eval: student.pt2 on DigitsDataModule test split: acc 97.50% (351/360), 9 errors``."""
    n, errors = result["test/n"], result["test/errors"]
    return (
        f"kd-eval: {Path(result['artifact']).name} on {result['datamodule']} test split: "
        f"acc {100 * result['test/acc']:.2f}% ({n - errors}/{n}), {errors} errors"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``kd-eval ARTIFACT [overrides ...]``; a ConfigError is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(
        prog="kd-eval", description="The test accuracy of an exported or saved model on a data config.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", type=Path, help="a .pt2, .onnx, .pt (student.pt) or .ckpt file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/eval.yaml, e.g. data=mnist data.root=/data")
    args = parser.parse_args(argv)
    try:
        result = evaluate_artifact(args.artifact, args.overrides)
    except ConfigError as e:
        print(f"kd-eval: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(summary_line(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
