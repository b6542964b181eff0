"""Deployable artifacts: torch.export programs (fp32 and both int8 forms) and ONNX, and their errors."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from kd.compress.artifacts import (
    OnnxModel,
    drop_unused_attributes,
    export_onnx,
    export_program,
    file_size,
    input_shape_of,
    load_artifact,
)
from kd.errors import ConfigError
from kd.models import MLP, ConvNet

SHAPE = (1, 8, 8)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, *SHAPE, generator=g) for b in (1, 64)]  # the exported batch was 2


def assert_same_outputs(loaded, model: nn.Module, atol: float = 0.0) -> None:
    with torch.no_grad():
        for x in batches():
            expected = model(x)  # (B, 10)
            got = loaded(x)
            assert got.shape == (x.shape[0], 10)
            torch.testing.assert_close(got, expected, rtol=0.0, atol=atol)


def int8_linear_mlp(hidden: list[int]) -> tuple[nn.Module, nn.Module]:
    """An MLP after torchao QAT prepare + convert (int8 Linear weights), and its fp32 original."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_
    from torchao.quantization.qat import QATConfig

    torch.manual_seed(0)
    fp32 = MLP(10, in_features=64, hidden=hidden).eval()
    model = copy.deepcopy(fp32).train()
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(model, QATConfig(base, step="prepare"))
    model(torch.randn(16, *SHAPE))
    quantize_(model, QATConfig(base, step="convert"))
    return model.eval(), fp32


def pt2e_int8_convnet() -> fx.GraphModule:
    """A small CNN through PT2E QAT: export, prepare_qat_pt2e, a few steps, convert_pt2e.

    Without BatchNorm: torchao's conv-BN folding in convert_pt2e takes most of a minute on a
    small CPU, and it is not what is tested here.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    batch = ({0: torch.export.Dim("batch", min=1)},)
    gm = torch.export.export(net, (torch.randn(2, *SHAPE),), dynamic_shapes=batch).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    gm = prepare_qat_pt2e(gm, quantizer)
    allow_exported_model_train_eval(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    for _ in range(3):
        loss = gm(torch.randn(16, *SHAPE)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()
    return convert_pt2e(gm)


@pytest.fixture(scope="module")
def conv_program(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = ConvNet(num_classes=10, in_channels=1, channels=[8, 16])
    return export_program(model, SHAPE, tmp_path_factory.mktemp("conv") / "student.pt2"), model


@pytest.fixture(scope="module")
def qat_mlp() -> tuple[nn.Module, nn.Module]:
    return int8_linear_mlp([256, 256])


def test_fp32_convnet_program_round_trips_at_batch_1_and_64(conv_program) -> None:
    path, model = conv_program
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.pt2"]  # no temporary file left
    assert file_size(path) == len(path.read_bytes())
    loaded = load_artifact(path)
    assert isinstance(loaded, nn.Module)
    assert input_shape_of(loaded) == SHAPE
    assert not model.training  # exported in eval mode: BatchNorm uses its running statistics
    assert_same_outputs(loaded, model)


def test_fp32_mlp_program_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(10, in_features=64, hidden=[32, 32]).train()
    loaded = load_artifact(export_program(model, SHAPE, tmp_path / "mlp.pt2"))
    assert input_shape_of(loaded) == SHAPE
    assert_same_outputs(loaded, model)


def test_int8_qat_linear_program_round_trips_and_is_smaller(qat_mlp, tmp_path: Path) -> None:
    model, fp32 = qat_mlp
    assert type(model.fc.weight).__name__ == "IntxUnpackedToInt8Tensor"
    int8 = export_program(model, SHAPE, tmp_path / "int8.pt2")
    dense = export_program(fp32, SHAPE, tmp_path / "fp32.pt2")
    assert_same_outputs(load_artifact(int8), model)
    # 1 byte instead of 4 for each of the 84k weights (338 kB in fp32), plus per-row scales and
    # the program's graph (~40 kB either way)
    assert file_size(int8) < 0.5 * file_size(dense)


def test_pt2e_int8_program_round_trips_without_its_dead_fp32_weights(tmp_path: Path) -> None:
    gm = pt2e_int8_convnet()
    fp32_weights = {"0.weight", "3.weight", "7.weight"}  # replaced by int8 _frozen_param constants
    assert fp32_weights <= {name for name, _ in gm.named_parameters()}
    with torch.no_grad():
        expected = [gm(x) for x in batches()]
    path = export_program(gm, SHAPE, tmp_path / "pt2e.pt2")
    assert not fp32_weights & {name for name, _ in gm.named_parameters()}  # dropped before export
    program = torch.export.load(path)
    stored = {**program.state_dict, **program.constants}
    assert not fp32_weights & set(stored)
    int8 = {name: t.shape for name, t in stored.items() if t.dtype == torch.int8}
    assert sorted(int8.values()) == [(8, 1, 3, 3), (10, 16), (16, 8, 3, 3)]
    loaded = program.module()
    assert input_shape_of(loaded) == SHAPE
    with torch.no_grad():
        for x, y in zip(batches(), expected):
            torch.testing.assert_close(loaded(x), y, rtol=0.0, atol=0.0)


def test_drop_unused_attributes_keeps_what_get_attr_and_call_module_read() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale

    gm = fx.symbolic_trace(Net())  # lin: a call_module node; scale: a get_attr node
    gm.register_buffer("dead", torch.zeros(3))
    gm.lin.register_parameter("stale", nn.Parameter(torch.zeros(2)))
    gm.register_parameter("old_weight", nn.Parameter(torch.ones(5)))
    x = torch.randn(3, 4)
    before = gm(x)
    # lin.stale sits under a called submodule, which may read it: kept
    assert drop_unused_attributes(gm) == ["dead", "old_weight"]
    assert {n for n, _ in gm.named_parameters()} == {"lin.weight", "lin.bias", "lin.stale", "scale"}
    assert not hasattr(gm, "dead")
    torch.testing.assert_close(gm(x), before)


def test_onnx_round_trip_through_onnxruntime(conv_program, tmp_path: Path) -> None:
    _, model = conv_program
    path = export_onnx(model, SHAPE, tmp_path / "student.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]
    loaded = load_artifact(path)
    assert isinstance(loaded, OnnxModel)
    assert input_shape_of(loaded) == SHAPE
    assert_same_outputs(loaded, model, atol=1e-5)


def test_onnx_refuses_a_quantized_model(qat_mlp, tmp_path: Path) -> None:
    model, _ = qat_mlp
    expected = r"^artifact: cannot export a quantized model to ONNX \(features.2.weight is a IntxUnpackedToInt8Tensor\)"
    with pytest.raises(ConfigError, match=expected + ".*student.pt2"):
        export_onnx(model, SHAPE, tmp_path / "q.onnx")
    assert not list(tmp_path.iterdir())


def test_missing_file_names_the_path_and_what_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "run" / "student.pt2"
    with pytest.raises(ConfigError, match="file not found") as e:
        load_artifact(path)
    assert e.value.key == "artifact" and str(path) in e.value.message
    assert "student.pt2 in the run directory" in e.value.message


def test_truncated_program_asks_to_re_export(conv_program, tmp_path: Path) -> None:
    data = conv_program[0].read_bytes()
    half = tmp_path / "half.pt2"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"half.pt2 is not a valid torch.export program .*re-export it") as e:
        load_artifact(half)
    assert "\n" not in str(e.value)


def test_corrupt_onnx_asks_to_re_export(tmp_path: Path) -> None:
    bad = tmp_path / "student.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match=r"student.onnx is not a valid ONNX model .*re-export it"):
        load_artifact(bad)


def test_unknown_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "student.pth"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"unknown artifact type '.pth'; supported: .pt2, .onnx"):
        load_artifact(path)


def test_onnx_without_onnxruntime_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "student.onnx"
    path.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        load_artifact(path)
