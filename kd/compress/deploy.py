"""The end of every run: the deployable student, its artifacts, and the compression report.

After ``fit`` has loaded the selected weights, the compression callbacks finalize the student
(pruning masks made permanent, the fake-quantized model converted to int8), the result is saved
as a ``torch.export`` program (``student.pt2``, and ``student.onnx`` for fp32 students), loaded
back and measured next to the teacher and the dense student.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from kd.compress.artifacts import export_onnx, export_program, load_artifact, quantized_part
from kd.compress.base import Compression, dense_snapshot
from kd.compress.evaluate import evaluate_model
from kd.compress.report import count_weights, measure, measure_unsaved, ratios

log = logging.getLogger(__name__)

STUDENT_PROGRAM = "student.pt2"
STUDENT_ONNX = "student.onnx"


def deploy_and_report(
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    teacher_test_acc: float | None,
    student_test_acc: float | None,
    callbacks: Sequence[Compression],
    datamodule: L.LightningDataModule,
    input_shape: tuple[int, ...],
    output_dir: Path,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 20,
    onnx: bool = True,
    measure_teacher: bool = True,
    test_batches: int | None = None,
) -> dict[str, Any]:
    """Finalizes the student, writes its artifacts and measures teacher, dense and compressed models.

    Args:
        student: The trained student holding the selected weights (changed in place by the
            callbacks' ``finalize``; do not train it afterwards).
        teacher: The frozen teacher, or None.
        teacher_test_acc: The teacher's measured test accuracy, if known.
        student_test_acc: Test accuracy of the selected student as trained (fake-quantized
            when QAT ran).
        callbacks: The run's compression callbacks, in finalization order.
        datamodule: The data; its test split scores the dense snapshot and the int8 student.
        input_shape: Shape of one input.
        output_dir: The run directory; ``student.pt2`` (and ``student.onnx``) are written there.
        batch_sizes: Batch sizes at which latency is timed.
        warmup: Untimed passes before timing.
        repeats: Timed passes per batch size.
        onnx: Whether to also write ``student.onnx`` when the deployed student is fp32.
        measure_teacher: Whether to export and time the teacher too.
        test_batches: Score on this many test batches only (``trainer.limit_test_batches``), so
            every row is scored on the same images as the run's own test metrics.

    Returns:
        The report: ``rows`` (one per model), ``ratios`` (dense / compressed), the callbacks'
        summaries and the timing settings.
    """
    timing = {"batch_sizes": list(batch_sizes), "warmup": warmup, "repeats": repeats}
    student = student.eval()
    counts = count_weights(student)  # before conversion, which keeps count and zeros
    deployed = student
    for cb in callbacks:
        deployed = cb.finalize(deployed, input_shape)
    deployed = deployed.cpu()
    program = export_program(deployed, input_shape, output_dir / STUDENT_PROGRAM)
    quantized = quantized_part(deployed) is not None
    artifacts = {"program": str(program)}
    if onnx and not quantized:
        artifacts["onnx"] = str(export_onnx(deployed, input_shape, output_dir / STUDENT_ONNX))

    loader = datamodule.test_dataloader()

    def test() -> Iterable[Any]:
        return loader if test_batches is None else islice(loader, test_batches)

    rows: list[dict[str, Any]] = []
    if teacher is not None and measure_teacher:
        if teacher_test_acc is None:
            teacher_test_acc = float(evaluate_model(teacher.cpu().eval(), test())["test/acc"])
        rows.append(measure_unsaved("teacher", teacher.cpu().eval(), input_shape, test_acc=teacher_test_acc, **timing))
    if not callbacks:
        rows.append(measure("student", counts=counts, artifact=program, input_shape=input_shape,
                            test_acc=student_test_acc, **timing))
    else:
        dense, epoch, step = dense_snapshot(callbacks)
        if dense is not None:
            dense = dense.cpu().eval()
            acc = float(evaluate_model(dense, test())["test/acc"])
            rows.append(measure_unsaved("student_dense", dense, input_shape, test_acc=acc, dense_epoch=epoch,
                                        dense_step=step, **timing))
        # the deployed student is scored from its artifact, loaded back: what ships is what is scored
        deployed_acc = float(evaluate_model(load_artifact(program), test())["test/acc"])
        extra = {"fake_quant_test_acc": student_test_acc} if quantized else {}
        rows.append(measure("student_compressed", counts=counts, artifact=program, input_shape=input_shape,
                            test_acc=deployed_acc, int8=quantized, **extra, **timing))
    return {
        "rows": rows,
        "ratios": ratios(rows),
        "compression": [cb.summary() for cb in callbacks],
        "artifacts": artifacts,
        "threads": torch.get_num_threads(),
        **timing,
    }
