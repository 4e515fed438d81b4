"""`coft build-engine`: a TensorRT engine built on the target box from the bundle's model.onnx.

Engines do not move between GPU models or TensorRT versions, so this runs on the Jetson
itself. The engine computes only the embedding (patch features for a patch bundle): the
graph's `score` and `anomaly_map` outputs are unmarked, TensorRT prunes the scoring
layers, and the fused CUDA kernel scores instead. FP16 and
INT8 (entropy calibration on the bundle's calibration frames) are optional; a timing
cache beside the bundle makes rebuilds fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from coft.runtime.engines.tensorrt import TRT_MISSING, gpu_name, io_shapes
from coft.runtime.model.bundle import load_bundle, sha256, update_manifest
from coft.runtime.model.errors import CoftError

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
CALIBRATION_FILE = "calibration.npz"


def calibration_batches(frames: np.ndarray, batch: int) -> list[np.ndarray]:
    """Full batches of calibration frames (TensorRT needs every batch the same size)."""
    if len(frames) < batch:
        raise CoftError(f"only {len(frames)} calibration frames for a batch of {batch}; lower --calib-batch")
    return [np.ascontiguousarray(frames[i:i + batch]) for i in range(0, len(frames) - batch + 1, batch)]


def load_calibration_frames(bundle_dir: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    path = bundle_dir / CALIBRATION_FILE
    if not path.is_file():
        raise CoftError(f"{bundle_dir}: no {CALIBRATION_FILE} for INT8 calibration; retrain the bundle with this version or build with --fp16")
    with np.load(path, allow_pickle=False) as data:
        frames = data["frames"]
    if frames.dtype != np.uint8 or frames.shape[1:] != input_shape or len(frames) == 0:
        raise CoftError(f"{path}: calibration frames {frames.shape} {frames.dtype} do not fit the input {input_shape}; retrain the bundle")
    return frames


if TRT_MISSING is None:
    import pycuda.driver as cuda
    import tensorrt as trt

    from coft.runtime.engines.tensorrt import TrtLogger

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds the bundle's calibration frames to TensorRT, and keeps the cache beside the bundle."""

        def __init__(self, batches: list[np.ndarray], cache: Path):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.cache, self.index = batches, cache, 0
            self.device = cuda.mem_alloc(batches[0].nbytes)

        def get_batch_size(self) -> int:
            return len(self.batches[0])

        def get_batch(self, names):  # noqa: ARG002  (one input)
            if self.index == len(self.batches):
                return None
            cuda.memcpy_htod(self.device, self.batches[self.index])
            self.index += 1
            return [int(self.device)]

        def read_calibration_cache(self):
            return self.cache.read_bytes() if self.cache.is_file() else None

        def write_calibration_cache(self, cache) -> None:  # through a new file: a revision may share the old
            tmp = self.cache.with_name(f".{self.cache.name}.tmp")
            tmp.write_bytes(bytes(cache))
            tmp.replace(self.cache)


def keep_norms_fp32(network, config) -> int:
    """Pin normalisation layers (a ViT's LayerNorms) to FP32 in an FP16 engine: their variance overflows FP16."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            pinned += 1
    if pinned:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("FP16 engine: %d normalisation layers kept in FP32", pinned)
    return pinned


def build_engine(bundle_dir: str | Path, fp16: bool = False, int8: bool = False, max_batch: int = 16,
                 workspace_mb: int = 1024, calib_batch: int = 8, half_factor: bool = False) -> Path:
    """Build model.engine from the bundle's model.onnx on this box and record it in the manifest."""
    bundle = load_bundle(bundle_dir)
    onnx_info = bundle.manifest.get("onnx")
    if not onnx_info:
        raise CoftError(f"{bundle.path}: the bundle has no ONNX model; run 'coft export {bundle.path}' first")
    if int8 and bundle.manifest["backbone"]["name"] == "dinov2_vits14":
        log.warning("INT8 and the DINOv2 ViT: a static INT8 probe of it (ONNX Runtime, per-channel QDQ) left patch "
                    "features at cosine 0.85 of FP32 and lost AUROC; prefer --fp16, and check with coft eval")
    if int8:  # check the calibration data before asking for TensorRT, so the error is about the data
        batches = calibration_batches(load_calibration_frames(bundle.path, io_shapes(bundle, 1)["frame"][1:]), calib_batch)
    if TRT_MISSING:
        raise CoftError(f"{TRT_MISSING}; build the engine on the Jetson (JetPack 6 ships TensorRT 10)")
    logger = TrtLogger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse((bundle.path / onnx_info["file"]).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CoftError(f"TensorRT could not parse model.onnx ({errors}); re-export with 'coft export'")
    for i in reversed(range(network.num_outputs)):
        if network.get_output(i).name in ("score", "anomaly_map"):
            network.unmark_output(network.get_output(i))  # scored by the fused kernel (and the CPU map) instead
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    shape = io_shapes(bundle, 1)["frame"][1:]
    profile.set_shape("frame", (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    precision = "fp32"
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16"
        keep_norms_fp32(network, config)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape("frame", *[(calib_batch, *shape)] * 3)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = EntropyCalibrator(batches, bundle.path / "calibration.cache")
        precision = "int8+fp16" if fp16 else "int8"
    timing_path = bundle.path.parent / ".coft-timing.cache"  # per box, shared by its bundles
    cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building TensorRT %s engine (%s, batch 1..%d); this takes minutes", trt.__version__, precision, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CoftError("TensorRT failed to build the engine; see the log above for its reason")
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    engine_path = bundle.path / ENGINE_FILE
    tmp = bundle.path / f".{ENGINE_FILE}.tmp"
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    device = cuda.Device(0)
    update_manifest(bundle.path, {"engine": {
        "file": ENGINE_FILE, "tensorrt_version": trt.__version__, "gpu": gpu_name(),
        "compute_capability": "{}.{}".format(*device.compute_capability()), "precision": precision,
        "max_batch": max_batch, "outputs": ["embedding"], "fused_scoring": True, "half_factor": half_factor,
        "onnx_sha256": sha256(bundle.path / onnx_info["file"]),
    }})
    log.info("wrote %s", engine_path)
    return engine_path
