"""A strongly augmented second view of each training sample, for MLKD (Jin, Wang & Lin, CVPR 2023).

The authors' training (Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/dataset/cifar100.py``)
gives every sample two views: the usual one (random crop and flip) and a strong one, drawn
independently: another random crop and flip, then FixMatch's RandAugment (two of 14 operations,
drawn with replacement, each at a magnitude drawn uniformly from its range) and a Cutout (a square
of side ``v * W``, ``v`` uniform in [0, 0.5), centred uniformly, filled with (125, 123, 114)).
``StrongAugment`` does the same on uint8 tensors with torchvision's functional ops (PIL's, on
tensors: the enhancements blend as ``ImageEnhance`` does; shears and translations are about the
image's corner, as PIL's ``affine``). ``StrongViews`` wraps a training split as ``kd.data.pairs``
does: the strong view's draws come from the sample's seed (the DataLoader path) or from the
batch's indices and views (the fast path), so a resumed run draws them again exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from kd.data.order import Key, sample_generator, split_key
from kd.data.views import WrappedSplit

STRONG_SALT = 0x57A6  # keeps the strong view's draws apart from the sample's own and its partner's
CUTOUT_FILL = (125, 123, 114)


def _shear(img: Tensor, v: float, axis: int) -> Tensor:
    shear = [math.degrees(math.atan(v)), 0.0] if axis == 0 else [0.0, math.degrees(math.atan(v))]
    return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])


def _translate(img: Tensor, v: float, axis: int) -> Tensor:
    shift = round(v * img.shape[-1 if axis == 0 else -2])
    return TF.affine(img, angle=0.0, translate=[shift, 0] if axis == 0 else [0, shift], scale=1.0, shear=[0.0, 0.0])


# FixMatch's RandAugment pool as the MLKD code has it: (name, op on a uint8 image and a magnitude, min, max)
OPS: list[tuple[str, Callable[[Tensor, float], Tensor], float, float]] = [
    ("AutoContrast", lambda x, v: TF.autocontrast(x), 0, 1),
    ("Brightness", TF.adjust_brightness, 0.05, 0.95),
    ("Color", TF.adjust_saturation, 0.05, 0.95),
    ("Contrast", TF.adjust_contrast, 0.05, 0.95),
    ("Equalize", lambda x, v: TF.equalize(x), 0, 1),
    ("Identity", lambda x, v: x, 0, 1),
    ("Posterize", lambda x, v: TF.posterize(x, int(v)), 4, 8),
    ("Rotate", lambda x, v: TF.rotate(x, v), -30, 30),
    ("Sharpness", TF.adjust_sharpness, 0.05, 0.95),
    ("ShearX", lambda x, v: _shear(x, v, 0), -0.3, 0.3),
    ("ShearY", lambda x, v: _shear(x, v, 1), -0.3, 0.3),
    ("Solarize", lambda x, v: TF.solarize(x, v), 0, 256),
    ("TranslateX", lambda x, v: _translate(x, v, 0), -0.3, 0.3),
    ("TranslateY", lambda x, v: _translate(x, v, 1), -0.3, 0.3),
]


class StrongAugment:
    """RandAugment (``n`` operations of FixMatch's 14) then a Cutout, on one uint8 image ``(C, H, W)``.

    Args:
        n: Operations per image (2 in MLKD).
    """

    def __init__(self, n: int = 2) -> None:
        self.n = n

    def spec(self) -> dict[str, Any]:
        return {"kind": "randaugment_fixmatch_cutout", "n": self.n, "ops": [name for name, *_ in OPS]}

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        picks = torch.randint(len(OPS), (self.n,), generator=generator).tolist()
        for i in picks:
            _, op, low, high = OPS[i]
            image = op(image, low + float(high - low) * float(torch.rand((), generator=generator)))
        return cutout(image, 0.5 * float(torch.rand((), generator=generator)), generator)


def cutout(image: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """A square of side ``fraction * W`` at a uniform centre, clipped at the borders, filled with
    (125, 123, 114) (FixMatch's ``CutoutAbs``)."""
    _, h, w = image.shape
    size = fraction * w
    x0, y0 = float(torch.rand((), generator=generator)) * w, float(torch.rand((), generator=generator)) * h
    left, top = int(max(0, x0 - size / 2.0)), int(max(0, y0 - size / 2.0))
    right, bottom = int(min(w, left + size)), int(min(h, top + size))
    out = image.clone()
    fill = torch.tensor(CUTOUT_FILL[: image.shape[0]] if image.shape[0] == 3 else CUTOUT_FILL[:1] * image.shape[0],
                        dtype=image.dtype, device=image.device)
    out[:, top:bottom, left:right] = fill.view(-1, 1, 1)
    return out


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
        images = self.base.images[index.to(self.base.images.device)]  # (B, C, H, W) uint8
        if self.base.augment is not None:  # an independent crop and flip first
            images = self.base.augment.apply(images, self.base.draw_views(len(index), generator))
        cpu = torch.stack([self.augment(img, generator) for img in images.cpu()]).to(images.device)
        mean, std = (torch.tensor(v, device=cpu.device).view(-1, 1, 1) for v in (self.base.mean, self.base.std))
        return (cpu.float() / 255.0 - mean) / std

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
        out["strong_input"] = self.strong(index, g).to(out["input"].device)
        return out
