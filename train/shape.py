"""The model's input size from the part's own shape, not a square every part is squashed into.

An elongated part squashed into 224x224 loses resolution along its length; the shots say what shape the part has.
The rule keeps the patch budget of 224x224 (256 ViT patches of 14 pixels: the same cost on the box) and gives it
the shots' median aspect ratio, clamped to 1:4 .. 4:1, each side a multiple of the patch.
"""

from __future__ import annotations

import math

import numpy as np

PATCH = 14
BUDGET = 16 * 16  # patches of a 224x224 input
MOST_ELONGATED = 4.0


def median_aspect(shapes: list[tuple[int, ...]]) -> float:
    """Height over width of the middle image (the median of the shots' ratios)."""
    return float(np.median([h / w for h, w, *_ in shapes]))


def size_for_aspect(aspect: float, budget: int = BUDGET, patch: int = PATCH) -> tuple[int, int]:
    """(height, width), multiples of `patch`, about `budget` patches, height/width as near `aspect` as that allows."""
    aspect = min(max(aspect, 1 / MOST_ELONGATED), MOST_ELONGATED)
    rows = max(1, round(math.sqrt(budget * aspect)))
    columns = max(1, round(budget / rows))
    return rows * patch, columns * patch


def input_size(images: list[np.ndarray]) -> tuple[int, int]:
    return size_for_aspect(median_aspect([image.shape for image in images]))
