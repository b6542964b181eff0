"""VID: the Gaussian NLL by hand, the variance's optimum, regressors built in setup, gradients."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.errors import ConfigError
from kd.losses.vid import VIDLoss, gaussian_nll
from kd.outputs import DataInfo, ModelOutput

DATA = DataInfo(num_classes=3, num_samples=10)


def out(**features: torch.Tensor) -> ModelOutput:
    b = next(iter(features.values())).shape[0]
    return ModelOutput(logits=torch.zeros(b, 3), features=features)


def built(s: torch.Tensor, t: torch.Tensor, **kwargs) -> VIDLoss:
    loss = VIDLoss(["s"], ["t"], **kwargs)
    loss.setup(out(s=s[:2]), out(t=t[:2]), DATA)
    return loss


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


def hand_nll(mu: np.ndarray, t: np.ndarray, var: np.ndarray) -> float:
    b, c, h, w = t.shape
    total = 0.0
    for i in range(b):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    total += 0.5 * ((mu[i, ch, y, x] - t[i, ch, y, x]) ** 2 / var[ch] + math.log(var[ch]))
    return total / (b * c * h * w)


def hand_regressor(loss: VIDLoss, s: np.ndarray) -> np.ndarray:
    convs = [m for m in loss.pairs[0].regressor if isinstance(m, torch.nn.Conv2d)]
    w1, w2, w3 = (m.weight.detach().double().numpy()[:, :, 0, 0] for m in convs)
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    h1 = relu(np.einsum("oi,bihw->bohw", w1, s))
    h2 = relu(np.einsum("oi,bihw->bohw", w2, h1))
    return np.einsum("oi,bihw->bohw", w3, h2)


def test_gaussian_nll_matches_the_formula_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    mu, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    var = torch.tensor([0.5, 1.0, 4.0])
    expected = hand_nll(mu.numpy(), t.numpy(), var.numpy())
    assert gaussian_nll(mu, t, var).item() == pytest.approx(expected, rel=1e-6)


def test_the_whole_loss_matches_a_hand_regressor_and_the_initial_variance() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.rand(3, 2, 2, 2, generator=g), torch.rand(3, 5, 2, 2, generator=g)
    loss = built(s, t, init_pred_var=5.0, eps=1e-5, weight=1.0)
    pair = loss.pairs[0]
    assert torch.allclose(pair.variance(), torch.full((5,), 5.0))
    convs = [m for m in pair.regressor if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(2, 5), (5, 5), (5, 5)]
    assert all(m.bias is None for m in convs)
    mu = hand_regressor(loss, s.double().numpy())
    expected = hand_nll(mu, t.double().numpy(), np.full(5, 5.0))
    assert loss.loss_terms(out(s=s), out(t=t), {})["vid"].item() == pytest.approx(expected, rel=1e-5)


def test_an_exact_regressor_leaves_only_the_log_variance() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.rand(4, 3, 2, 2, generator=g)  # post-ReLU features
    loss = built(t, t)
    with torch.no_grad():
        for m in loss.pairs[0].regressor:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.eye(3)[:, :, None, None])
    value = loss.loss_terms(out(s=t.clone()), out(t=t), {})["vid"].item()
    assert value == pytest.approx(0.5 * math.log(5.0), rel=1e-5)


def test_the_nll_is_smallest_where_the_variance_is_the_squared_error() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.rand(4, 2, 3, 3, generator=g), torch.rand(4, 3, 3, 3, generator=g)
    loss = built(s, t)
    pair = loss.pairs[0]
    with torch.no_grad():
        err2 = (pair.regressor(s) - t).pow(2).mean(dim=(0, 2, 3))  # (3,) mean squared error per channel
        pair.log_scale.copy_(torch.log(torch.expm1(err2 - pair.eps)))
    assert torch.allclose(pair.variance(), err2)
    best = loss.loss_terms(out(s=s), out(t=t), {})["vid"]
    best.backward()
    assert pair.log_scale.grad.abs().max().item() < 1e-6
    for factor in (0.8, 1.25):
        with torch.no_grad():
            pair.log_scale.copy_(torch.log(torch.expm1(factor * err2 - pair.eps)))
        assert loss.loss_terms(out(s=s), out(t=t), {})["vid"].item() > best.item()


def test_gradients_reach_the_student_the_regressor_and_log_scale_never_the_teacher() -> None:
    g = torch.Generator().manual_seed(4)
    s = torch.rand(2, 4, 4, 4, generator=g, requires_grad=True)
    t = torch.rand(2, 6, 4, 4, generator=g, requires_grad=True)
    loss = built(s.detach(), t.detach())
    loss.loss_terms(out(s=s), out(t=t), {})["vid"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    params = dict(loss.named_parameters())
    assert set(params) == {"pairs.0.regressor.0.weight", "pairs.0.regressor.2.weight",
                           "pairs.0.regressor.4.weight", "pairs.0.log_scale"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert t.grad is None


@pytest.mark.parametrize(("hw_s", "hw_t"), [(8, 4), (2, 4)])
def test_unequal_sizes_pool_the_larger_map_channels_go_through_the_regressor(hw_s: int, hw_t: int) -> None:
    g = torch.Generator().manual_seed(5)
    s, t = torch.rand(2, 3, hw_s, hw_s, generator=g), torch.rand(2, 7, hw_t, hw_t, generator=g)
    loss = built(s, t)
    pair = loss.pairs[0]
    size = min(hw_s, hw_t)
    mu = pair.regressor(F.adaptive_avg_pool2d(s, size))
    expected = gaussian_nll(mu, F.adaptive_avg_pool2d(t, size), pair.variance())
    assert loss.loss_terms(out(s=s), out(t=t), {})["vid"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_several_pairs_sum_embeddings_count_as_1x1_maps_and_bf16_is_fp32() -> None:
    g = torch.Generator().manual_seed(6)
    f = {"s1": torch.rand(2, 3, 4, 4, generator=g), "s2": torch.rand(2, 5, generator=g)}
    h = {"t1": torch.rand(2, 6, 2, 2, generator=g), "t2": torch.rand(2, 9, generator=g)}
    loss = VIDLoss(["s1", "s2"], ["t1", "t2"], weight=3.0, ce_weight=0.0)
    loss.setup(out(**f), out(**h), DATA)
    assert [p.log_scale.shape[0] for p in loss.pairs] == [6, 9]
    terms = loss(out(**f), out(**h), {"target": torch.zeros(2, dtype=torch.long)})
    expected = 3.0 * sum(
        p(a if a.dim() == 4 else a[:, :, None, None], b if b.dim() == 4 else b[:, :, None, None]).item()
        for p, a, b in zip(loss.pairs, f.values(), h.values())
    )
    assert set(terms) == {"vid"} and terms["vid"].item() == pytest.approx(expected, rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the regressor runs in bf16, the NLL in fp32
        low = loss.loss_terms(out(**{k: v.bfloat16() for k, v in f.items()}), out(**h), {})
    assert low["vid"].dtype == torch.float32
    assert low["vid"].item() == pytest.approx(terms["vid"].item() / 3.0, rel=0.05)


def test_setup_rejects_features_that_are_neither_maps_nor_embeddings() -> None:
    with pytest.raises(ConfigError, match="student_nodes"):
        built(torch.rand(2, 3, 4), torch.rand(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="setup"):
        VIDLoss(["s"], ["t"]).loss_terms(out(s=torch.rand(2, 3, 4, 4)), out(t=torch.rand(2, 3, 4, 4)), {})


def test_a_bf16_module_runs_forward_and_backward_on_bf16_features() -> None:
    # precision="bf16-true" converts the loss (regressors, log_scale) to bf16 and feeds bf16 features.
    g = torch.Generator().manual_seed(7)
    student, teacher = out(s=torch.rand(2, 4, 4, 4, generator=g)), out(t=torch.rand(2, 6, 2, 2, generator=g))
    loss = built(student.features["s"], teacher.features["t"])
    expected = loss.loss_terms(student, teacher, {})["vid"].item()  # the fp32 module on fp32 features
    loss = loss.to(torch.bfloat16)
    s, t = _bf16(student), _bf16(teacher)
    with _bf16_true():
        value = loss(s, t, {"target": torch.tensor([0, 1])})["vid"]
    value.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-2)
    for p in loss.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
    assert s.features["s"].grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [{"eps": 0.0}, {"eps": -1.0}, {"init_pred_var": 0.0}, {"init_pred_var": 1e-6}, {"weight": -1.0},
     {"student_nodes": ["a", "b"]}],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict) -> None:
    args = {"student_nodes": ["s"], "teacher_nodes": ["t"], **kwargs}
    with pytest.raises(ConfigError):
        VIDLoss(**args)
