"""Any torchvision classification model by name, fitted to the data's classes and channels."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from kd.errors import ConfigError


def torchvision_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    small_input: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Builds ``torchvision.models.<name>`` (random init) for ``num_classes`` and ``in_channels``.

    Args:
        name: A torchvision classification builder (``resnet18``, ``mobilenet_v3_small``, ...).
        num_classes: Classes of the data.
        in_channels: Channels of the input; when not 3, the first convolution is replaced by one
            with the same shape otherwise.
        small_input: For 32x32-or-smaller images (CIFAR, digits) on ResNet-style models: the 7x7
            stride-2 stem becomes a 3x3 stride-1 convolution and the max-pool is dropped, as in
            the CIFAR variants of the literature.
        **kwargs: Passed to the torchvision builder (``dropout``, ``width_mult``...).

    Raises:
        ConfigError: On an unknown name, or ``small_input`` on a model without a ResNet stem.
    """
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError("name", f"torchvision has no classification model {name!r}; {hint}see torchvision.models.list_models()")
    if "weights" in kwargs and kwargs["weights"] is not None:
        raise ConfigError("weights", "pretrained torchvision weights are not supported here yet; give teacher.ckpt=PATH")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if small_input:
        conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
        if not isinstance(conv, nn.Conv2d) or pool is None:
            raise ConfigError("small_input", f"{name} has no ResNet-style stem (conv1 + maxpool) to shrink")
        model.conv1 = nn.Conv2d(in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


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
