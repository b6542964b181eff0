"""MobileNet-V1 (ImageNet) against mdistiller's definition: size, names, and outputs on its weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.build import count_parameters
from kd.models.mobilenetv1 import mobilenet_v1


class _MdMobileNetV1(nn.Module):
    """mdistiller/models/imagenet/mobilenetv1.py (megvii-research/mdistiller @ a08d46f), the logits."""

    def __init__(self):
        super().__init__()

        def conv_bn(inp, oup, stride):
            return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))

        def conv_dw(inp, oup, stride):
            return nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
                nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
            )

        self.model = nn.Sequential(
            conv_bn(3, 32, 2), conv_dw(32, 64, 1), conv_dw(64, 128, 2), conv_dw(128, 128, 1), conv_dw(128, 256, 2),
            conv_dw(256, 256, 1), conv_dw(256, 512, 2), conv_dw(512, 512, 1), conv_dw(512, 512, 1),
            conv_dw(512, 512, 1), conv_dw(512, 512, 1), conv_dw(512, 512, 1), conv_dw(512, 1024, 2),
            conv_dw(1024, 1024, 1), nn.AvgPool2d(7),
        )
        self.fc = nn.Linear(1024, 1000)

    def forward(self, x):
        feat1 = self.model[3][:-1](self.model[0:3](x))
        feat2 = self.model[5][:-1](self.model[4:5](F.relu(feat1)))
        feat3 = self.model[11][:-1](self.model[6:11](F.relu(feat2)))
        feat4 = self.model[13][:-1](self.model[12:13](F.relu(feat3)))
        feat5 = self.model[14](F.relu(feat4))
        return self.fc(feat5.reshape(-1, 1024)), [F.relu(feat1), F.relu(feat2), F.relu(feat3), F.relu(feat4)]


def test_mobilenet_v1_is_mdistillers_and_loads_its_weights() -> None:
    torch.manual_seed(0)
    theirs, ours = _MdMobileNetV1().eval(), mobilenet_v1(1000).eval()
    assert count_parameters(ours) == count_parameters(theirs) == 4_231_976
    ours.load_state_dict(theirs.state_dict())  # the same names: mdistiller's released weights load as they are
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, feats = theirs(x)
        assert torch.allclose(ours(x), logits, atol=1e-5)
        stages = [ours.model[:4](x)]  # the taps of conf/model/student/mobilenet_v1.yaml: model.3/5/11/13
        stages += [ours.model[4:6](stages[-1]), ours.model[6:12](ours.model[4:6](stages[0])),]
        assert [tuple(f.shape[1:]) for f in feats] == [(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)]
        assert torch.allclose(stages[0], feats[0], atol=1e-5) and torch.allclose(stages[1], feats[1], atol=1e-5)
        assert torch.allclose(stages[2], feats[2], atol=1e-5)
