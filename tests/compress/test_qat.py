"""Quantization-aware training: real fits that fake-quantize the student from epoch 1 while the
fp32 teacher distills, int8 models after finalize, frozen BN and observers, checkpoints, bad input."""

from __future__ import annotations

import copy
import functools
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, fx, nn

from kd.compress.pt2e import prepare_pt2e, set_graph_mode
from kd.compress.qat import QuantizationAwareTraining, count_fake_quantized, prepare_linear
from kd.data import DigitsDataModule
from kd.errors import ConfigError, instantiate_checked
from kd.losses.kd import KDLoss
from kd.models import MLP, ConvNet
from kd.training.module import DistillationModule

CONF = Path(__file__).resolve().parents[2] / "conf"
SHAPE = (1, 8, 8)


class Recorder(L.Callback):
    """What the student looks like while it trains (runs after the QAT callback)."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}
        self.student_types: dict[int, type] = {}
        self.params_at_qat_start: list[Tensor] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.student_types[trainer.current_epoch] = type(pl_module.student)
        if trainer.current_epoch == 1:
            self.params_at_qat_start = [p.detach().clone() for p in pl_module.student.parameters()]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One intra-op thread: on a CPU shared with other jobs, two spin-waiting threads run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return dm


def pretrain(model: nn.Module, digits: DigitsDataModule, epochs: int = 2) -> nn.Module:
    """Plain cross-entropy training on the digits train split (under a second)."""
    torch.manual_seed(1)
    train = digits.splits["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(train.targets)).split(64):
            loss = nn.functional.cross_entropy(model(train.inputs[idx]), train.targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


@pytest.fixture(scope="module")
def teacher(digits: DigitsDataModule) -> ConvNet:
    torch.manual_seed(0)
    return pretrain(ConvNet(num_classes=10, in_channels=1, channels=[16, 32]), digits).eval()


def fit_with_qat(student: nn.Module, teacher: nn.Module, digits: DigitsDataModule, **qat_args: Any) -> SimpleNamespace:
    """Two epochs of KD into a trained ``student``, fake-quantized from epoch 1 (QAT fine-tunes a
    trained float model, as in Jacob et al.); everything the tests look at."""
    student = pretrain(student, digits)
    teacher = copy.deepcopy(teacher)
    teacher_state = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(student, KDLoss(temperature=4, weight=0.9, ce_weight=0.1),
                                functools.partial(torch.optim.AdamW, lr=3e-3), num_classes=10, teacher=teacher)
    qat = QuantizationAwareTraining(start_epoch=1, **qat_args)
    qat.key = "callbacks.qat"
    qat.check(student, max_epochs=2, reads_features=False, input_shape=SHAPE)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=5,
                        limit_val_batches=1, callbacks=[qat, recorder])
    trainer.fit(module, datamodule=digits)
    module.eval()
    fake_quant = predictions(module.student, digits)
    finalized = qat.finalize(module.student, SHAPE)
    return SimpleNamespace(module=module, qat=qat, recorder=recorder, trainer=trainer, teacher_state=teacher_state,
                           finalized=finalized, fake_quant=fake_quant, int8=predictions(finalized, digits))


@torch.no_grad()
def predictions(model: nn.Module, digits: DigitsDataModule) -> tuple[Tensor, Tensor]:
    """Top-1 predictions on the digits test split (360 images), with the labels."""
    test = digits.splits["test"]
    return model(test.inputs).argmax(1), test.targets


@pytest.fixture(scope="module")
def conv_run(teacher: ConvNet, digits: DigitsDataModule) -> SimpleNamespace:
    torch.manual_seed(0)
    return fit_with_qat(ConvNet(num_classes=10, in_channels=1, channels=[8, 16]), teacher, digits)


@pytest.fixture(scope="module")
def mlp_run(teacher: ConvNet, digits: DigitsDataModule) -> SimpleNamespace:
    torch.manual_seed(0)
    return fit_with_qat(MLP(10, in_features=64, hidden=[32, 32]), teacher, digits)


def int8_tensors(model: nn.Module) -> list[Tensor]:
    """The int8 weight tensors of a finalized model: PT2E constants or torchao's quantized tensors."""
    tensors = list(model.state_dict().values())
    return [t for t in tensors if t.dtype == torch.int8] + [
        t.qdata for t in tensors if isinstance(getattr(t, "qdata", None), Tensor) and t.qdata.dtype == torch.int8
    ]


def program_bytes(model: nn.Module) -> int:
    x = torch.randn(2, *SHAPE)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return len(buffer.getvalue())


# --- real fits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("run, flow", [("conv_run", "pt2e"), ("mlp_run", "linear")])
def test_student_is_fake_quantized_from_start_epoch_and_teacher_stays_fp32(run: str, flow: str,
                                                                         request: pytest.FixtureRequest) -> None:
    r = request.getfixturevalue(run)
    module, student = r.module, r.module.student
    assert r.qat.resolved_flow == flow and r.qat.prepared_epoch == 1
    # epoch 0 trained the plain student; epoch 1 a fake-quantized one, with a finite loss
    assert r.recorder.student_types[0] in (ConvNet, MLP) and count_fake_quantized(r.qat.dense) == 0
    assert count_fake_quantized(student) == 3  # two convs + the head, or three linears
    assert isinstance(student, fx.GraphModule) == (flow == "pt2e")
    assert all(torch.isfinite(torch.tensor(v)).all() for v in r.recorder.losses.values())
    # the optimizer Lightning built on the plain student's parameters trains the new one
    optimizer_params = [p for g in r.trainer.optimizers[0].param_groups for p in g["params"]]
    student_params = list(student.parameters())
    assert {id(p) for p in optimizer_params} == {id(p) for p in student_params}
    assert any(not torch.equal(a, b) for a, b in zip(r.recorder.params_at_qat_start, student_params))
    # the teacher: untouched, fp32, no fake quantization
    teacher = module.teacher
    assert count_fake_quantized(teacher) == 0 and not isinstance(teacher, fx.GraphModule)
    assert all(torch.equal(v, r.teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    summary = r.qat.summary()
    assert summary["flow"] == flow and summary["quantized_layers"] == 3 and summary["start_epoch"] == 1


def test_pt2e_student_is_the_fp32_net_plus_fake_quantization(conv_run: SimpleNamespace) -> None:
    from torchao.quantization.pt2e import disable_fake_quant

    student = conv_run.module.student.eval()
    fp32 = ConvNet(num_classes=10, in_channels=1, channels=[8, 16]).eval()
    fp32.load_state_dict({k: v for k, v in student.state_dict().items() if k in fp32.state_dict()})
    no_fq = copy.deepcopy(student)
    no_fq.apply(disable_fake_quant)
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, fq, plain = fp32(x), student(x), no_fq(x)
    # conv+BN fused as in Jacob et al. computes what conv then BN computes; fake quantization alone differs
    assert torch.allclose(plain, reference, atol=1e-4)
    assert (fq - reference).abs().max() > 1e-3


def test_linear_student_keeps_its_parameter_objects_and_fake_quantizes() -> None:
    torch.manual_seed(0)
    student = MLP(10, in_features=64, hidden=[32, 32])
    fp32 = copy.deepcopy(student)
    before = dict(student.named_parameters())
    prepare_linear(student)
    assert all(p is before[n] for n, p in student.named_parameters()) and len(before) == 6
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        error = (student(x) - fp32(x)).abs().max()
    assert 0 < error < 0.05  # int8 rounding of weights and activations: small, not zero


@pytest.mark.parametrize("run", ["conv_run", "mlp_run"])
def test_finalize_gives_int8_weights_that_predict_like_the_fake_quantized_model(
    run: str, digits: DigitsDataModule, request: pytest.FixtureRequest
) -> None:
    r = request.getfixturevalue(run)
    assert len(int8_tensors(r.finalized)) == 3  # one per conv/linear layer
    matrices = [t for t in r.finalized.state_dict().values() if t.dim() > 1]  # weights, no biases/scales
    assert matrices and all(t.dtype == torch.int8 or getattr(t, "qdata", t).dtype == torch.int8 for t in matrices)
    (fq, y), (q, _) = r.fake_quant, r.int8
    assert (fq == q).float().mean() >= 0.98
    assert abs((fq == y).float().mean() - (q == y).float().mean()) <= 0.01
    assert (q == y).float().mean() > 0.6  # a trained student, whose predictions are not ties
    for batch in (1, 64):
        assert r.finalized(torch.randn(batch, *SHAPE)).shape == (batch, 10)
    assert torch.equal(predictions(r.module.student, digits)[0], fq)  # finalize converted a copy


@pytest.mark.parametrize("make", [lambda: MLP(10, in_features=64, hidden=[256, 256]),
                                  lambda: ConvNet(num_classes=10, in_channels=1, channels=[32, 64])],
                         ids=["mlp", "convnet"])
def test_int8_program_is_smaller_than_fp32(make: Any) -> None:
    torch.manual_seed(0)
    student = make().train()
    fp32_bytes = program_bytes(copy.deepcopy(student).eval())
    qat = QuantizationAwareTraining()
    prepared: nn.Module = student
    if isinstance(student, ConvNet):
        prepared = prepare_pt2e(student, SHAPE)
        for _ in range(3):  # observers learn ranges on training batches
            prepared(torch.randn(32, *SHAPE))
    else:
        prepare_linear(student)
    int8 = qat.finalize(prepared.eval(), SHAPE)
    weights = sum(m.weight.numel() for m in make().modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    saved = fp32_bytes - program_bytes(int8)
    assert saved > weights  # > 1 of the 3 bytes per weight that int8 saves: no fp32 copy kept
    assert not isinstance(prepared, fx.GraphModule) or "features.0.weight" not in int8.state_dict()


# --- train/eval and freezing in the exported graph ------------------------------------------------


def bn_flags(gm: fx.GraphModule) -> list[bool]:
    return [n.args[5] for n in gm.graph.nodes if n.target == torch.ops.aten.batch_norm.default]


def test_exported_student_follows_train_eval_even_when_lightning_restores_only_the_flag(conv_run) -> None:
    student = copy.deepcopy(conv_run.module.student)  # the copy follows the flag too
    x = torch.randn(32, *SHAPE)
    student.eval()
    student(x)
    assert bn_flags(student) == [False, False]
    # Lightning's validation loop puts the mode back by setting `.training`, never calling train()
    for m in student.modules():
        m.training = True
    mean = student.get_buffer("features.1.running_mean").clone()
    count = int(student.get_buffer("features.1.num_batches_tracked"))
    student(x)
    assert bn_flags(student) == [True, True]
    assert not torch.equal(student.get_buffer("features.1.running_mean"), mean)
    assert int(student.get_buffer("features.1.num_batches_tracked")) == count + 1
    student.eval()
    student(x)  # eval changes no buffer, as in eager BatchNorm
    assert int(student.get_buffer("features.1.num_batches_tracked")) == count + 1


def test_frozen_bn_and_observers_compute_in_training_what_eval_computes(conv_run) -> None:
    student = copy.deepcopy(conv_run.module.student)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3)
    qat.prepared_epoch = 1
    stub = SimpleNamespace(student=student)
    x = torch.randn(32, *SHAPE)
    student.eval()
    with torch.no_grad():
        evaluated = student(x)
    state = copy.deepcopy(student.state_dict())  # with its metadata: observers load their eps by version

    def epoch(n: int) -> Tensor:
        qat.on_train_epoch_start(SimpleNamespace(current_epoch=n, callbacks=[]), stub)  # type: ignore[arg-type]
        student.train()
        with torch.no_grad():
            return student(x)

    epoch(2)  # BN frozen, observers still learning
    assert bn_flags(student) == [False, False]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(k.startswith("activation_post_process") for k in changed)  # BN buffers unchanged
    student.load_state_dict(state)
    out = epoch(3)  # both frozen: a training step computes what eval computes, and changes no state
    assert torch.equal(out, evaluated)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_own_eval_switch_matches_torchao(conv_run) -> None:
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval

    ours, theirs = copy.deepcopy(conv_run.module.student), copy.deepcopy(conv_run.module.student)
    ours.eval()
    theirs.train()
    set_graph_mode(theirs)  # the train form training leaves; then torchao's own pattern rewrite to eval
    assert bn_flags(theirs) == [True, True]
    theirs.apply(disable_observer)
    move_exported_model_to_eval(theirs)
    assert bn_flags(theirs) == [False, False]
    x = torch.randn(32, *SHAPE)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_of_the_prepared_student_loads_back_strictly(conv_run, digits, tmp_path: Path) -> None:
    module, trainer = conv_run.module, conv_run.trainer
    saved = copy.deepcopy(module.student.state_dict())
    copy.deepcopy(module.student).load_state_dict(module.student.state_dict(), strict=True)
    module.load_state_dict(module.state_dict(), strict=True)
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    with torch.no_grad():
        module.student.get_parameter("features.0.weight").zero_()
    trainer.validate(module, datamodule=digits, ckpt_path=str(path), verbose=False)  # Lightning loads strictly
    assert all(torch.equal(v, saved[k]) for k, v in module.student.state_dict().items())


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key, message",
    [
        ({"start_epoch": -1}, "start_epoch", ">= 0"),
        ({"flow": "fx"}, "flow", "auto, pt2e, linear"),
        ({"start_epoch": 3, "freeze_bn_epoch": 2}, "freeze_bn_epoch", ">= start_epoch (3)"),
        ({"start_epoch": 3, "freeze_observer_epoch": 3}, "freeze_observer_epoch", "> start_epoch (3)"),
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        QuantizationAwareTraining(**kwargs)
    assert info.value.key == key and message in info.value.message


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y  # torch.export cannot capture a branch on the data


def _check(qat: QuantizationAwareTraining, student: nn.Module, max_epochs: int = 2, reads: bool = False) -> None:
    qat.key = "callbacks.qat"
    qat.check(student, max_epochs=max_epochs, reads_features=reads, input_shape=SHAPE)


def test_check_rejects_what_cannot_run() -> None:
    conv, mlp = ConvNet(num_classes=10, in_channels=1, channels=[8, 16]), MLP(10, in_features=64, hidden=[32])
    with pytest.raises(ConfigError, match=r"^callbacks.qat.start_epoch: QAT start epoch beyond max_epochs: 2 >= "
                                          r"trainer.max_epochs 2; set start_epoch below 2"):
        _check(QuantizationAwareTraining(start_epoch=2), conv)
    with pytest.raises(ConfigError, match=r"^callbacks.qat.freeze_observer_epoch: .*5 >= trainer.max_epochs 5"):
        _check(QuantizationAwareTraining(start_epoch=1, freeze_observer_epoch=5), conv, max_epochs=5)
    with pytest.raises(ConfigError, match=r"^callbacks.qat.flow: pt2e: the exported student does not expose"):
        _check(QuantizationAwareTraining(), conv, reads=True)
    with pytest.raises(ConfigError, match=r"^callbacks.qat.flow: linear leaves the 2 Conv layers of ConvNet in fp32"):
        _check(QuantizationAwareTraining(flow="linear"), conv)
    with pytest.raises(ConfigError, match=r"^callbacks.qat: nothing to quantize: Sequential has no Linear or Conv"):
        _check(QuantizationAwareTraining(), nn.Sequential(nn.Flatten(), nn.ReLU()))
    with pytest.raises(ConfigError, match=r"^callbacks.qat.freeze_bn_epoch: applies to flow=pt2e only"):
        _check(QuantizationAwareTraining(start_epoch=0, freeze_bn_epoch=1), mlp)
    with pytest.raises(ConfigError, match=r"^callbacks.qat.flow: pt2e cannot export and prepare DataDependent: "):
        _check(QuantizationAwareTraining(), DataDependent())
    qat = QuantizationAwareTraining()
    _check(qat, mlp)
    assert qat.resolved_flow == "linear"


def test_config_builds_with_a_start_epoch_for_the_default_run() -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["callbacks=qat"])
    qat = instantiate_checked(cfg.callbacks.qat, "callbacks.qat")
    assert isinstance(qat, QuantizationAwareTraining) and qat.flow == "auto" and "model_checkpoint" in cfg.callbacks
    assert 0 < qat.start_epoch < cfg.trainer.max_epochs and qat.order == 10 and qat.final_epoch == qat.start_epoch
    with initialize_config_dir(str(CONF), version_base="1.3"):
        bad = compose("train", overrides=["callbacks=qat", "callbacks.qat.flow=int4"])
    with pytest.raises(ConfigError, match=r"^callbacks.qat.flow: must be one of auto, pt2e, linear"):
        instantiate_checked(bad.callbacks.qat, "callbacks.qat")
