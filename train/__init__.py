"""Training: backbones/ and scorers/, COFT-AD fine-tuning, FUN-AD, thresholds, evaluation, retraining."""

__all__ = ["anomalies", "augment", "backbones", "coftad", "embed", "evaluate", "funad", "losses", "metrics", "patches",
           "pipeline", "progress", "retrain", "scorers", "shape", "threshold", "unlabelled"]
