"""Checkpoints that survive crashes: atomic writes, safe loading, resuming exactly where a run stopped.

- ``SafeCheckpointIO`` is the trainer's checkpoint plugin. A checkpoint is written to a temporary
  file beside its target, synced and renamed over it, so a killed process leaves the previous file
  or the new one, never half of one. Loading uses ``torch.load(weights_only=True)``: tensors,
  numbers, strings and containers only, no pickled code runs. A checkpoint that needs pickle is
  refused unless ``checkpoint.allow_pickle=true`` names that risk.
- ``StepSeeds`` seeds the Python, NumPy, torch and CUDA generators from (seed, rank, epoch,
  batch) before every training batch, so dropout and the methods' sampling (CRD's negatives) draw the same
  numbers as in a run that never stopped. The data order does not depend on them: the loaders
  draw from generators of their own, keyed by seed and epoch, and say how far into the epoch
  they got (``kd.data.order``).
- ``find_resume`` picks the checkpoint ``resume=auto`` continues from: the newest one in the run's
  ``checkpoints/`` that loads and holds finite weights, skipping (with a warning) truncated or
  corrupt ones (a record whose bytes fail its CRC) and ones with NaN or Inf.
- ``RunSettings`` writes the run's resolved config into every checkpoint; ``resume_changes``
  compares it with the config of the run that continues from it, and refuses a resume that would
  train one thing and record another.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kd.errors import ConfigError
from kd.models.weights import CorruptCheckpoint, load_checkpoint, nonfinite_tensor
from kd.results import _write_atomic

log = logging.getLogger(__name__)

class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with atomic saves and weights-only loads.

    Args:
        allow_pickle: Load checkpoints that need pickle (they can run code): an explicit opt-in.
    """

    def __init__(self, allow_pickle: bool = False) -> None:
        super().__init__()
        self.allow_pickle = allow_pickle

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        _write_atomic(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, allow_pickle=self.allow_pickle, map_location=map_location or "cpu")


def _step(state: dict[str, Any]) -> int:
    return int(state.get("global_step", -1))


def checkpoint_candidates(directory: str | Path) -> list[Path]:
    """The ``.ckpt`` files of a run's ``checkpoints/`` (and Lightning's ``hpc_ckpt_*`` of SLURM requeues)."""
    directory = Path(directory)
    found = list((directory / "checkpoints").glob("*.ckpt")) if (directory / "checkpoints").is_dir() else []
    found += list(directory.glob("hpc_ckpt_*.ckpt"))
    return found


def find_resume(run_dir: str | Path, *, allow_pickle: bool = False) -> Path | None:
    """The checkpoint ``resume=auto`` continues from: the one of the highest step that loads and
    holds finite weights.

    Checkpoints of the same step (``last.ckpt`` and a step checkpoint) are equivalent; the newest
    file wins. A file that does not load (a crash while it was copied in, a full disk, bytes
    changed on disk) or whose weights hold NaN or Inf (written just before a run diverged) is
    skipped with a warning naming it, and the previous good one is used.

    Returns:
        The path, or None when the run has no such checkpoint.
    """
    readable: list[tuple[int, float, Path]] = []
    for path in checkpoint_candidates(run_dir):
        try:
            state = load_checkpoint(path, allow_pickle=allow_pickle, mmap=True)
        except CorruptCheckpoint as e:
            log.warning("resume=auto: skipping a checkpoint that does not load: %s", e.message)
            continue
        if "loops" not in state or "state_dict" not in state:
            log.warning("resume=auto: skipping %s, which is not a training checkpoint", path)
            continue
        readable.append((_step(state), path.stat().st_mtime, path))
    for _, _, path in sorted(readable, reverse=True):
        bad = nonfinite_tensor(load_checkpoint(path, allow_pickle=allow_pickle, mmap=True)["state_dict"])
        if bad is None:
            return path
        log.warning("skipping checkpoint %s: its weights hold NaN or Inf (%s)", path, bad)
    return None


# Settings a resumed run may change: where files go, what is logged and reported, and how long it
# trains. Anything else would train one thing and record another.
MAY_CHANGE_ON_RESUME = (
    "resume", "paths", "logger", "report", "checkpoint.allow_pickle", "teacher.store_dir", "teacher_cache.dir",
    "trainer.max_epochs", "trainer.enable_progress_bar",
)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


RUN_DIR_KEY = "trainer.default_root_dir"  # the run directory, which every other run path lies under


def _moved_run_dir(before: dict[str, Any], now: dict[str, Any]) -> Callable[[Any], Any]:
    """Maps a saved value to what it is when the run directory is the new one: a checkpoint resumed
    in another directory (``checkpoint.resume_from``) keeps its settings, not its paths."""
    old, new = before.get(RUN_DIR_KEY), now.get(RUN_DIR_KEY)
    if not isinstance(old, str) or not isinstance(new, str) or old == new:
        return lambda v: v
    old, new = old.rstrip("/"), new.rstrip("/")
    return lambda v: new + v[len(old):] if isinstance(v, str) and (v == old or v.startswith(old + "/")) else v


def resume_changes(path: Path, saved: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, list[Any]]:
    """What differs between the config that wrote checkpoint ``path`` and ``config``, which resumes from it.

    Args:
        path: The checkpoint, for messages.
        saved: The resolved config stored in it by ``RunSettings`` (None for a checkpoint from
            before kd stored it: nothing can be compared).
        config: This run's resolved config.

    Returns:
        The changed keys of ``MAY_CHANGE_ON_RESUME``, each with ``[before, now]``.

    Raises:
        ConfigError: Naming every other changed key with both values.
    """
    if saved is None:
        log.warning("resume: %s does not record the settings it was trained with; they cannot be compared", path)
        return {}
    before, now = _flat(saved), _flat(config)
    moved = _moved_run_dir(before, now)
    changed = {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now))
               if moved(before.get(k)) != now.get(k)}
    allowed = {k: v for k, v in changed.items() if any(k == p or k.startswith(p + ".") for p in MAY_CHANGE_ON_RESUME)}
    if before.get(RUN_DIR_KEY) != now.get(RUN_DIR_KEY):
        allowed[RUN_DIR_KEY] = [before.get(RUN_DIR_KEY), now.get(RUN_DIR_KEY)]
    refused = [f"{k}={v[0]!r} (now {v[1]!r})" for k, v in changed.items() if k not in allowed]
    if refused:
        more = f", +{len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError("resume", f"{path} was written by a run with other settings: {', '.join(refused[:6])}{more}; "
                          "resume with the settings the run started with, or start a new run in a new directory "
                          "(only paths, logger, report and trainer.max_epochs may change on resume)")
    return allowed


class RunSettings(L.Callback):
    """Writes the run's settings into every checkpoint (``checkpoint["kd"]``), for ``resume_changes``.

    Args:
        config: The run's resolved config.
        overrides: The command-line overrides the run was started with.
        resumes: The resumes so far, each with its checkpoint, step, overrides and changed keys.
    """

    def __init__(self, config: dict[str, Any], overrides: list[str], resumes: list[dict[str, Any]]) -> None:
        self.record = {"config": config, "overrides": list(overrides), "resumes": list(resumes)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["kd"] = self.record


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the run's seed and ``parts`` (rank, epoch, batch): well spread, stable."""
    text = "/".join(str(int(p)) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def seed_all(seed: int) -> None:
    """Seeds Python's, NumPy's, torch's CPU and every CUDA generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CUDA too (lazily, when it is not initialized yet)


class StepSeeds(L.Callback):
    """Re-seeds every global generator from (run seed, rank, epoch, batch) before each training batch.

    So what a step draws (dropout, CRD's negatives, a method's noise) is a function of the seed
    and the step alone, not of everything drawn before it: a run resumed from a checkpoint of step
    ``s`` draws in step ``s + 1`` what the uninterrupted run drew, whatever Lightning did in between
    (a sanity check, a new epoch's iterator). Epoch starts are seeded from (seed, rank, epoch)
    likewise, for callbacks that draw there. Keep it first among the callbacks.

    Args:
        seed: The run's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_all(step_seed(self.seed, trainer.global_rank, trainer.current_epoch, -1))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # by batch, not optimizer step: the batches accumulated into one step draw differently
        seed_all(step_seed(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx))
