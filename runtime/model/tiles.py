"""Tiles: a frame larger than the model input scored as overlapping windows at the camera's own pixels.

One resize of a 1130x460 frame to the model's 224-pixel short side halves its resolution, and pitting a few pixels
wide goes with it. Tiling keeps a chosen scale (1:1 at most) and runs the backbone on windows of the model input's
size instead, so a frame costs in proportion to its area. The windows' origins are multiples of the patch stride, so
every window's patch grid lies exactly on the frame's: the windows' patch scores are placed on one grid and
averaged where they overlap, and that grid is what the image score and the heatmap come from, as for one window.
The exported graph does the same with constant slices (export/onnx.py); this is its numpy reference (the TensorRT
path stitches its kernel's patch scores with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from coft.runtime.model.errors import CoftError

MIN_OVERLAP = 0.125  # of a window's side: a defect on a window's border is still seen whole by its neighbour


def _origins(length: int, window: int, stride: int) -> tuple[int, ...]:
    """Window origins along one side, multiples of `stride`, spread evenly from 0 to length - window."""
    if window >= length:
        return (0,)
    count = 1 + math.ceil((length - window) / (window * (1 - MIN_OVERLAP)))
    last = (length - window) // stride
    return tuple(sorted({round(i * last / (count - 1)) * stride for i in range(count)}))


@dataclass(frozen=True)
class Tiling:
    """Windows of `window` (height, width) over a frame of `frame` (height, width); both multiples of `stride`."""

    frame: tuple[int, int]
    window: tuple[int, int]
    stride: int
    origins: tuple[tuple[int, int], ...]  # (y, x) of each window's top-left pixel

    @classmethod
    def over(cls, frame: tuple[int, int], window: tuple[int, int], stride: int) -> Tiling:
        """The fewest windows of at most `window` that cover `frame` with MIN_OVERLAP between neighbours."""
        if any(side % stride for side in (*frame, *window)):
            raise CoftError(f"tiles: frame {frame} and window {window} must be multiples of the {stride}-pixel patch")
        window = (min(window[0], frame[0]), min(window[1], frame[1]))
        ys, xs = (_origins(frame[i], window[i], stride) for i in (0, 1))
        return cls((frame[0], frame[1]), window, stride, tuple((y, x) for y in ys for x in xs))

    @classmethod
    def from_manifest(cls, patch: dict, size: tuple[int, int]) -> Tiling | None:
        """The bundle's tiling (manifest `patch.tiles`), or None for a bundle scored as one window."""
        tiles = patch.get("tiles")
        if not tiles:
            return None
        (h, w), origins = tiles["window"], tuple((int(y), int(x)) for y, x in tiles["origins"])
        tiling = cls((size[0], size[1]), (int(h), int(w)), int(patch["stride"]), origins)
        tiling.check(patch["grid"], tiles["count"])
        return tiling

    def check(self, grid: list[int], count: int) -> None:
        """Refuse windows that leave the frame, miss the patch grid or leave part of it unseen (a bundle edited
        or written by another tool): the stitched grid would be wrong without a word."""
        h, w = self.window
        inside = all(0 <= y <= self.frame[0] - h and 0 <= x <= self.frame[1] - w and not y % self.stride
                     and not x % self.stride for y, x in self.origins)
        if (not inside or count != len(self) or list(grid) != list(self.grid) or any(s % self.stride for s in self.window)
                or self.coverage.min() < 1):
            raise CoftError(f"patch.tiles: {len(self)} windows of {h}x{w} do not tile the {self.frame[0]}x"
                            f"{self.frame[1]} input on its {self.stride}-pixel grid; retrain the bundle")

    def as_manifest(self, scale: float) -> dict:
        return {"window": list(self.window), "origins": [list(o) for o in self.origins], "count": len(self),
                "scale": scale}

    def __len__(self) -> int:
        return len(self.origins)

    @property
    def grid(self) -> tuple[int, int]:
        return self.frame[0] // self.stride, self.frame[1] // self.stride

    @property
    def window_grid(self) -> tuple[int, int]:
        return self.window[0] // self.stride, self.window[1] // self.stride

    def cut(self, frames: np.ndarray) -> np.ndarray:
        """[N, H, W, ...] frames -> [N, tiles, h, w, ...] windows."""
        h, w = self.window
        return np.stack([frames[:, y:y + h, x:x + w] for y, x in self.origins], axis=1)

    @cached_property
    def coverage(self) -> np.ndarray:
        """[rows, cols]: how many windows see each patch of the frame's grid (at least one); computed once, as
        every stitch divides by it."""
        counts = np.zeros(self.grid, np.float32)
        gh, gw = self.window_grid
        for y, x in self.origins:
            counts[y // self.stride:y // self.stride + gh, x // self.stride:x // self.stride + gw] += 1
        return counts

    def stitch(self, window_scores: np.ndarray) -> np.ndarray:
        """Patch scores of the windows [N, tiles, h*w] (or [N, tiles, h, w]) -> the frame's grid [N, rows, cols],
        averaged where windows overlap."""
        gh, gw = self.window_grid
        scores = window_scores.reshape(len(window_scores), len(self), gh, gw)
        total = np.zeros((len(scores), *self.grid), np.float32)
        for t, (y, x) in enumerate(self.origins):
            total[:, y // self.stride:y // self.stride + gh, x // self.stride:x // self.stride + gw] += scores[:, t]
        return total / self.coverage

    def stitched(self, window_scores: np.ndarray) -> np.ndarray:
        """As `stitch`, flat: [N, tiles * h * w] -> [N, rows * cols], what pooling and maps read."""
        return self.stitch(window_scores).reshape(len(window_scores), -1)


def tiled_size(shape: tuple[int, int], scale: float, stride: int) -> tuple[int, int]:
    """A frame of `shape` (height, width) at `scale`, each side rounded to the patch stride."""
    return tuple(max(stride, int(round(side * scale / stride)) * stride) for side in shape)  # type: ignore[return-value]
