"""Model constructors and the builder that fits them to a datamodule."""

from kd.models.build import build_model, count_parameters
from kd.models.convnet import ConvNet
from kd.models.mlp import MLP
from kd.models.pretrained import pretrained_source
from kd.models.timm import timm_model
from kd.models.tv import torchvision_model

__all__ = ["MLP", "ConvNet", "build_model", "count_parameters", "pretrained_source", "timm_model", "torchvision_model"]
