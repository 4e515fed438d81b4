"""Small textured parts, good and defective, and a video of them: real image files for real backbones."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SIZE = (96, 96)  # model input for tests: small, so the real backbone runs fast


def good_part(rng: np.random.Generator, side: int = 128) -> np.ndarray:
    """A grey machined surface: fine stripes with a random phase, mild noise."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    surface = 128 + 12 * np.sin(x / 3.0 + phase) + rng.normal(0, 4, (side, side))
    return np.clip(surface, 0, 255).astype(np.uint8)


def defective_part(rng: np.random.Generator, kind: str, side: int = 128) -> np.ndarray:
    image = good_part(rng, side)
    if kind == "scratch":
        p1 = tuple(int(v) for v in rng.integers(10, side - 10, 2))
        p2 = tuple(int(v) for v in rng.integers(10, side - 10, 2))
        cv2.line(image, p1, p2, 20, thickness=5)
    else:  # stain
        centre = tuple(int(v) for v in rng.integers(25, side - 25, 2))
        cv2.circle(image, centre, int(rng.integers(10, 18)), 235, thickness=-1)
    return image


def write_video(path: Path, frames: int, defect_every: int = 10, fps: int = 25) -> Path:
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (128, 128))
    for i in range(frames):
        image = defective_part(rng, "scratch") if i % defect_every == defect_every - 1 else good_part(rng)
        writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


STAIN = (90, 40, 14)  # x, y, radius in the 128 px part


def stained(rng):
    image = good_part(rng)
    cv2.circle(image, STAIN[:2], STAIN[2], 235, thickness=-1)
    return image
