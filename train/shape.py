"""The model's input size from the part's own shape, not a square every part is squashed into.

An elongated part squashed into 224x224 loses resolution along its length; the shots say what shape the part has.
The rule keeps the short side at 224 and gives the long side the shots' median aspect ratio (clamped to 4:1), each
side a multiple of the 14-pixel patch (of 32 pixels for a CNN): an elongated part costs its aspect ratio times a
square's patches. Shots whose shapes differ by more than AGREE (a folder mixing parts or orientations) keep the
square: one aspect would distort the others. bench/shape.py measured the choices on magnetic tiles (docs/accuracy.md, Input shape): the square's
patch budget at the shots' aspect gained on tall tiles and lost on wide ones; the short side kept gained on both.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

PATCH = 14
CNN_STRIDE = 32  # a CNN's deepest stride: sides that are multiples of it halve evenly at every stage, so the patch
# maps of stride 8 and 16 line up and the exported graph traces for any batch (224x546 failed to export on Lite0)
CNN_UNIT = f"a CNN's {CNN_STRIDE}-pixel stride"
SHORT_SIDE = 224
MOST_ELONGATED = 4.0
AGREE = 2.0  # the shots are one shape of part when their height/width ratios lie within this factor of each other
SQUARE = (SHORT_SIDE, SHORT_SIDE)


def median_aspect(shapes: list[tuple[int, ...]]) -> float:
    """Height over width of the middle image (the median of the shots' ratios)."""
    return float(np.median([h / w for h, w, *_ in shapes]))


def median_size(shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(height, width): the shots' median of each, the size --tiles scales."""
    return int(np.median([h for h, *_ in shapes])), int(np.median([w for _, w, *_ in shapes]))


def size_for_aspect(aspect: float, short: int = SHORT_SIDE, patch: int = PATCH) -> tuple[int, int]:
    """(height, width), multiples of `patch`, the short side `short`, height/width as near `aspect` as that allows."""
    aspect = min(max(aspect, 1 / MOST_ELONGATED), MOST_ELONGATED)
    long = max(short, round(short * max(aspect, 1 / aspect) / patch) * patch)
    return (long, short) if aspect >= 1 else (short, long)


def rounded(size: tuple[int, int], multiple: int, unit: str) -> tuple[int, int]:
    """`size` with each side the nearest multiple of `multiple` (the backbone's `unit`); says so when it changes."""
    out = (max(multiple, round(size[0] / multiple) * multiple), max(multiple, round(size[1] / multiple) * multiple))
    if out != tuple(size):
        log.warning("input %dx%d is not a multiple of %s: using %dx%d", *size, unit, *out)
    return out


def input_size(shapes: list[tuple[int, ...]], multiple: int = PATCH) -> tuple[tuple[int, int], str]:
    """The input (height, width) for shots of these shapes, each side a multiple of `multiple` (the backbone's
    patch or stride), and why, for the log and the manifest."""
    ratios = [h / w for h, w, *_ in shapes]
    if max(ratios) > AGREE * min(ratios):
        return SQUARE, f"square: the shots' height/width ratios vary from {min(ratios):.2f} to {max(ratios):.2f}"
    aspect = median_aspect(shapes)
    size = size_for_aspect(aspect, patch=multiple)
    cost = size[0] * size[1] / SHORT_SIDE**2
    return size, f"the shots' height/width {aspect:.2f}, short side {SHORT_SIDE}" + (
        f" ({cost:.1f}x the patches of 224x224)" if cost > 1.05 else "")
