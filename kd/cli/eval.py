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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd.cli import config_dir
from kd.cli.compose_errors import composition_error
from kd.errors import ConfigError, check_int, instantiate_checked

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

EXAMPLES = """examples:
  kd-eval outputs/2026-11-22/12-00-00/student.pt2
  kd-eval run/student.pt2 data=mnist data.root=/data
  kd-eval run/student.onnx batch_size=256
  kd-eval run/student.pt                  (rebuilt from run/results.json)

config: conf/eval.yaml (data, batch_size, device, checkpoint.allow_pickle); bad input: one line on stderr, exit status 2"""


# --- composing conf/eval.yaml -----------------------------------------------------------------


def compose_eval(overrides: Sequence[str]) -> tuple[DictConfig, str]:
    """``conf/eval.yaml`` with ``overrides``, and the name of the chosen data config.

    Raises:
        ConfigError: For an override Hydra refuses (an unknown option or key, bad syntax),
            in one line naming the options there are.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import open_dict

    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("eval", overrides=list(overrides), return_hydra_config=True)
    except HydraException as e:
        raise (composition_error(e) or ConfigError("overrides", str(e).strip().splitlines()[0])) from None
    data = str(cfg.hydra.runtime.choices.get("data"))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, data


# --- the command --------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    import torch

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
    # torch and the artifact loaders: not imported for --help or a bad command line
    import torch
    from omegaconf import open_dict
    from torch import nn

    from kd.compress.artifacts import KEY, file_size
    from kd.compress.evaluate import check_path, evaluate_model, load_model

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
    model, shape = load_model(path, allow_pickle=bool(cfg.checkpoint.allow_pickle))
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
