"""Factor Transfer (FT): the student imitates the teacher's "factors", a paraphrase of its last map.

Kim, Park and Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018, arXiv:1802.04977. Two steps:

1. Stage ``paraphraser``: a convolutional autoencoder P (the paraphraser) learns to reconstruct
   the teacher's last-stage map x_T, ``L_rec = ||x_T - P(x_T)||^2``; its encoder has ``k * C_T``
   output channels (the paraphrase rate k, 0.5 for CIFAR).
2. Main training: the teacher factor ``F_T = encoder(x_T)`` (paraphraser frozen) and the student
   factor ``F_S = translator(x_S)`` meet in ``L_FT = || F_S / ||F_S||_2 - F_T / ||F_T||_2 ||_p``
   with p = 1, each factor flattened to one vector per sample.

Reductions and architecture follow the authors' code (Jangho-Kim/Factor-Transfer-pytorch) and
RepDistiller (HobbitLong/RepDistiller, ``distiller_zoo/FT.py``, ``models/util.py``): the
reconstruction loss is the mean squared error (RepDistiller's ``nn.MSELoss``; the authors' script
uses L1), the FT term is the mean of ``|d|^p`` over all elements (the authors' ``nn.L1Loss``), the
paraphraser has no batch norm and the translator has (RepDistiller). Factors of different
spatial sizes are average-pooled to the smaller one, as RepDistiller does.

Deviation from RepDistiller: its ``factor()`` first averages the squared factor over channels
(an attention map) before normalising; kd normalises the whole ``(k*C_T) * H * W`` factor as the
paper and the authors' code do. The FT term is therefore of the order of sqrt(k * C_T) times
smaller than RepDistiller's for the same weight.

The paraphraser is frozen in the main stage by computation, not by flags: its encoder runs under
``torch.no_grad()`` there, so its parameters never receive a gradient and no optimizer (momentum,
weight decay included, which skip parameters whose ``.grad`` is None) changes them, whatever
order stages, optimizer construction and dry runs happen in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import DistillationLoss, Stage, check_pairs, check_positive
from kd.losses.common import as_map, feature, flat, match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def _conv_block(c_in: int, c_out: int, bn: bool, transpose: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = [conv(c_in, c_out, kernel_size=3, stride=1, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.LeakyReLU(0.1))
    return layers


class Paraphraser(nn.Module):
    """The teacher-side autoencoder: three 3x3 convolutions in, three transposed ones out.

    Channels ``C -> C -> C' -> C'`` in the encoder and back in the decoder, LeakyReLU(0.1)
    after each layer, no batch norm (the authors' code and RepDistiller).

    Args:
        channels: Channels C of the teacher's map.
        factor_channels: Channels C' of the factor (``round(k * C)``).
    """

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(
            *_conv_block(c, c, False), *_conv_block(c, k, False), *_conv_block(k, k, False)
        )
        self.decoder = nn.Sequential(
            *_conv_block(k, k, False, True), *_conv_block(k, c, False, True), *_conv_block(c, c, False, True)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(factor (B, C', H, W), reconstruction (B, C, H, W))`` of a map ``(B, C, H, W)``."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def translator(c_in: int, factor_channels: int) -> nn.Sequential:
    """The student-side encoder: 3x3 conv-BN-LeakyReLU ``c_in -> c_in -> C' -> C'`` (RepDistiller)."""
    return nn.Sequential(
        *_conv_block(c_in, c_in, True),
        *_conv_block(c_in, factor_channels, True),
        *_conv_block(factor_channels, factor_channels, True),
    )


def reconstruction_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """The paraphraser's loss: mean squared error ``mean((P(x) - x)^2)``, in fp32.

    Args:
        reconstruction: ``(B, C, H, W)``.
        target: ``(B, C, H, W)``, the teacher's map.
    """
    dtype = torch.promote_types(reconstruction.dtype, torch.float32)
    return F.mse_loss(reconstruction.to(dtype), target.to(dtype))


def factor_transfer_loss(factor_s: Tensor, factor_t: Tensor, p: int = 1) -> Tensor:
    """``mean(|F_S / ||F_S||_2 - F_T / ||F_T||_2|^p)`` over batch and elements.

    Each factor is flattened to one vector per sample and L2-normalised (in fp32); factors of
    different spatial sizes are first average-pooled to the smaller size.

    Args:
        factor_s: Student factor ``(B, C', H_s, W_s)``.
        factor_t: Teacher factor ``(B, C', H_t, W_t)``.
        p: 1 (the paper's choice) or 2.

    Returns:
        A scalar tensor, 0 when the factors are positive multiples of each other.
    """
    factor_s, factor_t = match_spatial(factor_s, factor_t)
    dtype = torch.promote_types(factor_s.dtype, torch.float32)
    s = F.normalize(flat(factor_s).to(dtype), dim=1)  # (B, C' * H * W)
    t = F.normalize(flat(factor_t).to(dtype), dim=1)  # (B, C' * H * W)
    return (s - t).abs().pow(p).mean()


class FTLoss(DistillationLoss):
    """Factor Transfer: ``ce_weight * CE + weight * L_FT``, after a paraphraser stage.

    Args:
        student_nodes: The student's stage outputs; with ``last_only`` only the last is used.
        teacher_nodes: The teacher's, likewise.
        rate: Paraphrase rate k > 0: factor channels ``round(k * C_T)`` (the paper's CIFAR 0.5).
        p: Norm of the FT term, 1 (paper) or 2.
        init_epochs: Epochs of the paraphraser stage (RepDistiller 30); 0 skips it.
        last_only: Transfer the last pair of nodes only (the paper); False gives every pair its
            own paraphraser and translator, needing as many student as teacher nodes.
        weight: Weight of the FT term (RepDistiller's CIFAR-100 recipe: 200).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On a bad rate, p, epoch count or node lists.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        rate: float = 0.5,
        p: int = 1,
        init_epochs: int = 30,
        last_only: bool = True,
        weight: float | Schedule = 200.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        self.rate = check_positive("rate", rate)
        if p not in (1, 2) or isinstance(p, bool):
            raise ConfigError("p", f"must be 1 (the paper) or 2, got {p!r}")
        self.p = int(p)
        self.init_epochs = check_int("init_epochs", init_epochs, 0, valid=">= 0")
        self.last_only = bool(last_only)
        if self.last_only:
            if not self.student_nodes or not self.teacher_nodes:
                raise ConfigError("student_nodes", "FT needs at least one student and one teacher node")
            self.pairs = [(self.student_nodes[-1], self.teacher_nodes[-1])]
        else:
            check_pairs(self.student_nodes, self.teacher_nodes)
            self.pairs = list(zip(self.student_nodes, self.teacher_nodes))
        # Filled by setup(); created here so stages() can hand them out before setup runs.
        self.paraphrasers = nn.ModuleList()
        self.translators = nn.ModuleList()

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds one paraphraser and one translator per transferred pair, from the map shapes."""
        assert teacher is not None, "FTLoss needs the teacher's output"
        del self.paraphrasers[:]
        del self.translators[:]
        for s_name, t_name in self.pairs:
            f_s = as_map(feature(student, s_name, "student_nodes"))  # (B, C_s, H_s, W_s)
            f_t = as_map(feature(teacher, t_name, "teacher_nodes"))  # (B, C_t, H_t, W_t)
            factor = max(1, round(self.rate * f_t.shape[1]))
            self.paraphrasers.append(Paraphraser(f_t.shape[1], factor).to(f_t.device))
            self.translators.append(translator(f_s.shape[1], factor).to(f_s.device))

    def _check_built(self) -> None:
        if len(self.paraphrasers) != len(self.pairs):
            raise RuntimeError("FTLoss.setup() must run before the loss is used")

    def paraphraser_loss(
        self, student: ModelOutput | None, teacher: ModelOutput, batch: Batch
    ) -> dict[str, Tensor]:
        """The paraphraser stage's loss ``{"ft_rec": mean squared reconstruction error}``."""
        self._check_built()
        losses = []
        for (_, t_name), para in zip(self.pairs, self.paraphrasers):
            f_t = as_map(teacher.features[t_name]).detach()  # (B, C_t, H, W)
            _, rec = para(f_t)
            losses.append(reconstruction_loss(rec, f_t))
        return {"ft_rec": torch.stack(losses).sum()}

    def stages(self) -> list[Stage]:
        """The paraphraser stage: trains the paraphrasers on the teacher alone."""
        if self.init_epochs == 0:
            return []
        return [
            Stage(
                name="paraphraser",
                epochs=self.init_epochs,
                loss=self.paraphraser_loss,
                modules=[self.paraphrasers],
                train_student=False,
                freeze_after=True,  # fixed in the main stage, as in RepDistiller
            )
        ]

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "FTLoss needs the teacher's output"
        self._check_built()
        losses = []
        for (s_name, t_name), para, trans in zip(self.pairs, self.paraphrasers, self.translators):
            with torch.no_grad():  # the paraphraser is frozen after its stage
                factor_t = para.encoder(as_map(teacher.features[t_name]))  # (B, C', H_t, W_t)
            factor_s = trans(as_map(student.features[s_name]))  # (B, C', H_s, W_s)
            losses.append(factor_transfer_loss(factor_s, factor_t, self.p))
        return {"ft": torch.stack(losses).sum()}

    def extra_repr(self) -> str:
        return (
            f"rate={self.rate:g}, p={self.p}, init_epochs={self.init_epochs}, "
            f"pairs={self.pairs}, {super().extra_repr()}"
        )
