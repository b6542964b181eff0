"""MLKD with the strong second view: the authors' whole loss, the strong augmentation, a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.data.strong import OPS, StrongAugment, StrongViews, cutout
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


def test_the_strong_view_is_randaugment_then_cutout_drawn_from_the_seed() -> None:
    g = torch.Generator().manual_seed(3)
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
    # Cutout: a clipped square of (125, 123, 114) at most half the width
    out = cutout(torch.zeros(3, 32, 32, dtype=torch.uint8), 0.5, g)
    filled = (out[0] == 125) & (out[1] == 123) & (out[2] == 114)
    rows, cols = filled.any(1).sum().item(), filled.any(0).sum().item()
    assert filled.sum().item() == rows * cols and 0 < rows <= 16 and 0 < cols <= 16


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
