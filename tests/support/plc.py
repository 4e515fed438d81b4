"""A simulated PLC for triggered inspection: triggers parts at a line rate over MQTT and judges, for each
part, whether the line could act on it in time.

A part is *answered* when its `result` arrives within the deadline (plus `slack_s` for the broker's hops);
otherwise it is *defaulted* when the heartbeat went stale while the PLC waited for it (a PLC watching the
counter rejects it by default); anything else is *late* or *silent*: a part that would have gone down the
line unjudged.
"""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt


class SimulatedPlc:
    def __init__(self, port: int, line: str = "l1", prefix: str = "coft"):
        self.base = f"{prefix}/{line}"
        self.sent: dict[str, tuple[str, float]] = {}  # part id -> (camera, monotonic time sent)
        self.results: dict[str, list[tuple[float, dict]]] = {}  # part id -> [(monotonic time received, result)]
        self.beats: list[tuple[float, int]] = []  # (monotonic time received, counter)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"plc-sim-{port}-{time.time_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"{self.base}/+/result", 1),
                                                                     (f"{self.base}/+/heartbeat", 0)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, client, userdata, message):
        now = time.monotonic()
        payload = json.loads(message.payload)
        with self.lock:
            if message.topic.endswith("/heartbeat"):
                self.beats.append((now, payload["beat"]))
            else:
                self.results.setdefault(payload["part_id"], []).append((now, payload))

    def trigger(self, camera: str, part_id: str) -> None:
        with self.lock:
            self.sent[part_id] = (camera, time.monotonic())
        self.client.publish(f"{self.base}/{camera}/trigger", part_id, qos=1)

    def run_line(self, camera: str, rate: float, parts: int, prefix: str) -> list[str]:
        """Trigger `parts` parts at `rate` per second, on a fixed schedule (no drift)."""
        names, start = [], time.monotonic()
        for i in range(parts):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            names.append(f"{prefix}-{i:04d}")
            self.trigger(camera, names[-1])
        return names

    def wait_for_answers(self, parts: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(p in self.results for p in parts):
                    return
            time.sleep(0.05)

    def judge(self, parts: list[str], deadline_s: float, heartbeat_timeout_s: float,
              slack_s: float = 0.25) -> dict[str, list[str]]:
        """Each part as 'answered', 'late', 'defaulted' or 'silent' (see the module's docstring). A PLC declares
        the inspector dead once no heartbeat came for `heartbeat_timeout_s`; a part is defaulted when that
        happened between its trigger and its deadline plus that timeout, i.e. while the PLC was waiting for it."""
        verdicts: dict[str, list[str]] = {"answered": [], "late": [], "defaulted": [], "silent": []}
        with self.lock:
            beats = sorted(t for t, _ in self.beats)
            for part in parts:
                sent = self.sent[part][1]
                answers = self.results.get(part, [])
                if answers and answers[0][0] <= sent + deadline_s + slack_s:
                    verdicts["answered"].append(part)
                elif self._went_stale(beats, sent, sent + deadline_s + heartbeat_timeout_s, heartbeat_timeout_s):
                    verdicts["defaulted"].append(part)
                else:
                    verdicts["late" if answers else "silent"].append(part)
        return verdicts

    @staticmethod
    def _went_stale(beats: list[float], start: float, end: float, timeout: float) -> bool:
        """Whether, at some moment in [start, end], no heartbeat had arrived for `timeout` seconds."""
        previous = max((t for t in beats if t <= start), default=float("-inf"))
        for beat in (t for t in beats if start < t <= end):
            if beat - previous >= timeout:
                return True
            previous = beat
        return end - previous >= timeout

    def latencies_ms(self, parts: list[str]) -> list[float]:
        """Trigger sent to first result received, per answered part, as the PLC sees it."""
        with self.lock:
            return [(self.results[p][0][0] - self.sent[p][1]) * 1000 for p in parts if p in self.results]

    def answers(self, part: str) -> list[dict]:
        with self.lock:
            return [result for _, result in self.results.get(part, [])]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
