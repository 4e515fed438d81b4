"""Inference backends behind one interface (base.py): uint8 frames in, scores and embeddings out; one file each,
named like its BACKENDS key, and kernels/ with the CUDA sources the box compiles.

An explicit table, no discovery: `onnxruntime` runs anywhere (the embedded default), `openvino` on Intel
CPUs (f32, or `openvino-bf16` where the CPU has AMX or AVX512-BF16), `tensorrt` runs a bundle's engine with the
fused CUDA scoring kernel on a Jetson or GPU. `auto` takes TensorRT where it can run, else times the installed
CPU engines on the bundle's own graph and keeps the fastest, among those that compute in the precision the line
fitted the bundle's threshold on (a threshold holds on scores of that arithmetic only).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable

import numpy as np

from coft.runtime.engines.base import Engine, Inference
from coft.runtime.model.bundle import Bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.manifest import ManifestSchema

__all__ = ["BACKENDS", "CPU_PRECISION", "Engine", "Inference", "auto_candidates", "fitted_precision", "open_engine", "provisional_engine", "tensorrt_unavailable"]

log = logging.getLogger(__name__)
TIMED_RUNS = 5  # batch-1 runs per CPU engine when `auto` chooses between them (after two to warm up)
CPU_PRECISION = {"onnxruntime": "f32", "openvino": "f32", "openvino-bf16": "bf16"}  # auto's candidates' arithmetic


def _onnxruntime(bundle: Bundle, threads: int, precision: str = "f32") -> Engine:
    from coft.runtime.engines.onnxruntime import OnnxRuntimeEngine
    return OnnxRuntimeEngine(bundle, threads=threads, precision=precision)


def _openvino(bundle: Bundle, threads: int, precision: str = "f32") -> Engine:
    from coft.runtime.engines.openvino import OpenVinoEngine
    return OpenVinoEngine(bundle, threads=threads, precision=precision)


def _tensorrt(bundle: Bundle, threads: int) -> Engine:  # noqa: ARG001  (TensorRT schedules the GPU itself)
    from coft.runtime.engines.tensorrt import TensorRTEngine
    return TensorRTEngine(bundle)


BACKENDS: dict[str, Callable[[Bundle, int], Engine]] = {
    "onnxruntime": _onnxruntime, "onnxruntime-int8": lambda bundle, threads: _onnxruntime(bundle, threads, "int8"),
    "openvino": _openvino,
    "openvino-bf16": lambda bundle, threads: _openvino(bundle, threads, "bf16"), "tensorrt": _tensorrt}


def fitted_precision(spec: ManifestSchema) -> str | None:
    """The arithmetic (an engine's `precision`) of the scores the line fitted the bundle's threshold on: the learn
    step's, else commissioning's; None where the line fitted none. A threshold holds on engines of that precision
    only. A record written before engines stated their precision names the backend alone."""
    for done in filter(None, (spec.learning, spec.commissioning)):
        if done.precision:
            return done.precision
        if done.engine:
            return done.engine.partition("-")[2] or "f32"
    return None


def tensorrt_unavailable(bundle: Bundle) -> str | None:
    """Why the TensorRT backend cannot run this bundle here, or None if it can."""
    if "engine" not in bundle.manifest:
        return "the bundle has no TensorRT engine (build one on this box with 'coft build-engine')"
    from coft.runtime.engines.tensorrt import TRT_MISSING
    return TRT_MISSING


def installed_cpu_engines() -> list[str]:
    """The CPU engines `auto` chooses between: ONNX Runtime always, OpenVINO where it is installed, and OpenVINO's
    bf16 where the CPU computes bf16 natively (AMX, AVX512-BF16). On magnetic tiles and ELPV bf16 moved no
    operating point (docs/speed.md); commissioning records the engine its threshold was fitted on."""
    try:
        found = importlib.util.find_spec("openvino") is not None
    except ValueError:  # in sys.modules without a spec: as good as absent
        found = False
    if not found:
        return ["onnxruntime"]
    import openvino as ov
    native_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["onnxruntime", "openvino", *(["openvino-bf16"] if native_bf16 else [])]


def auto_candidates(bundle: Bundle, keep: str | None) -> list[str]:
    """The installed CPU engines `auto` may take: those computing in `keep` (the precision the bundle's threshold was
    fitted on) where any does, else all of them (the start then warns that the threshold needs commissioning again)."""
    names = installed_cpu_engines()
    kept = [name for name in names if CPU_PRECISION[name] == keep]
    if keep and not kept:
        log.warning("engine auto: no installed CPU engine computes in %s, the precision %s's threshold was fitted on; "
                    "choosing among %s", keep, bundle.model_id, ", ".join(names))
    elif keep and kept != names:
        log.info("engine auto: %s only (%s's threshold was fitted on %s scores)", " or ".join(kept), bundle.model_id, keep)
    return kept or names


def fastest_cpu_engine(bundle: Bundle, threads: int, names: list[str]) -> Engine:
    """Time each of these CPU engines (auto_candidates) on the bundle's own graph at batch 1 and keep the faster; say
    which."""
    if len(names) == 1:
        return BACKENDS[names[0]](bundle, threads)
    frame = np.zeros((1, *bundle.input_size, 3), np.uint8)
    timed: list[tuple[float, str, Engine]] = []
    refused: CoftError | None = None
    for name in names:
        try:
            engine = BACKENDS[name](bundle, threads)
        except CoftError as exc:  # one engine that cannot take the graph leaves the others
            refused = refused or exc
            log.warning("engine auto: %s left out: %s", name, exc)
            continue
        for _ in range(2):
            engine.infer(frame)
        runs = []
        for _ in range(TIMED_RUNS):
            started = time.perf_counter()
            engine.infer(frame)
            runs.append(time.perf_counter() - started)
        timed.append((float(np.median(runs)) * 1000, name, engine))
    if not timed and refused is not None:
        raise refused  # none can take the graph: ONNX Runtime's one-line error says why
    timed.sort(key=lambda t: t[0])
    log.info("engine auto: %s (%s a frame at batch 1 on this graph)", timed[0][1],
             ", ".join(f"{name} {ms:.1f} ms" for ms, name, _ in timed))
    return timed[0][2]


def provisional_engine(bundle: Bundle, backend: str, threads: int,
                       keep: str | None = None) -> tuple[Engine, Callable[[], Engine] | None]:
    """An engine to start with and, where `auto` has CPU engines to choose between, the choice to make later: the
    runtime times them in its inspector's warm-up, which its stall check watches (a graph that hangs must end
    the process, not its start). `keep`: the precision auto keeps (open_engine)."""
    if backend == "auto" and tensorrt_unavailable(bundle):
        names = auto_candidates(bundle, keep)
        if len(names) > 1:
            return BACKENDS[names[0]](bundle, threads), lambda: fastest_cpu_engine(bundle, threads, names)
    return open_engine(bundle, backend, threads, keep), None


def open_engine(bundle: Bundle, backend: str = "auto", threads: int = 0, keep: str | None = None) -> Engine:
    """The requested backend; `auto` takes TensorRT where the bundle has an engine and it can run, else the faster
    of the installed CPU engines on this graph (fastest_cpu_engine), among those computing in `keep` where given
    (fitted_precision: the line's threshold holds on that arithmetic only).

    `threads` sets the CPU engines' threads (0: all cores)."""
    if backend == "auto":
        if tensorrt_unavailable(bundle):
            return fastest_cpu_engine(bundle, threads, auto_candidates(bundle, keep))
        backend = "tensorrt"
    if backend not in BACKENDS:
        raise CoftError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    return BACKENDS[backend](bundle, threads)
