"""OpenVINO backend: the bundle's model.onnx on an Intel (or ARM) CPU through OpenVINO, the native runtime of the
industrial PCs at most lines. `precision` is OpenVINO's inference precision hint: f32 (scores as ONNX Runtime
gives them), or bf16, native on CPUs with AMX or AVX512-BF16 (3x faster on this project's Xeon; scores move by
up to 0.006, which moved no operating point on two real sets: docs/speed.md; elsewhere OpenVINO runs f32)."""

from __future__ import annotations

import numpy as np

from coft.runtime.engines.base import Inference, check_frames
from coft.runtime.model.bundle import Bundle
from coft.runtime.model.errors import CoftError

PRECISIONS = ("f32", "bf16")


class OpenVinoEngine:
    def __init__(self, bundle: Bundle, threads: int = 0, precision: str = "f32"):
        try:
            import openvino as ov
            from openvino.frontend import FrontEndManager
        except ImportError as exc:
            raise CoftError("OpenVINO is not installed: pip install 'coft[openvino]', or set backend: onnxruntime in "
                            "line.yaml") from exc
        if precision not in PRECISIONS:
            raise CoftError(f"OpenVINO precision {precision!r}: choose {' or '.join(PRECISIONS)}")
        onnx_info = bundle.spec.onnx
        if not onnx_info:
            raise CoftError(f"{bundle.path}: the bundle has no ONNX model; run 'coft export {bundle.path}' first")
        self.bundle = bundle
        self.name = "openvino" if precision == "f32" else f"openvino-{precision}"
        self.max_batch = onnx_info.max_batch
        path = bundle.path / onnx_info.file
        core = ov.Core()
        onnx_frontend = FrontEndManager().load_by_framework("onnx")
        config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            # the ONNX reader alone: read_model tries every frontend, and TensorFlow's writes the graph's bytes to stderr
            self.compiled = core.compile_model(onnx_frontend.convert(onnx_frontend.load(str(path))), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with pages of detail
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CoftError(f"{path}: OpenVINO cannot compile this graph ({detail}); export the bundle again with "
                            "'coft export', or set backend: onnxruntime") from None
        # what the CPU really computes in: a bf16 hint runs in f32 where the CPU has no bf16
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.request = self.compiled.create_infer_request()
        self.outputs = ["score", "embedding"] + (["anomaly_map"] if bundle.scores_patches else [])

    def infer(self, frames: np.ndarray) -> Inference:
        check_frames(frames, self.bundle)
        chunks = []
        for i in range(0, len(frames), self.max_batch):
            result = self.request.infer({"frame": frames[i:i + self.max_batch]})
            by_name = {port.get_any_name(): value for port, value in result.items()}
            chunks.append([np.array(by_name[name]) for name in self.outputs])  # copies: the request reuses them
        joined = [np.concatenate(parts) for parts in zip(*chunks)]
        return Inference(joined[0], joined[1], joined[2] if len(joined) > 2 else None)
