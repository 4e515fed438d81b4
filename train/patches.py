"""Mid-level patch features: what patch scorers (kNN, FUN-AD) compare between images.

A ViT's are its chosen blocks' patch tokens (train/dinov2.py). A CNN's: stride-8 and
stride-16 stage outputs, each averaged over its 3x3 neighbourhood (so a patch sees a
little context), brought to one grid and concatenated: 152 dimensions per patch for
EfficientNet-Lite0.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from coft.train.backbones import Backbone
from coft.train.progress import bar


def patch_features_from_maps(maps: list[torch.Tensor], stride: int = 8) -> torch.Tensor:
    """[N, P, C] from a backbone's stage outputs, on a grid of `stride` 8 or 16."""
    mid = F.avg_pool2d(maps[1], 3, 1, 1)
    deep = F.avg_pool2d(maps[2], 3, 1, 1)
    grid = mid.shape[-2:] if stride == 8 else deep.shape[-2:]
    mid = F.adaptive_avg_pool2d(mid, grid) if stride == 16 else mid
    deep = F.interpolate(deep, size=grid, mode="bilinear", align_corners=False) if stride == 8 else deep
    return torch.cat([mid, deep], 1).flatten(2).transpose(1, 2)


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
