"""The compression report of a run: what the teacher, the dense student and the compressed
student cost and score, measured on the artifacts that would be deployed.

For each model: parameters, non-zero parameters, sparsity, the size on disk of its serialized
``torch.export`` program, CPU latency at each batch size (the median of repeated timed runs after
warm-up, in the process's current thread count), and test accuracy. Latency is timed on the
program loaded back from disk, so what is timed is what ships; int8 programs run eagerly here
(dequantize, then fp32 kernels), which is slower than after lowering to x86 int8 kernels with
``torch.compile`` (``kd.compress.pt2e.lower_for_x86``, measured by the benchmark script).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd.compress.artifacts import export_program, file_size, load_artifact
from kd.models.build import count_parameters


def count_weights(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)`` of a model, each shared tensor counted once."""
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())  # parameters() dedupes
    return count_parameters(model), nonzero


@torch.no_grad()
def latency_ms(
    model: Callable[[Tensor], Tensor], input_shape: Sequence[int], batch_size: int, *, warmup: int, repeats: int
) -> float:
    """Median wall time in milliseconds of one forward pass on a random batch, on the CPU.

    Args:
        model: The model (in eval mode) or a loaded artifact.
        input_shape: Shape of one input ``(C, H, W)``.
        batch_size: Inputs per forward pass.
        warmup: Untimed passes first (allocator, lazy initialisation).
        repeats: Timed passes; the median is returned.
    """
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def measure(
    name: str,
    *,
    counts: tuple[int, int],
    artifact: Path,
    input_shape: Sequence[int],
    test_acc: float | None,
    batch_sizes: Iterable[int],
    warmup: int,
    repeats: int,
    **extra: Any,
) -> dict[str, Any]:
    """One row of the report.

    Args:
        name: Row name (``teacher``, ``student_dense``, ``student_compressed``).
        counts: ``count_weights`` of the model (for an int8 student, of the model before
            conversion: conversion keeps the count and the zeros).
        artifact: Its serialized ``torch.export`` program; timed after loading it back.
        input_shape: Shape of one input.
        test_acc: Its test accuracy, measured by the caller.
        batch_sizes: Batch sizes to time.
        warmup: Untimed passes before timing.
        repeats: Timed passes per batch size.
        **extra: More fields for the row.
    """
    total, nonzero = counts
    model = load_artifact(artifact)
    return {
        "name": name,
        "params": total,
        "nonzero_params": nonzero,
        "sparsity": round(1.0 - nonzero / total, 6) if total else 0.0,
        "artifact": str(artifact),
        "size_bytes": file_size(artifact),
        "latency_ms": {
            f"b{b}": round(latency_ms(model, input_shape, b, warmup=warmup, repeats=repeats), 4) for b in batch_sizes
        },
        "test_acc": test_acc,
        **extra,
    }


def measure_unsaved(name: str, model: nn.Module, input_shape: Sequence[int], **kwargs: Any) -> dict[str, Any]:
    """``measure`` for a model that is not kept as an artifact: exported to a temporary file."""
    with tempfile.TemporaryDirectory(prefix="kd-report-") as tmp:
        path = export_program(model, tuple(input_shape), Path(tmp) / f"{name}.pt2")
        row = measure(name, counts=count_weights(model), artifact=path, input_shape=input_shape, **kwargs)
    row["artifact"] = None
    return row


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Dense student over compressed student: size and latency (> 1 means the compressed one wins)."""
    by_name = {r["name"]: r for r in rows}
    dense, small = by_name.get("student_dense"), by_name.get("student_compressed")
    if not dense or not small:
        return {}
    out = {"size": round(dense["size_bytes"] / small["size_bytes"], 3)}
    for key, ms in small["latency_ms"].items():
        if ms > 0:
            out[f"latency_{key}"] = round(dense["latency_ms"][key] / ms, 3)
    if dense["nonzero_params"]:
        out["nonzero_params"] = round(dense["nonzero_params"] / max(1, small["nonzero_params"]), 3)
    return out


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table, for the end of the log."""
    rows = report["rows"]
    keys = list(rows[0]["latency_ms"]) if rows else []
    header = ("model", "params", "non-zero", "sparsity", "size", *[f"ms@{k[1:]}" for k in keys], "test acc")
    lines = [header]
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f}" if r.get("test_acc") is not None else "-"
        lines.append((
            r["name"], f"{r['params']:,}", f"{r['nonzero_params']:,}", f"{100 * r['sparsity']:.1f}%",
            _size(r["size_bytes"]), *[f"{r['latency_ms'][k]:.3f}" for k in keys], acc,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "-" * len(text[0]))
    notes = [f"latency: median of {report['repeats']} runs after {report['warmup']} warm-up, "
             f"{report['threads']} CPU thread(s), eager torch.export programs loaded from disk"]
    for r in rows:
        if r.get("fake_quant_test_acc") is not None:
            notes.append(f"{r['name']}: test acc of the fake-quantized model it was converted from "
                         f"{100 * r['fake_quant_test_acc']:.2f}")
        if r.get("dense_epoch") is not None:
            notes.append(f"{r['name']}: the student after {r.get('dense_step')} optimizer steps (epoch {r['dense_epoch']}), "
                         "just before compression first changed it")
    if report.get("ratios"):
        notes.append("dense / compressed: " + ", ".join(f"{k} x{v:g}" for k, v in report["ratios"].items()))
    return "\n".join(["compression report", *text, *notes])
