"""What a threshold can promise about false rejects, from how many good frames it was set on.

If n good scores are exchangeable with the parts to come, and r of them lie at or below the
threshold, the share of future good parts above it is distributed as Beta(n + 1 - r, r) (the
coverage of an order statistic), whatever the scores' distribution. Its 95% quantile is
the false-reject rate the threshold promises with 95% confidence. The smallest rate n
frames can promise is 1 - 0.05^(1/n): 10 shots cannot promise better than 26%, 300 frames
1.0%; a target below that is an estimate, not a promise, and is stated as one.
"""

from __future__ import annotations

import functools
import math

import numpy as np

CONFIDENCE = 0.95


@functools.lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    """log(k!) for k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _tail(n: int, at_least: int, rate: float) -> float:
    """P(Binomial(n, rate) >= at_least), in log space so that n in the tens of thousands stays exact."""
    if at_least <= 0:
        return 1.0
    if rate <= 0:
        return 0.0
    if rate >= 1:
        return 1.0
    j = np.arange(at_least, n + 1)
    log_factorial = _log_factorials(n)
    logs = (log_factorial[n] - log_factorial[j] - log_factorial[n - j]
            + j * math.log(rate) + (n - j) * math.log1p(-rate))
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def false_reject_bound(n: int, below: int, confidence: float = CONFIDENCE) -> float:
    """The false-reject rate promised with `confidence` by a threshold that `below` of `n` good scores do not
    exceed: the `confidence` quantile of Beta(n + 1 - below, below)."""
    if n <= 0 or below <= 0:
        return 1.0
    below = min(below, n)
    low, high = 0.0, 1.0  # P(Beta(a, b) <= x) = P(Binomial(n, x) >= a), a = n + 1 - below
    for _ in range(60):
        mid = (low + high) / 2
        if _tail(n, n + 1 - below, mid) >= confidence:
            high = mid
        else:
            low = mid
    return high


def best_promise(n: int, confidence: float = CONFIDENCE) -> float:
    """The lowest false-reject rate n good frames can promise (the threshold at their highest score)."""
    return 1 - (1 - confidence) ** (1 / n) if n > 0 else 1.0


def frames_to_promise(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest good frames that can promise `target` with `confidence` (299 for 1% at 95%)."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - target))


def order_threshold(scores: np.ndarray, target: float, confidence: float = CONFIDENCE) -> float | None:
    """The lowest threshold among the scores that promises `target` with `confidence`, or None when there are
    too few scores for that promise."""
    ordered = np.sort(np.asarray(scores, np.float64))
    n = len(ordered)
    if n == 0 or best_promise(n, confidence) > target:
        return None
    low, high = 1, n  # the bound falls as more scores lie below: find the smallest rank that keeps the promise
    while low < high:
        mid = (low + high) // 2
        if false_reject_bound(n, mid, confidence) <= target:
            high = mid
        else:
            low = mid + 1
    return float(ordered[low - 1])


def expected_threshold(scores: np.ndarray, target: float) -> float | None:
    """Split conformal's order statistic, rank ceil((n + 1)(1 - target)): the expected share of good parts above it
    is at most `target` (an expectation over draws, not a 95% promise), or None when n < 1/target - 1."""
    ordered = np.sort(np.asarray(scores, np.float64))
    rank = math.ceil((len(ordered) + 1) * (1 - target))
    return float(ordered[rank - 1]) if 0 < rank <= len(ordered) else None


def promise(scores: np.ndarray, threshold: float, confidence: float = CONFIDENCE) -> dict:
    """What `threshold` promises on these good scores: {"false_reject_rate", "confidence", "frames"}."""
    scores = np.asarray(scores, np.float64)
    below = int((scores <= threshold).sum())
    return {"false_reject_rate": round(false_reject_bound(len(scores), below, confidence), 5),
            "confidence": confidence, "frames": int(len(scores))}


def describe(threshold: dict) -> str:
    """One line for logs, eval, `coft status` and the page: the promise, or why there is none."""
    stated = threshold.get("promise")
    if stated:
        line = (f"false-reject <= {stated['false_reject_rate']:.1%} with {stated['confidence']:.0%} confidence "
                f"from {stated['frames']} frames")
        assumed = stated.get("if_defects")
        if assumed:
            line += (f"; <= {assumed['false_reject_rate']:.1%} if the {assumed['frames']} frames scored above "
                     f"{assumed['above']:.4g} are defects (sort them on the live page's commissioning review, "
                     "one click each, or into good/ and defect/ beside the kept frames; coft learn reads them)")
        return line
    images = threshold.get("calibration_images")
    target = threshold.get("target_false_reject_rate", 0.01)
    if images:
        return (f"an estimate from {images} good images, no promise: {images} images can promise at best "
                f"false-reject <= {best_promise(images):.0%} with 95% confidence, not {target:.0%}; commission it")
    return "an estimate, no promise: commission it on the line's own frames"
