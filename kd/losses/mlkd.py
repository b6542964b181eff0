"""Multi-level logit distillation (MLKD), on the batch's view, or on it and a strongly augmented one.

Jin, Wang and Lin, "Multi-Level Logit Distillation", CVPR 2023 (pp. 24276-24285). The student's
predictions are aligned with the teacher's at three levels, each at several temperatures T
("prediction augmentation"), with ``P = softmax(Z / T)`` of shape ``(B, C)``:

- instance: ``T^2 * KL(P_t || P_s)`` per sample, averaged over the batch (plain KD);
- batch: the sample-correlation Gram matrices ``G = P P^T`` (B x B),
  ``sum((G_t - G_s)^2) / B``;
- class: the class-correlation matrices ``M = P^T P`` (C x C), ``sum((M_t - M_s)^2) / C``.

Formulas, temperatures and weights follow the authors' code (Jin-Ying/Multi-Level-Logit-Distillation,
``mdistiller/distillers/KD_ours.py``, on mdistiller's defaults): T in {2, 3, 4, 5, 6}, every
term weighted by KD_WEIGHT 0.9, CE weight 0.1, the terms summed over temperatures.

Confidence masks, as the authors compute them from the teacher's softmax at T = 1 on the weak
view: the sample mask keeps the samples whose top-class probability is <= its batch median
(``np.percentile(., 50)``, so the *less* confident half, ties included); the class mask keeps the
classes whose probability summed over the batch is <= the median over classes. In the released
code the losses are first reduced to scalars (``reduce=True``; the per-sample variant is
commented out) and then multiplied by the boolean mask and averaged, so each mask acts only
through the fraction it keeps: instance and batch terms are scaled by the fraction of samples
kept, the class term by the fraction of classes kept (both about 1/2). ``mlkd_loss`` reproduces
exactly that.

Two views (``views=2``, the paper's training): every image also comes in a strongly augmented view
(``kd.data.strong``: an independent crop and flip, FixMatch's RandAugment and a Cutout), on which
both networks run. The authors' loss then adds CE on the strong view (``strong_ce``) and an
unmasked instance term (``mlkd_strong``, ``strong_instance_loss``) at T in {4, 3, 5} on the strong
view, whose T = 2 and 6 terms in fact take the weak logits, as their code does; their strong-view
batch and class terms are computed and discarded there, and left out here. ``views=1`` (the
default of ``distill=mlkd``) computes the weak-view terms on the batch's one view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_positive
from kd.losses.kd import kd_loss
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def _probs(logits: Tensor, temperature: float) -> Tensor:
    return F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=1)


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` kept in fp32 under autocast, which would run it in bf16/fp16: the loss is a
    difference of two such products, and low precision swamps it when they are close."""
    with torch.autocast(a.device.type, enabled=False):
        return a @ b


def batch_correlation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``sum((P_t P_t^T - P_s P_s^T)^2) / B``: alignment of the B x B sample-correlation matrices.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.
        temperature: T > 0.

    Returns:
        A scalar tensor.
    """
    p_s, p_t = _probs(student_logits, temperature), _probs(teacher_logits, temperature)  # (B, C)
    g_s, g_t = _gram(p_s, p_s.t()), _gram(p_t, p_t.t())  # (B, B)
    return ((g_t - g_s) ** 2).sum() / p_s.shape[0]


def class_correlation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``sum((P_t^T P_t - P_s^T P_s)^2) / C``: alignment of the C x C class-correlation matrices.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.
        temperature: T > 0.

    Returns:
        A scalar tensor.
    """
    p_s, p_t = _probs(student_logits, temperature), _probs(teacher_logits, temperature)  # (B, C)
    m_s, m_t = _gram(p_s.t(), p_s), _gram(p_t.t(), p_t)  # (C, C)
    return ((m_t - m_s) ** 2).sum() / p_s.shape[1]


def confidence_masks(teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' sample and class masks from the teacher's softmax at T = 1.

    Args:
        teacher_logits: ``(B, C)``.

    Returns:
        ``(sample_mask (B,), class_mask (C,))``, booleans: samples whose top-class probability
        is <= the batch median, and classes whose probability summed over the batch is <= the
        median over classes (medians interpolated linearly, as ``np.percentile``).
    """
    p_t = _probs(teacher_logits.detach(), 1.0)  # (B, C)
    confidence = p_t.max(dim=1).values  # (B,)
    class_confidence = p_t.sum(dim=0)  # (C,)
    sample_mask = confidence <= torch.quantile(confidence, 0.5)
    class_mask = class_confidence <= torch.quantile(class_confidence, 0.5)
    return sample_mask, class_mask


def mlkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Sequence[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """MLKD's instance, batch and class terms on one view, as the authors' weak-view terms.

    Each term is summed over ``temperatures`` and, as in the released code, multiplied by the
    fraction of samples (instance, batch) or classes (class) its confidence mask keeps.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.
        temperatures: The temperatures, each > 0.

    Returns:
        ``(instance, batch, class)``, scalar tensors.
    """
    sample_mask, class_mask = confidence_masks(teacher_logits)
    instance = sum(kd_loss(student_logits, teacher_logits, t) for t in temperatures)
    batch = sum(batch_correlation_loss(student_logits, teacher_logits, t) for t in temperatures)
    klass = sum(class_correlation_loss(student_logits, teacher_logits, t) for t in temperatures)
    sample_kept = sample_mask.to(instance.dtype).mean()
    class_kept = class_mask.to(instance.dtype).mean()
    return sample_kept * instance, sample_kept * batch, class_kept * klass


class MLKDLoss(DistillationLoss):
    """MLKD: ``ce_weight * CE + weight * (instance + batch + class)`` on the batch's view, and with
    ``views=2`` the strong view's CE and instance terms (see the module docstring).

    Defaults are the authors' CIFAR-100 settings (mdistiller's KD weights 0.9 and 0.1, T in
    {2, 3, 4, 5, 6}); their configs also halve the learning rate to 0.025, a recipe setting
    outside this loss.

    Args:
        temperatures: Temperatures of the prediction augmentation, each > 0.
        weight: Weight of the distillation terms (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy (of each view).
        views: 1 (the batch's view) or 2 (and a strongly augmented one, ``kd.data.strong``).
        strong_temperatures: The temperatures the strong-view instance term reads the strong
            view at (the authors': T, 3, 5); the others of ``temperatures`` read the weak view.

    Raises:
        ConfigError: If a temperature list is empty or holds a value that is not > 0, ``views``
            is not 1 or 2, or a weight is negative.
    """

    def __init__(
        self,
        temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
        weight: float | Schedule = 0.9,
        ce_weight: float = 0.1,
        views: int = 1,
        strong_temperatures: Sequence[float] = (4.0, 3.0, 5.0),
    ) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperatures = _temperatures("temperatures", temperatures)
        if views not in (1, 2):
            raise ConfigError("views", f"must be 1 (the batch's view) or 2 (and a strongly augmented one), got {views!r}")
        self.views = views
        self.requires_strong_view = views == 2
        self.strong_temperatures = _temperatures("strong_temperatures", strong_temperatures)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, epoch: int = 0) -> dict[str, Tensor]:
        terms = super().forward(student, teacher, batch, epoch)
        if self.views == 2 and self.ce_weight > 0:  # the authors' CE on the strong view too
            terms["strong_ce"] = self.ce_weight * F.cross_entropy(batch["strong_logits"].float(), batch["target"])
        return terms

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "MLKDLoss needs the teacher's output"
        instance, batch_term, class_term = mlkd_loss(student.logits, teacher.logits.detach(), self.temperatures)
        terms = {"mlkd_instance": instance, "mlkd_batch": batch_term, "mlkd_class": class_term}
        if self.views == 2:
            terms["mlkd_strong"] = strong_instance_loss(
                student.logits, teacher.logits.detach(), batch["strong_logits"], batch["strong_teacher_logits"].detach(),
                self.strong_temperatures, [t for t in self.temperatures if t not in self.strong_temperatures])
        return terms

    def extra_repr(self) -> str:
        temps = ", ".join(f"{t:g}" for t in self.temperatures)
        return f"temperatures=({temps}), views={self.views}, {super().extra_repr()}"


def _temperatures(key: str, values: Sequence[float]) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(key, f"must be a non-empty list of numbers > 0, got {values!r}")
    return tuple(check_positive(f"{key}[{i}]", t) for i, t in enumerate(values))


def strong_instance_loss(student_weak: Tensor, teacher_weak: Tensor, student_strong: Tensor, teacher_strong: Tensor,
                         strong_temperatures: Sequence[float], weak_temperatures: Sequence[float]) -> Tensor:
    """The authors' ``loss_kd_strong`` (``KD_ours.py``): instance KD on the strong view at
    ``strong_temperatures`` (T, 3 and 5) plus, as their code does, on the weak view at the other
    temperatures (2 and 6), unmasked. Their strong-view batch and class terms are computed and
    discarded there, and are not here.

    Args:
        student_weak, teacher_weak: ``(B, C)`` logits on the weak view.
        student_strong, teacher_strong: ``(B, C)`` logits on the strong view.
        strong_temperatures: Temperatures of the strong-view terms.
        weak_temperatures: Temperatures of the terms the code takes on the weak view.
    """
    strong = sum(kd_loss(student_strong, teacher_strong, t) for t in strong_temperatures)
    return strong + sum((kd_loss(student_weak, teacher_weak, t) for t in weak_temperatures), student_weak.new_zeros(()))
