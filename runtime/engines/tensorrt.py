"""TensorRT backend: the bundle's engine computes embeddings, a fused CUDA kernel scores them.

The kernel fits the scorer: Mahalanobis (runtime/engines/kernels/mahalanobis.cu) for the Gaussian
scorers, nearest neighbour against the memory bank (runtime/engines/kernels/nearest.cu) for knn.

For a patch bundle the engine outputs every image's patch features [N, P, D]; one kernel
launch scores all N x P patches and writes each image's worst patch, and the anomaly
maps are upsampled from the patch scores on the CPU, as the ONNX graph does in-graph.

TensorRT engines only run on the GPU model and TensorRT version they were built with,
so the manifest records both and this backend refuses a mismatch with a message that
says to rebuild. Without tensorrt or pycuda it reports why, and `auto` falls back to
ONNX Runtime.
"""

from __future__ import annotations

import logging

import numpy as np

from coft.runtime.engines.base import Inference, check_frames, concatenate, patch_inference
from coft.runtime.engines.fused_nearest import FusedNearest
from coft.runtime.engines.fused_scoring import FusedScorer
from coft.runtime.model.bundle import Bundle, sha256
from coft.runtime.model.errors import CoftError
from coft.runtime.model.manifest import EngineSpec
from coft.runtime.model.scoring import MemoryBank, defect_pull

log = logging.getLogger(__name__)

try:
    import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
    import pycuda.driver as cuda
    import tensorrt as trt
    TRT_MISSING: str | None = None
except ImportError as exc:
    TRT_MISSING = f"TensorRT backend not available: {exc.name or exc} is not importable"
except Exception as exc:  # pycuda.autoinit raises driver errors on a box without a GPU
    TRT_MISSING = f"TensorRT backend not available: no usable CUDA device ({exc})"


def check_engine_matches(engine: EngineSpec, tensorrt_version: str, gpu: str, onnx_sha256: str | None) -> None:
    """Refuse an engine built elsewhere or from another ONNX graph, with the rebuild command."""
    rebuild = "rebuild it on this box with 'coft build-engine BUNDLE'"
    if engine.tensorrt_version != tensorrt_version:
        raise CoftError(f"engine built with TensorRT {engine.tensorrt_version}, this box has {tensorrt_version}; {rebuild}")
    if engine.gpu != gpu:
        raise CoftError(f"engine built for GPU '{engine.gpu}', this box has '{gpu}'; {rebuild}")
    if onnx_sha256 is not None and engine.onnx_sha256 != onnx_sha256:
        raise CoftError(f"engine was built from another model.onnx than the one in the bundle; {rebuild}")


def io_shapes(bundle: Bundle, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the engine's input and output tensors for a batch: embeddings [N, D] or patch features [N, P, D]."""
    h, w = bundle.input_size
    patches = bundle.patch_rows
    dim = bundle.spec.embedding_dim
    return {"frame": (batch, h, w, 3), "embedding": (batch, patches, dim) if patches else (batch, dim)}


if TRT_MISSING is None:
    class TrtLogger(trt.ILogger):
        """TensorRT's messages into Python logging, so integrators grep one log."""

        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # TensorRT's method name
            level = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
                     trt.ILogger.WARNING: logging.WARNING}.get(severity, logging.DEBUG)
            log.log(level, "tensorrt: %s", msg)


def gpu_name() -> str:
    return cuda.Device(0).name()


def scoring_kernel(bundle: Bundle, max_batch: int, half: bool) -> FusedScorer | FusedNearest:
    """The fused kernel for the bundle's scorer; `half` stores its factor or bank in fp16."""
    if bundle.spec.scorer == "knn":
        return FusedNearest(bundle.bank, max_batch, bundle.patch_rows, bundle.patch.pooling, half)
    return FusedScorer(bundle.gaussian, max_batch, half_factor=half, patches=bundle.patch_rows)


def engine_precision(engine: EngineSpec) -> str:
    """The arithmetic a built engine's scores come from: its build flags, and fp16 where only the fused kernel's
    factor or bank is half (a threshold fitted on f32 scores does not carry over to either)."""
    if engine.precision == "fp32":
        return "fp16" if engine.half_factor else "f32"
    return engine.precision


class TensorRTEngine:
    name = "tensorrt"

    def __init__(self, bundle: Bundle):
        if TRT_MISSING:
            raise CoftError(f"{TRT_MISSING}; use backend onnxruntime")
        meta = bundle.spec.engine
        if not meta:
            raise CoftError(f"{bundle.path}: the bundle has no TensorRT engine; run 'coft build-engine {bundle.path}' on this box")
        onnx = bundle.spec.onnx
        check_engine_matches(meta, trt.__version__, gpu_name(), sha256(bundle.path / onnx.file) if onnx else None)
        self.bundle, self.max_batch = bundle, meta.max_batch
        self.precision = engine_precision(meta)
        runtime = trt.Runtime(TrtLogger())
        self.engine = runtime.deserialize_cuda_engine((bundle.path / meta.file).read_bytes())
        if self.engine is None:
            raise CoftError(f"{bundle.path / meta.file}: TensorRT could not load the engine; rebuild it with 'coft build-engine'")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        shapes = io_shapes(bundle, self.max_batch)
        self.patches = bundle.patch_rows
        rows = self.max_batch * max(1, self.patches)  # one score per image, or per patch
        self.frames = cuda.mem_alloc(int(np.prod(shapes["frame"])))
        self.embeddings = cuda.mem_alloc(int(np.prod(shapes["embedding"])) * 4)
        self.scores = cuda.mem_alloc(rows * 4)
        self.image_scores = cuda.mem_alloc(self.max_batch * 4) if self.patches else None
        self.context.set_tensor_address("frame", int(self.frames))
        self.context.set_tensor_address("embedding", int(self.embeddings))
        self.scorer = scoring_kernel(bundle, self.max_batch, meta.half_factor)
        self.host_scores = cuda.pagelocked_empty(rows, np.float32)
        self.host_image_scores = cuda.pagelocked_empty(self.max_batch, np.float32)
        self.host_embeddings = cuda.pagelocked_empty(shapes["embedding"], np.float32)

    def infer(self, frames: np.ndarray) -> Inference:
        check_frames(frames, self.bundle)
        parts = []
        for i in range(0, len(frames), self.max_batch):
            chunk = np.ascontiguousarray(frames[i:i + self.max_batch])
            n = len(chunk)
            rows = n * max(1, self.patches)
            self.context.set_input_shape("frame", chunk.shape)
            cuda.memcpy_htod_async(self.frames, chunk, self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise CoftError("TensorRT failed to run the engine on this batch; see the log for its message")
            self.scorer.launch(self.embeddings, self.scores, n, self.stream, self.image_scores)
            cuda.memcpy_dtoh_async(self.host_scores[:rows], self.scores, self.stream)
            cuda.memcpy_dtoh_async(self.host_embeddings[:n], self.embeddings, self.stream)
            if self.patches:
                cuda.memcpy_dtoh_async(self.host_image_scores[:n], self.image_scores, self.stream)
            self.stream.synchronize()
            embeddings = self.host_embeddings[:n].copy()
            if self.patches:
                patch_scores = self.host_scores[:rows].reshape(n, self.patches)
                bank = self.bundle.scoring
                if not isinstance(bank, MemoryBank) or bank.defects is None:
                    parts.append(patch_inference(self.bundle, patch_scores, embeddings, self.host_image_scores[:n].copy()))
                elif bank.blocks == 1:  # marked defects' rows: a few dozen, in numpy on the features the engine gave
                    near = (embeddings @ bank.defect_rows.T).max(axis=2)
                    parts.append(patch_inference(self.bundle, defect_pull(1.0 - patch_scores, near), embeddings))
                else:  # a bank per block with marked defects: each block's pull needs its own nearest row (numpy)
                    parts.append(patch_inference(self.bundle, bank.score(embeddings), embeddings))
            else:
                parts.append(Inference(self.host_scores[:n].copy(), embeddings))
        return concatenate(parts)
