"""Chains of runs, one command: generations (Born-Again Networks) and teacher assistants (TAKD).

A chain is a sequence of normal runs, the links, each distilled from the student of the one before:

- ``chain.links``: the links before the last, in order, by name: ``{model: <model config>,
  overrides: {<any config key>: <value>}}`` (``overrides`` optional: a link's own epochs,
  learning rate, method...). TAKD (Mirzadeh et al., AAAI 2020): teacher -> ``links.assistant``
  -> the student.
- ``chain.generations: N``: Born-Again Networks (Furlanello et al., ICML 2018): N generations of
  ``model.student`` after the teacher (generation 0, trained as any teacher): links ``gen1`` ..
  ``gen<N-1>``, then the run itself, generation N. Both may be given (the links first).

The first link learns from the run's teacher (``model.teacher``: checkpoint, store or trained);
each later one from the link before, through its ``student.pt`` (``teacher.ckpt``). The last link
is the run itself, in the run's directory, with its results.json, checkpoints and report; its
``chain`` entry lists every link (directory, store key, whether it was reused, its student's
metrics) and the ensemble of all generations' students (BAN's "ensemble of generations").

Each link before the last lives in ``chain.store_dir`` (the teacher store's ``links/`` by default),
keyed by a hash of everything that decides its weights: its config (paths, loggers and where it runs
left out) and the key of the link before it (or, for the first, the run's teacher settings). A
link that is already there is reused, never trained again: an interrupted chain continues from the
link it reached (a link killed half-way resumes from its own checkpoints), and chains of a sweep that
begin alike share their first links. One process trains a link at a time (a file lock, as the
teacher store).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError

from kd.compress.evaluate import evaluate_model
from kd.errors import ConfigError, check_int, check_writable_dir
from kd.models.build import build_model, count_parameters
from kd.models.weights import load_weights
from kd.results import RESULTS_FILE, STUDENT_WEIGHTS, read_json, run_dir_state
from kd.teacher.ensemble import TeacherEnsemble

log = logging.getLogger(__name__)

# what never decides a link's weights: where it runs and writes, what it logs and reports
_UNKEYED = ("paths", "logger", "report", "resume", "chain", "hydra", "checkpoint.allow_pickle", "teacher.store_dir",
            "teacher_cache.dir", "teacher_cache.num_workers", "teacher_cache.batch_size", "trainer.default_root_dir",
            "trainer.enable_progress_bar", "trainer.devices", "trainer.num_nodes", "data.num_workers", "data.root",
            "data.data_dir", "data.eval_batch_size", "callbacks.model_checkpoint.dirpath", "callbacks.resume_checkpoint.dirpath")
_PLACEHOLDER = "<chain-link>"


def chain_links(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """The links before the run's own, in order, as ``(name, {model, overrides})``; empty without ``chain``.

    Raises:
        ConfigError: On a link without a model, a bad ``generations``, or a chain of no link.
    """
    node = OmegaConf.select(cfg, "chain")
    if not node:
        return []
    links = [(str(name), link) for name, link in (node.get("links") or {}).items()]
    for name, link in links:
        if not isinstance(link, DictConfig) or not isinstance(link.get("model"), DictConfig):
            raise ConfigError(f"chain.links.{name}", "needs a model: +model/student@chain.links.<name>.model=<option>")
    generations = node.get("generations")
    if generations is not None:
        check_int("chain.generations", generations, 2, valid=">= 2 (the run is the last generation)")
        links += [(f"gen{i}", OmegaConf.create({"model": cfg.model.student})) for i in range(1, int(generations))]
    if not links:
        raise ConfigError("chain", "has no link: give chain.generations=N or chain.links.<name>.model")
    return links


def link_config(cfg: DictConfig, name: str, link: DictConfig, before: tuple[DictConfig, Path] | None) -> DictConfig:
    """The config of one link: the run's, with the link's student and overrides, taught by ``before``
    (the previous link's model config and student.pt), or by the run's teacher for the first link.

    Raises:
        ConfigError: When an override names a key the run's config does not have (a typo).
    """
    lcfg = copy.deepcopy(cfg)
    with open_dict(lcfg):
        del lcfg["chain"]
        lcfg.model.student = link.model
        if before is not None:
            lcfg.model.teacher, lcfg.teacher.ckpt = before[0], str(before[1])
        lcfg.resume = None
        lcfg.paths.output_dir = _PLACEHOLDER
        lcfg.report.enabled = False  # a link's student teaches the next; the run's own is the one deployed
    overrides = link.get("overrides")
    try:
        return OmegaConf.merge(lcfg, overrides) if overrides else lcfg  # type: ignore[return-value]
    except ConfigKeyError as e:
        raise ConfigError(f"chain.links.{name}.overrides", f"{e.full_key} is not a key of the run's config; check its "
                          "spelling, or add the key to the run itself (+key=value)") from None


def link_key(lcfg: DictConfig, before: str | None) -> str:
    """The store key of a link: a hash of its config (``_UNKEYED`` left out) and of the link before it."""
    resolved: dict[str, Any] = OmegaConf.to_container(lcfg, resolve=True)  # type: ignore[assignment]
    for dotted in _UNKEYED:
        *parents, leaf = dotted.split(".")
        node = resolved
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None  # type: ignore[assignment]
        if isinstance(node, dict):
            node.pop(leaf, None)
    if before is not None:  # the teacher is the link before: its key, not where its file lies
        resolved["teacher"].pop("ckpt", None)
    keyed = {"format": 1, "config": resolved, "after": before}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()
    name = str(resolved["model"]["student"].get("_target_", "model")).rsplit(".", 1)[-1].lower()
    return f"{name}-{digest[:12]}"


def run_chain(cfg: DictConfig, run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Runs the links in order (reusing those already stored), then the run itself as the last link.

    Args:
        cfg: The run's config, with ``chain``.
        run: ``kd.training.run.run``.

    Returns:
        The last link's results, with its ``chain`` entry.
    """
    links = chain_links(cfg)
    for name, link in links:  # an override that names no key fails here, before any link trains
        link_config(cfg, name, link, None)
    store = Path(str(OmegaConf.select(cfg, "chain.store_dir", default=None) or Path(cfg.teacher.store_dir) / "links"))
    done: list[dict[str, Any]] = []
    before: tuple[DictConfig, Path] | None = None
    key: str | None = None
    for name, link in links:
        lcfg = link_config(cfg, name, link, before)
        key = link_key(lcfg, key)
        entry = store / key
        check_writable_dir(store, "chain.store_dir")
        with FileLock(str(store / f"{key}.lock")):
            state = run_dir_state(entry)
            if state.status == "failed" and state.results is not None:  # it diverged: the same config would again
                raise ConfigError("chain.store_dir", f"link {name} failed in {entry} ({state.error}); change its "
                                  f"settings (chain.links.{name}.overrides) or delete that directory to train it again")
            reused = state.status == "completed"
            if reused:
                log.info("chain link %s: reusing %s", name, entry)
            else:
                with open_dict(lcfg):
                    lcfg.paths.output_dir = str(entry)
                    lcfg.resume = "auto" if state.resumable else None
                log.info("chain link %s: %s %s", name, "resuming" if state.resumable else "training", entry)
                run(lcfg)
        results, why = read_json(entry / RESULTS_FILE)
        if results is None:
            raise ConfigError("chain.store_dir", f"the link {entry} has no readable {RESULTS_FILE} ({why}); delete it")
        student = results["student"]
        done.append({"name": name, "key": key, "run_dir": str(entry), "reused": reused,
                     "teacher": (results.get("teacher") or {}).get("path"),
                     "student": {k: student[k] for k in ("params", "weights", "selected", "best_epoch", "metrics",
                                                         "final_metrics")}})
        before = (copy.deepcopy(lcfg.model.student), entry / STUDENT_WEIGHTS)
    assert before is not None
    final = copy.deepcopy(cfg)
    with open_dict(final):
        del final["chain"]
        final.model.teacher, final.teacher.ckpt = before[0], str(before[1])
    return run(final, finish=lambda job, result: {"chain": {"links": done, "ensemble": generations_ensemble(
        done, result.module.student, job.datamodule)}})


@torch.no_grad()
def generations_ensemble(links: list[dict[str, Any]], last: torch.nn.Module, datamodule: Any) -> dict[str, float]:
    """Val and test accuracy of the mean of the probabilities of every link's student and the run's
    (Born-Again Networks' ensemble of generations), at their selected weights."""
    shape, classes = tuple(datamodule.input_shape), int(datamodule.num_classes)
    members: dict[str, torch.nn.Module] = {}
    for link in links:
        config, _ = read_json(Path(link["run_dir"]) / RESULTS_FILE)
        assert config is not None
        net = build_model(config["config"]["model"]["student"], key=f"chain.links.{link['name']}.model",
                          num_classes=classes, input_shape=shape)
        load_weights(net, Path(link["student"]["weights"]), key="chain")
        members[link["name"]] = net
    members["last"] = copy.deepcopy(last).cpu()
    ensemble = TeacherEnsemble(members).eval()
    metrics = {"params": count_parameters(ensemble)}
    for stage, loader in (("val", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
        scored = evaluate_model(ensemble, loader)
        metrics[f"{stage}/acc"] = scored["test/acc"]
        if stage == "test":
            metrics["test/errors"] = scored["test/errors"]
    return metrics
