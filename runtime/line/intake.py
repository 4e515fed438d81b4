"""Frames and triggers into the line: which frame is inspected, for which part, and the fail-safe answer a
triggered part gets when its verdict cannot be in by its deadline.

A continuous camera's frames wait in the queue (the oldest dropped and counted when the engine is behind; a
replay waits for room instead); a trigger camera's first frame after a trigger is that part's, the others are
not inspected. A trigger, from MQTT or a PLC's write, is refused in one line when it cannot be served."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from coft.runtime.cameras.sources import CameraThread, Frame
from coft.runtime.config import RuntimeConfig
from coft.runtime.line.failsafe import FailSafe, Part
from coft.runtime.line.inspector import FrameQueue, InForce, Record, resize_ahead
from coft.runtime.line.verdict import Verdict
from coft.runtime.model.errors import CoftError
from coft.runtime.process.metrics import Metrics

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, config: RuntimeConfig, metrics: Metrics, record: Record, in_force: Callable[[], InForce],
                 stop_event: threading.Event, on_camera_state: Callable[[str, bool], None]):
        """`record`: the recorder's (fail-safe rejects are stored like any verdict); `in_force`: what the
        inspector judges with now (its model and thresholds)."""
        self.config, self.metrics, self.record, self.in_force = config, metrics, record, in_force
        self.stop_event = stop_event
        self.queue = FrameQueue(config.queue_size, self._dropped)
        self.cameras = {c.name: CameraThread(c, self._deliver(c.name, c.trigger), stop_event, on_camera_state)
                        for c in config.cameras}  # capture threads by camera name
        self.failsafe = FailSafe(config.control.trigger_deadline_ms / 1000, self._failsafe_reject, self.delivering,
                                 stop_event) if any(c.trigger for c in config.cameras) else None
        self.started = False  # the cameras start once the engine has warmed up

    def _deliver(self, camera: str, triggered: bool) -> Callable[[Frame], None]:
        def deliver(frame: Frame) -> None:
            self.metrics.frames_in.labels(camera).inc()
            if triggered:  # the first frame after a trigger is that part's; others are not inspected
                frame.part = self.failsafe.frame_for(camera, frame.frame_id) if self.failsafe else None
                if frame.part is None:
                    return
                frame.part_id = frame.part.part_id or None
            if not triggered and self.cameras[camera].replay:
                self.queue.wait_for_room(camera, self.stop_event)
            if triggered or self.queue.has_room(camera):  # a part's frame is always inspected; others maybe not
                resize_ahead(frame, self.in_force().bundle.input_size)
            self.queue.put(frame)
        return deliver

    def trigger_from_plc(self, camera: str, part_id: str) -> None:
        """A part id from a controller (an OPC UA write): the limits an MQTT trigger has, then the same path."""
        if len(part_id.encode()) > self.config.control.trigger_max_bytes or not part_id.isprintable():
            raise CoftError(f"part id must be printable text of at most {self.config.control.trigger_max_bytes} bytes")
        self.trigger(camera, part_id)

    def trigger(self, camera: str, part_id: str) -> None:
        if not part_id:
            raise CoftError("part id is empty; a trigger names the part it is for (e.g. A-1017)")
        if camera not in self.cameras:
            raise CoftError(f"trigger for camera {camera!r}, which this runtime does not have; cameras: "
                            f"{', '.join(self.cameras)}")
        if not self.cameras[camera].camera.trigger:
            raise CoftError(f"camera {camera} inspects every frame (trigger: false in line.yaml); part {part_id} "
                            "was not registered")
        if self.failsafe is not None:
            self.failsafe.trigger(camera, part_id)

    def delivering(self, camera: str) -> bool:
        return self.cameras[camera].state == "delivering"

    def start(self) -> None:
        for camera in self.cameras.values():
            camera.start()
        if self.failsafe:
            self.failsafe.start()
        self.started = True

    def health(self, stall_s: float) -> str | None:  # noqa: ARG002  (the parts' one signature: runtime/pipeline.py)
        """A capture thread or the fail-safe's that died, or None."""
        for camera in self.cameras.values() if self.started else ():
            if not camera.is_alive() and not camera.ended.is_set():
                return f"camera {camera.camera.name}: its capture thread died"
        if self.failsafe and self.started and not self.failsafe.is_alive():
            return "the fail-safe thread that answers triggered parts died"
        return None

    def _failsafe_reject(self, part: Part, reason: str) -> None:
        """A triggered part whose verdict could not be in by its deadline: a reject that says why, stored and
        published like any verdict (the same seq space, the same outbox)."""
        now = self.in_force()
        verdict = Verdict(part.camera, self.config.broker.line, part.frame_id, part.part_id, part.triggered_at, None,
                          now.threshold.value(part.camera), True, now.bundle.model_id, reason=reason, failsafe=True)
        self.record(verdict, part.waited_ms, part.waited_ms, True)
        self.metrics.failsafe_rejects.labels(part.camera, reason).inc()

    def _dropped(self, frame: Frame) -> None:
        self.metrics.frames_dropped.labels(frame.camera).inc()
        log.debug("camera %s: dropped frame %d (inference behind)", frame.camera, frame.frame_id)
