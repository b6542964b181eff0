"""Pretrained weights that never hang a machine without internet, and the mark of a ready classifier.

Weights are looked up in the local cache first (torch hub's ``<hub>/checkpoints/`` for torchvision,
the Hugging Face cache for timm). Only when they are missing does kd go to the network, and only
after a TCP connect to the server (or to the proxy) answered within ``PROBE_TIMEOUT_S``: a cluster
node without internet gets a one-line error naming the file, the path to put it at and the URL to
fetch it from, not a download that stalls for minutes. Downloads run under a socket timeout, so a
connection that stops sending fails instead of waiting forever.

A model whose every weight is pretrained, classification head included, is a usable classifier as
it is. Its builder marks it (``mark_pretrained``); ``kd.teacher.source`` uses such a teacher as is, with
no training and no store entry. A model whose head or stem was replaced is not marked: it is only
initialised from pretrained weights and trained like any other.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from kd.errors import ConfigError

log = logging.getLogger(__name__)

PRETRAINED_ATTR = "kd_pretrained"
PROBE_TIMEOUT_S = 5.0
# Longest wait for any one read of a download; the whole download may take longer.
DOWNLOAD_TIMEOUT_S = 60.0


def mark_pretrained(model: nn.Module, source: str) -> None:
    """Marks ``model`` as pretrained in full (head included), so it can serve as a teacher as is.

    Args:
        model: The model whose weights all come from ``source``.
        source: Where they come from, ``"<library>:<weights>"``
            (``"torchvision:ResNet34_Weights.IMAGENET1K_V1"``, ``"timm:resnet18.a1_in1k"``).
    """
    setattr(model, PRETRAINED_ATTR, source)


def pretrained_source(model: nn.Module) -> str | None:
    """The source of a model's weights when they are pretrained in full (head included), else None."""
    source = getattr(model, PRETRAINED_ATTR, None)
    return source if isinstance(source, str) else None


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the server of ``url`` (or to its proxy) opens within ``timeout``.

    The whole probe, name lookup included, runs in a daemon thread that is given up on after
    ``timeout``: ``socket.create_connection`` bounds the connect but not a DNS lookup, which can
    stall for much longer on a machine without a network.

    Args:
        url: Any URL of the server (``https://download.pytorch.org/models/x.pth``).
        timeout: Seconds to wait.

    Returns:
        True when the connection opened.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):  # urllib and requests go through the proxy
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = proxy_parts.hostname or ""
        port = proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    probe = threading.Thread(target=connect, name=f"kd-probe-{host}", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened and opened[0])


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Sets the default socket timeout (used by ``urllib``, hence ``torch.hub``) for a block."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextmanager
def environ(**values: str) -> Iterator[None]:
    """Sets environment variables for a block and restores the previous values after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Makes every ``torch.load`` in the block use ``weights_only=True``, whatever its caller asks.

    torchvision's builders load their weights with ``weights_only=False``; torch's own switch
    (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) keeps a planted cache file from running pickled code.
    """
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        yield  # the user opted out on purpose; both switches at once is an error in torch
        return
    with environ(TORCH_FORCE_WEIGHTS_ONLY_LOAD="1"):
        yield


def torch_hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps (and looks for) the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)


def fetch_to_torch_hub(url: str, *, key: str, what: str) -> Path:
    """Makes sure the file of ``url`` is in torch hub's cache, downloading it only when it can.

    Args:
        url: The weights' URL.
        key: The config key to blame in errors (``weights``).
        what: The weights, for messages (``ResNet18_Weights.IMAGENET1K_V1``).

    Returns:
        The cached file.

    Raises:
        ConfigError: When the file is missing and the server cannot be reached, or the download
            fails; the message gives the path to put the file at and the URL to fetch it from.
    """
    path = torch_hub_file(url)
    if path.is_file():
        return path
    host = urlsplit(url).hostname
    by_hand = f"put {path.name} at {path} (download it from {url} on a machine with internet)"
    if not reachable(url):
        raise ConfigError(key, f"{what} is not in the torch hub cache and {host} cannot be reached: {by_hand}")
    log.info("downloading %s to %s", url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)  # torchvision's names carry a sha256 prefix
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            # writes to a temporary file first: an interrupted download leaves no broken cache entry
            torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=False)
    except Exception as e:  # noqa: BLE001 - network, HTTP and hash errors alike
        raise ConfigError(key, f"downloading {what} from {url} failed ({type(e).__name__}: {e}); {by_hand}") from e
    return path
