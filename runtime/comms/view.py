"""What the plant's clients (the live page, OPC UA) are given of the line: a read-only view and the few
controls an operator or a PLC may use. Protocols: the composition root (runtime/pipeline.py) provides them, and
no client ever holds the runtime itself."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from coft.runtime.config import RuntimeConfig
from coft.runtime.line.evidence import Evidence
from coft.runtime.line.review import Review
from coft.runtime.line.thresholds import ThresholdState
from coft.runtime.line.verdict import Verdict


class LineView(Protocol):
    config: RuntimeConfig
    cameras: list[str]
    recent: dict[str, deque[Verdict]]  # per camera, the last verdicts stored
    evidence: Evidence | None
    harvest: Evidence | None

    @property
    def views(self) -> dict[str, tuple]:
        """Per camera, (frame, anomaly map, verdict) last scored: the live image."""

    @property
    def model_id(self) -> str: ...

    @property
    def thresholds(self) -> ThresholdState: ...

    def threshold_of(self, camera: str) -> float: ...

    def verdict_counts(self, camera: str) -> dict:
        """Accepts, rejects and unfired rejects so far."""

    def origin(self, camera: str) -> tuple[int, int]:
        """Where the camera's frames start in its full picture (its ROI's corner)."""

    def status(self) -> dict:
        """What /api/status and coft status show."""

    def review(self) -> Review:
        """The commissioning review of the model running, or a one-line CoftError saying why there is none."""


class LineControls(Protocol):
    def set_threshold(self, camera: str, value: str, via: str) -> dict:
        """The guarded threshold path (bounds, AUDIT line, state published); `via` names who asked."""

    def trigger(self, camera: str, part_id: str) -> None:
        """A part to inspect, as an MQTT trigger would register it (the same limits)."""

    def acknowledge_new_epoch(self, via: str) -> dict:
        """An operator has seen why the outbox started a new epoch."""

    def learn_from_review(self, via: str) -> str:
        """Operators have sorted the whole commissioning review: learn again with their word; what it does, one line."""
