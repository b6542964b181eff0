"""Any torchvision classification model by name, fitted to the data's classes and channels.

Pretrained weights are named as in torchvision (``weights: IMAGENET1K_V1``, ``DEFAULT``) and
loaded from torch hub's cache; see ``kd.models.pretrained`` for what happens without internet.
"""

from __future__ import annotations

import difflib
import logging
import pickle
from typing import TYPE_CHECKING, Any

from torch import nn

from kd.errors import ConfigError, closest_names
from kd.models import pretrained

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)


def torchvision_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    small_input: bool = False,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds ``torchvision.models.<name>`` for ``num_classes`` and ``in_channels``, random or pretrained.

    With ``weights``, the model is built with the weights' classes and loaded; when the data has
    as many classes, the model is pretrained in full and marked so (``kd.models.pretrained``):
    as a teacher it is used as is. Otherwise its classification head (the last ``nn.Linear``:
    ``fc``, ``classifier[-1]``, ``heads.head``...) is replaced by a new one for ``num_classes``,
    and the rest keeps the pretrained weights (fine-tuning).

    Args:
        name: A torchvision classification builder (``resnet18``, ``mobilenet_v3_small``, ...).
        num_classes: Classes of the data.
        in_channels: Channels of the input; when not 3, the first convolution is replaced by one
            with the same shape otherwise (randomly initialised, also with ``weights``).
        small_input: For 32x32-or-smaller images (CIFAR, digits) on ResNet-style models: the 7x7
            stride-2 stem becomes a 3x3 stride-1 convolution and the max-pool is dropped, as in
            the CIFAR variants of the literature (randomly initialised, also with ``weights``).
        weights: A member of the model's torchvision weights enum (``IMAGENET1K_V1``,
            ``DEFAULT``, or in full ``ResNet34_Weights.IMAGENET1K_V1``), or None for random init.
        **kwargs: Passed to the torchvision builder (``dropout``, ``width_mult``...).

    Returns:
        The model; ``kd.models.pretrained.pretrained_source(model)`` names its weights when it
        is pretrained in full.

    Raises:
        ConfigError: On an unknown name or weights, weights missing from the cache that cannot
            be downloaded, new classes for a model whose head is not an ``nn.Linear``, or
            ``small_input`` on a model without a ResNet stem.
    """
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = closest_names(name, names)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError("name", f"torchvision has no classification model {name!r}; {hint}see torchvision.models.list_models()")
    source = None
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    else:
        model, source = _pretrained(name, weights, num_classes, **kwargs)
    if small_input:
        conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
        if not isinstance(conv, nn.Conv2d) or pool is None:
            raise ConfigError("small_input", f"{name} has no ResNet-style stem (conv1 + maxpool) to shrink")
        model.conv1 = nn.Conv2d(in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        _replace_first_conv(model, in_channels)
    if weights is not None and (small_input or in_channels != 3):
        log.warning(
            "%s with weights=%s: the %s stem is newly initialised, not pretrained; it will be trained",
            name, weights, "small-input" if small_input else f"{in_channels}-channel",
        )
    elif source is not None:
        pretrained.mark_pretrained(model, source)
    return model


def _pretrained(name: str, weights: str, num_classes: int, **kwargs: Any) -> tuple[nn.Module, str | None]:
    """``name`` loaded with ``weights``, its head replaced when ``num_classes`` differs.

    Returns:
        The model, and the source of its weights when its head is the pretrained one.
    """
    import torchvision

    member = _weights_member(name, weights)
    categories = len(member.meta["categories"])
    path = pretrained.fetch_to_torch_hub(member.url, key="weights", what=str(member))
    try:
        # the builder itself loads: some adapt the architecture (ViT's image size, GoogLeNet's
        # input transform) or the keys (DenseNet) to their weights
        with pretrained.weights_only_loads():
            model = torchvision.models.get_model(name, weights=member, progress=False, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # unreadable, or not these weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            "weights", f"cannot load {path} as {member} ({type(e).__name__}: {first}); delete it to download it "
            f"again from {member.url}"
        ) from e
    if num_classes == categories:
        return model, f"torchvision:{member}"
    _replace_head(model, name, num_classes, categories)
    return model, None


def _weights_member(name: str, weights: str) -> WeightsEnum:
    """The member of ``name``'s weights enum that ``weights`` names (short or in full)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    members = list(enum.__members__)  # DEFAULT included: an alias of the recommended weights
    prefix, _, member = str(weights).rpartition(".")
    if prefix and prefix != enum.__name__:
        raise ConfigError("weights", f"{weights} are not weights of {name}; {enum.__name__} has {', '.join(members)}")
    if member not in enum.__members__:
        close = difflib.get_close_matches(member, members, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError("weights", f"{name} has no weights {weights!r}; {hint}{enum.__name__} has {', '.join(members)}")
    return enum[member]


def _replace_head(model: nn.Module, name: str, num_classes: int, categories: int) -> None:
    """Replaces the classification head (the last ``nn.Linear``) by a new one for ``num_classes``."""
    head = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            head = path, module
    if head is None or head[1].out_features != categories:
        raise ConfigError(
            "weights", f"{name}'s pretrained head is not an nn.Linear of {categories} outputs, so kd cannot "
            f"replace it for {num_classes} classes; use weights with data of {categories} classes, or another model"
        )
    path, old = head
    parent = model.get_submodule(path.rpartition(".")[0])
    setattr(parent, path.rpartition(".")[2], nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    log.info("%s: pretrained head %s (%d classes) replaced by a new one for %d classes", name, path, categories, num_classes)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            new = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups if module.groups == 1 else in_channels, module.bias is not None,
            )
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise ConfigError("in_channels", f"{type(model).__name__} has no convolution to take {in_channels} channels")
