"""bf16 on a CPU that computes it without native instructions: refused before anything trains.

On an x86 CPU without AVX-512-BF16 or AMX (an AVX2-only AMD EPYC, for instance), torch computes a
bf16 matmul by converting in software: about 75x slower than fp32 (1.3 vs 99 GFLOP/s at 512x512,
torch 2.15; ``scripts/benchmark.py`` prints the peaks of the machine it runs on). A run under
``trainer.precision=bf16-mixed`` there is tens of times slower without a word, so kd refuses it
with one line naming the CPU; ``speed.emulated_bf16=true`` insists.

What torch dispatches to counts, not only what the CPU has: ``ATEN_CPU_CAPABILITY=avx2`` or
``ONEDNN_MAX_CPU_ISA=AVX2`` make an AVX-512-BF16 CPU compute bf16 as an AVX2 one does (the README's
AVX2 table is measured that way). On other architectures (ARM) kd does not guess and lets bf16 run.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

import torch

from kd.errors import ConfigError

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) from which on it has bf16 instructions
_ONEDNN_BF16 = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU does with bf16.

    Attributes:
        native: Whether torch computes bf16 with native instructions here (or, off x86, whether kd
            cannot tell, in which case it assumes so).
        description: The CPU, torch's capability and its bf16 instructions, for messages and tables.
    """

    native: bool
    description: str


def cpu_features() -> dict[str, Any]:
    """The CPU's name and instruction-set flags as torch reads them (``torch._C._cpu``), or {}."""
    probe = getattr(torch._C._cpu, "_get_cpu_capability", None)
    try:
        return dict(probe()) if probe is not None else {}
    except Exception:  # a torch without the probe, or one that cannot read cpuid
        return {}


def cpu_bf16(features: dict[str, Any] | None = None, capability: str | None = None,
             onednn_isa: str | None = None) -> CpuBf16:
    """Whether torch computes bf16 natively on this CPU, and the CPU in words.

    Args:
        features: The CPU's flags (``cpu_features()`` by default).
        capability: torch's CPU capability (``torch.backends.cpu.get_cpu_capability()`` by default).
        onednn_isa: oneDNN's ISA limit (``$ONEDNN_MAX_CPU_ISA`` by default).

    Returns:
        ``native`` and a ``description`` such as ``AMD EPYC, torch capability AVX2, no AVX-512-BF16/AMX``.
    """
    features = cpu_features() if features is None else features
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")) if onednn_isa is None else onednn_isa
    arch = str(features.get("architecture") or platform.machine()).lower()
    name = str(features.get("cpu_name") or platform.processor() or arch or "this CPU")
    if arch not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return CpuBf16(True, f"{name} ({arch}), torch capability {capability}")
    has = [label for flag, label in (("avx512_bf16", "AVX-512-BF16"), ("amx_bf16", "AMX-BF16")) if features.get(flag)]
    limited = [f"torch capability {capability}"]
    if onednn_isa:
        limited.append(f"ONEDNN_MAX_CPU_ISA={onednn_isa}")
    isa_ok = not onednn_isa or onednn_isa.upper() in _ONEDNN_BF16
    native = bool(has) and capability.upper().startswith("AVX512") and isa_ok
    if native:
        return CpuBf16(True, f"{name}, {', '.join(limited)}, {'/'.join(has)}")
    why = "/".join(has) + " present but not used" if has else "no AVX-512-BF16/AMX"
    return CpuBf16(False, f"{name}, {', '.join(limited)}, {why}")


def runs_on_cpu(accelerator: Any) -> bool:
    """Whether a Trainer with this ``accelerator`` setting trains on the CPU."""
    name = str(getattr(accelerator, "__name__", accelerator) or "auto").lower()
    if name in ("cpu", "cpuaccelerator"):
        return True
    if name == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return False


def emulated_bf16(cfg: Any) -> bool:
    """``speed.emulated_bf16`` of a run config: whether bf16 runs on a CPU without native bf16 anyway."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(cfg, "speed.emulated_bf16", default=False))


def check_cpu_bf16(key: str, precision: Any, accelerator: Any, allow: bool, support: CpuBf16 | None = None) -> None:
    """Refuses a bf16 precision on a CPU without native bf16.

    Args:
        key: The trainer's config key (``trainer``, ``teacher.recipe.trainer``), for the message.
        precision: The trainer's precision setting (``bf16-mixed``, ``bf16-true``, ``32-true``, ...).
        accelerator: The trainer's accelerator setting.
        allow: ``speed.emulated_bf16``: run bf16 anyway.
        support: The CPU's bf16 support (``cpu_bf16()`` by default).

    Raises:
        ConfigError: ``<key>.precision: bf16 on <CPU> ...``, naming the faster setting and the override.
    """
    if allow or "bf16" not in str(precision) or not runs_on_cpu(accelerator):
        return
    support = cpu_bf16() if support is None else support
    if support.native:
        return
    raise ConfigError(f"{key}.precision", f"{precision} on a CPU without native bf16 ({support.description}) runs "
                      f"tens of times slower than fp32: use {key}.precision=32-true (faster here), or "
                      "speed.emulated_bf16=true to run bf16 anyway")
