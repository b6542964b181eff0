"""Builds a model from its config node, fitted to the data: classes, input channels, a dry run."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd.errors import ConfigError, check_int, instantiate_checked


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (or of those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(
    node: Mapping[str, Any],
    *,
    key: str,
    num_classes: int,
    input_shape: tuple[int, ...],
) -> nn.Module:
    """Instantiates a model config so that it fits the data, and checks that it does.

    ``num_classes`` (and ``in_channels`` / ``in_features``, the flattened input size, and
    ``image_size``, the input's height and width, where the constructor takes them) come from the data unless
    the config sets them; a config value that disagrees with the data is an error. A dry forward
    pass on one zero input checks the output shape.

    Args:
        node: A config node with a ``_target_``.
        key: Where the node sits in the config (``model.student``), for error messages.
        num_classes: Classes of the data.
        input_shape: Shape of one input, ``(C, H, W)``.

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: If the config or the built model disagrees with the data.
    """
    node = model_node(node)
    if "_target_" not in node:
        raise ConfigError(key, "has no _target_; pick one from conf/" + key.replace(".", "/"))
    target = node["_target_"]
    try:
        params = inspect.signature(get_object(target)).parameters
    except Exception as e:  # an import error in the target: say which target
        raise ConfigError(f"{key}._target_", f"cannot import {target}: {e}") from e
    kwargs: dict[str, Any] = {}
    fitted = (("num_classes", num_classes), ("in_channels", input_shape[0]), ("in_features", math.prod(input_shape)))
    for name, value in fitted:
        given = node.get(name)
        if given is not None and check_int(f"{key}.{name}", given) != value:
            raise ConfigError(
                f"{key}.{name}",
                f"is {given} but the data has {value}; remove the override "
                f"(kd sets it from the data) or pick matching data",
            )
        if given is None and name in params:
            kwargs[name] = value
    if "image_size" in params and node.get("image_size") is None:  # a ViT's positional embedding is per image size
        kwargs["image_size"] = tuple(input_shape[1:])
    model = instantiate_checked(node, key, **kwargs)
    check_output(model, key=key, num_classes=num_classes, input_shape=input_shape)
    return model


NODES_KEY = "_nodes_"


def model_node(node: Mapping[str, Any]) -> Any:
    """A model config without its ``_nodes_`` (feature taps, read by method configs, not the model)."""
    if NODES_KEY not in node:
        return node
    if isinstance(node, DictConfig):
        copy = OmegaConf.masked_copy(node, [k for k in node if k != NODES_KEY])
        copy._set_parent(node._get_parent())  # so interpolations inside the node still resolve
        return copy
    return {k: v for k, v in node.items() if k != NODES_KEY}


@torch.no_grad()
def check_output(
    model: nn.Module, *, key: str, num_classes: int, input_shape: tuple[int, ...]
) -> None:
    """Runs one zero input through ``model`` in eval mode and checks it gives ``(1, num_classes)``.

    Raises:
        ConfigError: If the forward pass fails or the logits have the wrong shape.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, *input_shape))
    except Exception as e:
        raise ConfigError(
            key, f"fails on an input of shape {(1, *input_shape)}: {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None or tuple(logits.shape) != (1, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
        raise ConfigError(
            key, f"outputs {got} for one input, but the data has {num_classes} classes"
        )
