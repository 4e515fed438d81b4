"""Detection metrics for scores where higher means more anomalous, and labels 1 = defect."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that reaches it."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    """False-reject rate (good parts rejected) and escape rate (defects passed) at a threshold (or one per part)."""
    rejected = scores > threshold
    good, bad = labels == 0, labels == 1
    return {
        "false_reject_rate": float(rejected[good].mean()) if good.any() else float("nan"),
        "escape_rate": float((~rejected[bad]).mean()) if bad.any() else float("nan"),
    }


def escape_at_false_reject(labels: np.ndarray, scores: np.ndarray, rate: float) -> float:
    """The share of defects passed by the threshold that rejects at most `rate` of these good parts: the
    oracle operating point (the best any threshold can do there; a line's own threshold does worse)."""
    good, bad = scores[labels == 0], scores[labels == 1]
    if not len(good) or not len(bad):
        return float("nan")
    return float((bad <= np.quantile(good, 1 - rate, method="higher")).mean())


def detection_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max, and what a line lives with: escape at 1% and at 5% false-reject (oracle)."""
    both = len(np.unique(labels)) == 2
    f1, f1_threshold = f1_max(labels, scores) if both else (float("nan"), float("nan"))
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "ap": float(average_precision_score(labels, scores)) if both else float("nan"),
        "f1_max": f1,
        "f1_max_threshold": f1_threshold,
        "escape_at_1pct_frr": escape_at_false_reject(labels, scores, 0.01),
        "escape_at_5pct_frr": escape_at_false_reject(labels, scores, 0.05),
    }


def per_type_auroc(labels: np.ndarray, scores: np.ndarray, types: list[str]) -> dict[str, float]:
    """AUROC of each defect type against all good images ('good' is the type of label 0)."""
    out = {}
    for t in sorted(set(types) - {"good"}):
        mask = np.array([ty in ("good", t) for ty in types])
        out[t] = detection_metrics(labels[mask], scores[mask])["auroc"]
    return out
