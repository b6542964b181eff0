"""Logger factories: W&B that is offline unless asked otherwise and never hangs without network."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_reachable(timeout: float) -> bool:
    """Whether a TCP connection to the W&B server (``WANDB_BASE_URL``) opens within ``timeout`` s."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_logger(
    project: str = "kd",
    save_dir: str = ".",
    offline: bool = True,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    log_model: bool | str = False,
    connect_timeout: float = 5.0,
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` that cannot hang a run on a machine without network.

    W&B's own online init waits about two minutes for an unreachable server. Here an online
    logger first checks that the server answers within ``connect_timeout`` seconds and falls back
    to offline mode (with a warning) when it does not; offline runs land in
    ``<save_dir>/wandb/offline-run-*`` and upload later with ``wandb sync``.

    Args:
        project: W&B project.
        save_dir: Directory of the local W&B files (the run directory).
        offline: Log offline (the default); false to log online.
        name: Run name (W&B picks one when None).
        group: Run group, e.g. a sweep.
        tags: Run tags.
        log_model: Upload checkpoints as artifacts (online only).
        connect_timeout: Seconds to wait for the W&B server before going offline.
        **kwargs: Passed on to ``wandb.init``.
    """
    if not offline and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        if not wandb_reachable(connect_timeout):
            log.warning(
                "W&B server unreachable within %.0f s: logging offline to %s/wandb "
                "(upload later with `wandb sync`)", connect_timeout, save_dir,
            )
            offline = True
    if offline:
        log_model = False  # artifacts need a server
    return WandbLogger(
        project=project, save_dir=save_dir, offline=offline, name=name, group=group,
        tags=list(tags), log_model=log_model, **kwargs,
    )
