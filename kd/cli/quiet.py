"""A quiet console for kd's commands: kd's progress and results, not its dependencies' chatter.

A kd run prints its progress (the loggers ``kd.*``), Lightning's progress bar and kd's result
tables. The libraries under it add lines nobody asked for: Lightning announces the accelerators
and a tip for every Trainer it builds (a run builds several: teacher, stages, student) and each
checkpoint it restores; the ONNX optimizer (onnxscript, onnx_ir) logs its passes; torch, torchao
and Lightning warn about one another's internals. ``quiet`` raises those loggers to WARNING and
ignores those warnings where they arise inside the libraries. What the libraries log at WARNING
or above still shows, and so does a warning that a library attributes to kd's call of it.

``kd-train -v`` (``--verbose``), ``KD_VERBOSE=1``, a ``hydra.verbose=...`` override or Python's
own ``-W`` / ``PYTHONWARNINGS`` leave the logs (respectively the warnings) as the libraries set
them. ``-v`` sets ``KD_VERBOSE=1`` for the processes the run starts (DDP ranks).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

VERBOSE_FLAGS = ("-v", "--verbose")
VERBOSE_ENV = "KD_VERBOSE"  # =1: verbose, as -v; set by -v for the processes a run starts

# Loggers of dependencies that log at INFO what a kd user did not ask for (torch's own loggers
# are WARNING already, unless TORCH_LOGS asks otherwise, which sets them again when torch loads).
LOGGERS = ("onnx_ir", "onnxscript", "onnx", "onnxruntime", "torch.onnx", "torchao", "torch_pruning",
           "torchvision", "timm", "huggingface_hub", "httpx", "urllib3", "numexpr", "fsspec", "PIL",
           "matplotlib", "submitit")

# Packages whose warnings are about their own internals or one another's (torch's deprecations
# inside Lightning, torchao's inside torch). Not Hydra nor OmegaConf: theirs are about the user's config.
WARNING_PACKAGES = ("torch", "torchao", "torchvision", "torchmetrics", "torch_pruning", "timm", "lightning",
                    "lightning_fabric", "lightning_utilities", "pytorch_lightning", "onnx", "onnx_ir",
                    "onnxscript", "onnxruntime", "wandb", "submitit", "numpy", "scipy", "sklearn", "matplotlib")
WARNING_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning)


def _lightning_loggers() -> list[str]:
    """The loggers to set for Lightning: those of the modules of ``lightning.pytorch`` and ``lightning.fabric``.

    Importing Lightning sets ``lightning.pytorch`` and ``lightning.fabric`` to INFO, and kd imports
    it only once a run starts, after ``quiet``. Lightning leaves the levels of the loggers below
    them unset, and a logger's level is the first one set on the way up its dotted name, so the
    level goes on ``lightning.pytorch.utilities`` (where ``rank_zero_info`` logs), ``.trainer``,
    ``.callbacks``, ... The modules are listed from the installed files, without importing Lightning.
    """
    spec = importlib.util.find_spec("lightning")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    names = []
    for package in ("pytorch", "fabric"):
        names.append(f"lightning.{package}")  # set for a Lightning imported already
        names += [f"lightning.{package}.{m.name}" for m in pkgutil.iter_modules([str(root / package)])]
    return names


def _asks_for_verbose(arg: str) -> bool:
    key, eq, value = arg.lstrip("+").partition("=")
    return key == "hydra.verbose" and bool(eq) and value.strip().lower() != "false"


def quiet(argv: Sequence[str]) -> list[str]:
    """Quiets kd's dependencies for the rest of the process, unless ``argv`` asks for them.

    Sets the loggers of ``LOGGERS`` and Lightning's to WARNING, and ignores the
    ``WARNING_CATEGORIES`` raised in the modules of ``WARNING_PACKAGES``. Call it before Hydra
    runs: Hydra's logging config leaves the levels of these loggers alone.

    Args:
        argv: The command's arguments, without the program name.

    Returns:
        ``argv`` without ``-v`` / ``--verbose``, which are kd's and not Hydra's.

    Example:
        >>> sys.argv[1:] = quiet(sys.argv[1:])  # first thing in a command, before Hydra parses argv
    """
    args = [a for a in argv if a not in VERBOSE_FLAGS]
    if len(args) < len(argv) or any(_asks_for_verbose(a) for a in args) or os.environ.get(VERBOSE_ENV) == "1":
        # the processes this one starts (Lightning's DDP ranks re-run the command, without -v) say it too
        os.environ[VERBOSE_ENV] = "1"
        return args
    for name in (*LOGGERS, *_lightning_loggers()):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not sys.warnoptions:  # python -W / PYTHONWARNINGS: the user's filters decide
        module = rf"(?:{'|'.join(map(re.escape, WARNING_PACKAGES))})(?:\.|$)"
        for category in WARNING_CATEGORIES:
            warnings.filterwarnings("ignore", category=category, module=module)
    return args


def one_console_for_lightning() -> None:
    """Stops Lightning's lines printing twice under Hydra's logging.

    Importing ``lightning`` adds a console handler of its own to the ``lightning`` logger, which
    still passes each record up to the root logger. kd-train imports it after Hydra has given
    the root logger its handlers, so every Lightning line would print twice (``-v`` shows them):
    this drops Lightning's own handler when the root logger has one.
    """
    if not logging.getLogger().handlers:
        return
    own = logging.getLogger("lightning")
    for handler in [h for h in own.handlers if type(h) is logging.StreamHandler]:
        own.removeHandler(handler)
