"""Inference backends behind one interface (base.py): uint8 frames in, scores and embeddings out; one file each,
named like its BACKENDS key, and kernels/ with the CUDA sources the box compiles.

An explicit table, no discovery: `onnxruntime` runs anywhere (the embedded default),
`tensorrt` runs a bundle's engine with the fused CUDA scoring kernel on a Jetson or GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from coft.runtime.engines.base import Engine, Inference
from coft.runtime.model.bundle import Bundle
from coft.runtime.model.errors import CoftError

__all__ = ["BACKENDS", "Engine", "Inference", "open_engine", "tensorrt_unavailable"]


def _onnxruntime(bundle: Bundle, threads: int) -> Engine:
    from coft.runtime.engines.onnxruntime import OnnxRuntimeEngine
    return OnnxRuntimeEngine(bundle, threads=threads)


def _tensorrt(bundle: Bundle, threads: int) -> Engine:  # noqa: ARG001  (TensorRT schedules the GPU itself)
    from coft.runtime.engines.tensorrt import TensorRTEngine
    return TensorRTEngine(bundle)


BACKENDS: dict[str, Callable[[Bundle, int], Engine]] = {"onnxruntime": _onnxruntime, "tensorrt": _tensorrt}


def tensorrt_unavailable(bundle: Bundle) -> str | None:
    """Why the TensorRT backend cannot run this bundle here, or None if it can."""
    if "engine" not in bundle.manifest:
        return "the bundle has no TensorRT engine (build one on this box with 'coft build-engine')"
    from coft.runtime.engines.tensorrt import TRT_MISSING
    return TRT_MISSING


def open_engine(bundle: Bundle, backend: str = "auto", threads: int = 0) -> Engine:
    """The requested backend; `auto` takes TensorRT where the bundle has an engine and it can run, else ONNX Runtime.

    `threads` sets ONNX Runtime's CPU threads (0: all cores)."""
    if backend == "auto":
        backend = "onnxruntime" if tensorrt_unavailable(bundle) else "tensorrt"
    if backend not in BACKENDS:
        raise CoftError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    return BACKENDS[backend](bundle, threads)
