"""What happens to a frame at the line: intake (which frame, for which part), the inspector, the typed verdict,
thresholds, commissioning, learning and the revisions they make, drift, the fail-safe, evidence. It never imports
comms/ or box/: the composition root (runtime/pipeline.py) joins them."""
