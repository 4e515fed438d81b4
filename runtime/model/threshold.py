"""A threshold fitted on the line's own frames, unlabelled and mostly good (FUN-AD's premise).

Good parts' scores are tight, defects' spread to the right, and a line may well have a
third of its parts defective. On a log scale (scores are distances with a long right
tail), a median and MAD are refitted on the frames within TRIM_Z spreads above the
centre until they settle (the spread corrected for the cut), so the defects stop
pulling them; the threshold is where a normal with that centre and spread leaves the
target share of good parts above it, and frames beyond the trim are the suspects.
Chosen on bench/operating_point.py (ELPV and magnetic tiles, 3 seeds, 300 frames: it
met 3 of the 4 targets, the most of the fits kept in FITS); docs/accuracy.md gives the figures.

The threshold is an order statistic's (runtime/model/promise.py) on the promise pool, the frames
within PROMISE_Z spreads of the centre: a cut far enough out that good parts are rarely beyond
it, so frames there are taken for defects, and any defect inside only makes it more cautious.
Where the pool is big enough to promise the target (about 300 for 1% at 95% confidence) the
default fit takes the lowest order statistic that does ("conformal"); with fewer, split
conformal's (the target met in expectation). What it states as its promise counts every
frame, since "rarely" is not "never" (a rare look of good parts lies beyond the cut too), and
beside it what holds if the frames beyond are defects (bench/operating_point.py measures both).
A part seen in several frames counts once (frames thinned by part id where they have one).

Frames too few to promise the target (fewer than 299 for 1%) leave the fit a normal's guess at the tail, which on
an elongated-part line at 100 frames sat below the bundle's threshold and tripled its false rejects. There the fit
and the bundle's threshold are each judged on frames they were not fitted on (two folds of alternate frames), and
the fit is taken only where it rejects no more of them beyond the target than the bundle's threshold does
(held_out_choice; docs/learning.md gives the figures).
"""

from __future__ import annotations

import logging
from statistics import NormalDist

import numpy as np

from coft.runtime.model.errors import CoftError
from coft.runtime.model.promise import expected_threshold, frames_to_promise, order_threshold, promise

log = logging.getLogger(__name__)

MIN_FRAMES = 100  # below this a 1% tail is a guess
TRIM_Z = 2.0
PROMISE_Z = 3.5  # a normal's share beyond it is 0.02%: frames there are taken for defects by the fit
MAD_TO_SIGMA = 1.4826


def _truncated_mad(z: float) -> float:
    """1.4826 x MAD of a unit normal cut at +z: what the trimmed fit's spread shrinks to, to be undone."""
    unit = NormalDist()
    cut = np.array([unit.inv_cdf(u) for u in np.linspace(0, unit.cdf(z), 20001)[1:-1]])
    return MAD_TO_SIGMA * float(np.median(np.abs(cut - np.median(cut))))


TRUNCATED_MAD = _truncated_mad(TRIM_Z)


def _robust(log_scores: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(log_scores))
    spread = MAD_TO_SIGMA * float(np.median(np.abs(log_scores - centre)))
    return centre, max(spread, 1e-6)


def _trimmed(log_scores: np.ndarray) -> tuple[float, float]:
    """Median and MAD refitted on the scores within TRIM_Z spreads above the centre, until they settle."""
    centre, spread = _robust(log_scores)
    for _ in range(20):
        kept = log_scores[log_scores <= centre + TRIM_Z * spread]
        new_centre, new_spread = _robust(kept)
        new_spread /= TRUNCATED_MAD
        if abs(new_centre - centre) < 1e-9 and abs(new_spread - spread) < 1e-9:
            break
        centre, spread = new_centre, new_spread
    return centre, spread


def _right_side(log_scores: np.ndarray) -> tuple[float, float]:
    """The trimmed centre, and a spread read from the scores between it and the trim only: the good parts'
    upper side, which is the side the threshold cuts (good scores are often skewed to the left)."""
    centre, spread = _trimmed(log_scores)
    upper = log_scores[(log_scores > centre) & (log_scores <= centre + TRIM_Z * spread)] - centre
    if len(upper) < 10:
        return centre, spread
    unit = NormalDist()
    half_median = unit.inv_cdf(0.5 + (unit.cdf(TRIM_Z) - 0.5) / 2)  # median of a unit normal's (0, TRIM_Z] part
    return centre, max(float(np.median(upper)) / half_median, 1e-6)


def _normal(centre_spread: tuple[float, float], target: float) -> float:
    centre, spread = centre_spread
    return float(np.exp(centre + NormalDist().inv_cdf(1 - target) * spread))


def _trimmed_quantile(scores: np.ndarray, target: float) -> float:
    logs = np.log(scores)
    centre, spread = _trimmed(logs)
    return float(np.quantile(scores[logs <= centre + TRIM_Z * spread], 1 - target, method="higher"))


def in_pool(scores: np.ndarray, good: np.ndarray | None = None) -> np.ndarray:
    """Which frames a promise is stated on: all but those beyond PROMISE_Z spreads of the good parts' fit, except
    frames an operator sorted as good (`good`), which always count."""
    logs = np.log(scores)
    centre, spread = _trimmed(logs)
    kept = logs <= centre + PROMISE_Z * spread
    return kept if good is None else kept | good


def promise_pool(scores: np.ndarray, good: np.ndarray | None = None) -> np.ndarray:
    return scores[in_pool(scores, good)]


def _conformal(scores: np.ndarray, target: float, good: np.ndarray | None = None) -> float:
    """The lowest order statistic of the promise pool that promises the target, where the pool is big enough;
    else split conformal's, which meets the target in expectation (a normal misjudges a heavy good tail: on
    magnetic tiles, 285 frames, it rejected 7% of good parts for a 1% target); else the trimmed normal."""
    pool = promise_pool(scores, good)
    for fit in (order_threshold, expected_threshold):
        value = fit(pool, target)
        if value is not None:
            return value
    return _normal(_trimmed(np.log(scores)), target)


FITS = {"conformal": _conformal,
        "trimmed-normal": lambda scores, target: _normal(_trimmed(np.log(scores)), target),
        "right-side-normal": lambda scores, target: _normal(_right_side(np.log(scores)), target),
        "median-mad-normal": lambda scores, target: _normal(_robust(np.log(scores)), target),
        "trimmed-quantile": _trimmed_quantile}


def reference_median(threshold: dict) -> float | None:
    """Where good parts scored when the threshold was set (training's held-out views, or commissioning)."""
    value = threshold.get("calibration_score_median") or threshold.get("score_median")
    return float(value) if value and 0 < value < threshold["value"] else None


def suspects(scores: np.ndarray, z: float = TRIM_Z) -> np.ndarray:
    """Which frames lie beyond `z` spreads of the good parts' fit (the trim by default): the ones not to learn from."""
    logs = np.log(np.asarray(scores, np.float64))
    centre, spread = _trimmed(logs)
    return logs > centre + z * spread


def held_out_choice(scores: np.ndarray, target: float, fitted: float, bundle: float,
                    good: np.ndarray | None = None) -> dict:
    """The fit (`fitted`, on every frame) or the bundle's threshold, by what each delivers on frames it was not
    fitted on: the fit refitted on alternate frames and judged on the others, both ways round, against the
    bundle's threshold on the same frames (those in the promise pool: frames beyond it are taken for defects by
    both). The fit is kept where it rejects no more of them beyond the target than the bundle's threshold does;
    a lower fit is never taken for being lower."""
    pooled = in_pool(scores, good)
    alternate = np.arange(len(scores)) % 2 == 0
    fit_rejects = 0
    for fold in (alternate, ~alternate):
        value = _conformal(scores[fold], target, None if good is None else good[fold])
        fit_rejects += int((scores[~fold & pooled] > value).sum())
    judged = int(pooled.sum())
    rates = {"fit": fit_rejects / judged, "bundle": float((scores[pooled] > bundle).sum()) / judged}
    kept = "fit" if max(rates["fit"] - target, 0) <= max(rates["bundle"] - target, 0) else "bundle"
    return {"kept": kept, "fit": fitted, "bundle": bundle, "frames": judged,
            "fit_false_reject": round(rates["fit"], 5), "bundle_false_reject": round(rates["bundle"], 5)}


def fit_threshold(scores: np.ndarray, target: float, fit: str = "conformal", good: np.ndarray | None = None,
                  bundle: float | None = None) -> dict:
    """The commissioning threshold and what it was fitted on (recorded in the new revision's manifest); `good`
    marks frames an operator sorted as good parts; `bundle` is the threshold the line ran before, which frames too
    few to promise the target keep where it is shown to deliver more nearly what the fit would (held_out_choice)."""
    scores = np.asarray(scores, np.float64)
    finite = np.isfinite(scores)
    scores, good = scores[finite], None if good is None else np.asarray(good, bool)[finite]
    if len(scores) < MIN_FRAMES:
        raise CoftError(f"commissioning needs at least {MIN_FRAMES} frames to set a {target:.0%} false-reject "
                        f"threshold, got {len(scores)}; run it longer (--frames)")
    if (scores <= 0).any():
        raise CoftError("commissioning expects positive scores (distances); this bundle's scorer gives others")
    logs = np.log(scores)
    centre, spread = _trimmed(logs)
    beyond = logs > centre + TRIM_Z * spread
    value = _conformal(scores, target, good) if fit == "conformal" else FITS[fit](scores, target)
    method, checked = f"commissioning-{fit}", None
    if bundle is not None and fit == "conformal" and len(scores) < frames_to_promise(target):
        checked = held_out_choice(scores, target, value, bundle, good)
        if checked["kept"] == "bundle":
            value, method = bundle, "commissioning-kept-bundle"
    return {"value": value, "method": method, "target_false_reject_rate": target,
            "frames": int(len(scores)), "suspects_dropped": int(beyond.sum()), "score_median": float(np.exp(centre)),
            "promise": stated_promise(scores, value, good), **({"held_out": checked} if checked else {})}


def stated_promise(scores: np.ndarray, value: float, good: np.ndarray | None = None) -> dict:
    """What `value` promises counting every frame as a good part, which holds whatever the frames are (a defect
    among them only makes it more cautious); and, where the fit took the frames beyond the promise pool for
    defects, what it promises if they are (`if_defects`). Only the first is a promise: good parts with a rare look
    of their own lie out there too (the demo's ELPV draw: a run of mono cells, 3% of the good ones, scored where
    defects do), and on ELPV, 300 frames at 5% defects, the second held in 84% of 150 draws, the first in 99%."""
    stated = promise(scores, value)
    pool = promise_pool(scores, good)
    if len(pool) < len(scores):
        stated["if_defects"] = {"frames": int(len(scores) - len(pool)), "above": float(pool.max()),
                                "false_reject_rate": promise(pool, value)["false_reject_rate"]}
    return stated


def review_queue(scores: np.ndarray, value: float) -> np.ndarray:
    """The frames an operator is asked to sort, worst first: those the threshold rejects. The stated promise counts
    each as a false reject until someone says it is a defect, so they are what keeps it loose."""
    above = np.flatnonzero(scores > value)
    return above[np.argsort(-scores[above], kind="stable")]


def reviewed_promise(scores: np.ndarray, value: float, good: np.ndarray, defect: np.ndarray) -> dict:
    """What `value` promises once an operator sorted some frames: those sorted as defects are no good parts and
    leave the count, those sorted good always count; the rest count as good parts, as before any sorting."""
    counted = ~defect
    return stated_promise(scores[counted], value, good[counted])


def spread_ratio(scores: np.ndarray, threshold: dict) -> float | None:
    """How much wider the frames' scores spread than the good parts' did at training (log scale), or None
    when the bundle's threshold does not say where its good scores lay."""
    median = reference_median(threshold)
    if median is None:
        return None
    trained = np.log(threshold["value"] / median) / NormalDist().inv_cdf(1 - threshold.get("target_false_reject_rate", 0.01))
    return _trimmed(np.log(scores))[1] / trained
