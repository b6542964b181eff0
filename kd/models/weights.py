"""Reading weights files safely: checkpoints, teachers shared in other repos' formats, mismatches.

``load_checkpoint`` reads a checkpoint with ``torch.load(weights_only=True)`` (no pickled code
runs unless ``checkpoint.allow_pickle=true``) after checking its zip records' CRCs, and turns
every failure into one line: missing, truncated or corrupt (bytes changed on disk included), or
needing pickle. ``load_weights`` loads a model from any of the formats
teachers are shared in (a state_dict, a kd/Lightning checkpoint, RepDistiller's and mdistiller's
``{"model": ...}``, ``module.``-prefixed DDP keys). ``state_dict_mismatch`` says why saved
weights do not fit a model. The training stack is not imported: ``kd-eval`` uses these too.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.errors import ConfigError

PICKLE_RISK = ("loading it runs arbitrary code from the file (pickle); if you trust its source, "
               "set checkpoint.allow_pickle=true")


class CorruptCheckpoint(ConfigError):
    """A checkpoint file that cannot be read: truncated, corrupt or not a checkpoint."""


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False, key: str = "resume",
                    map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a checkpoint, ``weights_only`` unless ``allow_pickle``, with one-line errors.

    Raises:
        ConfigError: If ``path`` is missing, or holds objects that need pickle and ``allow_pickle``
            is off.
        CorruptCheckpoint: If the file is truncated, corrupt (a record fails its CRC) or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"no checkpoint file at {path}")
    check_crc(path, key)
    try:
        state = torch.load(path, map_location=map_location, weights_only=not allow_pickle, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = pickle_refusal(e, path, key)
        if refused is not None and not allow_pickle:
            raise refused from e
        raise CorruptCheckpoint(key, f"{path} is corrupt ({type(e).__name__}: {_first_line(e)})") from e
    except Exception as e:  # torch's unpickler meets garbage as KeyError, IndexError, RuntimeError...
        raise CorruptCheckpoint(key, f"{path} is truncated or corrupt ({type(e).__name__}: {_first_line(e)}); "
                                "delete it or give another checkpoint") from e
    if not isinstance(state, dict):
        raise CorruptCheckpoint(key, f"{path} is not a checkpoint (it holds a {type(state).__name__})")
    return state


def check_crc(path: Path, key: str) -> None:
    """Checks every record of a zip-format torch file against the CRC-32 stored for it.

    ``torch.load`` does not: a file whose bytes changed on disk (a bad sector, a flipped bit in a
    copy) loads silently with other weights. Reading the file once costs about a millisecond per
    4 MB. Files in torch's legacy (non-zip) format have no CRCs and pass.

    Raises:
        CorruptCheckpoint: Naming the first record whose bytes no longer match their CRC.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CorruptCheckpoint(key, f"{path} is truncated or corrupt ({type(e).__name__}: {_first_line(e)}); "
                                "delete it or give another checkpoint") from e
    if bad is not None:
        raise CorruptCheckpoint(key, f"{path} is corrupt: the bytes of its record {bad} no longer match their "
                                "CRC (changed on disk); delete it or give another checkpoint")


def nonfinite_tensor(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or Inf, else None."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def pickle_refusal(e: BaseException, path: str | Path, key: str) -> ConfigError | None:
    """The error to raise when ``torch.load(weights_only=True)`` refused ``path`` for needing pickle, else None."""
    if not isinstance(e, pickle.UnpicklingError) or "weights only load failed" not in str(e).lower():
        return None
    found = re.search(r"GLOBAL (\S+)", str(e))
    what = f"a pickled {found.group(1)}" if found else "pickled objects"
    return ConfigError(key, f"{path} holds more than weights ({what}); {PICKLE_RISK}")


def listed(keys: list[str], shown: int = 5) -> str:
    """The first keys of a list, and how many more there are."""
    more = f", +{len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def state_dict_mismatch(saved: dict[str, Any], own: dict[str, Any], *, saved_as: str, own_as: str,
                        keys: Callable[[list[str]], str] = listed) -> str:
    """Why ``saved`` does not load into a module whose state_dict is ``own``, '' when it does.

    The first tensor of another shape (``saved_as`` / ``own_as`` say where each shape is from), then
    the missing and unexpected keys, each list written by ``keys``.
    """
    wrong = [f"{k} {tuple(saved[k].shape)} {saved_as} vs {tuple(v.shape)} {own_as}"
             for k, v in own.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    parts = (f"size mismatch for {wrong[0]}" if wrong else "",
             f"{len(missing)} missing keys ({keys(missing)})" if missing else "",
             f"{len(unexpected)} unexpected keys ({keys(unexpected)})" if unexpected else "")
    return "; ".join(p for p in parts if p)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""



def load_weights(net: nn.Module, path: Path, key: str = "teacher.ckpt", allow_pickle: bool = False) -> None:
    """Loads a checkpoint into ``net``, in any of the formats teachers are shared in.

    Accepted: a plain state_dict; a Lightning checkpoint of a kd run (the weights under
    ``"state_dict"``; the student's are taken: a kd run's student, or a teacher run, whose
    student is the teacher); a RepDistiller or mdistiller checkpoint (the weights under
    ``"model"``, next to ``"epoch"``, ``"optimizer"``, ``"best_acc"``...); and any of these saved
    from ``DataParallel`` / DDP, whose keys start with ``module.``. Loading uses
    ``weights_only=True``: no pickled code runs.

    Args:
        net: The model to load into, in place.
        path: The checkpoint file.
        key: The config key to blame in errors.
        allow_pickle: Load a file that needs pickle (it can run code): ``checkpoint.allow_pickle``.

    Raises:
        ConfigError: If the file is missing, unreadable or corrupt, holds NaN or Inf, or is of another
            architecture.
    """
    if not path.is_file():
        raise ConfigError(
            key, f"file not found: {path} (give an existing checkpoint, or set {key}=null "
            "to reuse or train a teacher from the store)"
        )
    check_crc(path, key)
    try:
        # RepDistiller's *_last.pth and timm's or torchvision's training checkpoints hold their
        # argparse options next to the weights: allowed, as plain data, and nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        refused = pickle_refusal(e, path, key)
        if refused is not None:
            raise refused from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(key, f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {first})") from e
    for wrapper in ("state_dict", "model"):  # Lightning; RepDistiller and mdistiller
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(key, f"{path} holds no state_dict of tensors")
    bad = nonfinite_tensor(state)
    if bad is not None:
        raise ConfigError(key, f"{path} holds NaN or Inf in {bad}: the run that wrote it diverged; "
                          "give a checkpoint of a run that trained")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("student.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    details = state_dict_mismatch(state, net.state_dict(), saved_as="in the file", own_as="in the model")
    if details:
        raise ConfigError(
            key, f"{path} does not fit model.teacher ({type(net).__name__}): {details}; "
            "pick the model/teacher config it was trained with"
        )
    net.load_state_dict(state)
