"""Greedy coreset (k-centre, as PatchCore does) in numpy: training caps its bank with it, and so does a box that
grows its bank from its own frames (runtime/line/learning.py), where there is no torch."""

from __future__ import annotations

import numpy as np

PROJECTION_DIM = 128  # coreset distances on a random projection, as PatchCore does


def greedy_coreset(features: np.ndarray, cap: int, seed: int = 0, progress=None) -> np.ndarray:
    """Indices of at most `cap` rows chosen farthest-first, on a random projection.

    Large caps take the `cap // 512` farthest rows per pass and update the distances with
    one matrix product, so a pass reads the bank once for many picks (82,000 patches to
    16,384: 512 passes instead of 16,384); small caps are exact greedy. `progress(n)` is
    told how many rows each pass picked."""
    if cap <= 0 or len(features) <= cap:
        return np.arange(len(features))
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((features.shape[1], PROJECTION_DIM), dtype=np.float32) / PROJECTION_DIM ** 0.5
    z = np.asarray(features, np.float32) @ projection
    norms = np.einsum("ij,ij->i", z, z)
    nearest = np.full(len(z), np.inf, np.float32)
    centres = np.array([rng.integers(len(z))])
    picked, count, per_pass = [centres], 1, max(1, cap // 512)
    if progress:
        progress(count)
    while True:
        # squared distances to the new centres, the row's own norm added after the min
        np.minimum(nearest, (norms[centres][None, :] - 2 * (z @ z[centres].T)).min(axis=1) + norms, out=nearest)
        nearest[centres] = -1.0  # chosen rows never come back
        if count >= cap:
            return np.sort(np.concatenate(picked))
        take = min(per_pass, cap - count)
        centres = np.argpartition(nearest, -take)[-take:]
        picked.append(centres)
        count += take
        if progress:
            progress(take)
