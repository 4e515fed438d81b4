"""Fixtures made by the tests: small textured 'parts', good and defective, written as real image files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> Path:
    """train/good (8 images) and test/good + test/defect/{scratch,stain}, as 8-bit grayscale PNGs."""
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    folders = {"train/good": 8, "test/good": 12}
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / folder / f"part{i:02d}.png"), good_part(rng))
    for kind in ("scratch", "stain"):
        (root / "test/defect" / kind).mkdir(parents=True)
        for i in range(8):
            cv2.imwrite(str(root / "test/defect" / kind / f"{kind}{i:02d}.png"), defective_part(rng, kind))
    return root


@pytest.fixture(scope="session")
def frozen_bundle(parts, tmp_path_factory) -> Path:
    from train.pipeline import TrainOptions, train_bundle

    out = tmp_path_factory.mktemp("bundles") / "frozen.bundle"
    return train_bundle(parts / "train/good", out, TrainOptions(size=SIZE, method="frozen", views=6, progress=False))
