"""Anomaly maps from patch scores, and where the defect is: numpy and OpenCV only."""

from __future__ import annotations

import cv2
import numpy as np


def anomaly_map(patch_scores: np.ndarray, size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Patch scores [h, w] upsampled to (height, width) and smoothed: a score per pixel."""
    height, width = size
    full = cv2.resize(patch_scores.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(full, (0, 0), sigma) if sigma > 0 else full


def anomaly_maps(patch_scores: np.ndarray, grid: tuple[int, int], size: tuple[int, int], sigma: float) -> np.ndarray:
    """Maps [N, height, width] from a batch of patch scores [N, P] on a (rows, cols) grid.

    What the ONNX graph computes in-graph; the TensorRT path, whose engine stops at the
    patch features, does it here on the CPU after the fused kernel has scored the patches."""
    return np.stack([anomaly_map(scores.reshape(grid), size, sigma) for scores in patch_scores])


def defect_box(score_map: np.ndarray, threshold: float) -> list[int] | None:
    """[x, y, width, height] around the pixels above the threshold, or None if there are none."""
    ys, xs = np.nonzero(score_map > threshold)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def overlay(image_bgr: np.ndarray, score_map: np.ndarray, threshold: float) -> np.ndarray:
    """The frame with the map as a heat overlay, saturating at twice the threshold."""
    scaled = np.clip(score_map / (2 * threshold) * 255, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(cv2.resize(scaled, image_bgr.shape[1::-1]), cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 0.6, heat, 0.4, 0)
