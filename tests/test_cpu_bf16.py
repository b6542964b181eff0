"""bf16 on a CPU without native bf16 is refused before training; the benchmark skips it there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from kd.errors import ConfigError
from kd.training import cpu_bf16 as cb
from kd.training.run import run

ZEN4 = {"cpu_name": "AMD EPYC", "architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True,
        "amx_bf16": False}
ZEN2 = {"cpu_name": "AMD EPYC", "architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False,
        "amx_bf16": False}
SAPPHIRE = {"cpu_name": "Intel Xeon", "architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
GRAVITON = {"cpu_name": "Neoverse-V1", "architecture": "aarch64"}


@pytest.mark.parametrize(("features", "capability", "isa", "native", "says"), [
    (ZEN4, "AVX512", "", True, "AVX-512-BF16"),
    (SAPPHIRE, "AVX512", "", True, "AVX-512-BF16/AMX-BF16"),
    (ZEN2, "AVX2", "", False, "no AVX-512-BF16/AMX"),
    # the instructions are there, but torch or oneDNN is told not to use them
    (ZEN4, "AVX2", "", False, "AVX-512-BF16 present but not used"),
    (ZEN4, "AVX512", "AVX2", False, "ONEDNN_MAX_CPU_ISA=AVX2"),
    (ZEN4, "AVX512", "avx512_core_bf16", True, "ONEDNN_MAX_CPU_ISA"),
    (GRAVITON, "SVE256", "", True, "aarch64"),  # off x86 kd does not guess
])
def test_native_bf16_is_read_from_the_cpu_and_what_torch_dispatches_to(features, capability, isa, native, says) -> None:
    support = cb.cpu_bf16(features, capability, isa)
    assert support.native is native
    assert says in support.description and f"capability {capability}" in support.description


def test_this_machine_has_an_answer() -> None:
    support = cb.cpu_bf16()
    assert torch.backends.cpu.get_cpu_capability() in support.description


@pytest.fixture
def avx2_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # the CPU of the test, not the machine's limits
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cb, "cpu_features", lambda: dict(ZEN2))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


def test_bf16_on_a_cpu_without_it_is_refused_before_anything_is_written(make_cfg, avx2_cpu, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        run(make_cfg("trainer.precision=bf16-mixed"))
    message = str(err.value)
    assert message.startswith("trainer.precision: bf16-mixed on a CPU without native bf16 (AMD EPYC, torch capability AVX2")
    assert "trainer.precision=32-true" in message and "speed.emulated_bf16=true" in message
    assert "\n" not in message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))
    assert not (tmp_path / "outputs" / "teachers").exists()  # refused before the teacher trained


def test_a_teacher_recipe_in_bf16_is_refused_before_the_teacher_trains(make_cfg, avx2_cpu, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^teacher\.recipe\.trainer\.precision: bf16-true on a CPU without native bf16"):
        run(make_cfg("teacher.recipe.trainer.precision=bf16-true", f"teacher.store_dir={tmp_path / 'store'}"))
    assert not list((tmp_path / "store").glob("*/teacher.pt"))


def test_fp32_a_gpu_or_the_override_are_not_refused(avx2_cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    cb.check_cpu_bf16("trainer", "32-true", "cpu", allow=False)
    cb.check_cpu_bf16("trainer", "bf16-mixed", "gpu", allow=False)
    cb.check_cpu_bf16("trainer", "bf16-mixed", "cpu", allow=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^trainer.precision: bf16-true"):  # accelerator=auto without a GPU is the CPU
        cb.check_cpu_bf16("trainer", "bf16-true", "auto", allow=False)


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("kd_benchmark_script", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_benchmark_skips_the_bf16_variants_on_a_cpu_without_native_bf16(avx2_cpu, monkeypatch, capsys) -> None:
    bench = _benchmark()
    run_bf16, line = bench.bf16_plan(torch.device("cpu"), force=False)
    assert not run_bf16
    assert line.startswith("cpu: AMD EPYC, torch capability AVX2, no AVX-512-BF16/AMX") and "bf16 variants skipped" in line
    assert bench.bf16_plan(torch.device("cpu"), force=True)[0]
    # main() measures neither a bf16 peak nor a bf16 variant there, and names the CPU on top
    peaks, timed = [], []
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: peaks.append(dtype) or 1e9)
    monkeypatch.setattr(bench, "plain_loop", lambda *a: 0.01)
    monkeypatch.setattr(bench, "step_flops", lambda *a: 1e6)

    def kd_loop(cfg, *args):
        timed.append(str(cfg.trainer.precision))
        return 0.01, {}

    monkeypatch.setattr(bench, "kd_loop", kd_loop)
    bench.main(["--workload", "mlp"])
    assert peaks == [torch.float32]
    assert timed == ["32-true", "32-true"]  # (ii) and (iv')
    out = capsys.readouterr().out
    assert out.startswith("cpu: AMD EPYC, torch capability AVX2") and "bf16 variants skipped" in out
    assert "(ii) kd default" in out and "(iv') kd + teacher cache" in out and "bf16 + c" not in out
