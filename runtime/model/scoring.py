"""Gaussian anomaly scoring in numpy: the reference every accelerated path is checked against.

A part is scored by the Mahalanobis distance of its L2-normalised embedding from the
Gaussian fitted to good parts. With the precision P = L L^T (L lower-triangular, the
Cholesky factor), the distance is ||(x - mean) L||, one matrix product per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coft.runtime.model.errors import CoftError
from coft.runtime.model.tiles import Tiling

BANK_CONSTANT = "scoring.bank_t"  # the knn graph's [C, rows] bank initializer, which coft learn replaces
DEFECTS_CONSTANT = "scoring.defects_t"  # its [C, 1 + marked rows] defect rows, the zero row first


def pooled_patches(patches: int, pooling: str) -> int:
    """How many of an image's worst patches its score averages: 1 (max) or 1% of them (top1pct)."""
    return 1 if pooling == "max" else max(1, patches // 100)


def pool(patch_scores: np.ndarray, pooling: str = "max", tiling: Tiling | None = None) -> np.ndarray:
    """Image scores [N] from patch scores [N, P]: the worst patch, or the mean of the worst 1%; a tiled bundle's
    windows' patch scores [N, tiles * P] are stitched onto the frame's grid first."""
    if tiling is not None:
        patch_scores = tiling.stitched(patch_scores)
    if pooling == "max":
        return patch_scores.max(axis=1)
    top = pooled_patches(patch_scores.shape[1], pooling)
    return np.sort(patch_scores, axis=1)[:, -top:].mean(axis=1)


def l2_normalise(embeddings: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.maximum(norms, eps)


@dataclass(frozen=True)
class Gaussian:
    """Mean and precision of good-part features, with the precision's Cholesky factor.

    Global embeddings are L2-normalised before scoring (`normalised`); patch features are
    scored as they are, since their magnitude carries part of what makes a defect.
    """

    mean: np.ndarray  # [D] float32
    precision: np.ndarray  # [D, D] float32
    cholesky: np.ndarray  # [D, D] float32, lower-triangular, precision = L @ L.T
    normalised: bool = True

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of embeddings as the backbone gives them, [..., D] -> [...]."""
        if embeddings.shape[-1] != self.dim:
            raise CoftError(f"embeddings of shape {embeddings.shape} do not fit a Gaussian of dimension {self.dim}")
        x = embeddings.astype(np.float32)
        centred = (l2_normalise(x) if self.normalised else x) - self.mean
        return np.sqrt(np.sum((centred @ self.cholesky) ** 2, axis=-1))

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, precision=self.precision, cholesky=self.cholesky,
                 normalised=np.array(self.normalised))

    @classmethod
    def load(cls, path: Path) -> Gaussian:
        try:
            with np.load(path, allow_pickle=False) as data:
                normalised = bool(data["normalised"]) if "normalised" in data else True
                mean, precision, cholesky = (data[key].astype(np.float32) for key in ("mean", "precision", "cholesky"))
                gaussian = cls(mean, precision, cholesky, normalised)
        except (OSError, KeyError, ValueError) as exc:
            raise CoftError(f"{path}: not a valid Gaussian file ({exc}); retrain the bundle") from exc
        d = gaussian.dim
        if gaussian.precision.shape != (d, d) or gaussian.cholesky.shape != (d, d):
            raise CoftError(f"{path}: mean of size {d} but precision {gaussian.precision.shape}; retrain the bundle")
        return gaussian


@dataclass(frozen=True)
class MemoryBank:
    """Patch features of good parts (unit rows); a patch's score is its cosine distance to the nearest one.

    The kNN scorer: no distribution is assumed, so a handful of shots (and their rotations)
    already describe "good" patch by patch. The exported graph does the same with the bank
    as a constant (MatMul + ReduceMax); the TensorRT path with the fused nearest-neighbour kernel.

    `defects` are the worst patches of frames an operator marked as real defects: a patch
    more like one of them than like any good row scores more, by how much more (up to twice
    its distance), so the defects a line has seen stand out further above its good parts.

    `block_weights`: the rows hold the tokens of several ViT blocks side by side (each block's
    part 1/sqrt(B) of a unit row, as the backbone concatenates them). Each block then finds
    its own nearest row, and a patch's score is the blocks' distances weighted so that each
    speaks on one scale (SuperADD: a defect one block sees is not averaged away by the
    block the nearest row suits; docs/accuracy.md)."""

    features: np.ndarray  # [M, C] float32, L2-normalised rows
    defects: np.ndarray | None = None  # [K, C] float32 unit rows of marked defects, or None
    block_weights: np.ndarray | None = None  # [B] float32 summing to 1, or None: one block

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def blocks(self) -> int:
        return 1 if self.block_weights is None else len(self.block_weights)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def defect_rows(self) -> np.ndarray:
        """The defect rows with a zero row first (similarity 0: no defect pulls), as the graph's constant holds them."""
        rows = np.zeros((1, self.dim), np.float32)
        return rows if self.defects is None else np.concatenate([rows, self.defects.astype(np.float32)])

    def graph_constant(self, rows: np.ndarray) -> np.ndarray:
        """Rows [M, C] as the exported graph holds them: [C, M], or [B, C / B, M] per block."""
        if self.blocks == 1:
            return np.ascontiguousarray(rows.T, np.float32)
        return np.ascontiguousarray(rows.reshape(len(rows), self.blocks, -1).transpose(1, 2, 0), np.float32)

    def score(self, features: np.ndarray, chunk: int = 4096, leave_out: np.ndarray | None = None) -> np.ndarray:
        """1 - max cosine similarity to the bank, raised where a marked defect is nearer, [..., C] -> [...];
        features are unit vectors as the backbone gives them. `leave_out`: rows [M] bool compared with nothing
        (a frame's own rows, to judge it as if it had not given them)."""
        distances = self.block_distances(features, chunk, leave_out)
        return distances[0] if self.block_weights is None else np.tensordot(self.block_weights, distances, axes=1)

    def block_distances(self, features: np.ndarray, chunk: int = 4096, leave_out: np.ndarray | None = None
                        ) -> np.ndarray:
        """Each block's distances [B, ...] (score's, before the blocks are weighted)."""
        if features.shape[-1] != self.dim:
            raise CoftError(f"patch features of shape {features.shape} do not fit a memory bank of dimension {self.dim}")
        flat = features.reshape(-1, self.dim).astype(np.float32)
        width, out = self.dim // self.blocks, np.empty((self.blocks, len(flat)), np.float32)
        for b in range(self.blocks):
            columns = slice(b * width, (b + 1) * width)
            rows, defects = self.features[:, columns].T, self.defect_rows[:, columns].T
            for i in range(0, len(flat), chunk):
                part = flat[i:i + chunk, columns]
                sims = part @ rows
                if leave_out is not None:
                    sims[:, leave_out] = -np.inf
                out[b, i:i + chunk] = defect_pull(self.blocks * sims.max(axis=1), self.blocks * (part @ defects).max(axis=1))
        return out.reshape(self.blocks, *features.shape[:-1])

    def save(self, path: Path) -> None:
        arrays = {key: value for key, value in (("features", self.features), ("defects", self.defects),
                                                 ("block_weights", self.block_weights)) if value is not None}
        np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub takes keyword arrays for allow_pickle

    @classmethod
    def load(cls, path: Path) -> MemoryBank:
        try:
            with np.load(path, allow_pickle=False) as data:
                features = data["features"].astype(np.float32)
                defects = data["defects"].astype(np.float32) if "defects" in data else None
                weights = data["block_weights"].astype(np.float32) if "block_weights" in data else None
        except (OSError, KeyError, ValueError) as exc:
            raise CoftError(f"{path}: not a valid memory-bank file ({exc}); retrain the bundle") from exc
        if features.ndim != 2 or not len(features):
            raise CoftError(f"{path}: memory bank of shape {features.shape}, expected [patches, dim]; retrain the bundle")
        if defects is not None and (defects.ndim != 2 or defects.shape[1] != features.shape[1]):
            raise CoftError(f"{path}: defect rows of shape {defects.shape} do not fit the bank's {features.shape}; "
                            "run coft learn again")
        if weights is not None and (weights.ndim != 1 or features.shape[1] % len(weights)
                                    or not np.all(weights >= 0) or not np.isclose(weights.sum(), 1, atol=1e-4)):
            raise CoftError(f"{path}: block weights {weights} do not fit the bank's {features.shape[1]} columns or "
                            "do not sum to 1; retrain the bundle")
        return cls(features, defects, weights)


def defect_pull(best: np.ndarray, near_defect: np.ndarray) -> np.ndarray:
    """A patch's score from its best similarity to good rows and to marked defects (the zero row included, so
    never below 0): 1 - best, plus how much nearer the defect is (measured on magnetic tiles, 3 seeds, 10 shots
    and 10 marked defects: image AUROC 0.870 -> 0.876, escape at 1% false-reject 76% -> 70%; see docs/learning.md,
    Marked defects)."""
    return 1.0 - best + np.maximum(near_defect - best, 0.0)
