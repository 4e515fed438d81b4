"""Choosing the accept/reject threshold, from good images alone or from labelled defects."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from coft.runtime.model.errors import CoftError
from coft.train.metrics import f1_max

log = logging.getLogger(__name__)

Fit = Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]


def calibration_scores(views: np.ndarray, fit: Fit, scored: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Scores of good views the scorer did not see, and how they were held out.

    `views` is [k images, V views, ...features]; `scored`, laid out the same way, are the
    views to score (default: `views`). With three or more images: leave one image out, fit
    on the others' views, score the left-out image's (honest, slightly pessimistic since
    the final fit has one image more). With fewer: fit on half of each image's views and
    score the other half.
    """
    scored = views if scored is None else scored
    k, n_views = views.shape[:2]
    if k >= 3:
        return np.concatenate([fit(np.delete(views, i, axis=0).reshape(-1, *views.shape[2:]))(scored[i])
                               for i in range(k)]), "leave-one-out"
    if n_views < 4:
        raise CoftError(f"{k} image(s) with {n_views} views cannot calibrate a threshold; use --views 4 or more")
    fit_views, held_views = views[:, 0::2], scored[:, 1::2]
    return fit(fit_views.reshape(-1, *views.shape[2:]))(held_views.reshape(-1, *views.shape[2:])), "held-out-views"


def good_only_threshold(views: np.ndarray, target_false_reject_rate: float, fit: Fit,
                        scored: np.ndarray | None = None) -> dict:
    """Threshold at a target false-reject rate, from `calibration_scores` of good views."""
    _check_rate(target_false_reject_rate)
    scores, method = calibration_scores(views, fit, scored)
    if method == "held-out-views":
        log.warning("threshold set from views of only %d image(s): it cannot see how parts differ, so it will reject "
                    "far more good parts than the %.1f%% target (magnetic tiles, 1 image: about half); train on 3 or "
                    "more images, or set it from labelled parts with 'coft eval --recalibrate'",
                    len(views), 100 * target_false_reject_rate)
    return threshold_from_scores(scores, method, target_false_reject_rate)


def _check_rate(target_false_reject_rate: float) -> None:
    if not 0 < target_false_reject_rate < 1:
        raise CoftError(f"target false-reject rate {target_false_reject_rate} must lie between 0 and 1, e.g. 0.01")


def threshold_from_scores(scores: np.ndarray, method: str, target_false_reject_rate: float) -> dict:
    """The quantile of good parts' held-out scores that rejects the target share of them."""
    _check_rate(target_false_reject_rate)
    value = float(np.quantile(scores, 1 - target_false_reject_rate, method="higher"))
    return {
        "value": value,
        "method": method,
        "target_false_reject_rate": target_false_reject_rate,
        "calibration_scores": len(scores),
        "calibration_score_median": float(np.median(scores)),
    }


def labelled_threshold(labels: np.ndarray, scores: np.ndarray, rule: str) -> dict:
    """Threshold from labelled good and defect scores: 'f1' (F1-max) or 'escape=R' (at most R of defects pass)."""
    if len(np.unique(labels)) != 2:
        raise CoftError("recalibration needs both good and defective images in the data folder")
    if rule == "f1":
        f1, value = f1_max(labels, scores)
        return {"value": value, "method": "labelled-f1-max", "f1": f1}
    if rule.startswith("escape="):
        try:
            rate = float(rule.split("=", 1)[1])
        except ValueError:
            rate = -1.0
        if not 0 <= rate < 1:
            raise CoftError(f"--recalibrate {rule}: the escape rate must be a number in [0, 1), e.g. escape=0.01")
        defect_scores = np.sort(scores[labels == 1])
        # Pass at most `rate` of the defects: threshold just below the (rate)-quantile of defect scores.
        passed = int(np.floor(rate * len(defect_scores)))
        value = float(np.nextafter(defect_scores[passed], -np.inf))
        return {"value": value, "method": "labelled-escape-rate", "target_escape_rate": rate}
    raise CoftError(f"--recalibrate {rule!r}: use 'f1' or 'escape=RATE' (e.g. escape=0.01)")


def held_out_rates(labels: np.ndarray, scores: np.ndarray, rule: str, folds: int = 5, seed: int = 0) -> dict:
    """False-reject and escape of a labelled threshold on parts it was not fitted on (stratified k-fold): the
    rates on the very images it was fitted to flatter it, most of all for F1-max."""
    folds = min(folds, int((labels == 0).sum()), int((labels == 1).sum()))
    if folds < 2:
        raise CoftError("held-out rates need at least 2 good and 2 defective images")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), int)
    for kind in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == kind))
        fold[members] = np.arange(len(members)) % folds
    rejected = np.zeros(len(labels), bool)
    for f in range(folds):
        held = fold == f
        rejected[held] = scores[held] > labelled_threshold(labels[~held], scores[~held], rule)["value"]
    return {"false_reject_rate": float(rejected[labels == 0].mean()), "escape_rate": float((~rejected[labels == 1]).mean()),
            "folds": folds}
