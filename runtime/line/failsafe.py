"""The fail-safe handshake for triggered inspection: every part id gets an answer by its deadline.

A trigger registers the part with a deadline (`control.trigger_deadline_ms` after it
arrived). The first frame the camera captures after the trigger is inspected for it.
Whichever comes first answers the part, exactly once:
- its verdict (accept or reject), when scored before the deadline;
- a reject with a reason, when not: `camera_down` at once if the camera is not delivering,
  `no_frame` if no frame came after the trigger, `timeout` if one came but was not scored
  in time (inference stalled or behind). A verdict that comes later is still recorded,
  marked late, and changes nothing for the part.
When the runtime itself is gone nobody can answer: the PLC rejects by default once the
heartbeat counter stops moving (see docs/plc.md).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coft.runtime.process.logs import Throttled

log = logging.getLogger(__name__)

@dataclass
class Part:
    camera: str
    part_id: str
    triggered_at: float  # time.time(), for the answer's timestamp
    deadline: float  # time.monotonic()
    triggered_mono: float = field(default_factory=time.monotonic)  # for the answer's latency
    frame_id: int | None = None  # the frame inspected for it, once one came
    answered: bool = False
    order: int = field(default_factory=itertools.count().__next__)  # ties on the heap

    def waited_ms(self) -> float:
        """Trigger to now, on the monotonic clock (the wall clock may step back under NTP)."""
        return round((time.monotonic() - self.triggered_mono) * 1000, 2)


class FailSafe(threading.Thread):
    """Registers triggered parts and answers, with a fail-safe reject, every one whose verdict is not in by its
    deadline. `answer(part, reason)` stores and publishes that reject; `camera_up(name)` says if a camera delivers."""

    def __init__(self, deadline_s: float, answer: Callable[[Part, str], None], camera_up: Callable[[str], bool],
                 stop: threading.Event):
        super().__init__(name="failsafe", daemon=True)
        self.deadline_s, self.answer, self.camera_up, self.stop_event = deadline_s, answer, camera_up, stop
        self.heap: list[tuple[float, int, Part]] = []
        self.waiting: dict[str, list[Part]] = {}  # camera -> parts still without a frame, oldest first
        self.lock = threading.Condition()
        self.throttled = Throttled(log)  # a camera that is down for a whole shift fails every part

    def trigger(self, camera: str, part_id: str) -> Part:
        part = Part(camera, part_id, time.time(), time.monotonic() + self.deadline_s)
        if not self.camera_up(camera):
            part.answered = True
            self.throttled.log(logging.WARNING, (camera, "camera_down"), "camera %s: trigger for part %s while the "
                               "camera is not delivering; answered with a fail-safe reject (camera_down)", camera, part_id)
            self._fail(part, "camera_down")
            return part
        with self.lock:
            self.waiting.setdefault(camera, []).append(part)
            heapq.heappush(self.heap, (part.deadline, part.order, part))
            self.lock.notify()
        return part

    def frame_for(self, camera: str, frame_id: int) -> Part | None:
        """The oldest part of this camera still waiting for a frame, now given this one; None if none waits."""
        with self.lock:
            waiting = self.waiting.get(camera)
            while waiting:
                part = waiting.pop(0)
                if not part.answered:
                    part.frame_id = frame_id
                    return part
        return None

    def claim(self, part: Part) -> bool:
        """The verdict path asks to answer the part: True once, if the fail-safe has not answered it already."""
        with self.lock:
            if part.answered:
                return False
            part.answered = True
            return True

    def _fail(self, part: Part, reason: str) -> None:
        try:
            self.answer(part, reason)
        except Exception as exc:  # the outbox refused it (disk full): the heartbeat and the log must say so
            log.error("camera %s: could not record the fail-safe reject of part %s (%s): %s", part.camera,
                      part.part_id, reason, exc)

    def run(self) -> None:
        while not self.stop_event.is_set():
            due = []
            with self.lock:
                now = time.monotonic()
                while self.heap and self.heap[0][0] <= now:
                    part = heapq.heappop(self.heap)[2]
                    if not part.answered:
                        part.answered = True
                        due.append(part)
                wait = min(self.heap[0][0] - now, 0.5) if self.heap else 0.5
                if not due:
                    self.lock.wait(wait)
            for part in due:
                reason = "timeout" if part.frame_id is not None else \
                    "no_frame" if self.camera_up(part.camera) else "camera_down"
                self.throttled.log(logging.WARNING, (part.camera, reason), "camera %s: part %s not judged within %.0f "
                                   "ms (%s); answered with a fail-safe reject", part.camera, part.part_id,
                                   self.deadline_s * 1000, reason)
                self._fail(part, reason)
