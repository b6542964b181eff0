"""The measurement protocol of a run (``conf/protocol/``): ``honest`` (the default) or ``paper``.

``honest``: a validation split carved from the training set selects the checkpoint, and the test
set is only measured (``student.metrics``: the best-validation checkpoint, ``student.final_metrics``:
the final epoch). ``paper``: what the published CIFAR tables measured, for a like-for-like
comparison: every training image trains (``data.val_size=0``), the test set is evaluated every
epoch, fp32, and the reported number is the one the column's paper reports
(``protocol.published_measure``): the last epoch (RepDistiller, the CRD tables; then nothing is
selected, and ``student.pt`` is the last epoch's) or the best test epoch (the mdistiller lineage;
the checkpoint is selected on the test set, and ``student.pt`` is that epoch's). A teacher kd trains
under ``paper`` is its last epoch, as the released ``ckpt_epoch_240.pth`` teachers. ``results.json``
records the protocol and the number it reports (``protocol`` entry); ``kd-table`` never averages
runs of different protocols.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kd.errors import ConfigError

PROTOCOLS = ("honest", "paper")
MEASURES = ("last_epoch", "best_test_epoch")


def apply_protocol(cfg: DictConfig) -> str:
    """Checks ``protocol`` and applies it to the data: ``paper`` sets ``data.val_size=0``.

    Returns:
        The protocol's name.

    Raises:
        ConfigError: On an unknown protocol or measure, ``paper`` with data that has no
            ``val_size``, or ``data.val_size=0`` (validation on the test set) under ``honest``.
    """
    name = OmegaConf.select(cfg, "protocol.name", default="honest")
    if name not in PROTOCOLS:
        raise ConfigError("protocol.name", f"must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    measure = OmegaConf.select(cfg, "protocol.published_measure", default="last_epoch")
    if measure not in MEASURES:
        raise ConfigError("protocol.published_measure", f"must be one of {', '.join(MEASURES)}, got {measure!r}")
    has_val_size = "val_size" in cfg.data
    if name == "paper":
        if not has_val_size:
            raise ConfigError("protocol", f"paper trains on every training image and validates on the test set; "
                              f"{cfg.data.get('_target_')} has no val_size to set to 0 (CIFAR-10/100 and MNIST have)")
        with open_dict(cfg):
            cfg.data.val_size = 0
        if measure == "last_epoch":  # the paper reports the last epoch: nothing is selected on the test set
            for node in (cfg.get("callbacks") or {}).values():
                if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("ModelCheckpoint") \
                        and node.get("monitor") == "val/acc":
                    node.monitor = None
    elif has_val_size and cfg.data.val_size == 0:
        raise ConfigError("data.val_size", "0 validates on the test set, which the honest protocol never does; "
                          "give a held-out size >= 1, or protocol=paper for the papers' measurement")
    return str(name)


def protocol_record(cfg: dict[str, Any], train_size: int | None, val_size: int, precision: str,
                    metrics: dict[str, float], final_metrics: dict[str, float]) -> dict[str, Any]:
    """The ``protocol`` entry of ``results.json``: what was trained on, what selected, and the
    number this protocol reports (``test/acc``), with which epoch it is (``reports``).

    Args:
        cfg: The resolved run config.
        train_size: Samples in the training split.
        val_size: Samples held out for validation (0: validation ran on the test set).
        precision: The trainer's precision.
        metrics: The selected checkpoint's metrics (best validation; under ``paper``, best test epoch).
        final_metrics: The final epoch's metrics.
    """
    protocol = cfg.get("protocol") or {}
    name = protocol.get("name", "honest")
    measure = protocol.get("published_measure", "last_epoch")
    if name == "paper":
        reports = measure
        reported = final_metrics if measure == "last_epoch" else metrics
    else:
        reports, reported = "best_val_checkpoint", metrics
    return {
        "name": name, "train_size": train_size,
        "validation": "the test set, every epoch" if val_size == 0 else f"{val_size} images held out of the training set",
        "precision": precision, "published_measure": measure, "reports": reports,
        "test/acc": reported.get("test/acc"),
    }
