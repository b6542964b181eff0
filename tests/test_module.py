"""DistillationModule: the teacher stays frozen for real, the terms are summed and logged."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd.data import DigitsDataModule
from kd.errors import ConfigError
from kd.losses import CrossEntropy, KDLoss
from kd.models import ConvNet
from kd.training.module import DistillationModule


class TeacherWatch(Callback):
    """Records the teacher's mode at every forward and its gradients before every step."""

    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.grads: list[bool] = []
        self.student_grads = 0

    def setup(self, trainer, pl_module, stage):
        pl_module.teacher.register_forward_pre_hook(lambda m, _: self.modes.append(m.training))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads += [p.grad is not None for p in pl_module.teacher.parameters()]
        self.student_grads += sum(p.grad is not None for p in pl_module.student.parameters())


def _module(teacher: torch.nn.Module | None, criterion) -> DistillationModule:
    torch.manual_seed(0)
    student = ConvNet(num_classes=10, in_channels=1, channels=(4, 8))
    return DistillationModule(
        student, criterion, optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        num_classes=10, teacher=teacher,
    )


def _trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=2,
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), num_sanity_val_steps=1, **kwargs,
    )


def test_teacher_is_untouched_by_training(tmp_path) -> None:
    teacher = ConvNet(num_classes=10, in_channels=1, channels=(8, 16), dropout=0.5)  # has BN and dropout
    teacher.train()  # as a freshly built model would be
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = _module(teacher, KDLoss(temperature=4.0, weight=0.9, ce_weight=0.1))
    watch = TeacherWatch()
    student_before = [p.clone() for p in module.student.parameters()]
    _trainer(tmp_path, [watch], gradient_clip_val=0.01).fit(module, datamodule=DigitsDataModule(batch_size=32))

    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights or BN stats changed"
    assert watch.modes and not any(watch.modes), "teacher ran in train mode"
    assert watch.grads and not any(watch.grads), "teacher received gradients"
    assert all(not p.requires_grad for p in teacher.parameters())
    assert watch.student_grads > 0
    assert any(not torch.equal(a, b) for a, b in zip(student_before, module.student.parameters()))


def test_optimizer_holds_student_and_criterion_but_never_teacher() -> None:
    teacher = ConvNet(num_classes=10, in_channels=1, channels=(8,))
    criterion = KDLoss()
    criterion.proj = torch.nn.Linear(3, 3)  # stands for a method's auxiliary module
    module = _module(teacher, criterion)
    optimizer = module.configure_optimizers()
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in [*module.student.parameters(), *criterion.parameters()]}
    assert not in_opt & {id(p) for p in teacher.parameters()}


def test_train_mode_never_reaches_the_teacher() -> None:
    module = _module(ConvNet(num_classes=10, in_channels=1, channels=(8,)), KDLoss())
    module.train()
    assert module.student.training and not module.teacher.training
    assert not any(m.training for m in module.teacher.modules())
    module.eval()
    assert not module.student.training
    module.teacher.train()  # behind the module's back: the next teacher forward runs in eval mode
    module.teacher_forward(torch.zeros(2, 1, 8, 8))
    assert not module.teacher.training


def test_terms_are_summed_and_logged_by_name(tmp_path) -> None:
    module = _module(ConvNet(num_classes=10, in_channels=1, channels=(8,)), KDLoss(weight=0.5, ce_weight=0.5))
    seen: list[tuple[float, float]] = []
    original = module.training_step

    def step(batch, batch_idx):
        loss = original(batch, batch_idx)
        with torch.no_grad():
            terms = module.criterion(
                type(module.teacher_forward(batch["input"]))(logits=module.student(batch["input"])),
                module.teacher_forward(batch["input"]), batch,
            )
        seen.append((loss.item(), sum(t.item() for t in terms.values())))
        return loss

    module.training_step = step
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert seen and all(a == pytest.approx(b, rel=1e-5) for a, b in seen)
    logged = trainer.logged_metrics
    for key in ("train/loss", "train/loss_ce", "train/loss_kd", "train/acc", "train/acc_top5", "val/acc", "val/acc_top5"):
        assert key in logged, key
    assert logged["train/loss"].item() == pytest.approx(
        logged["train/loss_ce"].item() + logged["train/loss_kd"].item(), rel=1e-5
    )


def test_a_method_that_needs_a_teacher_refuses_to_run_without_one() -> None:
    with pytest.raises(ConfigError, match="needs a teacher"):
        _module(None, KDLoss())
    _module(None, CrossEntropy())  # plain training needs none
