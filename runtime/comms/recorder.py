"""The recorder: a verdict goes into the outbox with every message it owes (verdict, reject, result, Sparkplug's
channel) before anything is sent, and once stored, to each sink that shows or sends it (the camera's MQTT link,
the Sparkplug node, OPC UA, the recent list). While the disk refuses, what is lost is counted and said loudly."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from coft.runtime.comms.mqtt import camera_topic
from coft.runtime.comms.outbox import SPARKPLUG_CHANNEL, Outbox, OutboxRefused
from coft.runtime.config import BrokerConfig
from coft.runtime.line.verdict import Verdict
from coft.runtime.process.logs import Throttled
from coft.runtime.process.metrics import Metrics

log = logging.getLogger(__name__)

Sink = Callable[[Verdict], None]  # a stored verdict, to show or send; never blocks the inspector


def gap_messages(broker: BrokerConfig, camera: str, info: dict) -> list[tuple[str, bytes]]:
    """Told with the next verdict that is stored, or first in a new epoch: numbers were lost, and why (docs/plc.md)."""
    gap = {"camera": camera, "line": broker.line, **info}
    return [(camera_topic(broker, camera, "gap"), json.dumps(gap).encode())]


class Recorder:
    def __init__(self, broker: BrokerConfig, outbox: Outbox, metrics: Metrics, sparkplug: bool,
                 on_refusing: Callable[[str], None]):
        self.broker, self.outbox, self.metrics, self.sparkplug = broker, outbox, metrics, sparkplug
        self.on_refusing = on_refusing  # told once when the outbox starts refusing (the links report it)
        self.sinks: list[Sink] = []
        self.refusing = False  # the outbox cannot store verdicts (disk full)
        self.throttled = Throttled(log)

    def record(self, verdict: Verdict, latency_ms: Callable[[], float], answered_ms: Callable[[], float] | None,
               fire: bool) -> bool:
        """Store the verdict and its messages in one outbox transaction; `answered_ms` where a triggered part
        waits for its result. False when the outbox refused it (counted, logged)."""
        broker, camera = self.broker, verdict.camera

        def messages(seq: int) -> list[tuple]:
            verdict.seq, verdict.epoch, verdict.latency_ms = seq, self.outbox.epoch, latency_ms()
            payload = json.dumps(verdict.as_dict()).encode()
            out: list[tuple] = [(camera_topic(broker, camera, "verdict"), payload)]
            if self.sparkplug:  # encoded as DDATA when the node sends it
                out.append((camera, payload, SPARKPLUG_CHANNEL))
            if verdict.late:  # recorded, but the part has its answer: nothing more for the PLC
                return out
            if answered_ms is not None:
                out.append((camera_topic(broker, camera, "result"), json.dumps(verdict.answer(answered_ms())).encode()))
            if fire:
                out.append((camera_topic(broker, camera, "reject"), json.dumps(verdict.plc_reject()).encode()))
            return out

        try:
            self.outbox.put_verdict(camera, messages, verdict.reject)
        except OutboxRefused as exc:
            self.metrics.verdicts_refused.labels(camera).inc()
            self.metrics.outbox_refusing.set(1)
            self.throttled.log(logging.ERROR, "outbox", "verdicts are NOT being recorded: %s", exc)
            if not self.refusing:
                self.refusing = True
                self.on_refusing(f"verdicts are not being recorded: {exc}")
            return False
        if self.refusing:
            self.refusing = False
            self.metrics.outbox_refusing.set(0)
            self.throttled.clear("outbox")
            log.warning("outbox accepts verdicts again (%.0f verdicts were refused in all)", self.metrics.refused())
        self.metrics.verdicts.labels(camera, "unfired_reject" if not verdict.fired else verdict.verdict).inc()
        for sink in self.sinks:
            sink(verdict)
        return True
