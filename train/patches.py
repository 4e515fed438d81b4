"""Mid-level patch features: what patch scorers (kNN, FUN-AD) compare between images.

A ViT's are its chosen blocks' patch tokens (train/backbones/dinov2.py). A CNN's: stride-8 and
stride-16 stage outputs, each averaged over its 3x3 neighbourhood (so a patch sees a
little context), brought to one grid and concatenated: 152 dimensions per patch for
EfficientNet-Lite0.
"""

from __future__ import annotations

import torch

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
