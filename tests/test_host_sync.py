"""The training step reads nothing back from the device: on a GPU it would wait for the kernels.

On the CPU nothing waits, so these tests count what would: every conversion of a tensor to a
Python value (``item``, ``bool``, ``int``, ``float``, ``tolist``, ``nonzero``, ``cpu``, ``numpy``) made
while a training step runs (forward, loss, backward, optimizer step), on the default run and on the
CIFAR fast path (teacher cache, in-memory batches). torch's optimizers are left out: their step
counters live on the CPU on a GPU too. The GPU test under ``torch.cuda.set_sync_debug_mode("error")``
is in tests/test_gpu.py.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch

from kd.training.run import run
from tests.datagen import write_cifar

# On a GPU the teacher cache is in device memory (TeacherCache.to, at fit start) and rows() indexes
# it there; on the CPU it stays a memory-mapped array that rows() indexes with the batch's indices
# as numpy: CPU-only, not a device read.
CPU_ONLY = {("kd/teacher/cache.py", "rows", "cpu"), ("kd/teacher/cache.py", "rows", "numpy")}
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


class HostReads(L.Callback):
    """Records tensor-to-Python conversions made inside training steps ``start`` and after."""

    seen: list[str] = []

    def __init__(self, start: int = 1) -> None:  # step 0 builds things once (lazy metrics, the guard's record)
        self.start, self.saved = int(start), {}

    def _wrap(self, name: str):
        original = self.saved[name]

        def counted(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]  # the frame that called the conversion
            cpu_only = any(caller.filename.endswith(f) and (caller.name, name) == (fn, m) for f, fn, m in CPU_ONLY)
            if "torch/optim/" not in caller.filename and not cpu_only:
                HostReads.seen.append(f"Tensor.{name} from {caller.filename}:{caller.lineno}")
            return original(tensor, *args, **kwargs)

        return counted

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.start:
            for name in READS:
                self.saved[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._wrap(name))

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        self.saved = {}


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setitem(sys.modules, "kd_test_host_sync", sys.modules[__name__])
    HostReads.seen = []
    return HostReads.seen


PROBE = ("+callbacks.reads._target_=kd_test_host_sync.HostReads", "speed.finite_check_every=1000",
         "checkpoint.every_n_train_steps=1000", "trainer.limit_train_batches=5")


def test_the_default_runs_steps_read_nothing_back(make_cfg, host_reads: list[str]) -> None:
    results = run(make_cfg(*PROBE))
    assert results["status"] == "completed"
    assert host_reads == []
    # the probe sees a read when there is one: the guard read at every step
    run(make_cfg(*PROBE, "speed.finite_check_every=1", run_dir="every_step"))
    assert host_reads and all("kd/training/finite.py" in r for r in host_reads), host_reads


def test_the_cifar_fast_paths_steps_read_nothing_back(make_cfg, host_reads: list[str], tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "data", dataset="cifar100", n_train=120, n_test=20, labels_used=8)
    results = run(make_cfg(
        "experiment=cifar100_resnet32x4_resnet8x4", f"data.root={root}", "data.val_size=40", "data.batch_size=16",
        "data.augment=false", "data.fast=true", "teacher_cache.enabled=true", "report.enabled=false", *PROBE,
    ))
    assert results["status"] == "completed"
    assert list((tmp_path / "outputs" / "teacher_cache").glob("*/meta.json"))  # the steps read the cache
    assert host_reads == []


class SyncErrors(L.Callback):
    """Runs training steps ``start`` and after under ``torch.cuda.set_sync_debug_mode("error")``."""

    def __init__(self, start: int = 1) -> None:
        self.start = int(start)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.start:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True], ids=["default", "cache_fast_data"])
def test_a_gpu_training_step_never_synchronises(make_cfg, tmp_path: Path, monkeypatch, fast: bool) -> None:
    monkeypatch.setitem(sys.modules, "kd_test_host_sync", sys.modules[__name__])
    root = write_cifar(tmp_path / "data", dataset="cifar100", n_train=200, n_test=20, labels_used=8)
    extra = ("data.fast=true", "teacher_cache.enabled=true") if fast else ()
    try:
        results = run(make_cfg(
            "experiment=cifar100_resnet32x4_resnet8x4", "trainer=gpu", f"data.root={root}", "data.val_size=40",
            "data.batch_size=16", "report.enabled=false", "+callbacks.sync._target_=kd_test_host_sync.SyncErrors",
            "speed.finite_check_every=1000", "checkpoint.every_n_train_steps=1000", "trainer.limit_train_batches=8",
            *extra,
        ))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert results["status"] == "completed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_speed_fast_with_cuda_graphs_trains_and_resumes_exactly(tmp_path: Path) -> None:
    import json

    from tests.faults import kd_train

    root = write_cifar(tmp_path / "data", dataset="cifar100", n_train=200, n_test=20, labels_used=8)
    common = ("experiment=cifar100_resnet32x4_resnet8x4", "trainer=gpu", f"data.root={root}", "data.val_size=40",
              "data.batch_size=16", "report.enabled=false", "speed.fast=true", "speed.compile=reduce-overhead",
              "trainer.max_epochs=2", "trainer.limit_train_batches=6", "checkpoint.every_n_train_steps=3",
              "trainer.enable_progress_bar=false", f"teacher.store_dir={tmp_path / 'store'}")
    code, out = kd_train(tmp_path, *common, f"hydra.run.dir={tmp_path / 'whole'}")
    assert code == 0, out
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert whole["peak_memory_bytes"] > 0
    assert whole["config"]["speed"]["fused_optimizer"] and whole["config"]["teacher_cache"]["enabled"]
    # killed after step 8 (epoch 1), resumed from step 6's checkpoint: it ends where the whole run did
    killed = (*common, f"hydra.run.dir={tmp_path / 'part'}", "+callbacks.fault._target_=tests.faults.KillAt",
              "+callbacks.fault.step=8", f"+callbacks.fault.marker={tmp_path / 'killed'}")
    assert kd_train(tmp_path, *killed)[0] == -9
    code, out = kd_train(tmp_path, *killed, "resume=auto")
    assert code == 0, out
    resumed = json.loads((tmp_path / "part" / "results.json").read_text())
    assert resumed["student"]["final_metrics"] == whole["student"]["final_metrics"]
