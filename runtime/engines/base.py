"""What every inference backend is: uint8 frames in, an Inference (scores, embeddings, maps) out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coft.runtime.model.bundle import Bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.heatmap import anomaly_maps
from coft.runtime.model.scoring import pool


@dataclass
class Inference:
    scores: np.ndarray  # [N]
    embeddings: np.ndarray  # [N, D] global, or [N, P, D] patch features
    maps: np.ndarray | None = None  # [N, H, W] anomaly maps at the input size (patch scorer)


def patch_inference(bundle: Bundle, patch_scores: np.ndarray, features: np.ndarray,
                    image_scores: np.ndarray | None = None) -> Inference:
    """A patch bundle's outputs from its patch scores [N, P] (a tiled bundle's: [N, tiles * P]): image scores by the bundle's pooling, and maps.

    `image_scores`, where the fused kernel already wrote each image's worst patch, saves
    pooling again for max-pooled bundles."""
    patch, tiling = bundle.patch, bundle.tiling
    if tiling is not None:  # the windows' patch scores onto the frame's grid, as the graph stitches them
        patch_scores, image_scores = tiling.stitched(patch_scores), None
    if image_scores is None or patch.pooling != "max":
        image_scores = pool(patch_scores, patch.pooling)
    maps = anomaly_maps(patch_scores, (patch.grid[0], patch.grid[1]), bundle.input_size, patch.blur_sigma)
    return Inference(image_scores, features, maps)


def concatenate(parts: list[Inference]) -> Inference:
    """One Inference from the results of consecutive batches."""
    maps = None if parts[0].maps is None else np.concatenate([p.maps for p in parts])
    return Inference(np.concatenate([p.scores for p in parts]), np.concatenate([p.embeddings for p in parts]), maps)


class Engine(Protocol):
    name: str
    precision: str  # the arithmetic its scores come from (f32, bf16, fp16, int8): a threshold holds within one

    def infer(self, frames: np.ndarray) -> Inference:
        """uint8 frames [N, H, W, 3] in the bundle's colour order -> scores, embeddings and maps."""


def check_frames(frames: np.ndarray, bundle: Bundle) -> None:
    h, w = bundle.input_size
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
        raise CoftError(f"frames of shape {frames.shape} and type {frames.dtype} do not fit the model: "
                        f"expected uint8 [N, {h}, {w}, 3]; resize frames to the bundle's input first")
