"""Gaussian fit and Mahalanobis scoring agree with scipy and behave with few samples."""

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import Gaussian, l2_normalise
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
