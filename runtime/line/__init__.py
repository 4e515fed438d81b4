"""What happens to a frame's score at the line: thresholds, commissioning, learning, drift, the fail-safe, evidence.
It never imports comms/: the composition root (runtime/pipeline.py) joins the two."""

__all__ = ["commissioning", "drift", "evidence", "failsafe", "learning", "thresholds"]
