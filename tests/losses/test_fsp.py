"""FSP: the Gram matrices by explicit loops, the loss, connectors, the init stage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from kd.errors import ConfigError
from kd.losses.base import Stage
from kd.losses.fsp import FSPLoss, fsp_loss, fsp_matrix
from kd.outputs import DataInfo, ModelOutput

DATA = DataInfo(num_classes=10, num_samples=100)


def _fsp_by_loops(f1: torch.Tensor, f2: torch.Tensor) -> list[list[list[float]]]:
    b, c1, h, w = f1.shape
    c2 = f2.shape[1]
    out = [[[0.0] * c2 for _ in range(c1)] for _ in range(b)]
    for n in range(b):
        for i in range(c1):
            for j in range(c2):
                acc = 0.0
                for y in range(h):
                    for x in range(w):
                        acc += f1[n, i, y, x].item() * f2[n, j, y, x].item()
                out[n][i][j] = acc / (h * w)
    return out


def _outputs(s_shapes, t_shapes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = s_shapes[0][0]
    s_feats = {f"s{i}": torch.randn(*sh, generator=g, requires_grad=True) for i, sh in enumerate(s_shapes)}
    t_feats = {f"t{i}": torch.randn(*sh, generator=g, requires_grad=True) for i, sh in enumerate(t_shapes)}
    student = ModelOutput(torch.randn(b, 10, generator=g, requires_grad=True), s_feats)
    return student, ModelOutput(torch.randn(b, 10, generator=g), t_feats), {"target": torch.arange(b) % 10}


def _built(s_shapes, t_shapes, **kwargs):
    student, teacher, batch = _outputs(s_shapes, t_shapes)
    loss = FSPLoss(student_nodes=list(student.features), teacher_nodes=list(teacher.features), **kwargs)
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


def test_fsp_matrix_matches_explicit_loops() -> None:
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 2, 2, 3), torch.randn(2, 3, 2, 3)
    got = fsp_matrix(f1, f2)
    assert got.shape == (2, 2, 3)
    torch.testing.assert_close(got, torch.tensor(_fsp_by_loops(f1, f2)), rtol=1e-5, atol=1e-6)


def test_fsp_matrix_of_a_worked_example() -> None:
    # One sample, H x W = 1 x 2: F1 = [[1, 2]], F2 = [[3, 4], [0, 1]] -> G = [[(3 + 8) / 2, 2 / 2]].
    f1 = torch.tensor([[1.0, 2.0]]).view(1, 1, 1, 2)
    f2 = torch.tensor([[3.0, 4.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    torch.testing.assert_close(fsp_matrix(f1, f2), torch.tensor([[[5.5, 1.0]]]))


def test_fsp_matrix_pools_the_larger_map_to_the_smaller_size() -> None:
    torch.manual_seed(1)
    f1, f2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    f1_pooled = f1.view(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 block means
    expected = torch.tensor(_fsp_by_loops(f1_pooled, f2))
    torch.testing.assert_close(fsp_matrix(f1, f2), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fsp_matrix(f2, f1), expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_fsp_matrix_is_fp32_under_bf16_autocast() -> None:
    f1, f2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fsp_matrix(f1.bfloat16(), f2.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fsp_matrix(f1.bfloat16().float(), f2.bfloat16().float()))


def test_fsp_loss_sums_the_mean_squared_differences_of_consecutive_pairs() -> None:
    torch.manual_seed(2)
    s = [torch.randn(2, 2, 4, 4), torch.randn(2, 3, 2, 2), torch.randn(2, 2, 2, 2)]
    t = [torch.randn(2, 2, 4, 4), torch.randn(2, 3, 2, 2), torch.randn(2, 2, 2, 2)]
    expected = 0.0
    for k in range(2):
        g_s, g_t = _fsp_by_loops(*_pooled(s[k], s[k + 1])), _fsp_by_loops(*_pooled(t[k], t[k + 1]))
        diffs = [(a - b) ** 2 for ms, mt in zip(g_s, g_t) for rs, rt in zip(ms, mt) for a, b in zip(rs, rt)]
        expected += sum(diffs) / len(diffs)
    assert fsp_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert fsp_loss(s, [f.clone() for f in s]).item() == 0.0


def _pooled(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[-1] > b.shape[-1]:
        a = a.view(*a.shape[:2], 2, 2, 2, 2).mean(dim=(3, 5))
    return a, b


def test_equal_channels_need_no_connectors_and_student_equal_teacher_gives_zero() -> None:
    loss, student, teacher, batch = _built([(2, 3, 4, 4), (2, 5, 2, 2)], [(2, 3, 4, 4), (2, 5, 2, 2)])
    assert all(isinstance(c, nn.Identity) for c in loss.connectors)
    copies = {f"s{i}": teacher.features[f"t{i}"].detach().clone() for i in range(2)}
    same = ModelOutput(student.logits, copies)
    assert loss.loss_terms(same, teacher, batch)["fsp"].item() == 0.0
    assert loss.fsp(same, teacher).item() == 0.0


def test_connectors_for_the_digits_pair_and_zero_with_an_embedding_connector() -> None:
    # The digits pair: student 8/16 channels, teacher 64/128, at 8x8 and 4x4.
    loss, student, teacher, batch = _built([(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 64, 8, 8), (2, 128, 4, 4)])
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in loss.connectors]
    assert shapes == [(8, 64, (1, 1), None), (16, 128, (1, 1), None)]
    # A teacher whose maps are the student's padded with zero channels; connectors that embed the
    # student's channels in the first ones reproduce it exactly.
    t_feats = {}
    for i, conn in enumerate(loss.connectors):
        c_s, c_t = conn.in_channels, conn.out_channels
        with torch.no_grad():
            conn.weight.zero_()
            conn.weight[:c_s, :, 0, 0] = torch.eye(c_s)
        f = student.features[f"s{i}"].detach()
        t_feats[f"t{i}"] = torch.cat([f, f.new_zeros(f.shape[0], c_t - c_s, *f.shape[2:])], dim=1)
    padded = ModelOutput(teacher.logits, t_feats)
    assert loss.loss_terms(student, padded, batch)["fsp"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss.fsp(student, teacher).item() > 0


def test_connect_never_refuses_mismatched_channels_and_names_the_counts() -> None:
    student, teacher, _ = _outputs([(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 64, 8, 8), (2, 128, 4, 4)])
    loss = FSPLoss(["s0", "s1"], ["t0", "t1"], connect="never")
    with pytest.raises(ConfigError, match=r"\[8, 16\].*\[64, 128\]"):
        loss.setup(student, teacher, DATA)
    same, teacher2, _ = _outputs([(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 8, 8, 8), (2, 16, 2, 2)])
    loss.setup(same, teacher2, DATA)  # equal channels, different sizes: fine
    assert len(loss.connectors) == 2


def test_init_stage_fields_and_gradients() -> None:
    loss, student, teacher, batch = _built([(2, 4, 4, 4), (2, 8, 2, 2)], [(2, 6, 4, 4), (2, 8, 2, 2)])
    (stage,) = loss.stages()
    assert isinstance(stage, Stage)
    assert (stage.name, stage.epochs, stage.train_student) == ("fsp_init", 30, True)
    assert len(stage.modules) == 1 and stage.modules[0] is loss.connectors
    terms = stage.loss(student, teacher, batch)
    assert set(terms) == {"fsp"}
    terms["fsp"].backward()
    assert loss.connectors[0].weight.grad.abs().sum() > 0
    assert all(f.grad.abs().sum() > 0 for f in student.features.values())
    assert all(f.grad is None for f in teacher.features.values())


def test_main_loss_freezes_the_connectors_and_trains_the_student() -> None:
    shapes = [(2, 4, 4, 4), (2, 8, 2, 2)], [(2, 6, 4, 4), (2, 8, 2, 2)]
    loss, student, teacher, batch = _built(*shapes, weight=2.0)
    expected = loss.fsp(student, teacher).item()
    terms = loss(student, teacher, batch)
    assert set(terms) == {"ce", "fsp"}
    assert terms["fsp"].item() == pytest.approx(2.0 * expected, rel=1e-6)
    sum(terms.values()).backward()
    assert loss.connectors[0].weight.grad is None
    assert all(f.grad.abs().sum() > 0 for f in student.features.values())
    assert all(f.grad is None for f in teacher.features.values())


def test_main_weight_defaults_to_zero_as_repdistiller() -> None:
    loss, student, teacher, batch = _built([(2, 4, 4, 4), (2, 8, 2, 2)], [(2, 4, 4, 4), (2, 8, 2, 2)])
    terms = loss(student, teacher, batch)
    assert terms["fsp"].item() == 0.0 and terms["ce"].item() > 0 and loss.ce_weight == 1.0


def test_no_stage_with_zero_init_epochs() -> None:
    assert FSPLoss(["a", "b"], ["c", "d"], init_epochs=0).stages() == []


def test_a_bf16_module_runs_both_stages_on_bf16_features() -> None:
    # precision="bf16-true" converts the loss (connectors) to bf16 and feeds bf16 features.
    loss, student, teacher, batch = _built([(2, 4, 4, 4), (2, 8, 2, 2)], [(2, 6, 4, 4), (2, 12, 2, 2)], weight=1.0)
    s, t = _bf16(student), _bf16(teacher)
    expected = loss.fsp(student, teacher, frozen=True).item()  # the fp32 module on fp32 features
    loss = loss.to(torch.bfloat16)
    with _bf16_true():
        main = loss(s, t, batch)["fsp"]
        init = loss.stages()[0].loss(s, t, batch)["fsp"]
    (main + init).backward()
    assert main.dtype == init.dtype == torch.float32
    assert main.item() == pytest.approx(expected, rel=2e-2)
    for p in loss.connectors.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
    assert all(f.grad.abs().sum() > 0 for f in s.features.values())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"student_nodes": ["s0"], "teacher_nodes": ["t0"]}, "student_nodes"),
        ({"teacher_nodes": ["t0", "t1", "t2"]}, "student_nodes"),
        ({"connect": "always"}, "connect"),
        ({"init_epochs": -1}, "init_epochs"),
        ({"weight": -1.0}, "weight"),
        ({"ce_weight": -1.0}, "ce_weight"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["s0", "s1"], "teacher_nodes": ["t0", "t1"], **kwargs}
    with pytest.raises(ConfigError) as e:
        FSPLoss(**args)
    assert e.value.key == key


def test_missing_node_raises_config_error_in_setup() -> None:
    student, teacher, _ = _outputs([(2, 4, 4, 4), (2, 4, 2, 2)], [(2, 4, 4, 4), (2, 4, 2, 2)])
    with pytest.raises(ConfigError, match="nope"):
        FSPLoss(["s0", "nope"], ["t0", "t1"]).setup(student, teacher, DATA)
