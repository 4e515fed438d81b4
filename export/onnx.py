"""`coft export`: one ONNX graph from a raw camera frame to the anomaly score.

Inside the graph: uint8 NHWC frame in the camera's colour order -> float -> RGB ->
normalisation -> backbone -> global pooling -> L2 normalisation -> Mahalanobis distance
with the bundle's mean and Cholesky factor as constants. Outputs `score` [N] and the raw
`embedding` [N, D] (which the TensorRT path scores with the fused CUDA kernel instead).
A patch-scorer bundle's graph scores every patch instead (Mahalanobis distance, or for the
knn scorer the cosine distance to the nearest row of the memory bank, a constant: MatMul +
ReduceMax), outputs the patch features as `embedding` [N, P, C], and also
`anomaly_map` [N, H, W]: patch scores upsampled to the input and Gaussian-smoothed.
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
from torch.nn import functional as F

from coft.runtime.model.bundle import PATCH_SCORERS, Bundle, load_bundle, update_manifest
from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import BANK_CONSTANT, Gaussian, MemoryBank, pooled_patches
from coft.runtime.model.tiles import Tiling
from coft.train.backbones import Backbone, restore_bundle_backbone
from coft.train.progress import bar

log = logging.getLogger(__name__)
for chatty in ("onnx_ir", "onnxscript"):  # per-node chatter during export
    logging.getLogger(chatty).setLevel(logging.WARNING)

ONNX_FILE = "model.onnx"
OPSET = 18  # TensorRT 10 parses opsets up to 20; 18 is the lowest the torch exporter writes
INPUT, SCORE, EMBEDDING, ANOMALY_MAP = "frame", "score", "embedding", "anomaly_map"


def _channel_order(colour_order: str) -> torch.Tensor:
    if colour_order not in ("BGR", "RGB"):
        raise CoftError(f"input colour order {colour_order!r} is not supported; use BGR or RGB")
    return torch.tensor([2, 1, 0] if colour_order == "BGR" else [0, 1, 2])


class InspectionModel(nn.Module):
    """The whole scoring path of a bundle as one torch module, frame in, score out."""

    def __init__(self, backbone: Backbone, mean: np.ndarray, cholesky: np.ndarray, colour_order: str):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("to_rgb", _channel_order(colour_order))
        self.register_buffer("gauss_mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("cholesky", torch.from_numpy(cholesky.astype(np.float32)))

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = frame.permute(0, 3, 1, 2).float().index_select(1, self.to_rgb)
        embedding = self.backbone(pixels)
        unit = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = (unit - self.gauss_mean) @ self.cholesky
        return d.square().sum(dim=1).sqrt(), embedding


class MahalanobisPatches(nn.Module):
    """Patch scores [N, P] of raw patch features [N, P, C]: distance under one shared Gaussian."""

    def __init__(self, gaussian: Gaussian):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(gaussian.mean.astype(np.float32)))
        self.register_buffer("cholesky", torch.from_numpy(gaussian.cholesky.astype(np.float32)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) @ self.cholesky).square().sum(dim=2).sqrt()


class NearestNeighbourPatches(nn.Module):
    """Patch scores [N, P]: 1 - cosine similarity to the nearest bank row (MatMul + ReduceMax, the bank a constant),
    raised where a marked defect row is nearer (MemoryBank.score; a zero row alone when none is marked, so that
    `coft learn` can put marked defects into any exported graph). A bank over several ViT blocks holds its rows per
    block ([B, C / B, M]): each block's nearest row is its own, and the blocks' distances are weighted."""

    def __init__(self, bank: MemoryBank):
        super().__init__()
        self.blocks = bank.blocks
        self.register_buffer("bank_t", torch.from_numpy(bank.graph_constant(bank.features)))
        self.register_buffer("defects_t", torch.from_numpy(bank.graph_constant(bank.defect_rows)))
        if bank.block_weights is not None:
            self.register_buffer("weights", torch.from_numpy(bank.block_weights.astype(np.float32)).view(1, -1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.blocks == 1:
            best = (features @ self.bank_t).amax(dim=2)
            near_defect = (features @ self.defects_t).amax(dim=2)
            return 1.0 - best + (near_defect - best).clamp_min(0.0)
        per_block = features.unflatten(2, (self.blocks, -1)).transpose(1, 2)  # [N, B, P, C / B]
        best = (per_block @ self.bank_t).amax(dim=3) * self.blocks
        near_defect = (per_block @ self.defects_t).amax(dim=3) * self.blocks
        return ((1.0 - best + (near_defect - best).clamp_min(0.0)) * self.weights).sum(dim=1)


class PatchInspectionModel(nn.Module):
    """A patch scorer as one module: frame in; score, anomaly map and patch features out. A tiled bundle's frame is
    cut into its windows (constant slices), scored window by window in one batch, and the windows' patch scores
    placed on the frame's grid and averaged where they overlap, as runtime/model/tiles.py does in numpy."""

    def __init__(self, backbone: Backbone, scoring: nn.Module, colour_order: str, patch: dict, size: tuple[int, int],
                 tiling: Tiling | None = None):
        super().__init__()
        self.backbone, self.scoring, self.tiling = backbone, scoring, tiling
        if tiling is not None:
            self.register_buffer("coverage", torch.from_numpy(tiling.coverage.copy()).flatten())
        self.register_buffer("to_rgb", _channel_order(colour_order))
        self.pooling, self.grid, self.size = patch["pooling"], patch["grid"], size
        sigma = float(patch["blur_sigma"])
        radius = int(round(sigma * 4))  # OpenCV's kernel size for this sigma: 2 * 4 * sigma + 1
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        self.register_buffer("blur", (taps / taps.sum()).view(1, 1, 1, -1))
        self.radius = radius

    def windows(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = self.tiling.window
        return torch.stack([pixels[..., y:y + h, x:x + w] for y, x in self.tiling.origins], dim=1).flatten(0, 1)

    def stitched(self, window_scores: torch.Tensor) -> torch.Tensor:
        """[N * tiles, h * w] -> [N, rows * cols]: each window's scores padded into place, summed, averaged."""
        (rows, cols), (h, w), stride = self.tiling.grid, self.tiling.window_grid, self.tiling.stride
        scores = window_scores.reshape(-1, len(self.tiling), h, w)
        total = sum(F.pad(scores[:, t], (x // stride, cols - x // stride - w, y // stride, rows - y // stride - h))
                    for t, (y, x) in enumerate(self.tiling.origins))
        return total.flatten(1) / self.coverage

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = frame.permute(0, 3, 1, 2).float().index_select(1, self.to_rgb)
        if self.tiling is None:
            features = self.backbone.patch_features(pixels)
            patch_scores = self.scoring(features)
        else:
            window_features = self.backbone.patch_features(self.windows(pixels))
            patch_scores = self.stitched(self.scoring(window_features))
            features = window_features.reshape(-1, len(self.tiling) * window_features.shape[1], window_features.shape[2])
        if self.pooling == "max":
            score = patch_scores.amax(dim=1)
        else:
            score = patch_scores.topk(pooled_patches(patch_scores.shape[1], self.pooling), dim=1).values.mean(dim=1)
        grid = patch_scores.view(-1, 1, *self.grid)
        full = F.interpolate(grid, size=self.size, mode="bilinear", align_corners=False)
        r = self.radius  # separable Gaussian blur with mirrored borders, as cv2.GaussianBlur does
        full = F.conv2d(F.pad(full, (r, r, 0, 0), mode="reflect"), self.blur)
        full = F.conv2d(F.pad(full, (0, 0, r, r), mode="reflect"), self.blur.transpose(2, 3))
        return score, full[:, 0], features


def inspection_model(bundle: Bundle) -> nn.Module:
    m = bundle.manifest
    backbone = restore_bundle_backbone(bundle)
    if bundle.scores_patches:
        scoring = NearestNeighbourPatches(bundle.scoring) if m["scorer"] == "knn" else MahalanobisPatches(bundle.gaussian)
        return PatchInspectionModel(backbone, scoring, m["input"]["colour_order"], m["patch"], bundle.input_size,
                                    bundle.tiling).eval()
    return InspectionModel(backbone, bundle.gaussian.mean, bundle.gaussian.cholesky, m["input"]["colour_order"]).eval()


def check_matches_manifest(model: onnx.ModelProto, manifest: dict) -> None:
    """Refuse an ONNX graph whose input or outputs do not fit the bundle it sits in."""
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    needed = {SCORE, EMBEDDING} | ({ANOMALY_MAP} if manifest.get("scorer") in PATCH_SCORERS else set())
    if INPUT not in inputs or not needed <= set(outputs):
        raise CoftError(f"{ONNX_FILE}: expects input '{INPUT}' and outputs {sorted(needed)}; re-run 'coft export'")
    dims = [d.dim_value or d.dim_param for d in inputs[INPUT].type.tensor_type.shape.dim]
    expected = [manifest["input"]["height"], manifest["input"]["width"], 3]
    if dims[1:] != expected:
        raise CoftError(f"{ONNX_FILE}: takes frames of {dims[1:]} but the manifest says {expected}; re-run 'coft export'")
    if manifest.get("scorer") == "knn" and BANK_CONSTANT not in {c.name for c in model.graph.initializer}:
        raise CoftError(f"{ONNX_FILE}: no memory-bank constant {BANK_CONSTANT}, which 'coft learn' replaces on the box")
    emb_dim = outputs[EMBEDDING].type.tensor_type.shape.dim[-1].dim_value
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
    patch = bundle.scores_patches
    names = [SCORE, ANOMALY_MAP, EMBEDDING] if patch else [SCORE, EMBEDDING]
    steps = bar(desc="export: tracing the graph", total=3 if simplify else 2, unit="step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                    output_names=names, dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    steps.update()
    if simplify:
        import onnxslim
        steps.set_description("export: simplifying (onnxslim)")
        proto = onnxslim.slim(proto)
        steps.update()
    steps.set_description("export: checking the graph")
    onnx.checker.check_model(proto, full_check=True)
    check_matches_manifest(proto, bundle.manifest)
    steps.update()
    steps.close()
    onnx.save(proto, tmp)
    tmp.replace(target)
    outputs = {SCORE: ["batch"], EMBEDDING: ["batch", bundle.scoring.dim]}
    if patch:
        outputs = {SCORE: ["batch"], ANOMALY_MAP: ["batch", h, w],
                   EMBEDDING: ["batch", bundle.patch_rows, bundle.scoring.dim]}
    update_manifest(bundle.path, {"onnx": {"file": ONNX_FILE, "opset": OPSET, "max_batch": max_batch,
                                           "inputs": {INPUT: ["batch", h, w, 3]}, "outputs": outputs}})
    log.info("wrote %s (opset %d, batch 1..%d)", target, OPSET, max_batch)
    return target
