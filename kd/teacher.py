"""Where a run's teacher comes from: a checkpoint, the teacher store, or training it now.

The store (``paths.teacher_dir``, ``outputs/teachers/`` by default) keys each teacher by a hash
of everything that decides its weights: the teacher's model config, the data config, its
training recipe (optimizer, scheduler, epochs, seed) and the trainer settings that change
training. Every run of a sweep that asks for the same teacher reuses one entry. An entry is
written to a temporary directory and renamed into place when complete, under a file lock, so a
reader never sees half of one and two runs never train the same teacher at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

import kd
from kd.errors import ConfigError
from kd.fit import evaluate, fit
from kd.models.build import build_model, count_parameters
from kd.module import DistillationModule
from kd.results import write_json_atomic

log = logging.getLogger(__name__)

STORE_FORMAT = 1
# Settings that change how a run looks or where it writes, not the weights it ends with.
_COSMETIC_TRAINER_KEYS = {
    "_target_", "default_root_dir", "enable_progress_bar", "enable_model_summary",
    "log_every_n_steps", "num_sanity_val_steps", "enable_checkpointing", "accelerator",
    "profiler", "logger", "callbacks", "barebones",
}
_COSMETIC_DATA_KEYS = {"num_workers", "eval_batch_size", "pin_memory", "persistent_workers", "root", "data_dir"}
_PLACEHOLDER_DIR = "<teacher-run>"


@dataclass
class TeacherInfo:
    """Where the teacher came from and how good it is.

    Attributes:
        source: ``"checkpoint"`` (given by path), ``"store"`` (reused) or ``"trained"`` (now).
        path: The weights file.
        params: Number of parameters.
        metrics: Val and test metrics on this run's data.
        key: The store key, for store and trained teachers.
    """

    source: str
    path: str
    params: int
    metrics: dict[str, float]
    key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """The config of the run that trains ``cfg``'s teacher: same data and trainer, no teacher.

    The teacher becomes the student, the loss plain cross-entropy, and the optimizer, scheduler,
    epochs and seed come from ``teacher.recipe``.
    """
    tcfg = copy.deepcopy(cfg)
    recipe = cfg.teacher.recipe
    with open_dict(tcfg):
        tcfg.model.student = cfg.model.teacher
        tcfg.distill = {"_target_": "kd.losses.CrossEntropy"}
        tcfg.optimizer = recipe.optimizer
        tcfg.scheduler = recipe.get("scheduler")
        tcfg.trainer.max_epochs = recipe.max_epochs
        tcfg.seed = recipe.seed
        tcfg.paths.output_dir = _PLACEHOLDER_DIR
    return tcfg


def store_key(tcfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The store key of a teacher run config, and the resolved config it hashes."""
    def resolved(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    trainer = {k: v for k, v in resolved(tcfg.trainer).items() if k not in _COSMETIC_TRAINER_KEYS}
    data = {k: v for k, v in resolved(tcfg.data).items() if k not in _COSMETIC_DATA_KEYS}
    keyed = {
        "format": STORE_FORMAT,
        "model": resolved(tcfg.model.student),
        "data": data,
        "criterion": resolved(tcfg.distill),
        "optimizer": resolved(tcfg.optimizer),
        "scheduler": resolved(tcfg.get("scheduler")),
        "seed": tcfg.seed,
        "trainer": trainer,
    }
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()
    name = str(keyed["model"].get("_target_", "model")).rsplit(".", 1)[-1].lower()
    return f"{name}-{digest[:12]}", keyed


def load_weights(net: nn.Module, path: Path, key: str = "teacher.ckpt") -> None:
    """Loads a checkpoint into ``net``: a plain state_dict, or a Lightning checkpoint of a kd run.

    Loading uses ``weights_only=True``: no pickled code runs. From a kd checkpoint the student's
    weights are taken (a kd run's student, or a teacher run, whose student is the teacher).

    Raises:
        ConfigError: If the file is missing, unreadable, or of another architecture.
    """
    if not path.is_file():
        raise ConfigError(
            key, f"file not found: {path} (give an existing checkpoint, or set {key}=null "
            "to reuse or train a teacher from the store)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(key, f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {first})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(key, f"{path} holds no state_dict of tensors")
    if any(k.startswith("student.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
        for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part for part in (
                f"size mismatch for {wrong[0]}" if wrong else "",
                f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
            ) if part
        )
        raise ConfigError(
            key, f"{path} does not fit model.teacher ({type(net).__name__}): {details}; "
            "pick the model/teacher config it was trained with"
        )
    net.load_state_dict(state)


def resolve_teacher(
    cfg: DictConfig, datamodule: L.LightningDataModule
) -> tuple[nn.Module, TeacherInfo]:
    """Builds the teacher and gives it weights: from ``teacher.ckpt``, the store, or training.

    Everything that can be checked is checked before a teacher is trained.

    Raises:
        ConfigError: On a bad checkpoint, a model that does not fit the data, or when no
            teacher is available and ``teacher.train_if_missing`` is false.
    """
    shape = tuple(datamodule.input_shape)
    net = build_model(cfg.model.teacher, key="model.teacher", num_classes=datamodule.num_classes, input_shape=shape)
    if cfg.teacher.ckpt:
        path = Path(cfg.teacher.ckpt)
        load_weights(net, path)
        metrics = evaluate(cfg, _as_student(net, datamodule.num_classes), datamodule) if cfg.teacher.get("evaluate", True) else {}
        log.info("teacher loaded from %s", path)
        return net, TeacherInfo("checkpoint", str(path), count_parameters(net), metrics)

    tcfg = teacher_run_config(cfg)
    key, keyed = store_key(tcfg)
    store = Path(cfg.teacher.store_dir)
    entry = store / key
    trained = False
    if not (entry / "meta.json").is_file():
        if not cfg.teacher.train_if_missing:
            raise ConfigError(
                "teacher.ckpt", f"no teacher given and none stored at {entry}; give "
                "teacher.ckpt=PATH or set teacher.train_if_missing=true"
            )
        store.mkdir(parents=True, exist_ok=True)
        with FileLock(str(store / f"{key}.lock")):
            if not (entry / "meta.json").is_file():  # another run may have trained it meanwhile
                _train_into_store(tcfg, keyed, datamodule, entry)
                trained = True
    meta = json.loads((entry / "meta.json").read_text())
    load_weights(net, entry / "teacher.pt", key=f"teacher store entry {entry}")
    if not trained:
        log.info(
            "reusing stored teacher %s (trained %s, val acc %.4f, test acc %.4f)",
            entry, meta["created"], meta["metrics"].get("val/acc", float("nan")),
            meta["metrics"].get("test/acc", float("nan")),
        )
    source = "trained" if trained else "store"
    return net, TeacherInfo(source, str(entry / "teacher.pt"), count_parameters(net), meta["metrics"], key)


def _as_student(net: nn.Module, num_classes: int) -> DistillationModule:
    """Wraps a network for evaluation only (the optimizer factory is never called)."""
    from kd.losses import CrossEntropy

    return DistillationModule(net, CrossEntropy(), optimizer=torch.optim.SGD, num_classes=num_classes)


def _train_into_store(tcfg: DictConfig, keyed: dict[str, Any], datamodule: L.LightningDataModule, entry: Path) -> None:
    """Trains the teacher of a teacher run config and moves the finished entry to ``entry``."""
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    run_dir = tmp / "run"
    with open_dict(tcfg):
        tcfg.paths.output_dir = str(run_dir)
    log.info("no stored teacher %s: training it now (%s epochs)", entry.name, tcfg.trainer.max_epochs)
    start = time.time()
    L.seed_everything(tcfg.seed, workers=True)
    net = build_model(
        tcfg.model.student, key="model.teacher", num_classes=datamodule.num_classes,
        input_shape=tuple(datamodule.input_shape),
    )
    result = fit(
        tcfg,
        student=net,
        criterion=instantiate(tcfg.distill),
        datamodule=datamodule,
        teacher=None,
        callbacks=[ModelCheckpoint(
            dirpath=run_dir / "checkpoints", monitor="val/acc", mode="max",
            filename="epoch{epoch:03d}-step{step}", auto_insert_metric_name=False,
        )],
        loggers=[CSVLogger(str(run_dir), name="csv", version="")],
    )
    torch.save(result.module.student.state_dict(), tmp / "teacher.pt")
    meta = {
        "key": entry.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kd_version": kd.__version__,
        "train_time_s": round(time.time() - start, 2),
        "params": count_parameters(net),
        "selected": result.selected,
        "best_epoch": result.best_epoch,
        "metrics": result.metrics,
        "final_metrics": result.final_metrics,
        "config": keyed,
    }
    write_json_atomic(tmp / "meta.json", meta)
    if entry.exists():  # an incomplete entry (no meta.json) left by hand: replace it
        shutil.rmtree(entry)
    os.replace(tmp, entry)
    log.info("stored teacher %s (val acc %.4f, test acc %.4f)", entry, meta["metrics"].get("val/acc", float("nan")), meta["metrics"].get("test/acc", float("nan")))
