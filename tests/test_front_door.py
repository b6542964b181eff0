"""kd's front door: a quiet console (kd/cli/quiet.py) and commands that start without the training stack.

Each test runs a fresh interpreter, so what it checks (the modules one import loads, the lines a
run prints) does not depend on what the test process imported or configured before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# A line of Hydra's job log format: [time][logger][LEVEL] - message
LOG_LINE = re.compile(r"^\[[^\]]+\]\[(?P<name>[^\]]+)\]\[(?P<level>[A-Z]+)\] - ")
# What the commands must not import at the top: the training stack, and the optional heavy packages
# imported where they are used (torchao: int8 models; onnx*: the ONNX export; wandb: logger=wandb;
# matplotlib: kd-table plots; submitit: the SLURM launcher; torch_pruning: callbacks=prune_structured).
HEAVY = ("torch", "lightning", "torchao", "onnx", "onnxscript", "onnxruntime", "wandb", "matplotlib", "submitit",
         "torch_pruning")
COMMANDS = ("kd.cli.train", "kd.cli.eval", "kd.cli.nodes", "kd.cli.table", "kd.cli.slurm", "kd.cli.hydra_callbacks")


def _python(code: str, tmp_path: Path, timeout: int = 300) -> str:
    env = {**os.environ, "KD_OUTPUT_ROOT": str(tmp_path / "outputs")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    out = _python(f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))", tmp_path)
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_module_imports_no_heavy_package(command: str, tmp_path: Path) -> None:
    loaded = _modules_after(f"import {command}", tmp_path)
    assert not loaded & set(HEAVY), f"import {command} loads {sorted(loaded & set(HEAVY))}"


def test_kd_eval_does_not_import_the_training_stack(tmp_path: Path) -> None:
    loaded = _modules_after("import kd.cli.eval", tmp_path)
    assert not {m for m in loaded if m.startswith(("kd.training", "kd.teacher"))}


def test_kd_train_help_imports_no_heavy_package(tmp_path: Path) -> None:
    loaded = _modules_after(
        "import contextlib, io\nsys.argv = ['kd-train', '--help']\nfrom kd.cli.train import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        cli()\n    except SystemExit as e:\n        assert not e.code, e.code\n",
        tmp_path,
    )
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


# Modules a warning is attributed to (its caller's, by stacklevel), and whether it shows after quiet()
WARNED_IN = {"torch.nn.modules.module": False, "lightning.pytorch.utilities._pytree": False,
             "torchao.quantization.quant_api": False, "kd.training.fit": True, "torchvisionx": True}


def _after_quiet(argv: list[str], tmp_path: Path) -> dict:
    """``quiet(argv)`` in a fresh interpreter: what it returns, the levels of some loggers, which warnings show."""
    out = _python(
        "import json, logging, warnings\nfrom kd.cli.quiet import quiet\n"
        f"args = quiet({argv!r})\n"
        "names = ['onnx_ir', 'onnxscript', 'lightning.pytorch.utilities', 'lightning.fabric.utilities', 'kd']\n"
        "shown = {}\n"
        f"for module in {list(WARNED_IN)!r}:\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.warn_explicit('w', UserWarning, 'x.py', 1, module=module, registry={})\n"
        "    shown[module] = bool(caught)\n"
        "print(json.dumps({'args': args, 'levels': {n: logging.getLogger(n).level for n in names}, 'shown': shown}))",
        tmp_path,
    )
    return json.loads(out.splitlines()[-1])


def test_quiet_raises_the_dependencies_loggers_and_ignores_their_warnings_not_kds(tmp_path: Path) -> None:
    got = _after_quiet(["distill=kd"], tmp_path)
    assert got["args"] == ["distill=kd"]
    levels = got["levels"]
    assert levels.pop("kd") == logging.NOTSET  # kd's own: as Hydra's logging config sets them
    assert set(levels.values()) == {logging.WARNING}
    assert got["shown"] == WARNED_IN


@pytest.mark.parametrize("argv", [["-v", "seed=1"], ["seed=1", "--verbose"], ["seed=1", "hydra.verbose=true"],
                                  ["seed=1", "hydra.verbose=[kd]"]])
def test_verbose_leaves_logging_and_warnings_as_they_are(argv: list[str], tmp_path: Path) -> None:
    got = _after_quiet(argv, tmp_path)
    assert got["args"] == [a for a in argv if a not in ("-v", "--verbose")]
    assert set(got["levels"].values()) == {logging.NOTSET}  # nothing was set
    assert all(got["shown"].values())


def _kd_train(tmp_path: Path, *args: str) -> list[str]:
    """The lines of ``kd-train`` run in a fresh interpreter (stdout and stderr), on the fast debug preset."""
    env = {**os.environ, "KD_OUTPUT_ROOT": str(tmp_path / "outputs")}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "kd.cli.train", *args, "debug=fdr", f"hydra.run.dir={tmp_path / 'run'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-5000:]
    return done.stdout.splitlines()


def test_a_run_prints_kds_progress_and_results_and_nothing_from_its_dependencies(tmp_path: Path) -> None:
    # report.onnx: the ONNX optimizer (onnxscript, onnx_ir) logs each of its passes at INFO
    lines = _kd_train(tmp_path, "report.onnx=true")
    text = "\n".join(lines)
    assert "accuracy (%)" in text and "compression report" in text  # kd's tables
    logged = [m for m in map(LOG_LINE.match, lines) if m]
    assert any(m["name"].startswith("kd.") for m in logged), text  # kd's progress
    others = [line for line, m in zip(lines, map(LOG_LINE.match, lines))
              if m and not m["name"].startswith(("kd.", "hydra")) and m["level"] in ("DEBUG", "INFO")]
    assert not others, "\n".join(others)
    assert not [line for line in lines if line.startswith(("INFO: ", "DEBUG: "))], text  # Lightning's own handler
    assert "GPU available" not in text, text  # once per Trainer: teacher, student (and stages)
    assert not [line for line in lines if "Warning" in line or "site-packages" in line], text


def test_verbose_brings_back_lightnings_lines(tmp_path: Path) -> None:
    lines = _kd_train(tmp_path, "-v", "distill=none", "report.enabled=false")
    # one Trainer (no teacher, no stages): its lines once, through Hydra's logging, not twice
    assert sum("GPU available" in line for line in lines) == 1, "\n".join(lines)


def test_verbose_reaches_the_processes_a_run_starts(tmp_path: Path) -> None:
    # Lightning's DDP re-runs the command for ranks 1..n with argv as kd-train left it (no -v)
    code = ("import logging, os\nfrom kd.cli.quiet import quiet\n"
            "print(quiet(['-v', 'seed=1']), os.environ.get('KD_VERBOSE'))\n"
            "print(quiet(['seed=1']), logging.getLogger('onnx_ir').level)")
    assert _python(code, tmp_path).splitlines() == ["['seed=1'] 1", "['seed=1'] 0"]  # the rank: verbose, nothing set
