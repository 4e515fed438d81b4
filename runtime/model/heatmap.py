"""Anomaly maps from patch scores, and where the defect is: numpy and OpenCV only."""

from __future__ import annotations

from typing import Protocol

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
    """[x, y, width, height] around the hottest connected region above the threshold (the one holding the
    map's peak), or None if no pixel is above it. Several weak blobs elsewhere do not widen the box."""
    above = (score_map > threshold).astype(np.uint8)
    if not above.any():
        return None
    _, regions, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    y, x = np.unravel_index(int(np.argmax(score_map)), score_map.shape)
    left, top, width, height = stats[regions[y, x], :4]
    return [int(left), int(top), int(width), int(height)]


def overlay(image_bgr: np.ndarray, score_map: np.ndarray, threshold: float) -> np.ndarray:
    """The frame with the map as a heat overlay, saturating at twice the threshold."""
    scaled = np.clip(score_map / (2 * threshold) * 255, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(cv2.resize(scaled, image_bgr.shape[1::-1]), cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 0.6, heat, 0.4, 0)


REJECT_BGR, ACCEPT_BGR = (40, 40, 230), (60, 180, 60)


class Judged(Protocol):
    """What the banner says of a verdict (line/verdict.py's Verdict is one)."""
    reject: bool
    score: float | None
    threshold: float

    @property
    def box(self) -> list[int] | None: ...


def annotate(image_bgr: np.ndarray, verdict: Judged, score_map: np.ndarray | None = None,
             origin: tuple[int, int] = (0, 0), max_width: int | None = None) -> np.ndarray:
    """What an operator needs to see in one picture: the frame, the anomaly map over it, the defect box and a
    banner with verdict, score and threshold. `origin` is where the frame starts in the camera's pixels (its
    ROI), since the verdict's box is given in those."""
    threshold = verdict.threshold
    shown = overlay(image_bgr, cv2.resize(score_map, image_bgr.shape[1::-1]), threshold) \
        if score_map is not None else image_bgr.copy()
    scale = min(1.0, max_width / shown.shape[1]) if max_width else 1.0
    if scale < 1.0:
        shown = cv2.resize(shown, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    colour = REJECT_BGR if verdict.reject else ACCEPT_BGR
    box = verdict.box
    if box:
        x, y, w, h = [round(v * scale) for v in (box[0] - origin[0], box[1] - origin[1], box[2], box[3])]
        cv2.rectangle(shown, (x, y), (x + w - 1, y + h - 1), colour, max(1, round(shown.shape[1] / 200)))
    score = "none" if verdict.score is None else f"{verdict.score:.4g}"
    text = f"{'REJECT' if verdict.reject else 'ACCEPT'}  score {score} / threshold {threshold:.4g}"
    font_scale = max(0.35, shown.shape[1] / 700)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    cv2.rectangle(shown, (0, 0), (min(shown.shape[1], tw + 8), th + base + 8), colour, -1)
    cv2.putText(shown, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1, cv2.LINE_AA)
    return shown
