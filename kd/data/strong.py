"""A strongly augmented second view of each training sample, for MLKD (Jin, Wang & Lin, CVPR 2023).

The authors' training (Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/dataset/cifar100.py``)
gives every sample two views: the usual one (random crop and flip) and a strong one, drawn
independently: another random crop and flip, then FixMatch's RandAugment (two of 14 operations,
drawn with replacement, each at a magnitude drawn uniformly from its range) and a Cutout (a square
of side ``v * W``, ``v`` uniform in [0, 0.5), centred uniformly, filled with (125, 123, 114)).

Their operations are PIL's (``ImageOps``, ``ImageEnhance``, ``Image.transform``); the ones here
compute what PIL computes, on uint8 tensors ``(B, C, H, W)`` on any device, a batch at once with
a magnitude per image: PIL's integer grey level, its float32 blend truncated to uint8, its 16.16
fixed-point nearest-neighbour affine map (its float one for pure translations), its inclusive
Cutout rectangle, and a Solarize threshold above 255 that inverts nothing (torchvision's
``solarize`` refuses it). Checked pixel for pixel against PIL (``tests/losses/test_mlkd_views.py``).
Only integer and elementwise float operations: a batch gives what its images give one by one, on
the CPU and on a GPU alike, so the fast path renders the strong views on the device.

``StrongViews`` wraps a training split as ``kd.data.pairs`` does: the strong view's draws come from
the sample's seed (the DataLoader path) or from the batch's indices and views (the fast path), so a
resumed run draws them again exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from kd.data.order import Key, sample_generator, split_key
from kd.data.views import WrappedSplit, to_device

STRONG_SALT = 0x57A6  # keeps the strong view's draws apart from the sample's own and its partner's
CUTOUT_FILL = (125, 123, 114)

# An operation: uint8 images (B, C, H, W) and one magnitude per image -> uint8 images (B, C, H, W)
Op = Callable[[Tensor, Sequence[float]], Tensor]


def _per_image(values: Sequence[float], like: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` as a (B, 1, 1, 1) tensor on ``like``'s device."""
    return to_device(torch.tensor(list(values), dtype=dtype), like.device).view(-1, 1, 1, 1)


def _grey(images: Tensor) -> Tensor:
    """PIL's ``convert("L")``: ITU-R 601-2 luma in 16.16 fixed point, (B, 1, H, W) int64."""
    if images.shape[1] == 1:
        return images.long()
    r, g, b = images.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _blend(degenerate: Tensor, images: Tensor, factors: Sequence[float]) -> Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)`` (``ImageEnhance``): ``d + f * (x - d)`` in
    float32, clipped to [0, 255] and truncated."""
    d, f = degenerate.float(), _per_image(factors, images, torch.float32)
    return (d + f * (images.float() - d)).clamp(0, 255).to(torch.uint8)


def _autocontrast(images: Tensor, _: Sequence[float]) -> Tensor:
    """``ImageOps.autocontrast``: each channel's range stretched to [0, 255] (``int(i * scale + offset)``)."""
    x = images.double()
    lo, hi = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1.0)  # not 255.0 / t: torch takes t's reciprocal first
    out = (x * scale + (-lo) * scale).trunc().clamp(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, images)


def _brightness(images: Tensor, v: Sequence[float]) -> Tensor:
    return _blend(torch.zeros((), device=images.device), images, v)


def _color(images: Tensor, v: Sequence[float]) -> Tensor:
    return _blend(_grey(images), images, v) if images.shape[1] == 3 else images


def _contrast(images: Tensor, v: Sequence[float]) -> Tensor:
    """The degenerate is the grey level's mean, ``int(mean + 0.5)``."""
    grey = _grey(images)
    mean = (grey.sum((-3, -2, -1), keepdim=True).double() / grey[0].numel() + 0.5).floor()
    return _blend(mean, images, v)


def _sharpness(images: Tensor, v: Sequence[float]) -> Tensor:
    """The degenerate is PIL's SMOOTH filter (1 around, 5 in the middle, over 13, rounded), the border kept."""
    x = images.long()
    n = sum(x[..., 1 + dy:x.shape[-2] - 1 + dy, 1 + dx:x.shape[-1] - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    n = n + 4 * x[..., 1:-1, 1:-1]  # (B, C, H - 2, W - 2): 8 neighbours + 5 x the centre
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = torch.div(2 * n + 13, 26, rounding_mode="floor")  # round(n / 13), never a tie
    return _blend(smooth, images, v)


def _equalize(images: Tensor, _: Sequence[float]) -> Tensor:
    return TF.equalize(images)  # PIL's algorithm, integer (checked against ImageOps.equalize)


def _posterize(images: Tensor, v: Sequence[float]) -> Tensor:
    masks = [(0xFF << (8 - max(1, int(b)))) & 0xFF for b in v]  # ImageOps.posterize(img, max(1, int(v)))
    return images & _per_image(masks, images, torch.uint8)


def _solarize(images: Tensor, v: Sequence[float]) -> Tensor:
    """``ImageOps.solarize``: values at or above the threshold inverted; a threshold above 255 inverts none."""
    return torch.where(images.double() < _per_image(v, images, torch.float64), images, 255 - images)


def _identity(images: Tensor, _: Sequence[float]) -> Tensor:
    return images


def _affine(images: Tensor, matrices: Sequence[tuple[float, ...]]) -> Tensor:
    """PIL's ``Image.transform(size, AFFINE, (a, b, c, d, e, f), NEAREST)``, black outside.

    Output pixel (x, y) takes input pixel (a x' + b y' + c, d x' + e y' + f) at the centre
    (x', y') = (x + 0.5, y + 0.5): in 16.16 fixed point (``affine_fixed``), or in double
    precision when b = d = 0 (``ImagingScaleAffine``), as PIL's ``Geometry.c`` does.
    """
    b, _, h, w = images.shape
    fix = [[math.floor(v * 65536.0 + 0.5) for v in (a[0], a[1], a[2] + a[0] * 0.5 + a[1] * 0.5,
                                                  a[3], a[4], a[5] + a[3] * 0.5 + a[4] * 0.5)] for a in matrices]
    k = to_device(torch.tensor(fix, dtype=torch.long), images.device).view(b, 6, 1, 1)
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    x_in = (k[:, 2] + ys * k[:, 1] + xs * k[:, 0]) >> 16  # (B, H, W)
    y_in = (k[:, 5] + ys * k[:, 4] + xs * k[:, 3]) >> 16
    scale = [a[1] == 0 and a[3] == 0 for a in matrices]
    if any(scale):
        m = to_device(torch.tensor([list(a) for a in matrices], dtype=torch.float64), images.device).view(b, 6, 1, 1)
        x_f = (m[:, 2] + m[:, 0] * 0.5 + xs * m[:, 0]).floor().long()  # + 0 * y: b = 0
        y_f = (m[:, 5] + m[:, 4] * 0.5 + ys * m[:, 4]).floor().long()
        use = to_device(torch.tensor(scale), images.device).view(b, 1, 1)
        x_in, y_in = torch.where(use, x_f.expand(b, h, w), x_in), torch.where(use, y_f.expand(b, h, w), y_in)
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    source = (y_in.clamp(0, h - 1) * w + x_in.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, images.shape[1], -1)
    out = images.reshape(b, images.shape[1], h * w).gather(2, source).view_as(images)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=images.dtype, device=images.device))


def _rotation(angle: float, w: int, h: int) -> tuple[float, ...]:
    """The inverse matrix of PIL's ``img.rotate(angle)`` (about the centre, counter-clockwise)."""
    a = -math.radians(angle % 360.0)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    cx, cy = w / 2, h / 2
    m[2], m[5] = m[0] * -cx + m[1] * -cy + m[2] + cx, m[3] * -cx + m[4] * -cy + m[5] + cy
    return tuple(m)


def _rotate(images: Tensor, v: Sequence[float]) -> Tensor:
    return _affine(images, [_rotation(a, images.shape[-1], images.shape[-2]) for a in v])


def _shear_x(images: Tensor, v: Sequence[float]) -> Tensor:
    return _affine(images, [(1.0, s, 0.0, 0.0, 1.0, 0.0) for s in v])


def _shear_y(images: Tensor, v: Sequence[float]) -> Tensor:
    return _affine(images, [(1.0, 0.0, 0.0, s, 1.0, 0.0) for s in v])


def _translate_x(images: Tensor, v: Sequence[float]) -> Tensor:
    return _affine(images, [(1.0, 0.0, t * images.shape[-1], 0.0, 1.0, 0.0) for t in v])


def _translate_y(images: Tensor, v: Sequence[float]) -> Tensor:
    return _affine(images, [(1.0, 0.0, 0.0, 0.0, 1.0, t * images.shape[-2]) for t in v])


# FixMatch's RandAugment pool as the MLKD code has it (augment_list): (name, op, min, max)
OPS: list[tuple[str, Op, float, float]] = [
    ("AutoContrast", _autocontrast, 0, 1),
    ("Brightness", _brightness, 0.05, 0.95),
    ("Color", _color, 0.05, 0.95),
    ("Contrast", _contrast, 0.05, 0.95),
    ("Equalize", _equalize, 0, 1),
    ("Identity", _identity, 0, 1),
    ("Posterize", _posterize, 4, 8),
    ("Rotate", _rotate, -30, 30),
    ("Sharpness", _sharpness, 0.05, 0.95),
    ("ShearX", _shear_x, -0.3, 0.3),
    ("ShearY", _shear_y, -0.3, 0.3),
    ("Solarize", _solarize, 0, 256),
    ("TranslateX", _translate_x, -0.3, 0.3),
    ("TranslateY", _translate_y, -0.3, 0.3),
]


@dataclass(frozen=True)
class StrongDraw:
    """One image's draws: its operations in order, as (index into ``OPS``, magnitude), and its
    Cutout: the side as a fraction of the width and the centre as fractions of width and height."""

    ops: tuple[tuple[int, float], ...]
    cutout: tuple[float, float, float]


class StrongAugment:
    """RandAugment (``n`` operations of FixMatch's 14) then a Cutout, on uint8 images ``(B, C, H, W)``.

    Args:
        n: Operations per image (2 in MLKD).
    """

    def __init__(self, n: int = 2) -> None:
        self.n = n

    def spec(self) -> dict[str, Any]:
        return {"kind": "randaugment_fixmatch_cutout", "n": self.n, "ops": [name for name, *_ in OPS]}

    def draw(self, generator: torch.Generator) -> StrongDraw:
        """One image's operations, magnitudes and Cutout, from ``generator`` (on the host)."""
        picks = torch.randint(len(OPS), (self.n,), generator=generator).tolist()
        ops = tuple((i, OPS[i][2] + float(OPS[i][3] - OPS[i][2]) * float(torch.rand((), generator=generator))) for i in picks)
        side, x, y = (float(torch.rand((), generator=generator)) for _ in range(3))
        return StrongDraw(ops, (0.5 * side, x, y))

    def __call__(self, images: Tensor, draws: Sequence[StrongDraw]) -> Tensor:
        """``images`` (B, C, H, W) uint8, each with its draws, on the images' device."""
        out = images
        for k in range(self.n):  # the k-th operation of every image: one batched call per operation drawn
            for i in sorted({d.ops[k][0] for d in draws}):
                rows = [j for j, d in enumerate(draws) if d.ops[k][0] == i]
                op, values = OPS[i][1], [draws[j].ops[k][1] for j in rows]
                if op is _identity:
                    continue
                if len(rows) == len(draws):  # every image (one image alone, on the DataLoader path)
                    out = op(out, values)
                    continue
                picked = to_device(torch.tensor(rows), images.device)
                out = out.index_copy(0, picked, op(out.index_select(0, picked), values))
        return cutout(out, [d.cutout for d in draws])


def cutout(images: Tensor, cuts: Sequence[tuple[float, float, float]]) -> Tensor:
    """FixMatch's ``Cutout``/``CutoutAbs`` as the MLKD code has it: a square of side ``v * W`` with its
    corner at ``int(max(0, centre - v W / 2))``, filled with (125, 123, 114) through PIL's
    ``rectangle``, which includes its far edge (``int(min(W, corner + v W))``); none when ``v = 0``.

    Args:
        images: (B, C, H, W) uint8.
        cuts: Per image (v, centre x / W, centre y / H).
    """
    _, c, h, w = images.shape
    bounds = []
    for v, cx, cy in cuts:
        size = v * w
        left, top = int(max(0.0, cx * w - size / 2.0)), int(max(0.0, cy * h - size / 2.0))
        right, bottom = int(min(w, left + size)) + 1, int(min(h, top + size)) + 1
        bounds.append((left, right, top, bottom) if v > 0 else (0, 0, 0, 0))
    box = to_device(torch.tensor(bounds), images.device).view(-1, 4, 1, 1)
    cols, rows = torch.arange(w, device=images.device).view(1, 1, w), torch.arange(h, device=images.device).view(1, h, 1)
    inside = (cols >= box[:, 0]) & (cols < box[:, 1]) & (rows >= box[:, 2]) & (rows < box[:, 3])  # (B, H, W)
    fill = to_device(torch.tensor(CUTOUT_FILL if c == 3 else CUTOUT_FILL[:1] * c, dtype=images.dtype), images.device)
    return torch.where(inside.unsqueeze(1), fill.view(1, c, 1, 1), images)


class StrongViews(WrappedSplit):
    """The training split, each item or batch with ``strong_input``: the sample in an independent
    crop-and-flip view, strongly augmented (``StrongAugment``), normalised as the split's inputs.

    Args:
        base: The split (``kd.data.views.ImageViews``).
        augment: The strong augmentation.
    """

    def __init__(self, base: Any, augment: StrongAugment | None = None) -> None:
        super().__init__(base)
        self.augment = augment or StrongAugment()

    def to(self, device: torch.device | str) -> StrongViews:
        return StrongViews(self.base.to(device), self.augment)

    def draw_views(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.base.draw_views(n, generator)

    def render(self, index: Tensor, views: Tensor) -> Tensor:
        return self.base.render(index, views)

    def strong(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """The strong views ``(B, C, H, W)`` of samples ``index``, normalised, on the split's device."""
        images = self.base.images[to_device(index, self.base.images.device)]  # (B, C, H, W) uint8
        if self.base.augment is not None:  # an independent crop and flip first
            images = self.base.augment.apply(images, self.base.draw_views(len(index), generator))
        return self.base.normalize(self.augment(images, [self.augment.draw(generator) for _ in range(len(index))]))

    def __getitem__(self, key: Key) -> dict[str, Any]:
        i, seed = split_key(key)
        item = dict(self.base[key])
        g = sample_generator(None if seed is None else seed ^ STRONG_SALT)
        item["strong_input"] = self.strong(torch.tensor([i]), g)[0]
        return item

    def batch(self, index: Tensor, views: Tensor) -> dict[str, Tensor]:
        """``base.batch`` plus the strong views, drawn from a seed made of the batch's indices and views."""
        out = self.base.batch(index, views)
        digest = hashlib.blake2b(torch.stack([index.cpu().long(), views.cpu().long()]).numpy().tobytes(), digest_size=8)
        g = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") % 2**62 ^ STRONG_SALT)
        out["strong_input"] = self.strong(out["index"], g)  # the index already on the device: no second copy
        return out
