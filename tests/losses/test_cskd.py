"""CS-KD against the authors' loss, its gradient, and a run: the student learns from its own
predictions on same-class partners, with no teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.errors import ConfigError
from kd.losses.cskd import CSKDLoss
from kd.outputs import ModelOutput
from kd.training.run import run


class _AuthorsKDLoss(nn.Module):
    """train.py::KDLoss of alinlab/cs-kd."""

    def __init__(self, temp_factor: float) -> None:
        super().__init__()
        self.temp_factor = temp_factor
        self.kl_div = nn.KLDivLoss(reduction="sum")

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - theirs
        log_p = torch.log_softmax(input / self.temp_factor, dim=1)
        q = torch.softmax(target / self.temp_factor, dim=1)
        return self.kl_div(log_p, q) * (self.temp_factor**2) / input.size(0)


@pytest.mark.parametrize("lamda", [1.0, 3.0])
def test_the_loss_equals_the_authors(lamda: float) -> None:
    torch.manual_seed(0)
    s, pair = torch.randn(6, 10, dtype=torch.float64) * 3, torch.randn(6, 10, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (6,))
    terms = CSKDLoss(weight=lamda)(ModelOutput(s, {}), None, {"input": s, "target": y, "pair_logits": pair})
    want = nn.functional.cross_entropy(s, y) + lamda * _AuthorsKDLoss(4.0)(s, pair)  # train.py, -cls
    assert sum(terms.values()).item() == pytest.approx(want.item(), rel=1e-6)  # kd's CE is fp32


def test_no_gradient_reaches_the_partners_logits() -> None:
    s = torch.randn(4, 5, requires_grad=True)
    pair = torch.randn(4, 5, requires_grad=True)
    loss = sum(CSKDLoss()(ModelOutput(s, {}), None, {"target": torch.tensor([0, 1, 2, 3]), "pair_logits": pair}).values())
    loss.backward()
    assert pair.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_bad_settings_and_a_batch_without_partners() -> None:
    with pytest.raises(ConfigError, match="^temperature: must be > 0"):
        CSKDLoss(temperature=0)
    with pytest.raises(ValueError, match="needs batch\\['pair_logits'\\]"):
        CSKDLoss()(ModelOutput(torch.zeros(2, 3), {}), None, {"target": torch.tensor([0, 1])})


@pytest.mark.parametrize("fast", [False, True])
def test_a_run_trains_on_class_pairs_without_a_teacher(make_cfg, fast: bool, monkeypatch) -> None:
    from kd.training import module as module_mod

    seen: list[torch.Tensor] = []
    real = module_mod.DistillationModule.training_step

    def spy_first(self, batch, batch_idx):  # noqa: ANN001, ANN202 - Lightning's signature
        out = real(self, batch, batch_idx)
        assert batch["pair_input"].shape == batch["input"].shape
        seen.append(batch["pair_logits"])  # added by the module, without gradient
        return out

    monkeypatch.setattr(module_mod.DistillationModule, "training_step", spy_first)
    results = run(make_cfg("distill=cskd", f"data.fast={str(fast).lower()}", "trainer.limit_train_batches=3"))
    assert results["status"] == "completed" and results["method"] == "CSKDLoss" and results["teacher"] is None
    assert len(seen) == 3 and all(p.shape[-1] == 10 and not p.requires_grad for p in seen)
