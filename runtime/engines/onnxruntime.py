"""ONNX Runtime backend: the bundle's model.onnx on the CPU (or any provider ONNX Runtime has).

`precision="int8"` (`backend: onnxruntime-int8`) runs the ViT's MatMuls with int8 weights: ONNX Runtime's
dynamic quantisation, made from model.onnx when the engine opens (seconds), so a bank the box grew is always
the one scored; the bank's product stays in float. On a CPU without AMX it ran the default graph 20% faster
than f32, AUROC within 0.0003 on two real sets, but the shipped threshold's false-reject rose 0.5 points on ELPV
(docs/speed.md): not in `auto`; commission on it where it is pinned. Where bf16 is native, bf16 is faster."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from coft.runtime.engines.base import Inference, check_frames
from coft.runtime.model.bundle import Bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import BANK_CONSTANT, DEFECTS_CONSTANT

PRECISIONS = ("f32", "int8")


def scoring_matmuls(graph) -> list[str]:
    """The nodes of an ONNX graph that multiply by the bank or the defect rows: kept in float when the ViT's
    weights go to int8 (the bank's precision is a question of its own: bench/caps.py)."""
    return [node.name for node in graph.node if {BANK_CONSTANT, DEFECTS_CONSTANT} & set(node.input)]


class _QuantiserAdvice(logging.Filter):
    """ONNX Runtime's quantiser advises pre-processing on the root logger at every call: not a line's news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")


def int8_graph(path: Path) -> bytes:
    """model.onnx with the ViT's MatMul/Gemm weights in int8 (per channel), activations quantised per batch."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = scoring_matmuls(onnx.load(str(path), load_external_data=False).graph)
    advice = _QuantiserAdvice()
    logging.getLogger().addFilter(advice)
    try:
        with tempfile.TemporaryDirectory(prefix="coft-int8-") as work:
            target = Path(work) / "model.int8.onnx"
            quantize_dynamic(path, target, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep)
            return target.read_bytes()
    finally:
        logging.getLogger().removeFilter(advice)


class OnnxRuntimeEngine:
    def __init__(self, bundle: Bundle, threads: int = 0, precision: str = "f32"):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise CoftError("ONNX Runtime is not installed: pip install 'coft[runtime]'") from exc
        if precision not in PRECISIONS:
            raise CoftError(f"ONNX Runtime precision {precision!r}: choose {' or '.join(PRECISIONS)}")
        onnx_info = bundle.spec.onnx
        if not onnx_info:
            raise CoftError(f"{bundle.path}: the bundle has no ONNX model; run 'coft export {bundle.path}' first")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.bundle, self.precision = bundle, precision
        self.name = "onnxruntime" if precision == "f32" else f"onnxruntime-{precision}"
        self.max_batch = onnx_info.max_batch
        path = bundle.path / onnx_info.file
        try:
            graph = int8_graph(path) if precision == "int8" else str(path)
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
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
