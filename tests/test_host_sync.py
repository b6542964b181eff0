"""The training step reads nothing back from the device: on a GPU it would wait for the kernels.

On the CPU nothing waits, so these tests count what would: every conversion of a tensor to a
Python value (``item``, ``bool``, ``int``, ``float``, ``tolist``, ``nonzero``, ``cpu``, ``numpy``) made
while a training step runs (forward, loss, backward, optimizer step), on the default run and on the
CIFAR fast path (teacher cache, in-memory batches), and, for every method in conf/distill, also
the ATen ops that make a GPU hand values to the host (``DeviceWaits``: ``nonzero``, ``unique``,
boolean-mask indexing, ...). torch's optimizers are left out: their step counters live on the CPU
on a GPU too. On a GPU, ``test_a_gpu_training_step_never_synchronises`` runs steps under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
@pytest.mark.parametrize(("column", "fast"), [("kd", False), ("kd", True), ("crd", False), ("dkd", False)],
                         ids=["default", "cache_fast_data", "crd", "dkd"])
def test_a_gpu_training_step_never_synchronises(make_cfg, tmp_path: Path, tmp_path_factory, monkeypatch,
                                                column: str, fast: bool) -> None:
    monkeypatch.setitem(sys.modules, "kd_test_host_sync", sys.modules[__name__])
    shared = tmp_path_factory.getbasetemp() / "gpu_sync"  # one dataset and teacher for every column
    root = shared / "data" if (shared / "data").exists() else write_cifar(shared / "data", dataset="cifar100",
                                                                          n_train=200, n_test=20, labels_used=8)
    store = shared / "teachers"
    extra = (f"cifar_row={column}", f"teacher.store_dir={store}",
             *(("data.fast=true", "teacher_cache.enabled=true") if fast else ()))
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


aten = torch.ops.aten
SIZE_FROM_VALUES = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten.histc.default,
                    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                    aten.equal.default}  # their output (or result) depends on the values: CUDA hands them to the host
PROBE_FRAMES = {"counted", "__torch_dispatch__", "checked_on_the_host_only"}  # the probes' own wrappers
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class DeviceWaits(TorchDispatchMode):
    """Records the ATen ops of a training step that make the host wait for a GPU: a value read into
    Python (``_local_scalar_dense``: ``item``, ``bool``, ``int``) and the ops whose output size
    depends on the values (``nonzero``, ``unique``, ``masked_select``, indexing by a boolean mask,
    ``repeat_interleave`` without ``output_size``). On the CPU they cost nothing, so the probe works
    at the ATen level, below every library. Not counted: torch's optimizers (their step counters
    stay on the CPU) and ``F.one_hot``'s range checks, which CUDA leaves to a device assert."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.in_one_hot = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        waits = func in SIZE_FROM_VALUES or (func is aten._local_scalar_dense.default and not self.in_one_hot)
        if func is aten.repeat_interleave.Tensor:
            waits = kwargs.get("output_size") is None
        if func in BOOL_INDEXED:
            waits = any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if waits:
            frames = [f for f in traceback.extract_stack() if not (f.filename == __file__ and f.name in PROBE_FRAMES)
                      and ("torch/" not in f.filename or "torch/optim/" in f.filename)]
            if "torch/optim/" not in frames[-1].filename:  # the optimizer's own code (the step runs in its closure)
                where = next((f"{f.filename}:{f.lineno}" for f in reversed(frames) if "/kd/" in f.filename
                              or "/tests/" in f.filename), "outside kd")
                self.seen.append(f"{func} from {where} (innermost: {frames[-1].filename}:{frames[-1].lineno})")
        return func(*args, **kwargs)


class WaitsProbe(L.Callback):
    """Runs training steps 1 and after under ``DeviceWaits`` (step 0 builds things once)."""

    mode: DeviceWaits | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= 1:
            WaitsProbe.mode.__enter__()
            self.entered = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if getattr(self, "entered", False):
            WaitsProbe.mode.__exit__(None, None, None)
            self.entered = False

    def on_exception(self, trainer: L.Trainer, *args: object) -> None:
        self.on_train_batch_end(trainer)


@pytest.fixture
def device_waits(monkeypatch: pytest.MonkeyPatch) -> DeviceWaits:
    monkeypatch.setitem(sys.modules, "kd_test_host_sync", sys.modules[__name__])
    mode = WaitsProbe.mode = DeviceWaits()
    one_hot = torch.nn.functional.one_hot

    def checked_on_the_host_only(tensor, num_classes=-1):  # CUDA skips the checks when num_classes is given
        mode.in_one_hot = num_classes != -1
        try:
            return one_hot(tensor, num_classes)
        finally:
            mode.in_one_hot = False

    monkeypatch.setattr(torch.nn.functional, "one_hot", checked_on_the_host_only)
    return mode


METHODS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "distill").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_no_methods_training_step_makes_a_gpu_wait(make_cfg, host_reads: list[str], device_waits: DeviceWaits,
                                                   tmp_path_factory, method: str) -> None:
    """Every method's step on the default experiment, under both probes: the Python-level reads
    (``HostReads``: ``tolist``, ``cpu``, ``numpy`` copy without an ATen op on the CPU) and the ATen ops."""
    store = tmp_path_factory.getbasetemp() / "host_sync_teachers"  # the teachers, trained once for all methods
    results = run(make_cfg(f"distill={method}", "+callbacks.waits._target_=kd_test_host_sync.WaitsProbe", *PROBE,
                           "report.enabled=false", f"teacher.store_dir={store}"))
    assert results["status"] == "completed"
    assert (host_reads, device_waits.seen) == ([], []), method


def test_the_device_wait_probe_sees_an_op_sized_by_values(make_cfg, device_waits: DeviceWaits, monkeypatch) -> None:
    import kd.losses.crd

    update = kd.losses.crd.update_memory

    def deduplicated(memory, index, emb, momentum):  # as CRD's bank update did before: unique() first
        torch.unique(index, return_inverse=True)
        update(memory, index, emb, momentum)

    monkeypatch.setattr(kd.losses.crd, "update_memory", deduplicated)
    run(make_cfg("distill=crd", "+callbacks.waits._target_=kd_test_host_sync.WaitsProbe", *PROBE, "report.enabled=false"))
    assert device_waits.seen and all("_unique2" in s and "tests/test_host_sync.py" in s for s in device_waits.seen)
