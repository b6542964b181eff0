"""Any model of timm (pytorch-image-models) by name, random or pretrained, fitted to the data.

timm is an optional dependency (``pip install kd[timm]``). Its pretrained weights live on the
Hugging Face Hub (a few older ones at a URL, kept in torch hub's cache). Without internet, kd
loads them from the local Hugging Face cache only, instead of letting the Hub client retry; see
``kd.models.pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from torch import nn

from kd.errors import ConfigError, closest_names
from kd.models import pretrained as pretrained_weights

# Names that timm resolves itself, outside its registry: a Hub repository or a local folder.
_EXTERNAL_PREFIXES = ("hf-hub:", "local-dir:")


def timm_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Builds ``timm.create_model(name)`` for ``num_classes`` and ``in_channels``.

    With ``pretrained``, timm loads the weights and, when ``num_classes`` differs from theirs,
    leaves the classifier new; with ``in_channels`` other than 3 it adapts the first convolution's
    pretrained weights. A model whose classifier is the pretrained one is marked so
    (``kd.models.pretrained``): as a teacher it is used as is.

    Args:
        name: A timm model name (``resnet18``, ``convnext_tiny``), optionally with a pretrained
            tag (``resnet18.a1_in1k``), or ``hf-hub:<repo>`` / ``local-dir:<path>``.
        num_classes: Classes of the data.
        in_channels: Channels of the input (timm's ``in_chans``).
        pretrained: Load timm's pretrained weights for ``name``.
        **kwargs: Passed to ``timm.create_model`` (``drop_rate``, ``pretrained_cfg_overlay``...).

    Returns:
        The model; ``kd.models.pretrained.pretrained_source(model)`` names its weights when its
        classifier is the pretrained one.

    Raises:
        ConfigError: When timm is not installed, on an unknown name or tag, a model without
            pretrained weights, or weights that are neither cached nor downloadable.
    """
    timm = _import_timm()
    cfg = _pretrained_cfg(timm, name)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    # what timm will use: its registry entry, with the caller's overrides (a local `file`...)
    requested = None if cfg is None else {**cfg.to_dict(), **(kwargs.get("pretrained_cfg_overlay") or {})}
    model = _create_pretrained(timm, name, requested, num_classes=num_classes, in_chans=in_channels, **kwargs)
    loaded = getattr(model, "pretrained_cfg", None) or {}
    if loaded.get("num_classes") == num_classes:  # else timm left the classifier new
        tag = loaded.get("tag")
        source = name if name.startswith(_EXTERNAL_PREFIXES) or not tag else f"{loaded.get('architecture', name)}.{tag}"
        pretrained_weights.mark_pretrained(model, f"timm:{loaded.get('file') or source}")
    return model


def _import_timm() -> ModuleType:
    try:
        import timm
    except ImportError as e:
        raise ConfigError("_target_", "timm is not installed: pip install timm (or pip install kd[timm])") from e
    return timm


def _pretrained_cfg(timm: ModuleType, name: str) -> Any:
    """timm's pretrained config of a registry name (None for hf-hub:/local-dir: names).

    Raises:
        ConfigError: On a name or tag timm does not know, with close matches.
    """
    if name.startswith(_EXTERNAL_PREFIXES):
        return None
    if not timm.is_model(name):
        close = closest_names(name, timm.list_models(pretrained="." in name))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError("name", f"timm has no model {name!r}; {hint}see timm.list_models()")
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag: `resnet18.foo`
        tags = timm.list_models(name.partition(".")[0], pretrained=True)
        raise ConfigError("name", f"timm has no weights {name!r}; tagged weights of this model: {', '.join(tags)}") from e


def _weights_location(timm: ModuleType, name: str, cfg: dict[str, Any] | None) -> tuple[str, str]:
    """Where timm will load the weights of ``name`` from, as it decides it.

    Returns:
        ``("local", "")`` for a file, folder or state_dict given in the config,
        ``("url", <url>)`` for older models hosted at a plain URL, ``("hf", <repo id>)`` for the Hub.

    Raises:
        ConfigError: When timm has no pretrained weights for ``name``.
    """
    if name.startswith("local-dir:"):
        return "local", ""
    if name.startswith("hf-hub:"):
        return "hf", name.removeprefix("hf-hub:")
    cfg = cfg or {}
    if cfg.get("file") or cfg.get("state_dict") is not None:
        return "local", ""
    if cfg.get("hf_hub_id"):
        return "hf", cfg["hf_hub_id"]
    if cfg.get("url"):
        return "url", cfg["url"]
    tagged = timm.list_models(name.partition(".")[0], pretrained=True)
    hint = f"; tagged weights of this model: {', '.join(tagged)}" if tagged else ""
    raise ConfigError("pretrained", f"timm has no pretrained weights for {name!r}{hint}")


def _create_pretrained(timm: ModuleType, name: str, cfg: dict[str, Any] | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True)`` that never waits on a network that is not there."""
    kind, where = _weights_location(timm, name, cfg)
    if kind == "url":  # cached by torch hub: fetched (or refused) before timm looks for it
        pretrained_weights.fetch_to_torch_hub(where, key="pretrained", what=f"the timm weights of {name}")
    if kind != "hf":
        return timm.create_model(name, pretrained=True, **kwargs)

    from huggingface_hub import constants

    if pretrained_weights.reachable(constants.ENDPOINT):
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except OSError as e:  # the Hub client's HTTP and connection errors
            raise ConfigError(
                "pretrained", f"downloading the weights of {name} from {constants.ENDPOINT}/{where} failed "
                f"({type(e).__name__}: {e})"
            ) from e
    try:
        with _hf_offline():
            return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled
        cache = constants.HF_HUB_CACHE
        folder = "models--" + where.partition("@")[0].replace("/", "--")
        raise ConfigError(
            "pretrained", f"the weights of {name} ({where}) are not in the Hugging Face cache {cache} and "
            f"{constants.ENDPOINT} cannot be reached; on a machine with internet run `hf download {where}`, "
            f"then copy its cache folder {folder} into {cache} (or point HF_HUB_CACHE at a copy)"
        ) from e


@contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode (cache only) for a block.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, when imported; the constant is what it
    checks before each request, the environment variable is for anything started meanwhile.
    """
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        with pretrained_weights.environ(HF_HUB_OFFLINE="1"):
            yield
    finally:
        constants.HF_HUB_OFFLINE = old
