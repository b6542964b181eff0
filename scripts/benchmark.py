"""Training throughput of kd against the plain PyTorch KD loop of the reference repos, one table.

For each workload, in one process, on generated data of the real shapes and on-disk formats:

(i)   plain: the loop of RepDistiller / mdistiller: a torchvision dataset read from its files with
      PIL transforms in a DataLoader, fp32, the teacher's forward at every step (``no_grad``),
      KD loss, SGD;
(ii)  kd's default path: the experiment's composed config, ``DistillationModule`` in a
      Lightning ``Trainer`` (metrics and loss terms logged every step as in a run);
(iii) kd + ``trainer.precision=bf16-mixed`` + ``speed.channels_last=true``;
(iv)  (iii) + ``teacher_cache.enabled=true`` + ``data.fast=true``: the teacher's outputs read
      from the exact cache (built first, its build timed), batches rendered from memory;
(iv') the same in fp32 (no bf16, no channels_last), to separate what the cache and fast data give;
(v)   on a GPU: ``speed.fast=true`` (cache, fast data, fused optimizer, channels-last) in bf16;
(vi)  on a GPU: (v) + ``speed.compile=reduce-overhead`` (CUDA graphs through torch.compile).

Workloads: Hinton's MLP pair (784-1200-1200-10 -> 784-800-800-10, T=20) on MNIST-shaped data,
and resnet32x4 -> resnet8x4 on CIFAR-100-shaped data at batch 64. Each variant runs ``--warmup``
steps, then ``--steps`` timed steps (data loading included). It prints samples/s, the ratio to
(i), peak memory (the kernel's high-water mark of the resident set above its level before the
variant; CUDA: peak allocated), and the achieved FLOP/s of the step (FLOPs counted by ``torch.utils.flop_counter``)
against a matmul peak this script measures itself, fp32 or bf16 as the variant computes. On a
GPU, ``syncs/step`` counts the host synchronisations of a training step (forward, loss, backward,
optimizer step) that CUDA reports under ``torch.cuda.set_sync_debug_mode("warn")``, over the
warm-up steps after the first (untimed: the warnings cost time).

``--concurrent N`` (default 4 on a GPU, off on a CPU) then runs the fastest cached variant in N
processes at once on the same device (as ``hydra/launcher=concurrent`` runs a sweep) and reports
their step time side by side, against the same variant alone.

Then the cost of an 8-run temperature sweep of the standard 240-epoch CIFAR-100 recipe (45,000
training images after kd's validation split, batch 64): plain = 8 runs x 240 epochs x steps x
(i)'s step time; cached = the cache's construction (45,000 x 162 views x the per-view cost
measured while building it here) + 8 x 240 x steps x (iv)'s step time. Teacher forwards are
counted for both. With ``--concurrent N``: concurrent = the build + ceil(8 / N) x 240 x steps x the
step time of N runs at once. And one 240-epoch run, cache build included: the build + 240 x steps
x the fastest variant's step time. On a CPU without native bf16 (no AVX-512-BF16 or AMX) the bf16 variants (iii)
and (iv) are skipped (kd refuses bf16 there; ``--bf16`` measures them anyway) and the sweep uses (iv').
The first line names the CPU and torch's capability: a CPU timing means little without them.
Not a test: the numbers depend on the machine and its load.

Usage:
    .venv/bin/python scripts/benchmark.py                      # both workloads, CPU
    .venv/bin/python scripts/benchmark.py --workload cifar --steps 10 --warmup 2
    .venv/bin/python scripts/benchmark.py --device cuda         # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from torch import nn  # noqa: E402

WORKLOADS = {
    "mlp": {
        "title": "Hinton MLP 784-1200-1200-10 -> 784-800-800-10, MNIST-shaped (1x28x28), batch 128",
        "overrides": ["experiment=hinton_mnist", "data.val_size=512"],
        "n_train": 6144, "views": 1,
    },
    "cifar": {
        "title": "resnet32x4 -> resnet8x4, CIFAR-100-shaped (3x32x32), batch 64",
        # 96 images of 32 labels: kd holds 32 out for validation and trains on 64, one batch
        "overrides": ["experiment=cifar100_resnet32x4_resnet8x4", "data.val_size=32"],
        "n_train": 96, "views": 162,
    },
}
# kd's variants: label, overrides, whether it computes in bf16, whether it reads the teacher cache, GPU only
VARIANTS = [
    ("(ii) kd default", [], False, False, False),
    ("(iii) kd + bf16 + channels_last", ["trainer.precision=bf16-mixed", "speed.channels_last=true"], True, False, False),
    ("(iv) kd + bf16 + cl + teacher cache + fast data", ["trainer.precision=bf16-mixed", "speed.channels_last=true",
                                                         "data.fast=true"], True, True, False),
    ("(iv') kd + teacher cache + fast data, fp32", ["data.fast=true"], False, True, False),
    ("(v) kd speed.fast, bf16", ["trainer.precision=bf16-mixed", "speed.fast=true"], True, True, True),
    ("(vi) (v) + compile reduce-overhead", ["trainer.precision=bf16-mixed", "speed.fast=true",
                                            "speed.compile=reduce-overhead"], True, True, True),
]
SWEEP = {"runs": 8, "epochs": 240, "n_train": 45_000, "batch": 64, "views": 162}


# --- measuring ------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory above the level at start: CUDA's peak allocation, or the process's peak resident set.

    On the CPU the kernel's high-water mark is reset (``/proc/self/clear_refs``) and read back
    (``VmHWM``): no sampling thread, which would take a core from the 2 that torch computes on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self._base = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self.peak = self._status("VmHWM") - self._base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an ``n x n`` matmul, the best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@dataclass
class Result:
    name: str
    samples_per_s: float
    step_s: float
    peak_bytes: int
    flops_per_step: float
    bf16: bool
    syncs_per_step: float | None = None
    notes: list[str] = field(default_factory=list)


class SyncCount:
    """Counts the host synchronisations CUDA reports between ``begin`` and ``end`` (on a GPU only).

    Used as a context around the loop: ``torch.cuda.set_sync_debug_mode("warn")`` turns each
    synchronising operation into a warning, recorded here.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.count, self.steps = 0, 0

    def __enter__(self) -> SyncCount:
        self._context = warnings.catch_warnings(record=True)
        self._log = self._context.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: object) -> None:
        self.count = sum("synchroniz" in str(w.message) for w in self._log)
        self._context.__exit__(*exc)

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")

    def end(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self.steps += 1

    @property
    def per_step(self) -> float | None:
        return self.count / self.steps if self.cuda and self.steps else None


class StepTimer(L.Callback):
    """Times Lightning steps from the start of step ``warmup`` to the end of the last one; counts the
    host synchronisations of the warm-up steps after the first (``syncs``)."""

    def __init__(self, warmup: int, steps: int, device: torch.device, syncs: SyncCount | None = None) -> None:
        self.warmup, self.total, self.device = warmup, warmup + steps, device
        self.seen, self.start, self.end = 0, 0.0, 0.0
        self.syncs = syncs

    def _counted(self) -> bool:
        return self.syncs is not None and 1 <= self.seen < self.warmup

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._counted():
            self.syncs.begin()  # type: ignore[union-attr]

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._counted():
            self.syncs.end()  # type: ignore[union-attr]
        self.seen += 1
        if self.seen == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()  # data loading of the next step is inside the window
        if self.seen == self.total:
            sync(self.device)
            self.end = time.perf_counter()
            trainer.should_stop = True


# --- (i) the plain loop ---------------------------------------------------------------------------

def plain_loop(workload: str, data_root: Path, teacher: nn.Module, student: nn.Module, batch: int,
               temperature: float, warmup: int, steps: int, device: torch.device,
               syncs: SyncCount | None = None) -> float:
    """Seconds per step of the reference repos' loop, after ``warmup`` steps (``syncs`` counts the
    host synchronisations of the warm-up steps after the first)."""
    from torchvision import datasets, transforms

    if workload == "cifar":
        transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
        ])
        from kd.data.cifar import _DATASETS  # torchvision's CIFAR100, without the md5 check generated files fail

        dataset = _DATASETS["cifar100"](str(data_root), train=True, transform=transform)
    else:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        dataset = datasets.MNIST(str(data_root), train=True, transform=transform)
    # full batches only, so that every timed step is one of `batch` samples
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
    teacher.eval().to(device)
    student.train().to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    done, start = 0, 0.0
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            counted = syncs is not None and 1 <= done < warmup
            if counted:
                syncs.begin()  # type: ignore[union-attr]
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kl = F.kl_div(F.log_softmax(s_logits / temperature, 1), F.softmax(t_logits / temperature, 1),
                          reduction="batchmean") * temperature**2
            loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if counted:
                syncs.end()  # type: ignore[union-attr]
            done += 1
            if done == warmup:
                sync(device)
                start = time.perf_counter()
            if done == warmup + steps:
                sync(device)
                return (time.perf_counter() - start) / steps


# --- (ii)-(iv) kd -----------------------------------------------------------------------------------

def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kd.cli import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def kd_loop(cfg: Any, teacher_state: dict[str, torch.Tensor], student_state: dict[str, torch.Tensor],
            warmup: int, steps: int, device: torch.device, cache_dir: Path | None) -> tuple[float, dict[str, Any]]:
    """Seconds per step of kd's training loop on ``cfg`` (the teacher's weights given), and notes."""
    from kd.errors import instantiate_checked
    from kd.models.build import build_model
    from kd.teacher.cache import open_cache
    from kd.training.fit import build_optimization
    from kd.training.method import prepare_method
    from kd.training.module import DistillationModule
    from kd.training.speed import apply_speed

    with open_dict(cfg):
        cfg.trainer.accelerator = "gpu" if device.type == "cuda" else "cpu"
    apply_speed(cfg)  # speed.fast: what applies here (fused optimizer, channels-last on a GPU)
    L.seed_everything(0, verbose=False)
    datamodule = instantiate_checked(cfg.data, "data")
    criterion = instantiate_checked(cfg.distill, "distill")
    fits = {"num_classes": datamodule.num_classes, "input_shape": tuple(datamodule.input_shape)}
    student = build_model(cfg.model.student, key="model.student", **fits)
    teacher = build_model(cfg.model.teacher, key="model.teacher", **fits)
    student.load_state_dict(student_state)
    teacher.load_state_dict(teacher_state)
    if not criterion.requires_teacher:  # as kd's runs: the student trained alone runs no teacher
        teacher = None
    student_fx, teacher_fx = prepare_method(criterion, student, teacher, datamodule)
    optimizer, scheduler = build_optimization(cfg)
    notes: dict[str, Any] = {}
    cache = None
    if cache_dir is not None:
        t0 = time.perf_counter()
        cache = open_cache(teacher_fx, datamodule.splits["train"], cache_dir, batch_size=256, verify=0, device=device)
        built = cache.meta["build_time_s"]
        notes = {"build_s": built, "views": cache.num_samples * cache.num_views,
                 "per_view_s": built / (cache.num_samples * cache.num_views), "open_s": time.perf_counter() - t0}
    module = DistillationModule(
        student=student, criterion=criterion, optimizer=optimizer, num_classes=datamodule.num_classes,
        teacher=teacher, scheduler=scheduler, student_features=student_fx, teacher_features=teacher_fx,
        teacher_cache=cache, channels_last=bool(cfg.speed.channels_last), compile=cfg.speed.compile,
        fused_optimizer=bool(cfg.speed.fused_optimizer),
    )
    syncs = SyncCount(device)
    timer = StepTimer(warmup, steps, device, syncs)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=cfg.trainer.precision,
        max_epochs=10**6, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    with syncs:
        trainer.fit(module, datamodule=datamodule)
    if syncs.per_step is not None:
        notes["syncs_per_step"] = syncs.per_step
    return (timer.end - timer.start) / steps, notes


def step_flops(teacher: nn.Module, student: nn.Module, x: torch.Tensor, with_teacher: bool) -> float:
    """FLOPs of one training step: teacher forward (unless cached) + student forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        if with_teacher:
            with torch.no_grad():
                teacher.eval()(x)
        student.train()(x).sum().backward()
    student.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# --- the table ------------------------------------------------------------------------------------

def run_workload(name: str, root: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from kd.models.build import build_model
    from tests.datagen import write_cifar, write_mnist

    spec = WORKLOADS[name]
    data_root = root / name
    if name == "cifar":
        write_cifar(data_root, n_train=spec["n_train"], n_test=100, labels_used=32)
    else:
        write_mnist(data_root, n_train=spec["n_train"], n_test=100)
    base = [*spec["overrides"], f"data.root={data_root}"]
    cfg = compose(base)
    shape, classes = (3, 32, 32) if name == "cifar" else (1, 28, 28), 100 if name == "cifar" else 10
    torch.manual_seed(0)
    teacher = build_model(cfg.model.teacher, key="model.teacher", num_classes=classes, input_shape=shape)
    student = build_model(cfg.model.student, key="model.student", num_classes=classes, input_shape=shape)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_state = {k: v.clone() for k, v in student.state_dict().items()}
    batch, temperature = int(cfg.data.batch_size), float(cfg.distill.temperature)
    x = torch.randn(batch, *shape)
    flops_full, flops_cached = step_flops(teacher, student, x, True), step_flops(teacher, student, x, False)
    student.load_state_dict(s_state)

    results = []
    print(f"\n{spec['title']}: {args.warmup} warm-up + {args.steps} timed steps per variant", flush=True)
    with PeakMemory(device) as mem, SyncCount(device) as syncs:
        step = plain_loop(name, data_root, teacher, student, batch, temperature, args.warmup, args.steps, device, syncs)
    results.append(Result("(i) plain PyTorch loop, fp32", batch / step, step, mem.peak, flops_full, False, syncs.per_step))
    print(f"  {results[-1].name}: {step:.3f} s/step", flush=True)
    variants = [v for v in VARIANTS if (args.bf16 or not v[2]) and (device.type == "cuda" or not v[4])]
    notes: dict[str, Any] = {}
    for label, overrides, bf16, cache, _ in variants:
        vcfg = compose([*base, *overrides])
        with PeakMemory(device) as mem:
            step, info = kd_loop(vcfg, t_state, s_state, args.warmup, args.steps, device,
                                 root / "cache" if cache else None)
        syncs = info.pop("syncs_per_step", None)
        notes = info or notes
        results.append(Result(label, batch / step, step, mem.peak, flops_cached if cache else flops_full, bf16, syncs))
        print(f"  {label}: {step:.3f} s/step", flush=True)
    workload = {"name": name, "title": spec["title"], "results": results, "cache": notes, "batch": batch}
    if args.concurrent > 1:
        cached = {v[0]: v[1] for v in variants if v[3]}
        label = min((r for r in results if r.name in cached), key=lambda r: r.step_s).name  # the fastest cached path
        overrides = cached[label]
        states = root / f"{name}-states"
        states.mkdir(exist_ok=True)
        torch.save(t_state, states / "teacher.pt")
        torch.save(s_state, states / "student.pt")
        spec_child = {"overrides": [*base, *overrides], "teacher": str(states / "teacher.pt"),
                      "student": str(states / "student.pt"), "cache": str(root / "cache"), "device": str(device),
                      "warmup": args.warmup, "steps": args.steps}
        alone = next(r for r in results if r.name == label)
        workload["concurrent"] = {"label": label, "alone_s": alone.step_s, "n": args.concurrent,
                                  **run_concurrently(spec_child, args.concurrent, root)}
        c = workload["concurrent"]
        print(f"  {label}, {c['n']} runs at once: {c['step_s']:.3f} s/step each (alone {alone.step_s:.3f})", flush=True)
    return workload


def run_concurrently(spec: dict[str, Any], n: int, root: Path) -> dict[str, float]:
    """Runs ``kd_loop`` of ``spec`` in ``n`` processes at once; their mean step time and largest peak memory."""
    path = root / "concurrent.json"
    path.write_text(json.dumps(spec))
    # each with its share of the CPU cores, as joblib (hydra/launcher=concurrent) gives its workers
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    children = [subprocess.Popen([sys.executable, __file__, "--child", str(path)], stdout=subprocess.PIPE, text=True,
                                 env=env) for _ in range(n)]
    outs = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    if any(c.returncode for c in children):
        raise RuntimeError(f"a concurrent run failed: {[c.returncode for c in children]}")
    return {"step_s": sum(o["step_s"] for o in outs) / n, "peak_bytes": max(o["peak"] for o in outs)}


def child(spec_path: str) -> None:
    """One of ``--concurrent``'s processes: times ``kd_loop`` of the spec, prints ``{"step_s", "peak"}``."""
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    t_state = torch.load(spec["teacher"], weights_only=True)
    s_state = torch.load(spec["student"], weights_only=True)
    with PeakMemory(device) as mem:
        step, _ = kd_loop(compose(spec["overrides"]), t_state, s_state, spec["warmup"], spec["steps"], device,
                          Path(spec["cache"]))
    print(json.dumps({"step_s": step, "peak": mem.peak}), flush=True)


def print_table(workload: dict[str, Any], peaks: dict[bool, float]) -> None:
    rows = workload["results"]
    base = rows[0].samples_per_s
    print(f"\n{workload['title']}")
    print("| variant | samples/s | x (i) | peak memory MB | GFLOP/step | achieved GFLOP/s | of matmul peak | syncs/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        achieved = r.flops_per_step / r.step_s
        peak = peaks[r.bf16]
        print(f"| {r.name} | {r.samples_per_s:.1f} | {r.samples_per_s / base:.2f} | {r.peak_bytes / 2**20:.0f} | "
              f"{r.flops_per_step / 1e9:.2f} | {achieved / 1e9:.1f} | {100 * achieved / peak:.1f}% "
              f"({'bf16' if r.bf16 else 'fp32'}) | {'-' if r.syncs_per_step is None else f'{r.syncs_per_step:.1f}'} |")


def print_sweep(workload: dict[str, Any]) -> None:
    rows = {r.name[: r.name.index(")") + 1]: r for r in workload["results"]}
    fastest = min((k for k in rows if k != "(i)" and k not in ("(ii)", "(iii)")), key=lambda k: rows[k].step_s)
    plain, cached = rows["(i)"].step_s, rows[fastest].step_s
    per_view = workload["cache"]["per_view_s"]
    s = SWEEP
    steps = math.ceil(s["n_train"] / s["batch"])
    plain_s = s["runs"] * s["epochs"] * steps * plain
    build_s = s["n_train"] * s["views"] * per_view
    cached_s = build_s + s["runs"] * s["epochs"] * steps * cached
    print(f"\n{s['runs']}-run temperature sweep, {s['epochs']}-epoch CIFAR-100 recipe ({s['n_train']:,} training images, "
          f"batch {s['batch']}, {steps} steps/epoch), from the measured costs above:")
    print(f"  plain:  {s['runs']} x {s['epochs']} x {steps} steps x {plain:.3f} s = {plain_s / 3600:,.1f} h; "
          f"teacher forwards {s['runs'] * s['epochs'] * s['n_train']:,}")
    print(f"  cached: build {s['n_train']:,} x {s['views']} views x {per_view * 1e3:.2f} ms/view "
          f"(measured: {workload['cache']['views']:,} views in {workload['cache']['build_s']:.1f} s) = {build_s / 3600:,.1f} h")
    print(f"          + {s['runs']} x {s['epochs']} x {steps} steps x {cached:.3f} s {fastest} = {cached_s / 3600:,.1f} h; "
          f"teacher forwards {s['n_train'] * s['views']:,}")
    print(f"  cached / plain = {cached_s / plain_s:.1%} (target <= 40%)")
    one_s = build_s + s["epochs"] * steps * cached
    print(f"  one {s['epochs']}-epoch run, build included: {build_s / 60:,.1f} min + {s['epochs']} x {steps} x {cached:.3f} s "
          f"{fastest} = {one_s / 60:,.1f} min")
    c = workload.get("concurrent")
    if c:
        waves = math.ceil(s["runs"] / c["n"])
        together_s = build_s + waves * s["epochs"] * steps * c["step_s"]
        print(f"  concurrent, {c['n']} at once ({c['label'].split(' ')[0]}): build {build_s / 60:,.1f} min + {waves} x "
              f"{s['epochs']} x {steps} steps x {c['step_s']:.3f} s = {together_s / 60:,.1f} min, against "
              f"{(build_s + s['runs'] * s['epochs'] * steps * c['alone_s']) / 60:,.1f} min one after the other; "
              f"peak memory per run {c['peak_bytes'] / 2**30:.2f} GiB")


def bf16_plan(device: torch.device, force: bool) -> tuple[bool, str]:
    """Whether to run the bf16 variants on ``device``, and the line that says what the machine is.

    On a CPU without native bf16 (``kd.training.cpu_bf16``) a bf16 matmul is emulated, tens of
    times slower than fp32: measuring its peak and the bf16 variants would take minutes and show
    nothing kd would run there (kd refuses bf16 on such a CPU), so they are skipped unless ``force``.
    """
    from kd.training.cpu_bf16 import cpu_bf16

    if device.type != "cpu":
        return True, f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type})"
    support = cpu_bf16()
    line = f"cpu: {support.description}, {torch.get_num_threads()} threads"
    if support.native or force:
        return True, line
    return False, line + ("\nbf16 variants skipped: this CPU has no native bf16 (a bf16 matmul is emulated, tens "
                          "of times slower than fp32; kd refuses bf16 here). --bf16 measures them anyway.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["mlp", "cifar", "both"], default="both")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="measure the bf16 variants on a CPU without native bf16 too")
    parser.add_argument("--concurrent", type=int, default=None,
                        help="runs at once for the concurrent line (default 4 on a GPU, 0: none, on a CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    if args.concurrent is None:
        args.concurrent = 4 if args.device.startswith("cuda") else 0
    device = torch.device(args.device)
    args.bf16, machine = bf16_plan(device, args.bf16)
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    peaks = {False: matmul_peak(device, torch.float32)}
    if args.bf16:
        peaks[True] = matmul_peak(device, torch.bfloat16)
    print(machine)
    print(f"matmul peak: fp32 {peaks[False] / 1e9:.0f} GFLOP/s" + (f", bf16 {peaks[True] / 1e9:.0f} GFLOP/s" if args.bf16 else ""))
    # the CIFAR pair first, each table as soon as its workload is done: a run cut short keeps them
    names = ["cifar", "mlp"] if args.workload == "both" else [args.workload]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            workload = run_workload(name, Path(tmp), args, device)
            print_table(workload, peaks)
            if name == "cifar":
                print_sweep(workload)


if __name__ == "__main__":
    main()
