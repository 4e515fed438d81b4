"""Mid-level patch features: what patch scorers (kNN, FUN-AD) compare between images.

A ViT's are its chosen blocks' patch tokens (train/backbones/dinov2.py). A CNN's: stride-8 and
stride-16 stage outputs, each averaged over its 3x3 neighbourhood (so a patch sees a
little context), brought to one grid and concatenated: 152 dimensions per patch for
EfficientNet-Lite0.
"""

from __future__ import annotations

import torch

from coft.runtime.model.tiles import Tiling
from coft.train.backbones.base import Backbone, patch_features_from_maps
from coft.train.progress import bar


@torch.inference_mode()
def patch_features(backbone: Backbone, pixels: torch.Tensor, coarse: bool = False, batch: int = 32) -> torch.Tensor:
    """[N, P, C] on the backbone's own patch grid; `coarse` (FUN-AD) takes a CNN's stride-16 grid instead of 8."""
    device = next(backbone.parameters()).device

    def one(chunk: torch.Tensor) -> torch.Tensor:
        if not coarse or backbone.patch_stride != 8:
            return backbone.patch_features(chunk)
        return patch_features_from_maps(backbone.feature_maps(chunk), 16)
    return torch.cat([one(pixels[i:i + batch].to(device)).cpu()
                      for i in bar(range(0, len(pixels), batch), "patch features")])


def windows(pixels: torch.Tensor, tiling: Tiling | None) -> torch.Tensor:
    """[N, 3, H, W] frames -> [N * tiles, 3, h, w], each frame's windows in turn (the frames as they are, untiled)."""
    if tiling is None:
        return pixels
    h, w = tiling.window
    return torch.stack([pixels[..., y:y + h, x:x + w] for y, x in tiling.origins], dim=1).flatten(0, 1)


def frame_patch_features(backbone: Backbone, pixels: torch.Tensor, tiling: Tiling | None) -> torch.Tensor:
    """[N, P, C] patch features of frames, a tiled bundle's [N, tiles * P, C] (window-major, as its graph gives)."""
    features = patch_features(backbone, windows(pixels, tiling))
    return features.reshape(len(pixels), -1, features.shape[-1])
