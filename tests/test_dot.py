"""DOT against mdistiller's optimizer, on values worked by hand, and in a run (kd/training/dot.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.errors import ConfigError
from kd.models.weights import load_checkpoint
from kd.training.dot import DOT
from kd.training.run import run


# --- mdistiller/engine/dot.py (megvii-research/mdistiller @ a08d46f), as released (one group) ---
def _check_in(t, seq):
    return any(t is i for i in seq)


class _MdDOT(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0, momentum_kd=0, dampening=0, weight_decay=0):
        super().__init__(params, dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening,
                                      weight_decay=weight_decay))
        self.kd_grad_buffer, self.kd_grad_params, self.kd_momentum_buffer = [], [], []

    @torch.no_grad()
    def step_kd(self):
        group = self.param_groups[0]
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                bufs.append(self.state[p].get("momentum_kd_buffer"))
        self.kd_momentum_buffer, self.kd_grad_buffer, self.kd_grad_params = bufs, grads, params

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        wd, momentum, momentum_kd, lr = group["weight_decay"], group["momentum"], group["momentum_kd"], group["lr"]
        params, d_p_list, bufs = [], [], []
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                d_p_list.append(p.grad)
                bufs.append(self.state[p].get("momentum_buffer"))
        for i, param in enumerate(params):
            d_p = d_p_list[i]
            if wd != 0:
                d_p = d_p.add(param, alpha=wd)
            if momentum != 0:
                buf = bufs[i]
                if buf is None:
                    buf = torch.clone(d_p).detach()
                    bufs[i] = buf
                elif _check_in(param, self.kd_grad_params):
                    buf.mul_(momentum).add_(d_p)
                else:
                    buf.mul_((momentum_kd + momentum) / 2.0).add_(d_p)
                d_p = buf
            param.add_(d_p, alpha=-lr)
        for i, (d_p, buf, p) in enumerate(zip(self.kd_grad_buffer, self.kd_momentum_buffer, self.kd_grad_params)):
            if buf is None:
                buf = torch.clone(d_p).detach()
                self.kd_momentum_buffer[i] = buf
            elif _check_in(p, params):
                buf.mul_(momentum_kd).add_(d_p)
            else:
                if wd != 0:
                    d_p = d_p.add(p, alpha=wd)
                buf.mul_((momentum_kd + momentum) / 2.0).add_(d_p)
            p.add_(buf, alpha=-lr)
        for p, b in zip(params, bufs):
            self.state[p]["momentum_buffer"] = b
        for p, b in zip(self.kd_grad_params, self.kd_momentum_buffer):
            self.state[p]["momentum_kd_buffer"] = b
        self.kd_grad_buffer, self.kd_grad_params, self.kd_momentum_buffer = [], [], []
# --- end of mdistiller's code ---


class Three(nn.Module):
    """A parameter both losses reach, one only the task loss reaches, one only the distillation loss."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.both, self.task, self.kd = (nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)) for _ in range(3))

    def losses(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.arange(5, dtype=torch.float64) + step
        return ((self.both * x).sum() ** 2 / 10 + (self.task * x).pow(2).sum(),
                (self.both - x).pow(2).sum() + (self.kd * self.kd.flip(0)).sum())


def test_five_steps_equal_mdistillers_optimizer_for_every_kind_of_parameter() -> None:
    theirs, ours = Three(), Three()
    md = _MdDOT(theirs.parameters(), lr=0.1, momentum=0.9 - 0.075, momentum_kd=0.9 + 0.075, weight_decay=5e-4)
    dot = DOT(ours.parameters(), lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-4)
    for step in range(5):
        task, kd = theirs.losses(step)  # mdistiller's trainer: kd backward, step_kd, task backward, step
        md.zero_grad(set_to_none=True)
        kd.backward(retain_graph=True)
        md.step_kd()
        md.zero_grad(set_to_none=True)
        task.backward()
        md.step()
        task, kd = ours.losses(step)  # kd's training module: the distillation gradient first, then backward
        dot.zero_grad(set_to_none=True)
        params = list(ours.parameters())
        grads = torch.autograd.grad(kd, params, retain_graph=True, allow_unused=True)
        dot.set_distillation_grads({p: g for p, g in zip(params, grads) if g is not None})
        task.backward()
        dot.step()
        for a, b in zip(theirs.parameters(), ours.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-12), step


def test_the_update_worked_by_hand() -> None:
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    dot = DOT([p], lr=0.5, momentum=0.8, delta=0.1, weight_decay=0.0)
    for g_task, g_kd in ((2.0, 4.0), (1.0, -2.0)):
        dot.set_distillation_grads({p: torch.tensor([g_kd], dtype=torch.float64)})
        p.grad = torch.tensor([g_task], dtype=torch.float64)
        dot.step()
    # step 1: b_task = 2, b_kd = 4, p = 1 - 0.5 * 6 = -2
    # step 2: b_task = 0.7 * 2 + 1 = 2.4, b_kd = 0.9 * 4 - 2 = 1.6, p = -2 - 0.5 * 4.0 = -4
    assert p.item() == pytest.approx(-4.0)
    assert dot.state[p]["momentum_buffer"].item() == pytest.approx(2.4)
    assert dot.state[p]["momentum_kd_buffer"].item() == pytest.approx(1.6)


@pytest.mark.parametrize(("kwargs", "key"), [({"delta": 0.2}, "optimizer.delta"), ({"nesterov": True}, "optimizer.nesterov"),
                                             ({"lr": -1.0}, "optimizer.lr")])
def test_bad_settings_are_one_line(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        DOT([nn.Parameter(torch.zeros(1))], **{"lr": 0.1, **kwargs})
    assert e.value.key == key


def test_a_run_keeps_a_momentum_for_each_gradient_in_its_checkpoints(make_cfg) -> None:
    results = run(make_cfg("optimizer=dot", "optimizer.lr=0.05", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                           "distill=crd_kd", "distill.methods.crd.nce_k=16", "distill.methods.crd.feat_dim=8"))
    state = load_checkpoint(results["student"]["checkpoint"])["optimizer_states"][0]["state"]
    kinds = [frozenset(s) for s in state.values()]
    assert frozenset({"momentum_buffer", "momentum_kd_buffer"}) in kinds  # the student: CE and CRD+KD
    assert frozenset({"momentum_kd_buffer"}) in kinds  # CRD's embeddings: the distillation's gradient only


@pytest.mark.parametrize(("overrides", "key"), [(("trainer=ddp_cpu",), "optimizer"),
                                                (("trainer.accumulate_grad_batches=2",), "trainer.accumulate_grad_batches")])
def test_dot_refuses_what_it_cannot_split_before_anything_trains(make_cfg, overrides, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        run(make_cfg("optimizer=dot", *overrides))
    assert e.value.key == key
