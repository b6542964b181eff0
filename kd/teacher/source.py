"""Where a run's teacher comes from: a checkpoint, pretrained weights, the teacher store, or training it now.

In this order:

- ``teacher.ckpt=PATH``: a file of weights: a state_dict, a Lightning checkpoint of a kd run, a
  RepDistiller / mdistiller checkpoint (``{"model": state_dict, "epoch": ...}``), or a state_dict
  saved from ``DataParallel`` / DDP (``module.`` keys). Loaded with ``weights_only=True``.
- Pretrained in full: a teacher model built with pretrained weights whose classification head
  fits the data as it is (``model.teacher.weights=IMAGENET1K_V1`` at 1000 classes,
  ``kd.models.timm_model`` with ``pretrained: true``; see ``kd.models.pretrained``) is used as
  is: nothing is trained or stored.
- The store, or training now: any other teacher, a pretrained one whose head was replaced for
  the data's classes included (then it is fine-tuned from its pretrained weights; the store key
  holds the model config, ``weights`` with it).

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
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

import kd
from kd.data.protocol import ViewData
from kd.errors import ConfigError, check_writable_dir, instantiate_checked
from kd.models.build import build_model, count_parameters, model_node
from kd.models.features import FeatureExtractor
from kd.models.pretrained import pretrained_source
from kd.models.weights import load_weights
from kd.results import read_json, save_atomic, write_json_atomic
from kd.teacher.cache import TeacherCache, open_cache
from kd.teacher.ensemble import EnsembleCache, EnsembleExtractor, TeacherEnsemble, ensemble_settings
from kd.training.checkpoints import SafeCheckpointIO
from kd.training.cpu_bf16 import check_cpu_bf16, emulated_bf16
from kd.training.fit import build_optimization, evaluate, fit
from kd.training.module import DistillationModule

log = logging.getLogger(__name__)

STORE_FORMAT = 1
# Trainer settings of the teacher run that do not decide its weights: left out of the store key.
_UNKEYED_TRAINER = {
    "_target_", "default_root_dir", "accelerator", "devices", "num_nodes", "enable_progress_bar",
    "enable_model_summary", "log_every_n_steps", "num_sanity_val_steps", "deterministic",
}
# Settings of the run's trainer that the teacher run inherits (where and how it runs, not what).
_INHERITED_TRAINER = ("_target_", "accelerator", "enable_progress_bar", "log_every_n_steps", "deterministic")
_UNKEYED_DATA = {"num_workers", "eval_batch_size", "pin_memory", "persistent_workers", "root", "data_dir"}
_PLACEHOLDER_DIR = "<teacher-run>"


@dataclass
class TeacherInfo:
    """Where the teacher came from and how good it is.

    Attributes:
        source: ``"checkpoint"`` (given by path), ``"pretrained"`` (used as built), ``"store"``
            (reused) or ``"trained"`` (now).
        path: The weights file, or for a pretrained teacher where its weights come from
            (``torchvision:ResNet34_Weights.IMAGENET1K_V1``).
        params: Number of parameters.
        metrics: Val and test metrics on this run's data.
        key: The store key, for store and trained teachers.
        members: For a teacher ensemble (``source: "ensemble"``, ``metrics`` the ensemble's):
            each member's own record, by name.
    """

    source: str
    path: str
    params: int
    metrics: dict[str, float]
    key: str | None = None
    members: dict[str, TeacherInfo] | None = None

    def as_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["members"]
        if self.members is not None:
            fields["members"] = {name: m.as_dict() for name, m in self.members.items()}
        return fields


@dataclass
class Teacher:
    """A frozen teacher, ready to distill from: its network, where it came from, its stored outputs.

    Attributes:
        net: The network, with its weights.
        info: Where it came from and its metrics on this run's data.
        cache: The cache of its outputs on the training split (``teacher_cache.enabled``), or None.
    """

    net: nn.Module
    info: TeacherInfo
    cache: TeacherCache | EnsembleCache | None = None


def get_teacher(
    cfg: DictConfig, datamodule: L.LightningDataModule, net: nn.Module, features: FeatureExtractor, device: torch.device
) -> Teacher:
    """Gives the run's teacher its weights (``resolve_teacher``) and opens the cache of its outputs.

    The cache is built on ``device`` when it is a GPU, before training, by one process: inside a
    multi-process launch a missing cache is refused, as a missing teacher is.

    Args:
        cfg: The run's config (``teacher``, ``teacher_cache``, ``model.teacher``).
        datamodule: The run's data.
        net: The teacher built from ``model.teacher`` (its weights are loaded in place).
        features: Its feature extractor (``kd.training.method.prepare_method``): what the cache stores.
        device: Where the run trains.

    Raises:
        ConfigError: See ``resolve_teacher`` and ``kd.teacher.cache.open_cache``.
    """
    if isinstance(net, TeacherEnsemble):
        return _get_ensemble(cfg, datamodule, net, features, device)  # type: ignore[arg-type]
    net, info = resolve_teacher(cfg, datamodule, net=net)
    node = cfg.teacher_cache
    if not node.enabled:
        return Teacher(net, info)
    datamodule.setup("fit")
    cache = open_cache(
        features, datamodule.splits["train"] if isinstance(datamodule, ViewData) else None, node.dir,
        dtype=node.dtype, top_k=node.top_k, batch_size=int(node.batch_size), num_workers=node.num_workers,
        max_gb=float(node.max_gb), verify=int(node.verify), device=device if device.type == "cuda" else "cpu",
        build=not multi_process_launch(), data_key="data",
    )
    return Teacher(net, info, cache)


def _get_ensemble(cfg: DictConfig, datamodule: L.LightningDataModule, ensemble: TeacherEnsemble,
                  features: EnsembleExtractor, device: torch.device) -> Teacher:
    """Each member of a teacher ensemble exactly as a single teacher (``get_teacher``: its
    checkpoint ``teacher.ckpts.<name>``, the store or training, its own cache), then the ensemble
    measured as a whole."""
    ckpts = OmegaConf.select(cfg, "teacher.ckpts") or {}
    members: dict[str, Teacher] = {}
    for name, node in (ensemble_settings(cfg) or {}).items():
        mcfg = copy.deepcopy(cfg)
        with open_dict(mcfg):
            mcfg.model.teacher = node
            mcfg.teacher.ckpt = ckpts.get(name)
            mcfg.teacher.recipe = OmegaConf.merge(cfg.teacher.recipe, OmegaConf.select(cfg, f"teacher.recipes.{name}") or {})
        log.info("teacher ensemble: member %s", name)
        members[name] = get_teacher(mcfg, datamodule, ensemble.members[name], features.members[name], device)
    metrics = _evaluate_as_is(cfg, teacher_run_config(cfg), ensemble, datamodule)
    info = TeacherInfo("ensemble", ", ".join(t.info.path for t in members.values()), count_parameters(ensemble),
                       metrics, members={name: t.info for name, t in members.items()})
    caches = {name: t.cache for name, t in members.items() if t.cache is not None}
    return Teacher(ensemble, info, EnsembleCache(ensemble, caches) if caches else None)


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """The config of the run that trains ``cfg``'s teacher: same data, no teacher, its own recipe.

    The teacher becomes the student and the loss plain cross-entropy. Its optimizer, scheduler,
    epochs, seed, batch size and trainer settings (``teacher.recipe.trainer``: precision,
    clipping, ...) come from ``teacher.recipe``, never from the student run, so a sweep over the
    student's settings shares one teacher. It runs on one device of the run's accelerator.
    """
    tcfg = copy.deepcopy(cfg)
    recipe = cfg.teacher.recipe
    trainer = {k: cfg.trainer[k] for k in _INHERITED_TRAINER if k in cfg.trainer}
    trainer.update(
        default_root_dir="${paths.output_dir}", devices=1, num_nodes=1, num_sanity_val_steps=0,
        enable_model_summary=False, max_epochs=recipe.max_epochs,
    )
    with open_dict(tcfg):
        tcfg.model.student = cfg.model.teacher
        tcfg.distill = {"_target_": "kd.losses.CrossEntropy"}
        tcfg.optimizer = recipe.optimizer
        tcfg.scheduler = recipe.get("scheduler")
        tcfg.seed = recipe.seed
        tcfg.trainer = OmegaConf.merge(trainer, recipe.get("trainer") or {})
        if "batch_size" in tcfg.data and recipe.get("batch_size"):
            tcfg.data.batch_size = recipe.batch_size
        if recipe.get("data"):  # data settings of the teacher only (Hinton's jitter)
            tcfg.data = OmegaConf.merge(tcfg.data, recipe.data)
        tcfg.paths.output_dir = _PLACEHOLDER_DIR
    return tcfg


def store_key(tcfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The store key of a teacher run config, and the resolved config it hashes."""
    def resolved(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    model = resolved(model_node(tcfg.model.student))
    if "weights" in model and model["weights"] is None:  # random init, as before the key existed: same key
        del model["weights"]
    keyed = {
        "format": STORE_FORMAT,
        "model": model,
        "data": {k: v for k, v in resolved(tcfg.data).items() if k not in _UNKEYED_DATA
                 and not (k == "fast" and not v)},  # the DataLoader path, as before the key existed: same key
        "criterion": resolved(tcfg.distill),
        "optimizer": resolved(tcfg.optimizer),
        "scheduler": resolved(tcfg.get("scheduler")),
        "seed": tcfg.seed,
        "trainer": {k: v for k, v in resolved(tcfg.trainer).items() if k not in _UNKEYED_TRAINER},
    }
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()
    name = str(keyed["model"].get("_target_", "model")).rsplit(".", 1)[-1].lower()
    return f"{name}-{digest[:12]}", keyed


def multi_process_launch() -> bool:
    """Whether this process is one of several started by torchrun, SLURM or Lightning's DDP."""
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in ("WORLD_SIZE", "SLURM_NTASKS")) or (
        "LOCAL_RANK" in os.environ and os.environ.get("LOCAL_RANK") != "0"
    )


def _teacher_trainer(tcfg: DictConfig, key: str, **kwargs: Any) -> L.Trainer:
    check_cpu_bf16(key, tcfg.trainer.get("precision"), tcfg.trainer.get("accelerator"), emulated_bf16(tcfg))
    return instantiate_checked(tcfg.trainer, key, **kwargs)


def resolve_teacher(
    cfg: DictConfig, datamodule: L.LightningDataModule, net: nn.Module | None = None
) -> tuple[nn.Module, TeacherInfo]:
    """Builds the teacher and gives it weights: from ``teacher.ckpt``, as pretrained, the store, or training.

    ``net``, when given, is the teacher already built from ``model.teacher`` (by the run, to
    prepare the method); the weights are loaded into it in place. Without ``teacher.ckpt``, a
    teacher pretrained in full (``kd.models.pretrained.pretrained_source``) is used as built.

    Args:
        cfg: The run's config.
        datamodule: The run's data, for the teacher's classes, input shape and evaluation.
        net: The teacher built from ``model.teacher``, or None to build it here.

    Returns:
        The teacher, and where it came from with its metrics on this run's data.

    Everything that can be checked is checked before a teacher is trained: the checkpoint, the
    architecture against the data, the recipe's optimizer, scheduler and trainer.

    Raises:
        ConfigError: On a bad checkpoint, a model that does not fit the data, a bad recipe, or
            when no teacher is available and it cannot be trained here.
    """
    shape = tuple(datamodule.input_shape)
    if net is None:
        net = build_model(cfg.model.teacher, key="model.teacher", num_classes=datamodule.num_classes, input_shape=shape)
    tcfg = teacher_run_config(cfg)
    if cfg.teacher.ckpt:
        path = Path(cfg.teacher.ckpt)
        load_weights(net, path, allow_pickle=bool(OmegaConf.select(cfg, "checkpoint.allow_pickle", default=False)))
        log.info("teacher loaded from %s", path)
        return net, TeacherInfo("checkpoint", str(path), count_parameters(net), _evaluate_as_is(cfg, tcfg, net, datamodule))
    source = pretrained_source(net)
    if source is not None:
        # a ready classifier of the data's classes: training or storing it would only change it
        log.info("teacher pretrained as is: %s", source)
        return net, TeacherInfo("pretrained", source, count_parameters(net), _evaluate_as_is(cfg, tcfg, net, datamodule))

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
        if multi_process_launch():
            raise ConfigError(
                "teacher.ckpt", f"no teacher stored at {entry}, and kd does not train one inside "
                "a multi-process launch; run the same command once on a single device first "
                "(it trains and stores the teacher), or give teacher.ckpt=PATH"
            )
        optimization = build_optimization(tcfg, prefix="teacher.recipe.")
        _teacher_trainer(tcfg, "teacher.recipe.trainer", logger=False, enable_checkpointing=False)
        check_writable_dir(store, "teacher.store_dir")
        lock = FileLock(str(store / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("waiting for another run, which is training teacher %s (lock %s)", key, lock.lock_file)
            lock.acquire()
        try:
            if not (entry / "meta.json").is_file():  # another run may have trained it meanwhile
                _train_into_store(tcfg, keyed, entry, optimization)
                trained = True
        finally:
            lock.release()
    meta, why = read_json(entry / "meta.json")
    if meta is None or not isinstance(meta.get("metrics"), dict):
        raise ConfigError("teacher.store_dir", f"the store entry {entry} is damaged: its meta.json "
                          f"{f'cannot be read ({why})' if why else 'has no metrics'}; delete {entry} and the "
                          "teacher is trained again")
    load_weights(net, entry / "teacher.pt", key=f"teacher store entry {entry}")
    if not trained:
        log.info(
            "reusing stored teacher %s (trained %s, val acc %.4f, test acc %.4f)",
            entry, meta["created"], meta["metrics"].get("val/acc", float("nan")),
            meta["metrics"].get("test/acc", float("nan")),
        )
    source = "trained" if trained else "store"
    return net, TeacherInfo(source, str(entry / "teacher.pt"), count_parameters(net), meta["metrics"], key)


def _evaluate_as_is(
    cfg: DictConfig, tcfg: DictConfig, net: nn.Module, datamodule: L.LightningDataModule
) -> dict[str, float]:
    """Val and test metrics of a teacher that is not trained here (empty unless ``teacher.evaluate``)."""
    if not cfg.teacher.get("evaluate", True):
        return {}
    trainer = _teacher_trainer(tcfg, "teacher.recipe.trainer", logger=False, enable_checkpointing=False)
    return evaluate(trainer, _as_student(net, datamodule.num_classes), datamodule)


def _as_student(net: nn.Module, num_classes: int) -> DistillationModule:
    """Wraps a network for evaluation only (the optimizer factory is never called)."""
    from kd.losses import CrossEntropy

    return DistillationModule(net, CrossEntropy(), optimizer=torch.optim.SGD, num_classes=num_classes)


def _train_into_store(
    tcfg: DictConfig, keyed: dict[str, Any], entry: Path, optimization: tuple[Any, Any]
) -> None:
    """Trains the teacher of a teacher run config and moves the finished entry to ``entry``.

    Runs under the entry's lock, so any temporary directory of this key is a leftover of a
    crashed run and is removed.
    """
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    run_dir = tmp / "run"
    with open_dict(tcfg):
        tcfg.paths.output_dir = str(run_dir)
    log.info("no stored teacher %s: training it now (%s epochs)", entry.name, tcfg.trainer.max_epochs)
    start = time.time()
    L.seed_everything(tcfg.seed, workers=True, verbose=False)
    datamodule = instantiate_checked(tcfg.data, "data")  # the recipe's batch size
    net = build_model(
        tcfg.model.student, key="model.teacher", num_classes=datamodule.num_classes,
        input_shape=tuple(datamodule.input_shape),
    )
    # validation on the test set (protocol=paper): the last epoch, as the released teachers, never the best test one
    val_is_test = tcfg.data.get("val_size") == 0
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", monitor=None if val_is_test else "val/acc", mode="max",
        filename="epoch{epoch:03d}-step{step}", auto_insert_metric_name=False,
    )
    trainer = _teacher_trainer(
        tcfg, "teacher.recipe.trainer", callbacks=[checkpoint],
        logger=[CSVLogger(str(run_dir), name="csv", version="")], plugins=[SafeCheckpointIO()],
    )
    result = fit(
        student=net, criterion=instantiate(tcfg.distill), datamodule=datamodule, teacher=None,
        trainer=trainer, optimization=optimization,
    )
    save_atomic(result.module.student.state_dict(), tmp / "teacher.pt")
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
    log.info(
        "stored teacher %s (val acc %.4f, test acc %.4f)", entry,
        meta["metrics"].get("val/acc", float("nan")), meta["metrics"].get("test/acc", float("nan")),
    )
