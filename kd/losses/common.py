"""Small pieces several feature methods share: spatial matching, connectors, flattening."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pools the larger of two feature maps to the spatial size of the smaller.

    The convention of the CRD code lineage (AT, NST, FT, VID, FSP) for pairs whose resolutions
    differ. Maps that already match are returned unchanged.

    Args:
        f_s: ``(B, C_s, H_s, W_s)``.
        f_t: ``(B, C_t, H_t, W_t)``.

    Returns:
        Both maps at ``(min(H_s, H_t), min(W_s, W_t))``.
    """
    hs, ws = f_s.shape[-2:]
    ht, wt = f_t.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if (ht, wt) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def flat(f: Tensor) -> Tensor:
    """A feature as one vector per sample, ``(B, D)`` (pooled embeddings stay as they are)."""
    return f.reshape(f.shape[0], -1)


def as_map(f: Tensor) -> Tensor:
    """A feature as a map ``(B, C, H, W)``: a ``(B, C)`` embedding becomes ``(B, C, 1, 1)``."""
    if f.dim() == 2:
        return f[:, :, None, None]
    if f.dim() != 4:
        raise ValueError(f"expected a (B, C) or (B, C, H, W) feature, got shape {tuple(f.shape)}")
    return f


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """A 1x1 convolution and batch norm from ``c_in`` to ``c_out`` channels (OFD's and AB's connector).

    Initialised as in OFD: conv weights ``N(0, sqrt(2 / (k * k * c_out)))``, BN weight 1, bias 0.
    """
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))
    bn = nn.BatchNorm2d(c_out)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)
