"""DeiT (Touvron et al. ICML 2021): the distillation token's losses by hand, the ViT against timm's, a short run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd.errors import ConfigError
from kd.losses.deit import DeiTLoss
from kd.models.build import build_model
from kd.models.vit import DistilledViT
from kd.outputs import ModelOutput
from kd.training.lr import warmup_cosine
from kd.training.run import run


def _outputs(g: torch.Generator) -> tuple[ModelOutput, ModelOutput, torch.Tensor]:
    cls, dist = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    student = ModelOutput((cls + dist) / 2, {"head": cls, "head_dist": dist})
    return student, ModelOutput(torch.randn(6, 5, generator=g) * 3), torch.randint(0, 5, (6,), generator=g)


def test_hard_distillation_is_the_class_head_on_labels_and_the_token_on_the_teacher_argmax() -> None:
    student, teacher, y = _outputs(torch.Generator().manual_seed(0))
    terms = DeiTLoss(kind="hard", alpha=0.3, label_smoothing=0.1)(student, teacher, {"target": y})
    assert set(terms) == {"cls", "dist"}  # no cross-entropy on the averaged logits
    cls, dist = student.features["head"], student.features["head_dist"]
    # label smoothing 0.1 by hand: (1 - eps) * NLL + eps * mean over classes of -log p
    log_p = cls.log_softmax(1)
    smoothed = (0.9 * -log_p.gather(1, y[:, None]).squeeze(1) + 0.1 * -log_p.mean(1)).mean()
    torch.testing.assert_close(terms["cls"], 0.7 * smoothed)
    torch.testing.assert_close(terms["dist"], 0.3 * F.cross_entropy(dist, teacher.logits.argmax(1)))


def test_soft_distillation_divides_the_kl_by_batch_times_classes_as_the_authors_code() -> None:
    student, teacher, y = _outputs(torch.Generator().manual_seed(1))
    t = 3.0
    terms = DeiTLoss(kind="soft", alpha=0.5, temperature=t)(student, teacher, {"target": y})
    p_t = torch.softmax(teacher.logits / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student.features["head_dist"] / t, 1))).sum()
    torch.testing.assert_close(terms["dist"], 0.5 * kl * t * t / 30)  # 6 samples x 5 classes
    torch.testing.assert_close(terms["cls"], 0.5 * F.cross_entropy(student.features["head"], y))
    with pytest.raises(ConfigError, match="hard, soft"):
        DeiTLoss(kind="both")
    with pytest.raises(ConfigError, match="alpha"):
        DeiTLoss(alpha=1.5)


def test_the_vit_is_timms_distilled_deit_and_predicts_the_mean_of_its_heads() -> None:
    timm = pytest.importorskip("timm")
    for size, patch, classes in ((32, 4, 100), (224, 16, 1000)):
        ours = build_model({"_target_": "kd.models.vit.DistilledViT", "patch_size": patch}, key="m", num_classes=classes,
                           input_shape=(3, size, size))
        theirs = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=classes, img_size=size, patch_size=patch)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == 5_910_800  # DeiT-Ti at ImageNet size
    net = DistilledViT(10, in_channels=1, image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2).eval()
    seen = {}
    for name in ("head", "head_dist"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    out = net(torch.randn(3, 1, 8, 8))
    torch.testing.assert_close(out, (seen["head"] + seen["head_dist"]) / 2)
    with pytest.raises(ConfigError, match="does not divide"):
        DistilledViT(10, image_size=30, patch_size=4)


def test_warmup_cosine_is_timms_cosine_schedule_per_epoch() -> None:
    timm_scheduler = pytest.importorskip("timm.scheduler")
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    theirs_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ours = warmup_cosine(ours_opt, 20, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    theirs = timm_scheduler.CosineLRScheduler(theirs_opt, t_initial=20, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6)
    for epoch in range(20):
        theirs.step(epoch)
        assert math.isclose(ours_opt.param_groups[0]["lr"], theirs_opt.param_groups[0]["lr"], rel_tol=1e-9), epoch
        ours_opt.step()
        ours.step()


def test_a_short_deit_run_teaches_the_distillation_token(make_cfg, tmp_path: Path) -> None:
    results = run(make_cfg("distill=deit", "trainer.max_epochs=3", "teacher.recipe.max_epochs=5", "report.enabled=false",
                           f"teacher.store_dir={tmp_path / 'store'}", fast=False))
    assert results["status"] == "completed" and results["student"]["params"] == 26_932
    rows = [r for r in csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()) if r.get("train/loss_dist")]
    dist = [float(r["train/loss_dist"]) for r in rows]
    assert len(dist) == 3 and dist[-1] < dist[0]  # the token learns the teacher's labels
