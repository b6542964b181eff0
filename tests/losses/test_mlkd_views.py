"""MLKD with the strong second view: the authors' whole loss, the strong augmentation, a run."""

from __future__ import annotations

import numpy as np
import PIL
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kd.data.strong import OPS, StrongAugment, StrongDraw, StrongViews, cutout
from kd.data.views import ImageViews, PadCrop
from kd.errors import ConfigError
from kd.losses.mlkd import MLKDLoss
from kd.outputs import ModelOutput
from kd.training.run import run


# --- Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py (@ 5ee473f), as released ---
def _kd_loss(s, t, T):
    return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(1).mean() * T**2


def _cc_loss(s, t, T):
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    return ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / t.shape[1]


def _bc_loss(s, t, T):
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    return ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / t.shape[0]


def _authors_forward(s_w, s_s, t_w, t_s, y, T=4.0, ce=0.1, w=0.9):
    p = F.softmax(t_w, dim=1)
    confidence = p.max(dim=1).values
    mask = confidence.le(float(np.percentile(confidence.numpy().flatten(), 50))).float()
    class_conf = p.sum(dim=0)
    class_mask = class_conf.le(float(np.percentile(class_conf.numpy().flatten(), 50))).float()
    temps = (T, 3.0, 5.0, 2.0, 6.0)
    loss_ce = ce * (F.cross_entropy(s_w, y) + F.cross_entropy(s_s, y))
    kd_weak = sum(w * (_kd_loss(s_w, t_w, t) * mask).mean() for t in temps)
    kd_strong = (w * _kd_loss(s_s, t_s, T) + w * _kd_loss(s_s, t_s, 3.0) + w * _kd_loss(s_s, t_s, 5.0)
                 + w * _kd_loss(s_w, t_w, 2.0) + w * _kd_loss(s_w, t_w, 6.0))  # their T = 2, 6 "strong" terms: weak logits
    cc_weak = sum(w * (_cc_loss(s_w, t_w, t) * class_mask).mean() for t in temps)
    bc_weak = sum(w * (_bc_loss(s_w, t_w, t) * mask).mean() for t in temps)
    return loss_ce + kd_weak + kd_strong + cc_weak + bc_weak
# --- end of the authors' code ---


def test_two_views_equal_the_authors_whole_loss() -> None:
    torch.manual_seed(0)
    s_w, s_s, t_w, t_s = (torch.randn(8, 20, dtype=torch.float64) * 3 for _ in range(4))
    y = torch.randint(0, 20, (8,))
    loss = MLKDLoss(views=2)
    assert loss.requires_strong_view and not MLKDLoss().requires_strong_view
    terms = loss(ModelOutput(s_w, {}), ModelOutput(t_w, {}),
                 {"target": y, "strong_logits": s_s, "strong_teacher_logits": t_s})
    assert set(terms) == {"ce", "strong_ce", "mlkd_instance", "mlkd_batch", "mlkd_class", "mlkd_strong"}
    want = _authors_forward(s_w, s_s, t_w, t_s, y)
    assert sum(terms.values()).item() == pytest.approx(want.item(), rel=1e-6)  # kd's CE is fp32


# --- Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py (@ 5ee473f), as released ---
def AutoContrast(img, _):
    return ImageOps.autocontrast(img)


def Brightness(img, v):
    assert v >= 0.0
    return ImageEnhance.Brightness(img).enhance(v)


def Color(img, v):
    assert v >= 0.0
    return ImageEnhance.Color(img).enhance(v)


def Contrast(img, v):
    assert v >= 0.0
    return ImageEnhance.Contrast(img).enhance(v)


def Equalize(img, _):
    return ImageOps.equalize(img)


def Identity(img, v):
    return img


def Posterize(img, v):  # [4, 8]
    v = int(v)
    v = max(1, v)
    return ImageOps.posterize(img, v)


def Rotate(img, v):  # [-30, 30]
    return img.rotate(v)


def Sharpness(img, v):  # [0.1,1.9]
    assert v >= 0.0
    return ImageEnhance.Sharpness(img).enhance(v)


def ShearX(img, v):  # [-0.3, 0.3]
    return img.transform(img.size, PIL.Image.AFFINE, (1, v, 0, 0, 1, 0))


def ShearY(img, v):  # [-0.3, 0.3]
    return img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, v, 1, 0))


def TranslateX(img, v):  # [-150, 150] => percentage: [-0.45, 0.45]
    v = v * img.size[0]
    return img.transform(img.size, PIL.Image.AFFINE, (1, 0, v, 0, 1, 0))


def TranslateY(img, v):  # [-150, 150] => percentage: [-0.45, 0.45]
    v = v * img.size[1]
    return img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, v))


def Solarize(img, v):  # [0, 256]
    assert 0 <= v <= 256
    return ImageOps.solarize(img, v)


def Cutout(img, v):  # [0, 60] => percentage: [0, 0.2] => change to [0, 0.5]
    assert 0.0 <= v <= 0.5
    if v <= 0.:
        return img

    v = v * img.size[0]
    return CutoutAbs(img, v)


def CutoutAbs(img, v):  # [0, 60] => percentage: [0, 0.2]
    if v < 0:
        return img
    w, h = img.size
    x0 = np.random.uniform(w)
    y0 = np.random.uniform(h)

    x0 = int(max(0, x0 - v / 2.))
    y0 = int(max(0, y0 - v / 2.))
    x1 = min(w, x0 + v)
    y1 = min(h, y0 + v)

    xy = (x0, y0, x1, y1)
    color = (125, 123, 114)
    img = img.copy()
    ImageDraw.Draw(img).rectangle(xy, color)
    return img


def augment_list():
    return [(AutoContrast, 0, 1), (Brightness, 0.05, 0.95), (Color, 0.05, 0.95), (Contrast, 0.05, 0.95),
            (Equalize, 0, 1), (Identity, 0, 1), (Posterize, 4, 8), (Rotate, -30, 30), (Sharpness, 0.05, 0.95),
            (ShearX, -0.3, 0.3), (ShearY, -0.3, 0.3), (Solarize, 0, 256), (TranslateX, -0.3, 0.3),
            (TranslateY, -0.3, 0.3)]
# --- end of the authors' code ---


def _images(n: int, seed: int) -> list[np.ndarray]:
    """CIFAR-sized RGB images of three kinds: noise, 4x4 blocks (flat areas, edges), low contrast."""
    rng = np.random.default_rng(seed)
    kinds = [lambda: rng.integers(0, 256, (32, 32, 3)),
             lambda: np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((4, 4, 1))),
             lambda: rng.integers(0, 256, (32, 32, 3)) // 4 + 60]
    return [kinds[i % 3]().astype(np.uint8) for i in range(n)]


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8


def _edges(low: float, high: float) -> list[float]:
    return [low, high - 1e-9, low + 0.5 * (high - low), 255.5] if high == 256 else [low, high - 1e-9, 0.0 if low < 0 else low]


@pytest.mark.parametrize("op", range(14), ids=[name for name, *_ in OPS])
def test_each_operation_gives_the_authors_pil_image_pixel_for_pixel(op: int) -> None:
    name, ours, low, high = OPS[op]
    theirs, their_low, their_high = augment_list()[op]
    assert (theirs.__name__, their_low, their_high) == (name, low, high)
    rng = np.random.default_rng(op)
    magnitudes = [*_edges(low, high), *(low + (high - low) * rng.random(9))]  # the range's ends, its middle, draws
    images = _images(len(magnitudes), seed=op)
    want = _tensor([np.asarray(theirs(Image.fromarray(a), v)) for a, v in zip(images, magnitudes)])
    got = ours(_tensor(images), magnitudes)  # one batch, a magnitude per image
    assert got.dtype == torch.uint8 and torch.equal(got, want), name


def test_the_cutout_is_the_authors_square_edges_included() -> None:
    images = _images(12, seed=99)
    sides = [0.0, 0.5 - 1e-9, 0.01, *np.random.default_rng(0).random(9) * 0.5]
    want = []
    for i, (a, v) in enumerate(zip(images, sides)):
        np.random.seed(i)
        want.append(np.asarray(Cutout(Image.fromarray(a), v)))
    centres = []
    for i in range(12):  # the same centres (x0 / 32 is exact)
        np.random.seed(i)
        centres.append((np.random.uniform(32) / 32, np.random.uniform(32) / 32))
    got = cutout(_tensor(images), [(v, cx, cy) for v, (cx, cy) in zip(sides, centres)])
    assert torch.equal(got, _tensor(want))
    assert torch.equal(got[0], _tensor(images)[0])  # v = 0: none


def test_a_batch_of_strong_views_is_each_image_augmented_alone() -> None:
    augment = StrongAugment()
    g = torch.Generator().manual_seed(5)
    draws = [augment.draw(g) for _ in range(48)]
    assert {i for d in draws for i, _ in d.ops} == set(range(14))  # every operation, several images each
    images = _tensor(_images(48, seed=7))
    together = augment(images, draws)
    alone = torch.cat([augment(images[i:i + 1], [d]) for i, d in enumerate(draws)])
    assert torch.equal(together, alone)
    # the draws as the authors' RandAugment makes them: ops with replacement, a uniform magnitude each, then a Cutout
    for d in draws:
        assert len(d.ops) == 2 and all(OPS[i][2] <= v <= OPS[i][3] for i, v in d.ops)
        assert 0 <= d.cutout[0] < 0.5 and all(0 <= c < 1 for c in d.cutout[1:])


def test_the_authors_randaugment_with_our_draws_gives_our_strong_view(monkeypatch: pytest.MonkeyPatch) -> None:
    augment = StrongAugment()
    g = torch.Generator().manual_seed(11)
    images = _images(24, seed=3)
    draws = [augment.draw(g) for _ in images]
    want = []
    for a, d in zip(images, draws):
        img = Image.fromarray(a)
        for i, v in d.ops:  # RandAugment.__call__ with these picks and magnitudes
            op, _, _ = augment_list()[i]
            img = op(img, v)
        v, cx, cy = d.cutout
        centre = iter((cx * 32, cy * 32))
        monkeypatch.setattr(np.random, "uniform", lambda w: next(centre))  # CutoutAbs's centre: ours
        want.append(np.asarray(Cutout(img, v)))
    assert torch.equal(augment(_tensor(images), draws), _tensor(want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_strong_views_on_the_gpu_are_those_on_the_cpu() -> None:
    augment = StrongAugment()
    g = torch.Generator().manual_seed(5)
    draws = [augment.draw(g) for _ in range(64)]
    images = _tensor(_images(64, seed=1))
    assert torch.equal(augment(images.cuda(), draws).cpu(), augment(images, draws))


def test_the_strong_view_is_drawn_from_the_seed() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    base = ImageViews(images, torch.arange(4), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), PadCrop(4, flip=True))
    strong = StrongViews(base)
    a = strong.strong(torch.arange(4), torch.Generator().manual_seed(7))
    b = strong.strong(torch.arange(4), torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)  # the same seed, the same views (exact resume)
    assert not torch.equal(a, strong.strong(torch.arange(4), torch.Generator().manual_seed(8)))
    item = strong[(2, 12345)]
    assert torch.equal(item["strong_input"], strong[(2, 12345)]["strong_input"]) and item["index"] == 2
    assert len(OPS) == 14 and StrongAugment().spec()["n"] == 2
    assert isinstance(StrongAugment().draw(torch.Generator()), StrongDraw)


@pytest.mark.parametrize("fast", [False, True])
def test_a_two_view_run_feeds_both_networks_the_strong_view(make_cfg, tmp_path, fast: bool, monkeypatch) -> None:
    from tests.datagen import write_cifar

    write_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=20)
    seen: list[torch.Tensor] = []
    real = MLKDLoss.loss_terms

    def spy(self, student, teacher, batch):  # noqa: ANN001, ANN202
        seen.append(batch["strong_teacher_logits"])
        assert batch["strong_logits"].requires_grad and batch["strong_input"].shape == batch["input"].shape
        return real(self, student, teacher, batch)

    monkeypatch.setattr(MLKDLoss, "loss_terms", spy)
    results = run(make_cfg("data=cifar10", f"paths.data_dir={tmp_path / 'data'}", "data.val_size=10",
                           "model/teacher=cifar_resnet56", "model/student=cifar_resnet8", "distill=mlkd",
                           "distill.views=2", f"data.fast={str(fast).lower()}"))
    assert results["status"] == "completed" and seen
    assert "train/loss_mlkd_strong" in open(next((tmp_path / "run").rglob("metrics.csv"))).readline()


def test_two_views_need_images_and_a_known_view_count(make_cfg) -> None:
    with pytest.raises(ConfigError, match="views"):
        MLKDLoss(views=3)
    with pytest.raises(ConfigError, match="strongly augmented second view") as e:  # digits: feature vectors
        run(make_cfg("distill=mlkd", "distill.views=2"))
    assert e.value.key == "distill"
