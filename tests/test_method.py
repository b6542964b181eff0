"""How methods plug in: dry-run setup, data checks, schedules, combinations, stages, export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.data.digits import DigitsDataModule
from kd.errors import ConfigError
from kd.losses import KDLoss
from kd.losses.base import DistillationLoss, Stage
from kd.losses.combined import Combined
from kd.losses.schedules import Constant, LinearWarmup, StepUntil, as_schedule
from kd.models import ConvNet
from kd.outputs import Batch, DataInfo, ModelOutput
from kd.training.method import prepare_method
from kd.training.module import DistillationModule
from kd.training.run import run
from kd.training.stages import run_stages


class Probe(DistillationLoss):
    """A toy feature method: a linear regressor from a student feature to a teacher feature."""

    def __init__(self, student_nodes=("head.0",), teacher_nodes=("head.0",), stage_epochs: int = 0, **kwargs) -> None:
        super().__init__(student_nodes=student_nodes, teacher_nodes=teacher_nodes, **kwargs)
        self.stage_epochs = stage_epochs
        self.epochs_seen: list[int] = []
        self.data: DataInfo | None = None

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        assert teacher is not None
        d_s = student.features[self.student_nodes[0]].shape[1]
        d_t = teacher.features[self.teacher_nodes[0]].shape[1]
        self.regressor = nn.Linear(d_s, d_t)
        self.data = data

    def _mse(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        s = student.features[self.student_nodes[0]]
        return F.mse_loss(self.regressor(s), teacher.features[self.teacher_nodes[0]])

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        assert teacher is not None
        return {"probe": self._mse(student, teacher)}

    def forward(self, student, teacher, batch, epoch: int = 0):  # noqa: ANN001, ANN201
        self.epochs_seen.append(epoch)
        return super().forward(student, teacher, batch, epoch)

    def fit_teacher(self, student: ModelOutput | None, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        """Stage loss: the regressor alone, fitted on a slice of the teacher's own feature."""
        t = teacher.features["head.0"]  # (B, 32)
        return {"fit": F.mse_loss(self.regressor(t[:, : self.regressor.in_features]), t)}

    def stages(self) -> list[Stage]:
        if not self.stage_epochs:
            return []
        return [Stage("probe_init", self.stage_epochs, self.fit_teacher, [self.regressor], freeze_after=True)]


def _pair() -> tuple[ConvNet, ConvNet, DigitsDataModule]:
    torch.manual_seed(0)
    student = ConvNet(10, 1, channels=(4, 8))
    teacher = ConvNet(10, 1, channels=(16, 32), hidden=12)
    return student, teacher, DigitsDataModule(batch_size=32)


def test_prepare_builds_learned_parts_from_a_dry_run_and_gives_the_data_facts() -> None:
    student, teacher, dm = _pair()
    probe = Probe()
    s_fx, t_fx = prepare_method(probe, student, teacher, dm)
    assert (probe.regressor.in_features, probe.regressor.out_features) == (8, 32)  # from shapes, not config
    assert probe.data is not None and probe.data.num_samples == 1167 and probe.data.num_classes == 10
    assert torch.equal(probe.data.targets, dm.splits["train"].targets)
    assert t_fx is not None and t_fx.model is teacher and s_fx.model is student


def test_a_method_needing_indices_fails_on_a_datamodule_without_them() -> None:
    class NoIndex(DigitsDataModule):
        provides_index = False

    class NeedsIndex(Probe):
        requires_index = True

    student, teacher, _ = _pair()
    with pytest.raises(ConfigError, match=r"distill: NeedsIndex needs the index of every training sample .* NoIndex does not provide"):
        prepare_method(NeedsIndex(), student, teacher, NoIndex())


def test_a_wrong_node_name_fails_naming_the_model_side() -> None:
    student, teacher, dm = _pair()
    with pytest.raises(ConfigError, match=r"^distill.teacher_nodes: ConvNet has no node named 'head.9'.*available: "):
        prepare_method(Probe(teacher_nodes=["head.9"]), student, teacher, dm)


def test_teacher_and_student_must_score_the_same_classes() -> None:
    student, _, dm = _pair()
    with pytest.raises(ConfigError, match="^model.teacher: scores 12 classes but the student 10"):
        prepare_method(KDLoss(), student, ConvNet(12, 1, channels=(4,)), dm)


def test_schedules() -> None:
    warm = LinearWarmup(value=2.0, epochs=4)
    assert [warm(e) for e in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    step = StepUntil(value=1.0, epoch=2, after=0.25)
    assert [step(e) for e in range(4)] == [1.0, 1.0, 0.25, 0.25]
    assert as_schedule("w", 3)(7) == 3.0 and isinstance(as_schedule("w", 0.5), Constant)
    for bad in (-1.0, float("nan"), "x", True):
        with pytest.raises(ConfigError, match="^w: "):
            as_schedule("w", bad)
    with pytest.raises(ConfigError, match="epochs"):
        LinearWarmup(1.0, 0)
    for make in (lambda: LinearWarmup(-3.0, 5), lambda: StepUntil(float("nan"), 2), lambda: StepUntil(1.0, 2, after=-1)):
        with pytest.raises(ConfigError, match="must be a number >= 0"):
            make()


def test_a_scheduled_weight_is_applied_at_the_epoch_the_module_passes() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    loss = KDLoss(temperature=2.0, weight=LinearWarmup(1.0, 4), ce_weight=0.0)
    full = KDLoss(temperature=2.0, weight=1.0, ce_weight=0.0)(ModelOutput(s), ModelOutput(t), {"target": y})["kd"]
    for epoch, factor in ((0, 0.25), (2, 0.75), (9, 1.0)):
        got = loss(ModelOutput(s), ModelOutput(t), {"target": y}, epoch=epoch)["kd"]
        torch.testing.assert_close(got, factor * full)


def test_the_training_module_passes_the_current_epoch_and_trains_the_method_parts(tmp_path: Path) -> None:
    student, teacher, dm = _pair()
    probe = Probe(ce_weight=1.0)
    features = prepare_method(probe, student, teacher, dm)
    before = probe.regressor.weight.detach().clone()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(
        student, probe, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), num_classes=10, teacher=teacher,
        student_features=features[0], teacher_features=features[1],
    )
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert probe.epochs_seen == [0, 0, 1, 1, 2, 2]
    assert not torch.equal(probe.regressor.weight, before)  # the auxiliary regressor trained
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # the teacher never changes, BN stats included
    assert any(k.startswith("criterion.regressor.") for k in module.state_dict())  # in checkpoints


def test_combined_merges_members_and_refuses_a_double_cross_entropy() -> None:
    kd = KDLoss(temperature=4.0, weight=1.0, ce_weight=1.0)
    probe = Probe(student_nodes=["head.0"], teacher_nodes=["features.2"], weight=0.5)
    both = Combined({"kd": kd, "probe": probe})
    assert both.student_nodes == ("head.0",) and both.teacher_nodes == ("features.2",)
    student, teacher, dm = _pair()
    s_fx, t_fx = prepare_method(Combined({"probe": Probe()}), student, teacher, dm)
    x = torch.randn(4, 1, 8, 8)
    combo = Combined({"kd": kd, "probe": Probe(weight=LinearWarmup(1.0, 2))})
    combo.setup(s_fx(x), t_fx(x), DataInfo(10, 4))
    batch = {"target": torch.tensor([0, 1, 2, 3])}
    s_out, t_out = s_fx(x), t_fx(x)
    terms = combo(s_out, t_out, batch, epoch=0)
    assert list(terms) == ["ce", "kd", "probe"]
    torch.testing.assert_close(terms["probe"], 0.5 * combo.methods["probe"].loss_terms(s_out, t_out, batch)["probe"])
    with pytest.raises(ConfigError, match="kd and kd2 both weight the cross-entropy"):
        Combined({"kd": kd, "kd2": KDLoss(ce_weight=0.5)})
    two = Combined({"a": KDLoss(ce_weight=0.0, weight=1.0), "b": KDLoss(temperature=2.0, ce_weight=0.0, weight=1.0)})(s_out, t_out, batch)
    assert list(two) == ["kd", "b_kd"]  # the second member's clashing term keeps its own name
    torch.testing.assert_close(two["b_kd"], KDLoss(temperature=2.0, ce_weight=0.0, weight=1.0)(s_out, t_out, batch)["kd"])


def test_stages_train_only_their_modules_before_the_main_training(tmp_path: Path) -> None:
    student, teacher, dm = _pair()
    probe = Probe(stage_epochs=3)
    s_fx, t_fx = prepare_method(probe, student, teacher, dm)
    frozen = {k: v.clone() for k, v in [*student.state_dict().items(), *(("t." + k, v) for k, v in teacher.state_dict().items())]}
    reg_before = probe.regressor.weight.detach().clone()
    report = run_stages(
        probe.stages(), student_features=s_fx, teacher_features=t_fx, datamodule=dm,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
        make_trainer=lambda epochs: L.Trainer(
            max_epochs=epochs, limit_train_batches=4, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        ),
    )
    assert [r["name"] for r in report] == ["probe_init"] and report[0]["epochs"] == 3
    assert report[0]["loss_last"] < report[0]["loss_first"]
    assert not torch.equal(probe.regressor.weight, reg_before)
    after = {**student.state_dict(), **{"t." + k: v for k, v in teacher.state_dict().items()}}
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k  # neither the student (train_student=False) nor the teacher moved
    assert teacher.training is False
    assert all(p.requires_grad for p in student.parameters())  # the student trains again afterwards
    # freeze_after: the main optimizer (and DDP) no longer see the regressor
    assert not any(p.requires_grad for p in probe.regressor.parameters())
    module = DistillationModule(student, probe, optimizer=torch.optim.SGD, num_classes=10, teacher=teacher)
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in student.parameters()}


def test_the_exported_student_holds_only_the_student(make_cfg) -> None:
    results = run(make_cfg("distill=kd"))
    state = torch.load(results["student"]["weights"], weights_only=True)
    fresh = ConvNet(10, 1, channels=(8, 16))
    fresh.load_state_dict(state)  # strict: no teacher, no method modules
    ckpt = torch.load(results["student"]["checkpoint"], weights_only=True)["state_dict"]
    for k, v in state.items():
        assert torch.equal(ckpt[f"student.{k}"], v)  # the selected (best-val) weights


def test_loading_a_checkpoint_before_the_method_is_prepared_fails_clearly(tmp_path: Path) -> None:
    student, teacher, dm = _pair()
    probe = Probe()
    prepare_method(probe, student, teacher, dm)
    trained = DistillationModule(student, probe, optimizer=torch.optim.SGD, num_classes=10, teacher=teacher)
    fresh = DistillationModule(student, Probe(), optimizer=torch.optim.SGD, num_classes=10, teacher=teacher)
    checkpoint = {"state_dict": trained.state_dict()}
    with pytest.raises(ConfigError, match=r"^checkpoint: holds 2 entries .*criterion.regressor.bias.*prepare_method"):
        fresh.on_load_checkpoint(checkpoint)
    trained.on_load_checkpoint(checkpoint)  # the prepared module loads it


def test_stages_under_ddp_allow_unused_parameters(make_cfg) -> None:
    from kd.training.prepare import stage_strategy

    assert stage_strategy(make_cfg("trainer=ddp", fast=False)) == {"strategy": "ddp_find_unused_parameters_true"}
    assert stage_strategy(make_cfg("trainer=cpu", fast=False)) == {}
