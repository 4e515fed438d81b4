"""Training: backbones/ and scorers/, COFT-AD fine-tuning, FUN-AD, thresholds, evaluation, retraining."""
