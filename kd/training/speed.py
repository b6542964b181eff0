"""``speed.fast=true``: kd's exact speed paths, each where it applies to the run.

Turned on, as ``scripts/benchmark.py`` measures them (docs/speed.md): the teacher-output cache
(``teacher_cache.enabled``: the teacher runs once per training view, every later step and run
reads its logits exactly) and whole batches from in-memory tensors (``data.fast``), both for the
datamodules with a finite set of training views (digits, MNIST, CIFAR: those with ``data.fast``);
and on a GPU the optimizer's fused kernel (``speed.fused_optimizer``) and channels-last conv
layout (``speed.channels_last``). Exactness holds: the cache's logits are the teacher's (to float16
unless ``teacher_cache.dtype=float32``), and a resumed run continues bit for bit as before.
``torch.compile`` (``speed.compile=reduce-overhead``: CUDA graphs) stays a choice of its own until
the benchmark shows it helps on the GPU.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def apply_speed(cfg: DictConfig) -> list[str]:
    """Under ``speed.fast=true``, sets the speed options that apply to this run (see the module docstring).

    Returns:
        The settings it changed, as overrides (``["data.fast=true", ...]``); logged once.
    """
    if not OmegaConf.select(cfg, "speed.fast", default=False):
        return []
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and _cuda())
    wanted: dict[str, bool] = {}
    if "fast" in cfg.data:  # a datamodule whose training views are a finite set: batches from memory, cached teacher
        wanted["data.fast"] = True
        if cfg.model.get("teacher") is not None or cfg.model.get("teachers"):
            wanted["teacher_cache.enabled"] = True
    if on_gpu:
        wanted["speed.fused_optimizer"] = True
        wanted["speed.channels_last"] = True
    changed = [f"{key}=true" for key, value in wanted.items() if OmegaConf.select(cfg, key) is not value]
    with open_dict(cfg):
        for key, value in wanted.items():
            OmegaConf.update(cfg, key, value, merge=False)
    if changed:
        log.info("speed.fast: %s", " ".join(changed))
    return changed


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
