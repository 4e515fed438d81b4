"""Greedy coreset (k-centre, as PatchCore does) in numpy: training caps its bank with it, and so does a box that
grows its bank from its own frames (runtime/learning.py), where there is no torch."""

from __future__ import annotations

import numpy as np

PROJECTION_DIM = 128  # coreset distances on a random projection, as PatchCore does


def greedy_coreset(features: np.ndarray, cap: int, seed: int = 0, keep: np.ndarray | None = None,
                   progress=None) -> np.ndarray:
    """Indices of at most `cap` rows chosen farthest-first, on a random projection; the rows in `keep` first.

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
    first = np.asarray(keep if keep is not None and len(keep) else [rng.integers(len(z))], np.int64)[:cap]
    picked, count, per_pass = [first], len(first), max(1, cap // 512)
    if progress:
        progress(count)
    def closer(centres: np.ndarray) -> None:  # squared distances to the new centres, the row's own norm added last
        np.minimum(nearest, (norms[centres][None, :] - 2 * (z @ z[centres].T)).min(axis=1) + norms, out=nearest)
    for start in range(0, len(first), 4096):  # the kept rows, a block at a time
        closer(first[start:start + 4096])
    nearest[first] = -1.0  # chosen rows never come back
    while count < cap:
        take = min(per_pass, cap - count)
        centres = np.argpartition(nearest, -take)[-take:] if take < len(nearest) else np.arange(len(nearest))
        picked.append(centres)
        count += take
        if progress:
            progress(take)
        closer(centres)
        nearest[centres] = -1.0
    return np.sort(np.concatenate(picked))
