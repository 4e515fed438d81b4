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


def detection_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    both = len(np.unique(labels)) == 2
    f1, f1_threshold = f1_max(labels, scores) if both else (float("nan"), float("nan"))
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "ap": float(average_precision_score(labels, scores)) if both else float("nan"),
        "f1_max": f1,
        "f1_max_threshold": f1_threshold,
    }


def per_type_auroc(labels: np.ndarray, scores: np.ndarray, types: list[str]) -> dict[str, float]:
    """AUROC of each defect type against all good images ('good' is the type of label 0)."""
    out = {}
    for t in sorted(set(types) - {"good"}):
        mask = np.array([ty in ("good", t) for ty in types])
        out[t] = detection_metrics(labels[mask], scores[mask])["auroc"]
    return out
