"""Fitting the Gaussian of good-part embeddings with a shrinkage covariance.

A few dozen views in 1280 dimensions give a singular sample covariance; Ledoit-Wolf (or
OAS) shrinkage toward a scaled identity makes it invertible and well conditioned.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import OAS, LedoitWolf

from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import Gaussian, l2_normalise
from coft.train.threshold import Fit

SHRINKAGE = {"ledoit-wolf": LedoitWolf, "oas": OAS}


def fit_gaussian(embeddings: np.ndarray, shrinkage: str = "ledoit-wolf", normalise: bool = True) -> Gaussian:
    """Fit mean and precision to embeddings [n, D], L2-normalised first unless `normalise` is off."""
    if shrinkage not in SHRINKAGE:
        raise CoftError(f"unknown shrinkage {shrinkage!r}; choose one of {', '.join(SHRINKAGE)}")
    if len(embeddings) < 2:
        raise CoftError("need at least two embeddings to fit a Gaussian; use more views (--views) or more images")
    x = embeddings.astype(np.float64)
    x = l2_normalise(x) if normalise else x
    estimator = SHRINKAGE[shrinkage](assume_centered=False).fit(x)
    try:
        precision = np.linalg.inv(estimator.covariance_)
    except np.linalg.LinAlgError:
        raise CoftError(f"the {len(x)} embeddings do not vary enough to fit a Gaussian (singular covariance); "
                        "train on more good images or with more --views") from None
    precision = (precision + precision.T) / 2
    cholesky = np.linalg.cholesky(precision)
    return Gaussian(estimator.location_.astype(np.float32), precision.astype(np.float32), cholesky.astype(np.float32),
                    normalise)


def global_fit(shrinkage: str = "ledoit-wolf") -> Fit:
    """Fit on embedding views [n, D]; the scorer maps views [m, D] to scores [m]."""
    return lambda views: fit_gaussian(views, shrinkage).score
