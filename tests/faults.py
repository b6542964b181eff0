"""Faults injected into real runs by tests, as Lightning callbacks a config can name (``+callbacks.fault``),
and ``kd_train``, which runs ``kd-train`` in a process of its own (so a fault can kill it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]


def kd_train(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``kd-train *args`` in a fresh process writing under ``tmp_path``; its exit status (-9: SIGKILL) and output.

    ``env`` adds variables to a copy of this process's environment without its ``SLURM_*``/``PL_*`` ones.
    """
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_"))}
    env.update(KD_OUTPUT_ROOT=str(tmp_path / "outputs"), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **extra)
    done = subprocess.run([str(Path(sys.executable).with_name("kd-train")), *args], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    return done.returncode, done.stdout


class KillAt(L.Callback):
    """SIGKILLs its own process once, right after optimizer step ``step``, before any checkpoint of it.

    Lightning runs checkpoint callbacks last, so the step's own checkpoint is never written: the
    run loses the steps since its last checkpoint, as a preempted or crashed job does. ``marker``
    is written first, so the same command run again (to resume) is not killed.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = int(step), Path(marker)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(f"killed after step {self.step}, epoch {trainer.current_epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class PreemptAt(L.Callback):
    """Preempts its own process once, after optimizer step ``step``, as SLURM does.

    SLURM first sends the signal asked for with ``--signal=USR1@90`` (Lightning's SLURM
    environment handles it: it writes ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``), then
    kills the job. ``marker`` is written first, so the requeued job is not preempted again.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = int(step), Path(marker)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(f"preempted after step {self.step}\n")
            os.kill(os.getpid(), signal.SIGUSR1)  # Python runs Lightning's handler before the next line
            os.kill(os.getpid(), signal.SIGKILL)


class NaNAt(L.Callback):
    """Makes loss term ``term`` NaN at optimizer step ``step``, as an overflow or a log(0) would.

    The criterion's output is replaced for that one step: the training module sees a real NaN
    in the term's tensor, where a diverging run would produce it.
    """

    def __init__(self, step: int, term: str) -> None:
        self.step, self.term = int(step), term

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        criterion = pl_module.criterion  # type: ignore[attr-defined]
        if trainer.global_step != self.step:
            criterion.__dict__.pop("forward", None)  # back to the class's forward
            return
        forward = type(criterion).forward

        def poisoned(*a: object, **k: object) -> dict:
            terms = forward(criterion, *a, **k)
            terms[self.term] = terms[self.term] * float("nan")
            return terms

        criterion.forward = poisoned


class KillInReport(L.Callback):
    """SIGKILLs its own process once, as the end-of-run report starts: after ``student.pt`` is written,
    before the report's exports and ``results.json``.

    ``marker`` is written first, so the same command run again (to resume) is not killed.
    """

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import kd.training.run

        def killed(**kwargs: object) -> dict:
            self.marker.write_text("killed as the report started\n")
            os.kill(os.getpid(), signal.SIGKILL)
            return {}

        if not self.marker.exists():
            kd.training.run.deploy_and_report = killed  # type: ignore[assignment]


def flip_bytes(path: Path, count: int = 64) -> str:
    """Flips ``count`` bytes in the middle of the largest tensor record of a torch zip file, as a bad
    sector or a faulty copy would; the file stays a valid zip. Returns the record's name."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - count // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename
