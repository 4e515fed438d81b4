"""`coft export`: one ONNX graph from a raw camera frame to the anomaly score.

Inside the graph: uint8 NHWC frame in the camera's colour order -> float -> RGB ->
normalisation -> backbone -> global pooling -> L2 normalisation -> Mahalanobis distance
with the bundle's mean and Cholesky factor as constants. Outputs `score` [N] and the raw
`embedding` [N, D] (which the TensorRT path scores with the fused CUDA kernel instead).
The batch is dynamic; the frame size is the bundle's.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from runtime.bundle import Bundle, load_bundle, update_manifest
from runtime.errors import CoftError
from train.backbones import Backbone, restore_backbone

log = logging.getLogger(__name__)
for chatty in ("onnx_ir", "onnxscript"):  # per-node chatter during export
    logging.getLogger(chatty).setLevel(logging.WARNING)

ONNX_FILE = "model.onnx"
OPSET = 18  # TensorRT 10 parses opsets up to 20; 18 is the lowest the torch exporter writes
INPUT, SCORE, EMBEDDING = "frame", "score", "embedding"


class InspectionModel(nn.Module):
    """The whole scoring path of a bundle as one torch module, frame in, score out."""

    def __init__(self, backbone: Backbone, mean: np.ndarray, cholesky: np.ndarray, colour_order: str):
        super().__init__()
        if colour_order not in ("BGR", "RGB"):
            raise CoftError(f"input colour order {colour_order!r} is not supported; use BGR or RGB")
        self.backbone = backbone
        self.register_buffer("to_rgb", torch.tensor([2, 1, 0] if colour_order == "BGR" else [0, 1, 2]))
        self.register_buffer("gauss_mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("cholesky", torch.from_numpy(cholesky.astype(np.float32)))

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = frame.permute(0, 3, 1, 2).float().index_select(1, self.to_rgb)
        embedding = self.backbone(pixels)
        unit = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = (unit - self.gauss_mean) @ self.cholesky
        return d.square().sum(dim=1).sqrt(), embedding


def inspection_model(bundle: Bundle) -> InspectionModel:
    m = bundle.manifest
    backbone = restore_backbone(m["backbone"]["name"], bundle.path / m["backbone"]["weights"])
    return InspectionModel(backbone, bundle.gaussian.mean, bundle.gaussian.cholesky, m["input"]["colour_order"]).eval()


def check_matches_manifest(model: onnx.ModelProto, manifest: dict) -> None:
    """Refuse an ONNX graph whose input or outputs do not fit the bundle it sits in."""
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    if INPUT not in inputs or not {SCORE, EMBEDDING} <= set(outputs):
        raise CoftError(f"{ONNX_FILE}: expects input '{INPUT}' and outputs '{SCORE}', '{EMBEDDING}'; re-run 'coft export'")
    dims = [d.dim_value or d.dim_param for d in inputs[INPUT].type.tensor_type.shape.dim]
    expected = [manifest["input"]["height"], manifest["input"]["width"], 3]
    if dims[1:] != expected:
        raise CoftError(f"{ONNX_FILE}: takes frames of {dims[1:]} but the manifest says {expected}; re-run 'coft export'")
    emb_dim = outputs[EMBEDDING].type.tensor_type.shape.dim[1].dim_value
    if emb_dim != manifest["embedding_dim"]:
        raise CoftError(f"{ONNX_FILE}: embedding of size {emb_dim} but the manifest says {manifest['embedding_dim']}; re-run 'coft export'")


def export_onnx(bundle_dir: str | Path, max_batch: int = 64, simplify: bool = True) -> Path:
    """Write model.onnx into the bundle, check it, and re-seal the manifest."""
    bundle = load_bundle(bundle_dir)
    model = inspection_model(bundle)
    h, w = bundle.input_size
    example = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    target = bundle.path / ONNX_FILE
    tmp = bundle.path / f".{ONNX_FILE}.tmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                    output_names=[SCORE, EMBEDDING], dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    if simplify:
        import onnxslim
        proto = onnxslim.slim(proto)
    onnx.checker.check_model(proto, full_check=True)
    check_matches_manifest(proto, bundle.manifest)
    onnx.save(proto, tmp)
    tmp.replace(target)
    update_manifest(bundle.path, {"onnx": {"file": ONNX_FILE, "opset": OPSET, "max_batch": max_batch,
                                           "inputs": {INPUT: ["batch", h, w, 3]},
                                           "outputs": {SCORE: ["batch"], EMBEDDING: ["batch", bundle.gaussian.dim]}}})
    log.info("wrote %s (opset %d, batch 1..%d)", target, OPSET, max_batch)
    return target
