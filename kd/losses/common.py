"""Small pieces several feature methods share: spatial matching, connectors, flattening, reading
features by name, fp32 products under autocast, and the DDP collectives of memory banks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError
from kd.outputs import ModelOutput


def full_precision(t: Tensor) -> torch.autocast:
    """A context that turns autocast off on ``t``'s device type, so products keep their inputs' dtype.

    Under bf16/fp16 autocast, ``matmul``, ``bmm``, ``mm``, ``einsum`` (and ``linear``, ``conv``)
    recast fp32 inputs to the low precision, whose rounding (8 bits of mantissa for bf16) is of
    the order of the student-teacher differences that relational and Gram-matrix losses measure.
    Cast the operands to fp32 first (``torch.promote_types(x.dtype, torch.float32)``), then run
    the product inside this context::

        x = flat(f).to(torch.promote_types(f.dtype, torch.float32))  # (B, D)
        with full_precision(x):
            gram = x @ x.t()  # (B, B), fp32 even under autocast

    Args:
        t: A tensor on the device whose autocast to disable.

    Returns:
        ``torch.autocast(t.device.type, enabled=False)``.
    """
    return torch.autocast(t.device.type, enabled=False)


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


_SHAPES = {2: "a (B, C) embedding", 4: "a (B, C, H, W) map"}


def feature(out: ModelOutput, name: str, key: str, dims: tuple[int, ...] | None = (2, 4)) -> Tensor:
    """The feature ``name`` of a model's output, checked where a method's ``setup`` first reads it.

    Args:
        out: A model's output (the dry run's, in ``setup``).
        name: The node name, from ``student_nodes`` or ``teacher_nodes``.
        key: The config key the name came from, for the error.
        dims: The numbers of dimensions the method accepts (default: ``(B, C)`` embeddings and
            ``(B, C, H, W)`` maps, which ``as_map`` reads alike); None accepts any.

    Returns:
        The feature, as it is.

    Raises:
        ConfigError: (under ``key``) when the node was not collected or has another number of
            dimensions.
    """
    if name not in out.features:
        raise ConfigError(key, f"node {name!r} is not among the collected features {sorted(out.features)}")
    f = out.features[name]
    if dims is not None and f.dim() not in dims:
        wanted = " or ".join(_SHAPES.get(d, f"a {d}-d tensor") for d in dims)
        raise ConfigError(key, f"node {name!r} has shape {tuple(f.shape)}, expected {wanted}")
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


def world_size() -> int:
    """The number of processes of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_gather_rows(index: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's ``(index, rows)`` concatenated in rank order, e.g. for a memory-bank update.

    Batches may differ in size across ranks: each pads to the largest with index -1, and the
    padding is dropped after the gather. Without a process group of more than one rank, the
    inputs come back unchanged.

    Args:
        index: ``(B,)`` sample indices on this rank.
        rows: ``(B, D)`` their rows.

    Returns:
        ``(n,)`` indices and ``(n, D)`` rows of all ranks.
    """
    world = world_size()
    if world == 1:
        return index, rows
    size = torch.tensor([index.shape[0]], device=index.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    pad = int(size.item()) - index.shape[0]
    index = F.pad(index, (0, pad), value=-1).contiguous()  # (B_max,)
    rows = F.pad(rows, (0, 0, 0, pad)).contiguous()  # (B_max, D)
    indices, all_rows = [torch.empty_like(index) for _ in range(world)], [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(indices, index)
    dist.all_gather(all_rows, rows)
    index, rows = torch.cat(indices), torch.cat(all_rows)  # (world * B_max,), (world * B_max, D)
    keep = index >= 0
    return index[keep], rows[keep]


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed in place over all ranks (``x`` itself on one process)."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
