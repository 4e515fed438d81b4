"""A verdict on one part, typed from judging to every sink, and its wire encodings: the MQTT JSON (the outbox,
evidence and harvest store it; `Verdict.from_json` is the one way back), the PLC's reject and result messages.
Sparkplug's metrics and OPC UA's node values are read through one table of PLC fields, PLC_FIELDS, each under its
protocol's name and type beside its server (tests/test_runtime_parts.py pins all three)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


@dataclass
class Verdict:
    camera: str
    line: str
    frame_id: int | None  # None: a fail-safe reject for a part no frame came for
    part_id: str | None
    capture_ts: float  # Unix time of the frame (or, for a fail-safe reject, of the trigger)
    score: float | None  # None: the model could not judge the part (or the fail-safe answered)
    threshold: float
    reject: bool
    model_id: str
    reason: str | None = None  # why a reject is one without a score: frame_too_small, deadline, ...
    failsafe: bool = False  # the fail-safe answered: no frame was judged in time
    commissioning: bool = False  # judged while commissioning set the threshold
    late: bool = False  # judged after the fail-safe had answered the part: recorded, nothing more sent
    fired: bool = True  # False: judged a reject while commissioning with rejects off; nothing went to the line
    defect: dict | None = None  # {"box": [x, y, w, h] in camera pixels, "peak": score}
    seq: int | None = None  # the camera's sequence number, given when the outbox stores it
    epoch: str | None = None  # the outbox's epoch: a seq is unique within it (docs/plc.md)
    latency_ms: float | None = None  # capture (or trigger) to the outbox

    @property
    def verdict(self) -> str:
        return "reject" if self.reject else "accept"

    def as_dict(self) -> dict:
        """The verdict topic's JSON (docs/plc.md, MQTT topics): optional keys only where they say something."""
        captured_at = datetime.fromtimestamp(self.capture_ts, timezone.utc).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"camera": self.camera, "line": self.line, "frame_id": self.frame_id,
                               "part_id": self.part_id, "captured_at": captured_at, "capture_ts": self.capture_ts,
                               "score": self.score, "threshold": self.threshold, "verdict": self.verdict,
                               "model_id": self.model_id}
        for key, value in (("reason", self.reason), ("failsafe", self.failsafe), ("commissioning", self.commissioning),
                           ("late", self.late)):
            if value:
                out[key] = value
        if not self.fired:
            out["fired"] = False
        if self.defect is not None:
            out["defect"] = self.defect
        out["seq"], out["epoch"], out["latency_ms"] = self.seq, self.epoch, self.latency_ms
        return out

    @classmethod
    def from_json(cls, wire: dict) -> Verdict:
        """The verdict a stored JSON (as_dict's) says; keys added by others (an operator's mark) are left aside."""
        return cls(wire["camera"], wire["line"], wire["frame_id"], wire["part_id"], wire["capture_ts"], wire["score"],
                   wire["threshold"], wire["verdict"] == "reject", wire["model_id"], reason=wire.get("reason"),
                   failsafe=wire.get("failsafe", False), commissioning=wire.get("commissioning", False),
                   late=wire.get("late", False), fired=wire.get("fired", True), defect=wire.get("defect"),
                   seq=wire.get("seq"), epoch=wire.get("epoch"), latency_ms=wire.get("latency_ms"))

    @property
    def box(self) -> list[int] | None:
        """The defect's box in camera pixels, where the map found one."""
        return None if self.defect is None else self.defect["box"]

    def plc_reject(self) -> dict:
        """The reject topic's message: what a PLC needs to divert the part."""
        out: dict[str, Any] = {"seq": self.seq, "epoch": self.epoch, "part_id": self.part_id,
                               "frame_id": self.frame_id, "score": self.score}
        if self.reason:
            out["reason"] = self.reason
        if self.box is not None:
            out["box"] = self.box
        return out

    def answer(self, answered_ms: float) -> dict:
        """The result topic's message: the one answer a PLC waits for after a trigger, and how long it took."""
        return {"seq": self.seq, "epoch": self.epoch, "part_id": self.part_id, "frame_id": self.frame_id,
                "result": self.verdict, "reason": reason_for_plc(self.reason, self.reject) or None, "score": self.score,
                "answered_ms": answered_ms}


def reason_for_plc(reason: str | None, reject: bool) -> str:
    """Why a part was rejected, as every PLC protocol says it: the frame's or the fail-safe's reason, else
    'score'; '' for an accept."""
    return reason or ("score" if reject else "")


# What a PLC reads of a verdict, by field: OPC UA's variables and Sparkplug's metrics are these under their own
# names and types (comms/opcua.py VERDICT_NODES, comms/sparkplug DEVICE_METRICS). None: no value.
PLC_FIELDS: dict[str, Callable[[Verdict], Any]] = {
    "seq": lambda v: v.seq,
    "epoch": lambda v: v.epoch,
    "part_id": lambda v: v.part_id,
    "frame_id": lambda v: v.frame_id,
    "result": lambda v: v.verdict,
    "reject": lambda v: v.reject,
    "reason": lambda v: reason_for_plc(v.reason, v.reject),
    "score": lambda v: v.score,
    "threshold": lambda v: v.threshold,
    "box": lambda v: json.dumps(v.box),
    "latency_ms": lambda v: v.latency_ms,
    "capture_ts": lambda v: v.capture_ts,
    "json": lambda v: json.dumps(v.as_dict()),
}


def plc_field(name: str, none: Any = None) -> Callable[[Verdict | dict], Any]:
    """A field's reader, with the protocol's stand-in where the verdict has no value (an OPC UA variable cannot
    be null: a part id it lacks reads ''). It reads a verdict, or its stored JSON (what the outbox gives back)."""
    read = PLC_FIELDS[name]

    def field(verdict: Verdict | dict) -> Any:
        value = read(verdict if isinstance(verdict, Verdict) else Verdict.from_json(verdict))
        return none if value is None and none is not None else value
    return field
