"""Inference backends behind one interface: uint8 frames in, scores and embeddings out.

An explicit table, no discovery: `onnxruntime` runs anywhere (the embedded default),
`tensorrt` runs a bundle's engine with the fused CUDA scoring kernel on a Jetson or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from coft.runtime.bundle import Bundle
from coft.runtime.errors import CoftError
from coft.runtime.heatmap import anomaly_maps
from coft.runtime.scoring import pool


@dataclass
class Inference:
    scores: np.ndarray  # [N]
    embeddings: np.ndarray  # [N, D] global, or [N, P, D] patch features
    maps: np.ndarray | None = None  # [N, H, W] anomaly maps at the input size (patch scorer)


def patch_inference(bundle: Bundle, patch_scores: np.ndarray, features: np.ndarray,
                    image_scores: np.ndarray | None = None) -> Inference:
    """A patch bundle's outputs from its patch scores [N, P]: image scores by the bundle's pooling, and maps.

    `image_scores`, where the fused kernel already wrote each image's worst patch, saves
    pooling again for max-pooled bundles."""
    patch = bundle.manifest["patch"]
    if image_scores is None or patch["pooling"] != "max":
        image_scores = pool(patch_scores, patch["pooling"])
    maps = anomaly_maps(patch_scores, tuple(patch["grid"]), bundle.input_size, float(patch["blur_sigma"]))
    return Inference(image_scores, features, maps)


def concatenate(parts: list[Inference]) -> Inference:
    """One Inference from the results of consecutive batches."""
    maps = None if parts[0].maps is None else np.concatenate([p.maps for p in parts])
    return Inference(np.concatenate([p.scores for p in parts]), np.concatenate([p.embeddings for p in parts]), maps)


class Engine(Protocol):
    name: str

    def infer(self, frames: np.ndarray) -> Inference:
        """uint8 frames [N, H, W, 3] in the bundle's colour order -> scores, embeddings and maps."""


def check_frames(frames: np.ndarray, bundle: Bundle) -> None:
    h, w = bundle.input_size
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
        raise CoftError(f"frames of shape {frames.shape} and type {frames.dtype} do not fit the model: "
                        f"expected uint8 [N, {h}, {w}, 3]; resize frames to the bundle's input first")


def _onnxruntime(bundle: Bundle, threads: int) -> Engine:
    from coft.runtime.engines.ort_engine import OnnxRuntimeEngine
    return OnnxRuntimeEngine(bundle, threads=threads)


def _tensorrt(bundle: Bundle, threads: int) -> Engine:  # noqa: ARG001  (TensorRT schedules the GPU itself)
    from coft.runtime.engines.trt_engine import TensorRTEngine
    return TensorRTEngine(bundle)


BACKENDS: dict[str, Callable[[Bundle, int], Engine]] = {"onnxruntime": _onnxruntime, "tensorrt": _tensorrt}


def tensorrt_unavailable(bundle: Bundle) -> str | None:
    """Why the TensorRT backend cannot run this bundle here, or None if it can."""
    if "engine" not in bundle.manifest:
        return "the bundle has no TensorRT engine (build one on this box with 'coft build-engine')"
    from coft.runtime.engines.trt_engine import TRT_MISSING
    return TRT_MISSING


def open_engine(bundle: Bundle, backend: str = "auto", threads: int = 0) -> Engine:
    """The requested backend; `auto` takes TensorRT where the bundle has an engine and it can run, else ONNX Runtime.

    `threads` sets ONNX Runtime's CPU threads (0: all cores)."""
    if backend == "auto":
        backend = "onnxruntime" if tensorrt_unavailable(bundle) else "tensorrt"
    if backend not in BACKENDS:
        raise CoftError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    return BACKENDS[backend](bundle, threads)
