"""Gaussian fit and Mahalanobis scoring agree with scipy and behave with few samples; the memory bank per ViT block
holds to its definition."""

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import Gaussian, MemoryBank, l2_normalise
from coft.train.scorers.gaussian import fit_gaussian


def test_score_matches_scipy_mahalanobis():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(40, 16)) + 3
    gaussian = fit_gaussian(train)
    test = rng.normal(size=(5, 16)) + 3
    expected = [mahalanobis(l2_normalise(t), gaussian.mean, gaussian.precision) for t in test]
    np.testing.assert_allclose(gaussian.score(test.astype(np.float32)), expected, rtol=1e-4)


def test_cholesky_factorises_the_precision():
    gaussian = fit_gaussian(np.random.default_rng(2).normal(size=(30, 12)))
    np.testing.assert_allclose(gaussian.cholesky @ gaussian.cholesky.T, gaussian.precision, rtol=1e-4, atol=1e-3)
    assert np.allclose(np.triu(gaussian.cholesky, 1), 0)
    assert all(v.dtype == np.float32 for v in (gaussian.mean, gaussian.precision, gaussian.cholesky))


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", "oas"])
def test_fewer_samples_than_dimensions_still_gives_a_usable_gaussian(shrinkage):
    rng = np.random.default_rng(3)
    normal = rng.normal(size=(20, 256)) + 5
    gaussian = fit_gaussian(normal, shrinkage)
    assert np.all(np.isfinite(gaussian.precision))
    outlier = normal[:3] + rng.normal(size=(3, 256)) * 4
    assert gaussian.score(outlier).min() > gaussian.score(normal).max()


def test_bad_inputs_are_refused():
    with pytest.raises(CoftError, match="unknown shrinkage"):
        fit_gaussian(np.ones((5, 3)), "magic")
    with pytest.raises(CoftError, match="at least two"):
        fit_gaussian(np.ones((1, 3)))
    gaussian = fit_gaussian(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(CoftError, match="do not fit"):
        gaussian.score(np.ones((2, 5), np.float32))


def test_save_and_load_without_pickle(tmp_path):
    gaussian = fit_gaussian(np.random.default_rng(0).normal(size=(10, 4)))
    gaussian.save(tmp_path / "g.npz")
    loaded = Gaussian.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(loaded.cholesky, gaussian.cholesky)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CoftError, match="not a valid Gaussian"):
        Gaussian.load(tmp_path / "bad.npz")


def _blocked(rng, n: int, blocks: int = 3, width: int = 32) -> np.ndarray:
    """Rows as the ViT backbone gives them: each block's tokens unit, side by side, the row unit."""
    parts = rng.normal(size=(n, blocks, width))
    return (parts / np.linalg.norm(parts, axis=-1, keepdims=True)).reshape(n, -1).astype(np.float32) / np.sqrt(blocks)


def test_a_bank_per_block_finds_each_block_s_nearest_row_and_weighs_the_distances(tmp_path):
    """The reference the ONNX graph and the fused kernel are held to: per block, 1 - cosine to that block's nearest
    row (not the row nearest over all blocks), weighted; saved with its weights, and bad weights refused."""
    rng = np.random.default_rng(0)
    rows, patches, weights = _blocked(rng, 200), _blocked(rng, 40), np.float32([0.5, 0.3, 0.2])
    bank = MemoryBank(rows, block_weights=weights)
    per_block = [1 - (patches[:, b * 32:(b + 1) * 32] @ rows[:, b * 32:(b + 1) * 32].T * 3).max(axis=1) for b in range(3)]
    np.testing.assert_allclose(bank.score(patches), np.tensordot(weights, per_block, axes=1), atol=1e-5)
    joint = 1 - (patches @ rows.T).max(axis=1)  # one nearest row for all blocks: what a per-block search beats
    assert not np.allclose(bank.score(patches), joint, atol=1e-3)
    left = np.zeros(len(rows), bool)
    left[:100] = True  # a frame's own rows, left out: only the others are compared with
    np.testing.assert_allclose(bank.score(patches, leave_out=left), MemoryBank(rows[100:], block_weights=weights).score(patches), atol=1e-5)
    bank.save(tmp_path / "bank.npz")
    np.testing.assert_array_equal(MemoryBank.load(tmp_path / "bank.npz").block_weights, weights)
    MemoryBank(rows, block_weights=np.float32([0.5, 0.5, 0.5])).save(tmp_path / "bad.npz")
    with pytest.raises(CoftError, match="do not sum to 1"):
        MemoryBank.load(tmp_path / "bad.npz")
