"""Bad model input: an unknown torchvision name, a checkpoint of another architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd.errors import ConfigError
from kd.models import torchvision_model
from kd.models.cifar import resnet20, resnet56
from kd.models.weights import load_weights


def test_an_unknown_torchvision_name_fails_with_suggestions() -> None:
    with pytest.raises(ConfigError, match=r"^name: torchvision has no classification model 'resnet19'; did you mean resnet18"):
        torchvision_model("resnet19", num_classes=10)
    # a family's name, or one written without its underscores, finds its members (difflib alone finds none)
    with pytest.raises(ConfigError, match=r"'vit'; did you mean vit_b_16, vit_b_32, vit_h_14\? see"):
        torchvision_model("vit", num_classes=10)
    with pytest.raises(ConfigError, match=r"'mobilenetv3'; did you mean mobilenet_v3_large, mobilenet_v3_small, "):
        torchvision_model("mobilenetv3", num_classes=10)


def test_a_checkpoint_of_another_architecture_names_the_mismatched_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet20.pt"
    torch.save(resnet20().state_dict(), path)
    with pytest.raises(ConfigError) as err:
        load_weights(resnet56(), path)
    message = str(err.value)
    assert message.startswith(f"teacher.ckpt: {path} does not fit model.teacher (CifarResNet)")
    assert "missing keys (layer1.3.bn1.bias, layer1.3.bn1.num_batches_tracked," in message and "more)" in message and "pick the model/teacher config it was trained with" in message
    wrong_width = tmp_path / "wrn.pt"
    from kd.models.cifar import wrn_16_1, wrn_16_2

    torch.save(wrn_16_1().state_dict(), wrong_width)
    with pytest.raises(ConfigError, match=r"size mismatch for \S+ \(\d+, \d+, 3, 3\) in the file vs \(\d+, \d+, 3, 3\) in the model"):
        load_weights(wrn_16_2(), wrong_width)
