"""Activation boundaries: the margin loss case by case, layer weights, connectors, the init stage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from kd.errors import ConfigError
from kd.losses.ab import SCALE, ABLoss, alternative_l2, layer_weights
from kd.losses.base import Stage
from kd.outputs import DataInfo, ModelOutput

DATA = DataInfo(num_classes=10, num_samples=100)


def _margin_loss_by_hand(s: list[float], t: list[float], mu: float) -> float:
    total = 0.0
    for a, b in zip(s, t):
        if b <= 0:  # teacher neuron off: the student should be at or below -mu
            total += (a + mu) ** 2 if a > -mu else 0.0
        else:  # teacher neuron on: the student should be above +mu
            total += (a - mu) ** 2 if a <= mu else 0.0
    return total


def _outputs(s_shapes, t_shapes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = s_shapes[0][0]
    s_feats = {f"s{i}": torch.randn(*sh, generator=g, requires_grad=True) for i, sh in enumerate(s_shapes)}
    t_feats = {f"t{i}": torch.randn(*sh, generator=g, requires_grad=True) for i, sh in enumerate(t_shapes)}
    student = ModelOutput(torch.randn(b, 10, generator=g, requires_grad=True), s_feats)
    return student, ModelOutput(torch.randn(b, 10, generator=g), t_feats), {"target": torch.arange(b) % 10}


def _built(s_shapes, t_shapes, **kwargs):
    student, teacher, batch = _outputs(s_shapes, t_shapes)
    loss = ABLoss(student_nodes=list(student.features), teacher_nodes=list(teacher.features), **kwargs)
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


def test_alternative_l2_case_by_case() -> None:
    # mu = 1. Teacher off (t <= 0): s = -2 -> 0 (beyond the margin), -1 -> 0 (s > -mu fails),
    # -0.5 -> 0.25, 0.5 -> 2.25, 2 -> 9. Teacher on (t > 0): s = 2 -> 0, 1 -> 0 ((1 - 1)^2),
    # 0.5 -> 0.25, -1 -> 4, -2 -> 9. t = 0 counts as off.
    s = [-2.0, -1.0, -0.5, 0.5, 2.0, 2.0, 1.0, 0.5, -1.0, -2.0, 0.5]
    t = [-1.0, -3.0, -0.1, -2.0, -1.0, 1.0, 0.5, 3.0, 0.1, 2.0, 0.0]
    expected = 0 + 0 + 0.25 + 2.25 + 9 + 0 + 0 + 0.25 + 4 + 9 + 2.25
    got = alternative_l2(torch.tensor(s).view(1, -1, 1, 1), torch.tensor(t).view(1, -1, 1, 1), 1.0)
    assert got.item() == pytest.approx(expected)
    assert expected == pytest.approx(_margin_loss_by_hand(s, t, 1.0))


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_alternative_l2_matches_explicit_loops_and_averages_over_the_batch(mu: float) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 2, 2) * 2, torch.randn(3, 4, 2, 2)
    per_sample = [
        _margin_loss_by_hand(s[b].flatten().tolist(), t[b].flatten().tolist(), mu) for b in range(3)
    ]
    expected = sum(per_sample) / 3
    assert alternative_l2(s, t, mu).item() == pytest.approx(expected, rel=1e-5)


def test_alternative_l2_is_zero_beyond_the_margin_on_the_teachers_side() -> None:
    t = torch.randn(2, 5, 3, 3)
    s = torch.where(t > 0, 1.5, -1.5)
    assert alternative_l2(s, t, 1.0).item() == 0.0
    assert alternative_l2(-s, t, 1.0).item() > 0


def test_layer_weights_halve_towards_the_input() -> None:
    assert layer_weights(1) == [1.0]
    assert layer_weights(3) == [0.25, 0.5, 1.0]


def test_ab_loss_value_with_identity_connectors() -> None:
    loss, student, teacher, _ = _built([(2, 3, 4, 4), (2, 5, 2, 2)], [(2, 3, 4, 4), (2, 5, 2, 2)])
    assert all(isinstance(c, nn.Identity) for c in loss.connectors)
    expected = SCALE * sum(
        w * alternative_l2(student.features[f"s{i}"], teacher.features[f"t{i}"], 1.0).item()
        for i, w in enumerate([0.5, 1.0])
    )
    assert SCALE == pytest.approx(0.003)
    assert loss.ab_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_connectors_map_mismatched_channels_and_pool_mismatched_sizes() -> None:
    # The digits pair's pre-activations: 8/16 vs 64/128 channels; here the student is also larger.
    loss, student, teacher, _ = _built([(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 64, 4, 4), (2, 16, 4, 4)])
    conv = loss.connectors[0][0]
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 64, (1, 1))
    assert isinstance(loss.connectors[0][1], nn.BatchNorm2d)
    assert isinstance(loss.connectors[1], nn.Identity)
    g = loss.connectors[0](student.features["s0"])  # (2, 64, 8, 8)
    pooled = g.view(2, 64, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 block means
    layer0 = alternative_l2(pooled, teacher.features["t0"], 1.0).item()
    layer1 = alternative_l2(student.features["s1"], teacher.features["t1"], 1.0).item()
    # In train mode BN normalises with the batch statistics, so both calls give the same maps.
    got = loss.ab_loss(student, teacher).item()
    assert got == pytest.approx(SCALE * (0.5 * layer0 + layer1), rel=1e-5)


def test_init_stage_fields_and_gradients() -> None:
    loss, student, teacher, batch = _built([(2, 4, 4, 4), (2, 8, 2, 2)], [(2, 6, 4, 4), (2, 12, 2, 2)])
    (stage,) = loss.stages()
    assert isinstance(stage, Stage)
    assert (stage.name, stage.epochs, stage.train_student) == ("ab_init", 30, True)
    assert len(stage.modules) == 1 and stage.modules[0] is loss.connectors
    bn = loss.connectors[0][1]
    mean_before = bn.running_mean.clone()
    terms = stage.loss(student, teacher, batch)
    assert set(terms) == {"ab"}
    terms["ab"].backward()
    assert not torch.equal(bn.running_mean, mean_before)  # BN trains with the connectors
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.connectors.parameters())
    assert all(f.grad.abs().sum() > 0 for f in student.features.values())
    assert all(f.grad is None for f in teacher.features.values())


def test_main_loss_freezes_the_connectors_and_trains_the_student() -> None:
    loss, student, teacher, batch = _built([(2, 4, 4, 4)], [(2, 6, 4, 4)], weight=1.0)
    loss.connectors[0][1].running_mean.fill_(0.3)  # as if trained in ab_init
    loss.connectors[0][1].running_var.fill_(2.0)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.train()
    terms = loss(student, teacher, batch)
    assert set(terms) == {"ce", "ab"}
    sum(terms.values()).backward()
    assert student.features["s0"].grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.connectors.parameters())
    assert teacher.features["t0"].grad is None
    for k, v in loss.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN running statistics untouched too
    # The main stage applies the connector as in eval mode (RepDistiller's connector.eval()).
    connector = loss.connectors[0].eval()
    with torch.no_grad():
        expected = SCALE * alternative_l2(connector(student.features["s0"]), teacher.features["t0"], 1.0)
    assert terms["ab"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_main_weight_defaults_to_zero_as_repdistiller() -> None:
    loss, student, teacher, batch = _built([(2, 4, 4, 4)], [(2, 4, 4, 4)])
    assert loss.ce_weight == 1.0
    terms = loss(student, teacher, batch, epoch=3)
    assert terms["ab"].item() == 0.0 and terms["ce"].item() > 0


def test_no_stage_with_zero_init_epochs() -> None:
    assert ABLoss(["a"], ["b"], init_epochs=0).stages() == []


def test_a_bf16_module_runs_both_stages_on_bf16_features() -> None:
    # precision="bf16-true" converts the loss (connectors, BN statistics) to bf16 and feeds bf16 features.
    loss, student, teacher, batch = _built([(2, 4, 4, 4), (2, 8, 2, 2)], [(2, 6, 4, 4), (2, 12, 2, 2)], weight=1.0)
    s, t = _bf16(student), _bf16(teacher)
    expected = loss.ab_loss(student, teacher, frozen=True).item()  # the fp32 module on fp32 features
    loss = loss.to(torch.bfloat16)
    with _bf16_true():
        main = loss(s, t, batch)["ab"]
        init = loss.stages()[0].loss(s, t, batch)["ab"]
    (init + main).backward()
    assert init.dtype == main.dtype == torch.float32
    assert main.item() == pytest.approx(expected, rel=2e-2)
    for p in loss.connectors.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
    assert all(f.grad.abs().sum() > 0 for f in s.features.values())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"margin": 0.0}, "margin"),
        ({"margin": -1.0}, "margin"),
        ({"init_epochs": -1}, "init_epochs"),
        ({"weight": -0.1}, "weight"),
        ({"teacher_nodes": ["t0", "t1"]}, "student_nodes"),
        ({"student_nodes": [], "teacher_nodes": []}, "student_nodes"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["s0"], "teacher_nodes": ["t0"], **kwargs}
    with pytest.raises(ConfigError) as e:
        ABLoss(**args)
    assert e.value.key == key


def test_missing_node_raises_config_error_in_setup() -> None:
    student, teacher, _ = _outputs([(2, 4, 4, 4)], [(2, 6, 4, 4)])
    with pytest.raises(ConfigError, match="nope"):
        ABLoss(["nope"], ["t0"]).setup(student, teacher, DATA)
