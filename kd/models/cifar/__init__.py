"""The CIFAR model zoo of the CRD/DKD code lineage, for 32x32 inputs, with the reference's exact
parameter counts (``../shared/REFERENCE.md``) and state_dict keys (RepDistiller checkpoints load)."""

from kd.models.cifar.mobilenetv2 import mobile_half
from kd.models.cifar.resnet import (
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from kd.models.cifar.resnetv2 import resnet50
from kd.models.cifar.shufflenetv1 import shufflenet_v1
from kd.models.cifar.shufflenetv2 import shufflenet_v2
from kd.models.cifar.vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from kd.models.cifar.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

ZOO = {
    f.__name__: f for f in (
        resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, resnet8x4, resnet32x4,
        wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13, vgg16, vgg19, mobile_half,
        shufflenet_v1, shufflenet_v2, resnet50,
    )
}
"""Every constructor by name, for tests and listings (configs name them by import path)."""

__all__ = ["ZOO", *ZOO]
