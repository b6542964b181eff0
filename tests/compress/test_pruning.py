"""Magnitude pruning: schedule math, exact mask counts, and pruned weights staying zero in real fits."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from kd.compress.pruning import MagnitudePruning, keep_mask
from kd.compress.schedule import (
    agp_event_steps,
    agp_sparsity,
    iterative_event_steps,
    iterative_sparsity,
    one_shot_sparsity,
)
from kd.data import DigitsDataModule
from kd.errors import ConfigError, instantiate_checked
from kd.losses.kd import KDLoss
from kd.models import ConvNet
from kd.training.module import DistillationModule
from tests.conftest import CONF

BATCHES = 6  # training batches per epoch in the fits: 6 optimizer steps per epoch


# --- schedules ------------------------------------------------------------------------------


def test_agp_matches_zhu_gupta_eq1_by_hand() -> None:
    agp = functools.partial(agp_sparsity, initial=0.0, final=0.8, start_step=100, end_step=200, frequency=10)
    assert agp(0) == 0.0 and agp(99) == 0.0  # s_i before t0
    assert agp(100) == 0.0  # t = t0: s_i
    assert agp(150) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7
    assert agp(159) == agp(150)  # constant between events
    assert agp(190) == pytest.approx(0.8 - 0.8 * 0.1**3)  # 0.7992
    assert agp(200) == 0.8 and agp(10_000) == 0.8  # reached exactly at end_step
    assert agp_sparsity(100, 0.2, 0.8, 100, 200, 10) == pytest.approx(0.2)
    values = [agp(t) for t in range(0, 250)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_agp_last_event_lands_on_end_step() -> None:
    # 25 steps, Δt = 10: events at 0, 10, 20 and 25 (the last interval is shorter)
    assert agp_event_steps(0, 25, 10) == [0, 10, 20, 25]
    assert agp_sparsity(24, 0.0, 0.8, 0, 25, 10) == pytest.approx(0.8 - 0.8 * (1 - 20 / 25) ** 3)
    assert agp_sparsity(25, 0.0, 0.8, 0, 25, 10) == 0.8
    with pytest.raises(ValueError):
        agp_sparsity(0, 0.5, 0.4, 0, 25, 10)


def test_iterative_rounds_are_geometric() -> None:
    # s_f = 1 - 0.5^4: every round halves the weights left
    final = 1 - 0.5**4
    it = functools.partial(iterative_sparsity, initial=0.0, final=final, start_step=0, end_step=100, rounds=4)
    assert iterative_event_steps(0, 100, 4) == [25, 50, 75, 100]
    assert [it(t) for t in (0, 24, 25, 49, 50, 74, 75, 99)] == pytest.approx([0, 0, 0.5, 0.5, 0.75, 0.75, 0.875, 0.875])
    assert it(100) == final
    # with s_i: kept = (1 - s_i) ((1 - s_f) / (1 - s_i))^(k/n) = 0.5 * 0.5^k
    with_initial = [iterative_sparsity(t, 0.5, final, 0, 30, 3) for t in (9, 10, 20, 30)]
    assert with_initial == pytest.approx([0.5, 0.75, 0.875, final])
    assert iterative_sparsity(5, 0.0, 0.8, 0, 10, 1) == 0.0 and iterative_sparsity(10, 0.0, 0.8, 0, 10, 1) == 0.8


def test_one_shot_prunes_at_start_step() -> None:
    assert [one_shot_sparsity(t, 0.0, 0.6, 12) for t in (0, 11, 12, 50)] == [0.0, 0.0, 0.6, 0.6]


# --- masks ----------------------------------------------------------------------------------


def test_keep_mask_prunes_exact_count_ties_by_position() -> None:
    scores = torch.tensor([3.0, 1.0, 1.0, -1.0, 1.0, 2.0])
    assert keep_mask(scores, 3).tolist() == [True, False, False, False, True, True]
    assert int((~keep_mask(torch.rand(1001), 400)).sum()) == 400


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 5))


def test_global_threshold_prunes_the_smallest_magnitudes() -> None:
    net = _net()
    cb = MagnitudePruning(0.5, scope="global")
    cb.attach(net)
    assert list(cb.params) == ["0.weight", "3.weight"]  # no biases, no BatchNorm
    magnitudes = torch.cat([net[0].weight.detach().abs().flatten(), net[3].weight.detach().abs().flatten()])
    threshold = magnitudes.sort().values[149]  # 300 weights, 150 pruned
    cb.prune_to(0.5)
    pruned = torch.cat([(~m).flatten() for m in cb.masks.values()])
    assert int(pruned.sum()) == 150
    assert torch.equal(pruned, magnitudes <= threshold)
    assert int((net[0].weight == 0).sum() + (net[3].weight == 0).sum()) == 150
    assert (net[1].weight != 0).all() and (net[0].bias != 0).all()


def test_masks_are_monotone_and_layer_scope_is_exact_per_tensor() -> None:
    net = _net()
    cb = MagnitudePruning(0.9, scope="layer")
    cb.attach(net)
    cb.prune_to(0.3)
    before = {n: m.clone() for n, m in cb.masks.items()}
    with torch.no_grad():  # pruned weights now look large; they must stay pruned anyway
        for name, p in cb.params.items():
            p.add_(5.0 * ~before[name])
    cb.prune_to(0.6)
    for name, p in cb.params.items():
        assert not (cb.masks[name] & ~before[name]).any()  # nothing revived
        assert int((~cb.masks[name]).sum()) == round(0.6 * p.numel())
        assert int((p == 0).sum()) == round(0.6 * p.numel())


def test_masks_keep_working_on_the_exported_student() -> None:
    # QAT replaces the student by its torch.export program, which holds the same Parameters
    net = ConvNet(num_classes=10, in_channels=1, channels=[8, 16]).eval()
    cb = MagnitudePruning(0.7)
    cb.attach(net)
    cb.prune_to(0.4)
    exported = torch.export.export(net, (torch.randn(2, 1, 8, 8),)).module()
    assert sorted(dict(exported.named_parameters())) == sorted(dict(net.named_parameters()))  # no weight_orig
    cb.prune_to(0.7)
    weights = dict(exported.named_parameters())
    total = sum(p.numel() for p in cb.params.values())
    assert sum(int((weights[n] == 0).sum()) for n in cb.params) == round(0.7 * total)


# --- real fits -------------------------------------------------------------------------------


class Recording(MagnitudePruning):
    """Keeps a copy of every new mask set and of the weights right after it was applied."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, Any]] = []
        self.epoch_sparsity: list[float] = []

    def prune_to(self, sparsity: float) -> None:
        super().prune_to(sparsity)
        self.history.append({
            "target": sparsity,
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "weights": {n: p.detach().clone() for n, p in self.params.items()},
        })

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.epoch_sparsity.append(self.summary()["sparsity"])


def _fit(
    cb: MagnitudePruning, optimizer: Any, max_epochs: int = 3, ckpt_path: Path | None = None
) -> tuple[DistillationModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    student = ConvNet(num_classes=10, in_channels=1, channels=[8, 16])
    teacher = ConvNet(num_classes=10, in_channels=1, channels=[16, 32])
    module = DistillationModule(
        student=student, criterion=KDLoss(temperature=4, weight=0.9, ce_weight=0.1), optimizer=optimizer,
        num_classes=10, teacher=teacher,
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=BATCHES,
        limit_val_batches=1, num_sanity_val_steps=0, callbacks=[cb],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return module, trainer


def _check_stays_zero(cb: Recording, trainer: L.Trainer, state_key: str) -> None:
    """The weights pruned by the last event are still zero after the later steps; the rest moved."""
    last = cb.history[-1]
    opt = trainer.optimizers[0]
    for name, p in cb.params.items():
        mask = last["masks"][name]
        assert torch.equal(cb.masks[name], mask)
        assert (p.detach()[~mask] == 0).all()
        assert (opt.state[p][state_key][~mask] == 0).all()  # no momentum builds up where pruned
        changed = p.detach()[mask] != last["weights"][name][mask]
        assert changed.float().mean() > 0.5  # the survivors kept training


def test_agp_fit_reaches_the_target_at_final_epoch_and_holds_it_under_adamw() -> None:
    # 6 steps per epoch; AGP over epochs 0-1 (steps 0-12, Δt = 3), then epoch 2 trains at 80%
    cb = Recording(final_sparsity=0.8, schedule="agp", end_epoch=2, frequency=3)
    module, trainer = _fit(cb, functools.partial(torch.optim.AdamW, lr=0.02, weight_decay=0.1), max_epochs=3)
    assert cb.steps_per_epoch == BATCHES and cb.final_epoch == 1
    # events at steps 3, 6, 9 and 12 (step 0 has target s_i = 0): 0.8 (1 - (1 - t/12)^3)
    assert [h["target"] for h in cb.history] == pytest.approx([0.8 * (1 - (1 - t / 12) ** 3) for t in (3, 6, 9, 12)])
    assert cb.events == 4
    for old, new in zip(cb.history, cb.history[1:]):
        for name, mask in new["masks"].items():
            assert not (mask & ~old["masks"][name]).any()  # pruned once, pruned forever
    assert cb.epoch_sparsity[0] == pytest.approx(0.7, abs=0.01)  # step 6: 0.8 - 0.8 * 0.5^3
    assert cb.epoch_sparsity[1:] == pytest.approx([0.8, 0.8], abs=0.01)
    assert cb.dense is not None and cb.dense_epoch == 0
    assert all(bool((m.weight != 0).all()) for m in cb.dense.modules() if isinstance(m, nn.Conv2d))
    _check_stays_zero(cb, trainer, "exp_avg")

    summary = cb.summary()
    assert summary["sparsity"] == pytest.approx(0.8, abs=0.01) and summary["events"] == 4
    assert summary["pruned_weights"] == round(0.8 * summary["prunable_weights"])
    assert set(summary["layers"]) == {"features.0.weight", "features.4.weight", "head.2.weight"}
    n_params = sum(p.numel() for p in module.student.parameters())
    assert summary["sparsity_all_parameters"] == pytest.approx(summary["pruned_weights"] / n_params)
    final = cb.finalize(module.student, (1, 8, 8))
    assert not final.training and cb.masks == {}
    assert sorted(final.state_dict()) == sorted(cb.dense.state_dict())  # no weight_orig / weight_mask


def test_one_shot_layer_scope_holds_under_sgd_momentum() -> None:
    # one shot when epoch 1 begins (step 6), then 6 more steps of SGD with momentum and L2
    cb = Recording(final_sparsity=0.5, schedule="one_shot", start_epoch=1, scope="layer")
    optimizer = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    module, trainer = _fit(cb, optimizer, max_epochs=2)
    assert cb.final_epoch == 1 and len(cb.history) == 1 and cb.dense_epoch == 0
    for name, p in cb.params.items():  # layer scope: every tensor at 50%
        assert abs(int((p == 0).sum()) - 0.5 * p.numel()) <= 0.5
    _check_stays_zero(cb, trainer, "momentum_buffer")


def test_state_dict_round_trip_restores_masks_and_position(tmp_path: Path) -> None:
    net = _net()
    cb = MagnitudePruning(0.7, scope="global")
    cb.attach(net)
    cb.prune_to(0.4)
    cb.sparsity_target, cb.events = 0.4, 3
    path = tmp_path / "state.pt"
    torch.save(cb.state_dict(), path)

    other = _net()  # same names, dense weights
    restored = MagnitudePruning(0.7, scope="global")
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.attach(other)
    assert restored.sparsity_target == 0.4 and restored.events == 3
    for name, mask in cb.masks.items():
        assert torch.equal(restored.masks[name], mask)
        assert (restored.params[name][~mask] == 0).all()
    restored.prune_to(0.7)  # continues monotonically from the restored masks
    assert all(not (restored.masks[n] & ~m).any() for n, m in cb.masks.items())
    with pytest.raises(RuntimeError, match="lacks"):
        stranger = MagnitudePruning(0.7)
        stranger.load_state_dict(cb.state_dict())
        stranger.attach(nn.Sequential(nn.Linear(3, 3)))


def test_a_lightning_checkpoint_resumes_masks_and_schedule(tmp_path: Path) -> None:
    adam = functools.partial(torch.optim.Adam, lr=0.01)
    first = Recording(final_sparsity=0.8, schedule="agp", end_epoch=2, frequency=3)
    _, trainer = _fit(first, adam, max_epochs=1)  # stops mid-schedule: events at steps 3 and 6
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    assert first.events == 2

    resumed = Recording(final_sparsity=0.8, schedule="agp", end_epoch=2, frequency=3)
    _fit(resumed, adam, max_epochs=2, ckpt_path=path)
    assert resumed.events == 4 and [h["target"] for h in resumed.history] == pytest.approx([0.8 - 0.8 / 64, 0.8])
    for name, mask in first.masks.items():
        assert not (resumed.masks[name] & ~mask).any()  # what was pruned before the checkpoint stays pruned
    assert resumed.summary()["sparsity"] == pytest.approx(0.8, abs=0.01)
    # the dense student, copied before the first pruning event, travels in the checkpoint for the report
    assert first.dense is not None and resumed.dense is not None and resumed.dense is not first.dense
    assert (resumed.dense_epoch, resumed.dense_step) == (first.dense_epoch, first.dense_step)
    dense, saved = resumed.dense.state_dict(), first.dense.state_dict()
    assert dense.keys() == saved.keys() and all(torch.equal(dense[k], saved[k]) for k in dense)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key, message",
    [
        ({"final_sparsity": 1.0}, "final_sparsity", "must be in [0, 1)"),
        ({"final_sparsity": -0.1}, "final_sparsity", "must be in [0, 1)"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity", "final_sparsity=0.5"),
        ({"final_sparsity": 0.5, "start_epoch": 5, "end_epoch": 3}, "end_epoch", "must be > start_epoch"),
        ({"final_sparsity": 0.5, "schedule": "cubic"}, "schedule", "agp, one_shot, iterative"),
        ({"final_sparsity": 0.5, "scope": "channel"}, "scope", "global, layer"),
        ({"final_sparsity": 0.5, "modules": ["BatchNorm2d"]}, "modules", "conv"),
        ({"final_sparsity": 0.5, "frequency": 0}, "frequency", ">= 1"),
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        MagnitudePruning(**kwargs)
    assert info.value.key == key and message in info.value.message


def _check(cb: MagnitudePruning, student: nn.Module, max_epochs: int = 30) -> None:
    cb.key = "callbacks.prune"
    cb.check(student, max_epochs=max_epochs, reads_features=False, input_shape=(1, 8, 8))


def test_check_rejects_what_cannot_run() -> None:
    student = ConvNet(num_classes=10, in_channels=1, channels=[8, 16])
    with pytest.raises(ConfigError, match=r"callbacks.prune.end_epoch: is 40 but trainer.max_epochs is 30"):
        _check(MagnitudePruning(0.5, end_epoch=40), student)
    with pytest.raises(ConfigError, match=r"callbacks.prune.start_epoch: is 30 but trainer.max_epochs is 30"):
        _check(MagnitudePruning(0.5, schedule="one_shot", start_epoch=30), student)
    with pytest.raises(ConfigError, match=r"callbacks.prune.modules: .*cannot handle the student's layers"):
        _check(MagnitudePruning(0.5), nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
    with pytest.raises(ConfigError, match=r"callbacks.prune.modules: .*outside exclude"):
        _check(MagnitudePruning(0.5, exclude=["features", "head"]), student)
    with pytest.raises(ConfigError, match=r"callbacks.prune.exclude: 'head.3' is not a module .*did you mean head.2"):
        _check(MagnitudePruning(0.5, exclude=["head.3"]), student)
    cb = MagnitudePruning(0.5, exclude=["head.2"])
    _check(cb, student, max_epochs=10)
    assert list(cb.prunable(student)) == ["features.0.weight", "features.4.weight"] and cb.final_epoch == 9


@pytest.mark.parametrize("name", ["prune_agp", "prune_oneshot", "prune_iterative"])
def test_configs_build_and_pass_check_on_the_default_run(name: str) -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"callbacks={name}", "callbacks.prune.final_sparsity=0.6"])
    cb = instantiate_checked(cfg.callbacks.prune, "callbacks.prune")
    assert isinstance(cb, MagnitudePruning) and cb.final_sparsity == 0.6 and "model_checkpoint" in cfg.callbacks
    _check(cb, ConvNet(num_classes=10, in_channels=1, channels=[8, 16]), max_epochs=cfg.trainer.max_epochs)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        bad = compose("train", overrides=[f"callbacks={name}", "callbacks.prune.final_sparsity=1.0"])
    with pytest.raises(ConfigError, match=r"^callbacks.prune.final_sparsity: must be in \[0, 1\)"):
        instantiate_checked(bad.callbacks.prune, "callbacks.prune")

