"""From BGR frames to backbone embeddings, exactly as the exported model will see them."""

from __future__ import annotations

import numpy as np
import torch

from coft.runtime.model.images import resize_to_input
from coft.train.augment import AugmentConfig, augment
from coft.train.backbones import Backbone
from coft.train.progress import bar


def to_pixels(images_bgr: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Resize like the runtime does, reorder BGR to RGB: float pixels in 0..255, [N, 3, H, W]."""
    batch = np.stack([resize_to_input(image, size) for image in images_bgr])
    return torch.from_numpy(batch[..., ::-1].copy()).permute(0, 3, 1, 2).float()


@torch.inference_mode()
def embed(backbone: Backbone, pixels: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Pooled embeddings [N, D] (not yet L2-normalised; the scorer does that)."""
    device = next(backbone.parameters()).device
    backbone.eval()
    out = [backbone(pixels[i:i + batch].to(device)).float().cpu() for i in bar(range(0, len(pixels), batch), "embedding")]
    return torch.cat(out).numpy()


def embed_views(backbone: Backbone, pixels: torch.Tensor, n_views: int, augment_config: AugmentConfig,
                generator: torch.Generator) -> np.ndarray:
    """Embeddings of `n_views` views per image, [k, n_views, D]; view 0 is the image itself."""
    views = [pixels] + [augment(pixels, augment_config, generator) for _ in range(n_views - 1)]
    stacked = torch.stack(views, dim=1).flatten(0, 1)
    return embed(backbone, stacked).reshape(len(pixels), n_views, -1)
