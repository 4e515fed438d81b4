"""Training: backbones, COFT-AD fine-tuning, Gaussian scoring, evaluation."""
