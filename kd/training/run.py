"""``run(cfg)``: one kd experiment, from a composed config to ``results.json``, as a pipeline.

prepare (build and check everything) -> teacher (loaded, stored or trained now) -> fit (the
method's stages, then distillation) -> record (``student.pt``) -> report (the deployable student:
exported, measured) -> complete (``results.json``, written last). Each step is a function of its
own; this file reads top to bottom.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kd.compress.deploy import deploy_and_report
from kd.compress.report import format_report
from kd.errors import ConfigError, Diverged, Terminated
from kd.models.build import count_parameters
from kd.results import STUDENT_WEIGHTS, RunRecord, run_dir_state, save_atomic, summary_table, task_overrides
from kd.teacher.source import Teacher, get_teacher
from kd.training.chain import run_chain
from kd.training.checkpoints import find_resume
from kd.training.fit import FitResult, fit
from kd.training.loggers import abort_wandb_run, finish_loggers, start_loggers
from kd.training.prepare import Job, prepare, stage_trainer
from kd.training.protocol import protocol_record

log = logging.getLogger(__name__)


def run(cfg: DictConfig, finish: Callable[[Job, FitResult], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Runs one experiment: builds and checks everything, gets a teacher, trains, records, reports.

    Every input is checked before anything trains (``kd.training.prepare``). A teacher that is
    needed but neither given nor stored is trained first (``kd.teacher.source``). ``results.json``
    with ``status: completed`` is written last, after every artifact: a run killed before it
    stays resumable. A run that raises leaves its record: ``results.json`` with
    ``status: failed`` when it diverged, ``failure.json`` otherwise.

    A config with ``chain`` runs a chain of such runs, this one the last (``kd.training.chain``).

    Args:
        cfg: A config composed from ``conf/train.yaml``.
        finish: Called after training with the job and its fit; what it returns is added to
            ``results.json`` (a chain's ``chain`` entry).

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError: On bad input, before training starts.
        Diverged: When a loss term became NaN or Inf.
        Terminated: On SIGTERM (exit status 143); the run stays resumable.
    """
    _quiet()
    if OmegaConf.select(cfg, "chain"):
        return run_chain(cfg, run)
    record = RunRecord(Path(cfg.paths.output_dir), task_overrides())
    job: Job | None = None
    try:
        job = prepare(cfg)
        record.method, record.seed, record.overrides = type(job.criterion).__name__, job.seed, job.history["overrides"]
        teacher = teacher_of(cfg, job)
        # data order and dropout must not depend on whether the teacher was trained in this run
        L.seed_everything(job.seed, workers=True, verbose=False)
        start_loggers(job.loggers, job.resolved)
        result = fit(
            student=job.student, criterion=job.criterion, datamodule=job.datamodule,
            teacher=teacher.net if teacher else None, trainer=job.trainer, optimization=job.optimization,
            features=job.features, make_stage_trainer=stage_trainer(cfg),
            teacher_cache=teacher.cache if teacher else None, channels_last=bool(cfg.speed.channels_last),
            compile=cfg.speed.compile, fused_optimizer=bool(cfg.speed.fused_optimizer), resume=job.resume, peers=job.peers,
            finite_check_every=cfg.speed.finite_check_every,
        )
        record_run(record, job, teacher, result)
        if finish is not None:
            record.fields.update(finish(job, result))
        if job.trainer.is_global_zero and cfg.report.enabled:
            report(cfg.report, record, job, teacher, result)
        results = complete(record, job)
        finish_loggers(job.loggers, results)
        record.clear_failure()
        return results
    except SIGTERMException as e:
        stopped = terminated(record, job)
        record_failure(record, job, stopped)
        raise stopped from e
    except Exception as e:
        record_failure(record, job, e)
        raise


def teacher_of(cfg: DictConfig, job: Job) -> Teacher | None:
    """The run's frozen teacher (or ensemble): loaded, taken from the store, or trained now; None without one."""
    if job.teacher is None:
        return None
    device = job.trainer.strategy.root_device
    return get_teacher(cfg, job.datamodule, job.teacher, job.features[1], device)  # type: ignore[arg-type]


def record_run(record: RunRecord, job: Job, teacher: Teacher | None, result: FitResult) -> None:
    """Writes the selected student's weights; gathers what ``results.json`` will hold (not written yet)."""
    output_dir = Path(record.run_dir)
    weights = output_dir / STUDENT_WEIGHTS
    student = result.module.student  # the compression callbacks may have replaced it
    test_size = len(job.datamodule.test_dataloader().dataset)
    every = (result.metrics, result.final_metrics, *result.ensemble.values(),
             *(m for peer in result.peers.values() for m in (peer["metrics"], peer["final_metrics"])))
    for metrics in every:  # misclassified test images, as papers count them
        if "test/acc" in metrics:
            metrics["test/errors"] = round((1.0 - metrics["test/acc"]) * test_size)
    splits = getattr(job.datamodule, "splits", None) or {}
    val_is_test = "val" in splits and splits["val"] is splits.get("test")  # protocol=paper
    selected = "best_test_epoch" if val_is_test and result.selected == "best_val" else result.selected
    record.fields.update({
        "world_size": job.trainer.world_size,
        # the device memory the run's caching allocator held at most (GPU runs; sizes hydra/launcher=concurrent)
        "peak_memory_bytes": int(torch.cuda.max_memory_reserved()) if torch.cuda.is_initialized() else None,
        "protocol": protocol_record(job.resolved, len(splits["train"]) if "train" in splits else None,
                                    0 if val_is_test else len(splits.get("val") or ()), str(job.trainer.precision),
                                    result.metrics, result.final_metrics),
        "data": {
            "name": type(job.datamodule).__name__, "num_classes": job.datamodule.num_classes,
            "input_shape": list(job.datamodule.input_shape), "test_size": test_size,
        },
        "teacher": teacher.info.as_dict() if teacher else None,
        "stages": result.stages,
        "student": {
            "params": count_parameters(student), "weights": str(weights), "selected": selected,
            "best_epoch": result.best_epoch, "epochs": result.epochs, "checkpoint": result.best_checkpoint,
            "metrics": result.metrics, "final_metrics": result.final_metrics,
        },
        **({"resumes": job.history["resumes"]} if job.history["resumes"] else {}),
        **({"peers": {name: {"params": count_parameters(job.peers[name]), "weights": str(peer_weights(output_dir, name)),
                             **{k: v for k, v in peer.items() if k != "state_dict"}, "epochs": result.epochs}
                      for name, peer in result.peers.items()}, "ensemble": result.ensemble} if result.peers else {}),
        "config": job.resolved,
    })
    if job.trainer.is_global_zero:
        # the selected student alone, as trained: no teacher, no auxiliary modules of the method
        save_atomic(student.state_dict(), weights)
        for name, peer in result.peers.items():  # each peer's, loadable alone like student.pt (kd-eval)
            save_atomic(peer["state_dict"], peer_weights(output_dir, name))


def peer_weights(run_dir: Path, name: str) -> Path:
    """Where a peer's selected weights go: ``<run>/peers/<name>/student.pt``."""
    return run_dir / "peers" / name / STUDENT_WEIGHTS


def complete(record: RunRecord, job: Job) -> dict[str, Any]:
    """Writes ``results.json`` with ``status: completed``, the last file of a run; prints the summary.

    Only the first process writes; every process returns the same record.
    """
    if not job.trainer.is_global_zero:
        return {**record.header("completed"), **record.fields}
    results = record.write("completed")
    print(summary_table(results), flush=True)
    rep = results.get("report")
    if rep is not None:
        print(f"compression report failed: {rep['error']} (results.json has the rest)" if "error" in rep
              else format_report(rep), flush=True)
    return results


def report(node: DictConfig, record: RunRecord, job: Job, teacher: Teacher | None, result: FitResult) -> None:
    """Exports and measures the deployable student (``kd.compress.deploy``), for ``results.json``.

    Training is done: a report that fails is recorded as an error, the rest of the results kept.
    """
    limit = job.trainer.limit_test_batches
    try:
        rep = deploy_and_report(
            student=result.module.student, teacher=teacher.net if teacher else None,
            student_test_acc=result.metrics.get("test/acc"),
            teacher_test_acc=teacher.info.metrics.get("test/acc") if teacher else None,
            callbacks=job.compressions, datamodule=job.datamodule, input_shape=tuple(job.datamodule.input_shape),
            output_dir=Path(record.run_dir), batch_sizes=list(node.latency.batch_sizes), warmup=node.latency.warmup,
            repeats=node.latency.repeats, onnx=node.onnx, measure_teacher=node.teacher,
            test_batches=limit if isinstance(limit, int) else None,
        )
    except Exception as e:  # noqa: BLE001 - training is done; its results must survive
        log.exception("the compression report failed")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        rep = {"error": f"{type(e).__name__}: {first}"}
    record.fields["report"] = rep


def terminated(record: RunRecord, job: Job | None) -> Terminated:
    """The error of a run stopped by SIGTERM: where it stopped, and where ``resume=auto`` continues."""
    step = job.trainer.global_step if job is not None else 0
    found = find_resume(record.run_dir, allow_pickle=job.allow_pickle if job is not None else False)
    after = f"after step {step}" if step else "before its first training step"
    then = (f"the same command with resume=auto continues from {found}" if found is not None
            else "no checkpoint was written yet: the same command starts it again")
    return Terminated(f"terminated by SIGTERM {after}; {then}")


def record_failure(record: RunRecord, job: Job | None, error: BaseException) -> None:
    """Leaves the record of a run that raised, closes an open W&B run.

    A divergence is a finished run: ``results.json`` with ``status: failed``, the term and step,
    and the last good checkpoint (``kd-table`` lists it as failed; the directory is not reused).
    Any other error leaves ``failure.json``, so a sweep's table lists the job and the same
    command can run again in the directory once the cause is fixed; except a start refused
    before it trained in a directory whose run has checkpoints (a resume with other settings):
    that run stays as it was, resumable.
    """
    abort_wandb_run()
    if job is None and isinstance(error, ConfigError) and run_dir_state(record.run_dir).checkpoints:
        return  # a start refused before it trained: the run it would have continued is recorded as it was
    if isinstance(error, Diverged) and job is not None and job.trainer.is_global_zero:
        last_good = find_resume(record.run_dir, allow_pickle=job.allow_pickle)
        record.write("failed", error=str(error), diverged=error.as_dict(), last_good_checkpoint=str(last_good or ""),
                     config=job.resolved)
    record.write_failure(error)  # never beside a results.json


def _quiet() -> None:
    """Silences warnings that are noise for kd's in-memory data and short runs."""
    for pattern in (
        ".*does not have many workers.*",
        ".*is smaller than the logging interval.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*module\\(s\\) in eval mode at the start of training.*",  # the frozen teacher
    ):
        warnings.filterwarnings("ignore", pattern)
