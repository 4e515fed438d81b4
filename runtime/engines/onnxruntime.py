"""ONNX Runtime backend: the bundle's model.onnx on the CPU (or any provider ONNX Runtime has)."""

from __future__ import annotations

import numpy as np

from coft.runtime.engines.base import Inference, check_frames
from coft.runtime.model.bundle import Bundle
from coft.runtime.model.errors import CoftError


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise CoftError("ONNX Runtime is not installed: pip install 'coft[runtime]'") from exc
        onnx_info = bundle.manifest.get("onnx")
        if not onnx_info:
            raise CoftError(f"{bundle.path}: the bundle has no ONNX model; run 'coft export {bundle.path}' first")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.bundle = bundle
        self.max_batch = int(onnx_info["max_batch"])
        path = bundle.path / onnx_info["file"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's own error types (InvalidProtobuf, Fail, ...) say little more
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CoftError(f"{path}: ONNX Runtime cannot load this graph ({detail}); export the bundle again with "
                            "'coft export', then pack and install it again") from None

    def infer(self, frames: np.ndarray) -> Inference:
        check_frames(frames, self.bundle)
        names = ["score", "embedding"] + (["anomaly_map"] if self.bundle.scores_patches else [])
        chunks = [self.session.run(names, {"frame": frames[i:i + self.max_batch]})
                  for i in range(0, len(frames), self.max_batch)]
        joined = [np.concatenate(parts) for parts in zip(*chunks)]
        return Inference(joined[0], joined[1], joined[2] if len(joined) > 2 else None)
