"""Structured channel pruning: channels really go, the right ones, and training carries on."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from kd.compress.structured import ChannelPruning, channel_counts, prune_step
from kd.data import DigitsDataModule
from kd.errors import ConfigError
from kd.losses.ce import CrossEntropy
from kd.models import MLP, ConvNet
from kd.models.cifar import resnet8
from kd.models.cifar.resnet import CifarResNet
from kd.models.features import FeatureExtractor
from kd.training.module import DistillationModule

DIGITS = (1, 8, 8)


def convnet() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(num_classes=10, in_channels=1, channels=[8, 16])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_at(cb: ChannelPruning, model: nn.Module, epoch: int, optimizers: list | None = None) -> None:
    """Runs the callback's epoch-start hook as Lightning would, on a bare model."""
    trainer = SimpleNamespace(current_epoch=epoch, global_step=0, optimizers=optimizers or [], callbacks=[])
    module = SimpleNamespace(student=model, student_features=FeatureExtractor(model, [], key="", input_shape=()))
    cb.on_train_epoch_start(trainer, module)  # type: ignore[arg-type]


def checked(model: nn.Module, input_shape: tuple[int, ...] = DIGITS, max_epochs: int = 3, **kwargs) -> ChannelPruning:
    cb = ChannelPruning(**kwargs)
    cb.key = "callbacks.prune"
    cb.check(model, max_epochs=max_epochs, reads_features=False, input_shape=input_shape)
    return cb


def test_convnet_loses_half_its_channels_and_the_hand_counted_parameters() -> None:
    model = convnet()
    assert n_params(model) == 1 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16 + 16 * 10 + 10 == 1442
    cb = checked(model, amount=0.5)
    prune_at(cb, model, 0)
    # conv 1->4, BN 4, conv 4->8, BN 8, linear 8->10
    assert n_params(model) == 1 * 4 * 9 + 2 * 4 + 4 * 8 * 9 + 2 * 8 + 8 * 10 + 10 == 438
    assert channel_counts(model) == {"features.0": 4, "features.4": 8, "head.2": 10}
    assert model.features[4].in_channels == 4 and model.head[2].in_features == 8
    assert model.features[1].running_mean.shape == (4,)  # BN buffers follow
    assert model(torch.randn(5, *DIGITS)).shape == (5, 10)
    assert cb.dense is not None and channel_counts(cb.dense)["features.0"] == 8 and cb.dense_epoch == 0
    s = cb.summary()
    assert (s["params_before"], s["params_after"]) == (1442, 438)
    assert s["channels"] == {"features.0": [8, 4], "features.4": [16, 8]}
    assert s["macs_after"] < s["macs_before"] / 3  # both convs lose half their inputs and outputs


def test_the_channels_with_the_largest_group_norm_are_kept_with_their_weights() -> None:
    model = convnet()
    keep = [1, 2, 5, 6]
    with torch.no_grad():  # channel c of conv1 is one group: conv1 filter, BN1, conv2 input slice
        for c in keep:
            model.features[0].weight[c] *= 10
            model.features[1].weight[c] *= 10
            model.features[4].weight[:, c] *= 10
    conv1, bn1 = model.features[0].weight.detach().clone(), model.features[1].bias.detach().clone()
    prune_at(checked(model, amount=0.5, importance="l1"), model, 0)
    torch.testing.assert_close(model.features[0].weight, conv1[keep], rtol=0, atol=0)
    torch.testing.assert_close(model.features[1].bias, bn1[keep], rtol=0, atol=0)


def test_mlp_hidden_layers_are_halved_and_the_classifier_kept() -> None:
    torch.manual_seed(0)
    model = MLP(num_classes=10, in_features=64, hidden=[32, 32])
    prune_at(checked(model, amount=0.5), model, 0)
    assert channel_counts(model) == {"features.2": 16, "features.5": 16, "fc": 10}
    assert n_params(model) == 64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert model(torch.randn(3, *DIGITS)).shape == (3, 10)


def test_cifar_resnet8_becomes_the_resnet8_of_half_width() -> None:
    torch.manual_seed(0)
    model = resnet8(num_classes=10)
    dense = channel_counts(model)
    prune_at(checked(model, input_shape=(3, 32, 32), amount=0.5), model, 0)
    # residual additions tie the channels of whole stages; each stage still loses exactly half
    assert channel_counts(model) == {n: c if n == "fc" else c // 2 for n, c in dense.items()}
    assert n_params(model) == n_params(CifarResNet(8, (8, 8, 16, 32), 10, 3))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_iterative_steps_reach_the_amount_linearly_and_ignored_modules_keep_their_width() -> None:
    model = convnet()
    cb = checked(model, amount=0.5, start_epoch=1, steps=2, ignored=["features.0"], max_epochs=4)
    prune_at(cb, model, 0)
    assert channel_counts(model)["features.4"] == 16  # before start_epoch
    prune_at(cb, model, 1)
    assert channel_counts(model) == {"features.0": 8, "features.4": 12, "head.2": 10}  # 0.25 of 16 gone
    prune_at(cb, model, 2)
    assert channel_counts(model) == {"features.0": 8, "features.4": 8, "head.2": 10}
    prune_at(cb, model, 3)  # after final_epoch: nothing more
    assert channel_counts(model)["features.4"] == 8 and cb.final_epoch == 2


def test_round_to_keeps_channel_counts_multiples() -> None:
    model = convnet()
    prune_at(checked(model, amount=0.3, round_to=4), model, 0)
    # 8 * 0.7 = 5.6 -> 5 kept, rounded down to 4; 16 * 0.7 = 11.2 -> 11, rounded down to 8
    assert channel_counts(model) == {"features.0": 4, "features.4": 8, "head.2": 10}


def test_check_warns_of_layers_that_round_to_leaves_whole(caplog: pytest.LogCaptureFixture) -> None:
    model = convnet()
    cb = checked(model, amount=0.5, round_to=8)  # features.0: 4 kept, rounded down to 0: left whole
    assert "leaves features.0 at full width" in caplog.text and "features.4" not in caplog.text
    prune_at(cb, model, 0)
    assert channel_counts(model) == {"features.0": 8, "features.4": 8, "head.2": 10}


def test_optimizer_follows_the_new_parameters_with_momentum_sliced() -> None:
    model = convnet()
    model.features[1].weight.requires_grad_(False)  # a frozen parameter stays frozen
    keep = [0, 3, 4, 7]
    with torch.no_grad():
        for c in keep:
            model.features[0].weight[c] *= 10
            model.features[4].weight[:, c] *= 10
    cb = checked(model, amount=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model(torch.randn(8, *DIGITS)).logsumexp(1).sum().backward()
    opt.step()
    old = model.features[0].weight
    momentum = opt.state[old]["momentum_buffer"].clone()  # (8, 1, 3, 3)
    grad = old.grad.clone()
    prune_at(cb, model, 0, optimizers=[opt])
    new = model.features[0].weight
    assert new is not old and new.shape == (4, 1, 3, 3)
    live = {p for p in model.parameters() if p.requires_grad}
    assert {p for g in opt.param_groups for p in g["params"]} == live
    assert set(opt.state) <= live and old not in opt.state
    torch.testing.assert_close(opt.state[new]["momentum_buffer"], momentum[keep], rtol=0, atol=0)
    torch.testing.assert_close(new.grad, grad[keep], rtol=0, atol=0)
    assert not model.features[1].weight.requires_grad
    model(torch.randn(8, *DIGITS)).sum().backward()
    opt.step()  # the optimizer steps on the pruned shapes


def test_prune_step_restarts_the_state_of_parameters_too_large_to_trace() -> None:
    # float16 holds integers exactly up to 2048 only: the (40, 60) classifier weight has 2400
    model = nn.Sequential(nn.Linear(4, 60), nn.ReLU(), nn.Linear(60, 40)).half()
    pruner = ChannelPruning(amount=0.5)._build_pruner(model, torch.randn(1, 4, dtype=torch.half), steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.arange(p.numel(), dtype=torch.float).view_as(p)
    prune_step(pruner, model, [opt])
    assert model[2].weight.shape == (40, 30) and model[2].weight not in opt.state
    assert model[2].bias in opt.state  # not pruned: same object, same state
    rows = opt.state[model[0].weight]["momentum_buffer"]  # (30, 4): whole rows of the (60, 4) buffer
    assert rows.shape == (30, 4) and (rows[:, 0] % 4 == 0).all() and (rows.diff(dim=1) == 1).all()


def test_fit_prunes_at_its_epoch_and_keeps_the_lr_schedule(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    student = convnet()
    cb = checked(student, amount=0.5, start_epoch=1)
    module = DistillationModule(
        student, CrossEntropy(), partial(torch.optim.SGD, lr=0.1, momentum=0.9), num_classes=10,
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    seen: list[dict] = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            opt = trainer.optimizers[0]
            seen.append({"lr": opt.param_groups[0]["lr"], "width": channel_counts(pl_module.student)["features.0"]})

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            opt = trainer.optimizers[0]
            params = {p for g in opt.param_groups for p in g["params"]}
            seen[-1]["live"] = params == set(pl_module.trainable_parameters())
            seen[-1]["momentum"] = all("momentum_buffer" in opt.state[p] for p in params)
            seen[-1]["loss"] = float(trainer.callback_metrics["train/loss"])

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=5, limit_val_batches=1, callbacks=[cb, Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert [s["lr"] for s in seen] == [0.1, 0.05, 0.025]  # not reset by the pruning at epoch 1
    assert [s["width"] for s in seen] == [8, 4, 4]  # Record runs after the pruning callback
    assert all(s["live"] and s["momentum"] for s in seen)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in seen)
    assert seen[2]["loss"] < seen[0]["loss"]
    assert n_params(module.student) == 438 and cb.dense_epoch == 1 and n_params(cb.dense) == 1442
    final = cb.finalize(module.student, DIGITS)
    assert not final.training and final(torch.randn(2, *DIGITS)).shape == (2, 10)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"amount": 1.0}, "amount"), ({"amount": -0.1}, "amount"), ({"steps": 0}, "steps"),
    ({"start_epoch": -1}, "start_epoch"), ({"importance": "taylor"}, "importance"), ({"round_to": 0}, "round_to"),
])
def test_constructor_rejects_values_out_of_range(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        ChannelPruning(**kwargs)
    assert e.value.key == key


def test_check_rejects_what_cannot_work() -> None:
    cb = ChannelPruning(start_epoch=2, steps=2)
    cb.key = "callbacks.prune"
    with pytest.raises(ConfigError, match=r"epochs 2\.\.3.*max_epochs is 3") as e:
        cb.check(convnet(), max_epochs=3, reads_features=False, input_shape=DIGITS)
    assert e.value.key == "callbacks.prune.start_epoch"
    with pytest.raises(ConfigError, match="feature-based") as e:
        cb.check(convnet(), max_epochs=10, reads_features=True, input_shape=DIGITS)
    assert e.value.key == "callbacks.prune"
    with pytest.raises(ConfigError, match="did you mean features.0") as e:
        checked(convnet(), ignored=["features.00"])
    assert e.value.key == "callbacks.prune.ignored"
    with pytest.raises(ConfigError, match="nothing prunable in Sequential") as e:
        checked(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))  # the classifier alone
    assert e.value.key == "callbacks.prune"
