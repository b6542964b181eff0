"""``hydra/launcher=concurrent``: the runs of a sweep several at a time on one device.

A CIFAR student's step leaves an H200 mostly idle between kernel launches, so a sweep's runs go
faster side by side than one after the other. The launcher is Hydra's joblib launcher (one loky
process per run at once); the runs share the teacher store and the teacher-output cache, which
the first run that needs them builds under a file lock while the others wait and then read it.

``hydra.launcher.n_jobs=0`` (the default of ``conf/hydra/launcher/concurrent.yaml``) sizes the
number of runs at once before the sweep starts (``SizeConcurrentRuns``): on a GPU, a probe run of
the sweep's common config (a few steps, in its own process, under ``<paths.root>/probes/``) measures
one run's peak device memory, and as many runs start together as fit in the free memory, with
each process's CUDA context and a margin; on a CPU, one run per two cores. A number sets it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from kd.errors import ConfigError

log = logging.getLogger(__name__)

CUDA_CONTEXT = 600 * 2**20  # device memory each process's CUDA context takes beside its tensors
MARGIN = 0.85  # of the free memory: allocator fragmentation, evaluation and checkpoint peaks
PROBE_STEPS = 20


def runs_that_fit(free: int, peak: int, cap: int, margin: float = MARGIN, context: int = CUDA_CONTEXT) -> int:
    """How many runs of peak device memory ``peak`` fit in ``free`` bytes: at least 1, at most ``cap``.

    Args:
        free: Free device memory in bytes (``torch.cuda.mem_get_info``).
        peak: One run's measured peak (the caching allocator's reserved bytes).
        cap: The most runs worth starting (the sweep's jobs, the CPU cores that feed them).
        margin: The share of ``free`` to fill.
        context: What each process takes beside its tensors (its CUDA context).
    """
    return max(1, min(int(cap), int(free * margin) // (int(peak) + context)))


def common_overrides(task: list[str]) -> list[str]:
    """The overrides of a sweep that every job shares: those that sweep nothing (no ``a,b``, glob, range...)."""
    sweeping = ("glob(", "range(", "choice(", "interval(", "tag(", "sort(", "shuffle(")
    return [o for o in task if "," not in o.partition("=")[2] and not any(s in o for s in sweeping)]


def probe_peak(overrides: list[str], run_dir: Path) -> int:
    """One run's peak device memory: ``kd-train`` with ``overrides`` for a few steps in a process of its own.

    Raises:
        ConfigError: When the probe run fails (its output's last line says why).
    """
    probe = [*overrides, "trainer.max_epochs=1", f"trainer.limit_train_batches={PROBE_STEPS}", "trainer.limit_val_batches=2",
             "trainer.limit_test_batches=2", "report.enabled=false", "logger=none", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, "-m", "kd.cli.train", *probe], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "KD_VERBOSE": "0"})
    results = run_dir / "results.json"
    if done.returncode != 0 or not results.is_file():
        last = (done.stdout.strip().splitlines() or ["no output"])[-1]
        raise ConfigError("hydra.launcher.n_jobs", f"0 (as many runs as fit) measures one run first, and that run "
                          f"failed ({last}); fix it, or give the number of runs at once, e.g. hydra.launcher.n_jobs=4")
    peak = json.loads(results.read_text()).get("peak_memory_bytes")
    if not peak:
        raise ConfigError("hydra.launcher.n_jobs", "the probe run recorded no peak device memory (not on a GPU?); "
                          "give the number of runs at once, e.g. hydra.launcher.n_jobs=4")
    return int(peak)


def free_device_memory() -> tuple[int, int]:
    """The current GPU's (free, total) bytes, asked in a process of its own.

    ``torch.cuda.mem_get_info`` creates a CUDA context (about 0.5 GiB of device memory) that stays
    for the life of the process; asked here, the launcher would hold one for the whole sweep.

    Raises:
        ConfigError: When no GPU answers.
    """
    ask = "import torch; print(*torch.cuda.mem_get_info())"
    done = subprocess.run([sys.executable, "-c", ask], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    words = done.stdout.split()
    if done.returncode != 0 or len(words) != 2 or not all(w.isdigit() for w in words):
        last = (done.stdout.strip().splitlines() or ["no output"])[-1]
        raise ConfigError("hydra.launcher.n_jobs", f"0 (as many runs as fit) reads the GPU's free memory, and that "
                          f"failed ({last}); give the number of runs at once, e.g. hydra.launcher.n_jobs=4")
    return int(words[0]), int(words[1])


class SizeConcurrentRuns(Callback):
    """Sets ``hydra.launcher.n_jobs`` of the concurrent launcher when it is 0: as many runs as fit."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if "joblib" not in str(launcher.get("_target_", "")) or launcher.get("n_jobs") not in (0, "0"):
            return
        n = self.size(config)
        with read_write(config.hydra.launcher):
            config.hydra.launcher.n_jobs = n

    @staticmethod
    def size(config: DictConfig) -> int:
        import torch

        cores = os.cpu_count() or 1
        accelerator = str(config.trainer.get("accelerator", "auto"))
        if accelerator in ("cpu",) or not torch.cuda.is_available():
            n = max(1, cores // 2)
            log.info("concurrent launcher: %d runs at once (one per two of %d CPU cores)", n, cores)
            return n
        # outside the sweep directory, where kd-table would count it as a run of the sweep
        probe_dir = Path(config.paths.root) / "probes" / Path(str(config.hydra.sweep.dir)).name
        log.info("concurrent launcher: measuring one run's peak memory in %s (%d steps; a teacher not yet stored "
                 "is trained first, once for the whole sweep)", probe_dir, PROBE_STEPS)
        peak = probe_peak(common_overrides(list(config.hydra.overrides.task)), probe_dir)
        free, total = free_device_memory()  # after the probe (and a teacher it trained) has let go of the GPU
        n = runs_that_fit(free, peak, cap=max(1, cores - 1))
        log.info("concurrent launcher: %d runs at once: %.1f of %.1f GiB free, one run's peak %.2f GiB + CUDA context",
                 n, free / 2**30, total / 2**30, peak / 2**30)
        return n
