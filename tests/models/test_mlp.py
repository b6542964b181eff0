"""The Hinton 2015 MNIST nets: exact sizes, inputs fitted from the data, dropout in train only."""

from __future__ import annotations

import pytest
import torch

from kd.errors import ConfigError
from kd.models import MLP
from kd.models.build import build_model, count_parameters
from kd.training.run import run
from tests.conftest import CONF


@pytest.mark.parametrize(
    ("config", "params"),
    # 784*1200+1200 + 1200*1200+1200 + 1200*10+10; 784*800+800 + 800*800+800 + 800*10+10; ...
    [("student/hinton_mlp", 2_395_210), ("student/hinton_mlp_800", 1_276_810), ("student/hinton_mlp_30", 24_790)],
)
def test_the_paper_nets_have_their_exact_sizes_on_mnist_shapes(config: str, params: int) -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF / "model" / f"{config}.yaml")
    model = build_model(node, key="model", num_classes=10, input_shape=(1, 28, 28))
    assert count_parameters(model) == params
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    model = MLP(10, in_features=16, hidden=(32,), dropout=0.5, input_dropout=0.2)
    x = torch.randn(4, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_bad_widths_and_dropouts_fail_clearly() -> None:
    for kwargs, key in (({"hidden": []}, "hidden"), ({"hidden": [0]}, "hidden"), ({"dropout": 1.0}, "dropout"),
                        ({"input_dropout": -0.1}, "input_dropout")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            MLP(10, **kwargs)


def test_the_mlps_distill_on_digits_with_inputs_fitted_from_the_data(make_cfg) -> None:
    results = run(make_cfg("model/teacher=hinton_mlp", "model/student=hinton_mlp_30", "distill=fitnet"))
    assert results["status"] == "completed"
    assert results["student"]["params"] == 64 * 30 + 30 + 30 * 30 + 30 + 30 * 10 + 10  # 8x8 digits: 64 inputs
