"""Factor Transfer: the FT and reconstruction losses by hand, the paraphraser stage, freezing."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from kd.errors import ConfigError
from kd.losses.base import Stage
from kd.losses.ft import FTLoss, Paraphraser, factor_transfer_loss, reconstruction_loss
from kd.outputs import DataInfo, ModelOutput

DATA = DataInfo(num_classes=10, num_samples=100)


def _outputs(
    s_shapes: list[tuple[int, ...]], t_shapes: list[tuple[int, ...]], seed: int = 0
) -> tuple[ModelOutput, ModelOutput, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    b = s_shapes[0][0]
    s_feats = {f"s{i}": torch.randn(*sh, generator=g, requires_grad=True) for i, sh in enumerate(s_shapes)}
    t_feats = {f"t{i}": torch.randn(*sh, generator=g, requires_grad=True) for i, sh in enumerate(t_shapes)}
    s_logits = torch.randn(b, 10, generator=g, requires_grad=True)
    batch = {"target": torch.arange(b) % 10}
    return ModelOutput(s_logits, s_feats), ModelOutput(torch.randn(b, 10, generator=g), t_feats), batch


def _built(s_shapes, t_shapes, **kwargs) -> tuple[FTLoss, ModelOutput, ModelOutput, dict]:
    student, teacher, batch = _outputs(s_shapes, t_shapes)
    loss = FTLoss(student_nodes=list(student.features), teacher_nodes=list(teacher.features), **kwargs)
    loss.setup(student, teacher, DATA)
    return loss, student, teacher, batch


@contextmanager
def _bf16_true() -> Iterator[None]:
    """As Lightning's ``bf16-true`` forward context: tensors created without a dtype are bf16."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _bf16(out: ModelOutput) -> ModelOutput:
    """A copy of ``out`` in bf16, as a ``bf16-true`` model gives, with fresh leaf features."""
    features = {k: v.detach().bfloat16().requires_grad_() for k, v in out.features.items()}
    return ModelOutput(out.logits.detach().bfloat16(), features)


def test_ft_loss_matches_a_value_worked_by_hand() -> None:
    # s = (3, 4) / 5 = (0.6, 0.8), t = (1, 0): |s - t| = (0.4, 0.8), mean 0.6; squared mean 0.4.
    s = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert factor_transfer_loss(s, t, p=1).item() == pytest.approx(0.6, abs=1e-6)
    assert factor_transfer_loss(s, t, p=2).item() == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize("p", [1, 2])
def test_ft_loss_matches_explicit_loops(p: int) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 2, 3), torch.randn(3, 2, 2, 3)
    total, count = 0.0, 0
    for b in range(3):
        vs, vt = s[b].flatten().tolist(), t[b].flatten().tolist()
        ns, nt = math.sqrt(sum(v * v for v in vs)), math.sqrt(sum(v * v for v in vt))
        for a, c in zip(vs, vt):
            total += abs(a / ns - c / nt) ** p
            count += 1
    assert factor_transfer_loss(s, t, p).item() == pytest.approx(total / count, rel=1e-5)


def test_ft_loss_is_zero_for_factors_equal_up_to_a_positive_scale() -> None:
    t = torch.randn(4, 3, 2, 2)
    assert factor_transfer_loss(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert factor_transfer_loss(-t, t).item() > 0.1


def test_ft_loss_pools_the_larger_factor_to_the_smaller_size() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)
    s_pooled = s.view(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 block means
    expected = factor_transfer_loss(s_pooled, t).item()
    assert factor_transfer_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert factor_transfer_loss(t, s).item() == pytest.approx(expected, rel=1e-6)


def test_ft_loss_is_fp32_for_bf16_factors() -> None:
    s, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    got = factor_transfer_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    expected = factor_transfer_loss(s.bfloat16().float(), t.bfloat16().float())
    assert got.item() == pytest.approx(expected.item())


def test_reconstruction_loss_is_mean_squared_error() -> None:
    rec = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    x = torch.tensor([1.0, 0.0, 3.0, 1.0]).view(1, 1, 2, 2)
    assert reconstruction_loss(rec, x).item() == pytest.approx((0 + 4 + 0 + 9) / 4)
    assert reconstruction_loss(x, x.clone()).item() == 0.0


def test_paraphraser_shapes() -> None:
    factor, rec = Paraphraser(6, 3)(torch.randn(2, 6, 5, 4))
    assert factor.shape == (2, 3, 5, 4) and rec.shape == (2, 6, 5, 4)


def test_setup_builds_modules_for_the_last_pair_from_the_shapes() -> None:
    # The digits pair: student 8/16 channels, teacher 64/128, both at 8x8 then 4x4.
    loss, *_ = _built([(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 64, 8, 8), (2, 128, 4, 4)])
    assert loss.pairs == [("s1", "t1")]
    assert len(loss.paraphrasers) == len(loss.translators) == 1
    assert loss.paraphrasers[0].encoder[0].in_channels == 128
    assert loss.paraphrasers[0].encoder[-2].out_channels == 64  # k = 0.5
    assert loss.translators[0][0].in_channels == 16
    assert [m for m in loss.translators[0] if isinstance(m, torch.nn.Conv2d)][-1].out_channels == 64


def test_paraphraser_stage_fields_and_gradients() -> None:
    loss, student, teacher, batch = _built([(2, 4, 4, 4)], [(2, 6, 4, 4)], init_epochs=30)
    (stage,) = loss.stages()
    assert isinstance(stage, Stage)
    assert (stage.name, stage.epochs, stage.train_student) == ("paraphraser", 30, False)
    assert len(stage.modules) == 1 and stage.modules[0] is loss.paraphrasers
    terms = stage.loss(None, teacher, batch)
    assert set(terms) == {"ft_rec"}
    f_t = teacher.features["t0"]
    _, rec = loss.paraphrasers[0](f_t.detach())
    assert terms["ft_rec"].item() == pytest.approx(((rec - f_t) ** 2).mean().item(), rel=1e-6)
    terms["ft_rec"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.paraphrasers.parameters())
    assert all(p.grad is None for p in loss.translators.parameters())
    assert f_t.grad is None


def test_main_loss_trains_student_and_translator_and_leaves_the_paraphraser_unchanged() -> None:
    loss, student, teacher, batch = _built([(2, 4, 8, 8)], [(2, 6, 4, 4)])
    params = [p for p in loss.parameters() if p.requires_grad] + list(student.features.values())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)  # as kd's main optimizer
    before = copy.deepcopy(loss.paraphrasers.state_dict())
    terms = loss(student, teacher, batch)
    assert set(terms) == {"ce", "ft"}
    sum(terms.values()).backward()
    assert student.features["s0"].grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.translators.parameters())
    assert all(p.grad is None for p in loss.paraphrasers.parameters())
    assert teacher.features["t0"].grad is None
    opt.step()
    for k, v in loss.paraphrasers.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_main_loss_value_and_weight() -> None:
    loss, student, teacher, batch = _built([(2, 4, 4, 4)], [(2, 6, 4, 4)], weight=200.0, ce_weight=1.0)
    factor_t = loss.paraphrasers[0].encoder(teacher.features["t0"])
    factor_s = loss.translators[0](student.features["s0"])
    raw = factor_transfer_loss(factor_s, factor_t).item()
    terms = loss(student, teacher, batch)
    assert terms["ft"].item() == pytest.approx(200.0 * raw, rel=1e-5)
    ce = torch.nn.functional.cross_entropy(student.logits, batch["target"]).item()
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_main_loss_is_zero_when_the_translator_equals_the_paraphraser_encoder() -> None:
    loss, student, teacher, batch = _built([(2, 6, 4, 4)], [(2, 6, 4, 4)])
    loss.translators[0] = copy.deepcopy(loss.paraphrasers[0].encoder)
    same = ModelOutput(student.logits, {"s0": teacher.features["t0"].detach().clone()})
    assert loss.loss_terms(same, teacher, batch)["ft"].item() == pytest.approx(0.0, abs=1e-7)


def test_all_pairs_when_not_last_only() -> None:
    loss, student, teacher, batch = _built(
        [(2, 4, 8, 8), (2, 8, 4, 4)], [(2, 6, 8, 8), (2, 12, 2, 2)], last_only=False
    )
    assert loss.pairs == [("s0", "t0"), ("s1", "t1")] and len(loss.paraphrasers) == 2
    expected = 0.0
    for i in range(2):
        factor_t = loss.paraphrasers[i].encoder(teacher.features[f"t{i}"])
        expected += factor_transfer_loss(loss.translators[i](student.features[f"s{i}"]), factor_t).item()
    assert loss.loss_terms(student, teacher, batch)["ft"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.paraphraser_loss(None, teacher, batch)["ft_rec"].dim() == 0


def test_pooled_embeddings_are_used_as_1x1_maps() -> None:
    loss, student, teacher, batch = _built([(2, 4)], [(2, 6)])
    assert loss.loss_terms(student, teacher, batch)["ft"].isfinite()


def test_no_stage_with_zero_init_epochs() -> None:
    assert FTLoss(["a"], ["b"], init_epochs=0).stages() == []


def test_a_bf16_module_runs_both_stages_on_bf16_features() -> None:
    # precision="bf16-true" converts the loss (paraphraser, translator, BN) to bf16 and feeds bf16 features.
    loss, student, teacher, batch = _built([(2, 4, 8, 8)], [(2, 6, 4, 4)], weight=1.0)
    s, t = _bf16(student), _bf16(teacher)
    expected = loss.loss_terms(student, teacher, batch)["ft"].item()  # the fp32 module on fp32 features
    loss = loss.to(torch.bfloat16)
    with _bf16_true():
        main = loss(s, t, batch)["ft"]
        rec = loss.stages()[0].loss(None, t, batch)["ft_rec"]
    (main + rec).backward()
    assert main.dtype == rec.dtype == torch.float32
    assert main.item() == pytest.approx(expected, rel=2e-2)
    for p in (*loss.paraphrasers.parameters(), *loss.translators.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
    assert s.features["s0"].grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": -0.5}, "rate"),
        ({"p": 3}, "p"),
        ({"p": True}, "p"),
        ({"init_epochs": -1}, "init_epochs"),
        ({"init_epochs": 2.5}, "init_epochs"),
        ({"weight": -1.0}, "weight"),
        ({"ce_weight": -1.0}, "ce_weight"),
        ({"student_nodes": []}, "student_nodes"),
        ({"last_only": False, "teacher_nodes": ["t0", "t1"]}, "student_nodes"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["s0"], "teacher_nodes": ["t0"], **kwargs}
    with pytest.raises(ConfigError) as e:
        FTLoss(**args)
    assert e.value.key == key


def test_missing_node_raises_config_error_in_setup() -> None:
    student, teacher, _ = _outputs([(2, 4, 4, 4)], [(2, 6, 4, 4)])
    loss = FTLoss(student_nodes=["s0"], teacher_nodes=["nope"])
    with pytest.raises(ConfigError, match="nope"):
        loss.setup(student, teacher, DATA)
