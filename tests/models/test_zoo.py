"""The whole model zoo in one place: exact sizes against REFERENCE.md, and every config's taps."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kd.models.build import NODES_KEY, build_model, count_parameters
from kd.models.cifar import ZOO
from kd.models.features import FeatureExtractor
from tests.conftest import CONF

# ../shared/REFERENCE.md, "Parameter counts of the reference CIFAR zoo (num_classes = 100)"
REFERENCE_PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobile_half": 812_836, "shufflenet_v1": 949_258, "shufflenet_v2": 1_355_528, "resnet50": 23_705_252,
}


def test_the_zoo_is_the_reference_zoo() -> None:
    assert set(ZOO) == set(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", sorted(ZOO))
@torch.no_grad()
def test_zoo_model_size_and_output(name: str) -> None:
    torch.manual_seed(0)
    model = ZOO[name](num_classes=100).eval()
    assert count_parameters(model) == REFERENCE_PARAMS[name]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def _data_of(target: str) -> tuple[tuple[int, ...], int]:
    if target.startswith(("kd.models.cifar.", "kd.models.vit.")):
        return (3, 32, 32), 100
    if target == "kd.models.MLP":
        return (1, 28, 28), 10
    return (1, 8, 8), 10


# every file that defines a net; the teacher files that point to a student one compose to it
# (tests/test_configs.py::test_each_architecture_is_defined_in_one_file)
MODEL_DEFINITIONS = sorted(
    p.relative_to(CONF / "model").as_posix()
    for p in (CONF / "model").rglob("*.yaml") if "_target_" in OmegaConf.load(p)
)


@pytest.mark.parametrize("path", MODEL_DEFINITIONS, ids=str)
@torch.no_grad()
def test_every_model_config_has_working_feature_taps(path: str) -> None:
    node = OmegaConf.load(CONF / "model" / path)
    shape, classes = _data_of(node["_target_"])
    model = build_model(node, key="model", num_classes=classes, input_shape=shape).eval()
    taps = OmegaConf.to_container(node[NODES_KEY])
    assert set(taps) - {"fsp"} == {"stages", "preact", "pooled", "hint"}
    assert len(taps["stages"]) == len(taps["preact"]) >= 1
    fsp = taps.get("fsp", [])  # RepDistiller's FSP maps: the stem's output, then every stage
    assert not fsp or fsp[1:] == taps["stages"]
    names = [*taps["stages"], *taps["preact"], taps["pooled"], taps["hint"], *fsp]
    fx = FeatureExtractor(model, names, key=path, input_shape=shape, tracer="fx")
    out = fx(torch.randn(2, *shape))
    assert out.features[taps["pooled"]].dim() == 2  # the embedding before the classifier
    for post, pre in zip(taps["stages"], taps["preact"]):
        assert out.features[post].shape == out.features[pre].shape, (post, pre)
    if fsp:  # the stem's map, as large as the first stage's or larger (FSP pools the larger of a pair)
        assert out.features[fsp[0]].dim() == 4 and out.features[fsp[0]].shape[2] >= out.features[fsp[1]].shape[2], path


def test_every_zoo_model_is_a_student_config() -> None:
    # model/student=cifar_<name> reaches every zoo model, with the zoo's exact constructor
    for name, make in ZOO.items():
        node = OmegaConf.load(CONF / "model" / "student" / f"cifar_{name}.yaml")
        assert node["_target_"] == f"{make.__module__}.{make.__name__}", name
