"""Speed options of DistillationModule: they change how the step is computed, not what it computes."""

from __future__ import annotations

import functools
import shutil

import lightning as L
import pytest
import torch

from kd.data import DigitsDataModule
from kd.losses import KDLoss
from kd.models import ConvNet
from kd.models.features import FeatureExtractor
from kd.training.module import DistillationModule


def _fit(tmp_path, **options) -> tuple[DistillationModule, list[float]]:
    torch.manual_seed(0)
    teacher = ConvNet(num_classes=10, in_channels=1, channels=(8, 16)).eval()
    student = ConvNet(num_classes=10, in_channels=1, channels=(4, 8))
    module = DistillationModule(student, KDLoss(temperature=4.0, weight=0.9, ce_weight=0.1),
                                optimizer=functools.partial(torch.optim.SGD, lr=0.1), num_classes=10,
                                teacher=teacher, **options)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    L.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=5, limit_val_batches=0, accelerator="cpu",
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[Record()]).fit(module, datamodule=DigitsDataModule(batch_size=32))
    return module, losses


def test_channels_last_changes_the_layout_not_the_losses(tmp_path) -> None:
    plain_module, plain = _fit(tmp_path)
    module, losses = _fit(tmp_path, channels_last=True)
    def conv(m: DistillationModule) -> torch.nn.Conv2d:  # one with several input channels, where layouts differ
        return next(c for c in m.student.modules() if isinstance(c, torch.nn.Conv2d) and c.in_channels > 1)

    assert conv(module).weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv(plain_module).weight.is_contiguous(memory_format=torch.channels_last)
    assert len(losses) == 5 and losses == pytest.approx(plain, rel=1e-4)


def test_the_teacher_runs_in_inference_mode_and_its_outputs_can_be_saved_for_backward() -> None:
    torch.manual_seed(0)
    teacher = ConvNet(num_classes=10, in_channels=1, channels=(8, 16))
    student = ConvNet(num_classes=10, in_channels=1, channels=(4, 8))
    module = DistillationModule(student, KDLoss(temperature=4.0, weight=1.0, ce_weight=0.0),
                                optimizer=torch.optim.SGD, num_classes=10, teacher=teacher)
    seen: list[bool] = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    x = torch.randn(6, 1, 8, 8)
    out = module.teacher_forward(x)
    assert seen == [True] and not out.logits.is_inference() and not out.logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out.logits, teacher.eval()(x))
    s = student(x)
    (s * out.logits).sum().backward()  # the teacher's logits saved by autograd: refused for an inference tensor
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_extractor_gives_the_eager_outputs() -> None:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, channels=(4, 8)).eval()
    extractor = FeatureExtractor(net, ["features.0"], key="k", input_shape=(1, 8, 8))
    extractor._graph = None  # as after pickling (ddp_spawn): built eagerly before compiling
    fn = extractor.compiled()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        eager, fast = extractor(x), fn(x)
    torch.testing.assert_close(fast.logits, eager.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.features["features.0"], eager.features["features.0"], rtol=1e-4, atol=1e-5)
    assert extractor.compiled() is fn  # compiled once
    net.features[0] = torch.nn.Conv2d(1, 4, 3, padding=1)  # module surgery (structured pruning, QAT)
    extractor.sync()
    refreshed = extractor.compiled()
    assert refreshed is not fn
    with torch.no_grad():
        torch.testing.assert_close(refreshed(x).logits, net(x), rtol=1e-4, atol=1e-5)


def test_speed_fast_turns_on_what_applies_to_the_run(make_cfg) -> None:
    from kd.training.speed import apply_speed

    cfg = make_cfg("speed.fast=true")  # digits on the CPU: cache and in-memory batches, nothing GPU-only
    assert apply_speed(cfg) == ["data.fast=true", "teacher_cache.enabled=true"]
    assert (cfg.data.fast, cfg.teacher_cache.enabled, cfg.speed.fused_optimizer, cfg.speed.channels_last) == (
        True, True, False, False)
    gpu = make_cfg("speed.fast=true", "trainer.accelerator=gpu", "data.fast=true")
    assert apply_speed(gpu) == ["teacher_cache.enabled=true", "speed.fused_optimizer=true", "speed.channels_last=true"]
    imagenet = make_cfg("speed.fast=true", "experiment=imagenet_resnet34_resnet18", "trainer.accelerator=cpu")
    assert apply_speed(imagenet) == []  # RandomResizedCrop: no finite set of views to cache, no data.fast
    assert apply_speed(make_cfg()) == []  # off by default


def test_a_fast_run_is_the_run_with_cache_and_in_memory_batches(make_cfg) -> None:
    from kd.training.run import run

    common = ("trainer.limit_train_batches=3", "report.enabled=false")
    fast = run(make_cfg(*common, "speed.fast=true", run_dir="fast"))
    by_hand = run(make_cfg(*common, "data.fast=true", "teacher_cache.enabled=true", run_dir="by_hand"))
    assert fast["config"]["teacher_cache"]["enabled"] and fast["config"]["data"]["fast"]
    assert fast["student"]["final_metrics"] == by_hand["student"]["final_metrics"]


def test_fused_optimizer_is_used_only_on_a_gpu_and_only_when_the_class_has_one() -> None:
    student = ConvNet(num_classes=10, in_channels=1, channels=[4], depth=1, hidden=0)
    sgd = DistillationModule(student, KDLoss(), functools.partial(torch.optim.SGD, lr=0.1), 10,
                             teacher=ConvNet(num_classes=10, in_channels=1, channels=[4], depth=1, hidden=0),
                             fused_optimizer=True)
    assert not sgd.configure_optimizers().defaults.get("fused")  # on the CPU: the foreach kernel
    if torch.cuda.is_available():
        assert sgd.to("cuda").configure_optimizers().defaults["fused"]


@pytest.mark.parametrize(("value", "mode"), [(False, None), (True, "default"), ("reduce-overhead", "reduce-overhead")])
def test_speed_compile_takes_a_torch_compile_mode(value, mode) -> None:
    from kd.training.module import compile_mode

    assert compile_mode(value) == mode


def test_an_unknown_compile_mode_is_refused(make_cfg) -> None:
    from kd.errors import ConfigError
    from kd.training.run import run

    with pytest.raises(ConfigError, match=r"^speed.compile: must be false, true or a torch.compile mode .*got 'fastest'"):
        run(make_cfg("speed.compile=fastest"))
