"""`coft run`: camera frames -> score -> verdict -> durable outbox -> MQTT, for months.

One capture thread per camera feeds the frame queue: per camera, bounded, drop-oldest and
counted, with triggered frames (a PLC waits on their deadline) served first. The inspector
thread scores what is waiting, writes each verdict (and, for a reject, the PLC message) to
the outbox before anything is published, and wakes the camera's MQTT sender.

The main loop is the supervisor: it feeds the systemd watchdog only while every camera
thread and MQTT link is alive and frames that wait get verdicts, and otherwise ends the
process with exit status 2 and the reason, so systemd restarts it; an engine that never
returns shows in /api/status, the metrics and the retained status first. Nothing stalls
silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np

from coft.runtime.box.install import switch
from coft.runtime.cameras.sources import CameraThread, Frame
from coft.runtime.comms.metrics import Metrics
from coft.runtime.comms.mqtt import CameraLink, camera_topic
from coft.runtime.comms.outbox import SPARKPLUG_CHANNEL, Outbox, OutboxRefused, Reserve, hold_line
from coft.runtime.config import RuntimeConfig
from coft.runtime.engines import open_engine
from coft.runtime.line.commissioning import Commissioning
from coft.runtime.line.drift import DriftWatch
from coft.runtime.line.evidence import Evidence
from coft.runtime.line.failsafe import FailSafe, Part
from coft.runtime.line.thresholds import ThresholdState
from coft.runtime.logs import LastProblems, Throttled
from coft.runtime.model.bundle import commissioned_revision, load_bundle, revise
from coft.runtime.model.errors import CoftError
from coft.runtime.model.heatmap import annotate, defect_box
from coft.runtime.model.images import resize_to_input
from coft.runtime.model.promise import describe
from coft.runtime.watchdog import Watchdog

log = logging.getLogger(__name__)
RECENT = 300  # verdicts per camera kept for the live view, its chart and latency percentiles
MIN_FRAME_SIDE = 16  # pixels: below this a frame holds no part to judge (a broken ROI or camera mode)
BEAT_GRACE_S = 5.0  # the heartbeat's counter stands still once the inspector has not turned for this long


class FrameQueue:
    """Frames waiting for the engine, per camera: bounded, drop-oldest, and it counts what it drops.

    A triggered frame has a PLC waiting on its deadline: triggered frames are served first, in a batch of
    their own, and never make room for continuous ones; continuous cameras take turns."""

    def __init__(self, size: int, on_drop):
        self.size, self.on_drop = size, on_drop
        self.triggered: deque[Frame] = deque()
        self.continuous: dict[str, deque[Frame]] = {}
        self.turn = 0
        self.ready = threading.Condition()

    def put(self, frame: Frame) -> None:
        with self.ready:
            waiting = self.triggered if frame.part is not None else self.continuous.setdefault(frame.camera, deque())
            if len(waiting) >= self.size:
                self.on_drop(waiting.popleft())
            waiting.append(frame)
            self.ready.notify()

    def __len__(self) -> int:
        return len(self.triggered) + sum(len(q) for q in self.continuous.values())

    def take(self, max_frames: int, timeout: float) -> list[Frame]:
        with self.ready:
            if not len(self):
                self.ready.wait(timeout)
            if self.triggered:
                return [self.triggered.popleft() for _ in range(min(max_frames, len(self.triggered)))]
            queues = list(self.continuous.values())
            if not queues:
                return []
            self.turn = (self.turn + 1) % len(queues)
            order = queues[self.turn:] + queues[:self.turn]
            taken: list[Frame] = []
            while len(taken) < max_frames and any(order):
                taken += [q.popleft() for q in islice((q for q in order if q), max_frames - len(taken))]
            return taken


class Unhealthy(CoftError):
    """A part of the runtime stopped working; the process ends so that systemd restarts it."""


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one (systemd's default soft limit is 1,024): frames,
    the outbox, broker links and viewers all need descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open files: soft limit raised from %d to %d", soft, hard)


class Runtime:
    def __init__(self, config: RuntimeConfig, commission: bool = False):
        """`commission`: fit the threshold again even where the bundle was commissioned (`coft commission`)."""
        self.config = config
        self.line_lock = hold_line(config.outbox.path)  # first: a second runtime must not touch anything
        raise_open_files_limit()
        self.bundle = load_bundle(config.bundle, config.trusted_keys)
        self.engine = open_engine(self.bundle, config.backend, config.threads)
        log.info("model %s on %s, threshold %.6g", self.bundle.model_id, self.engine.name, self.bundle.threshold)
        names = [c.name for c in config.cameras]
        self._adopt(self.bundle, names)
        if not config.control.threshold:
            log.info("set/threshold is off (control.threshold: false): thresholds change only with a new bundle")
        self.learns = bool(config.commissioning and config.commissioning.learn
                           and self.bundle.manifest.get("scorer") == "knn")  # grows its bank after commissioning
        self.metrics = Metrics(names, sparkplug=config.sparkplug is not None, opcua=config.opcua is not None,
                               learning=self.learns)
        self.outbox = Outbox(config.outbox.path, config.outbox.max_messages, config.outbox.fsync,
                             int(config.outbox.max_mb * 2**20), self._gap,
                             lambda camera, n: self.metrics.outbox_dropped.labels(camera).inc(n))
        self.reserve = Reserve(config.outbox.path, int(config.outbox.reserve_mb * 2**20))
        self.evidence = Evidence(config.evidence, "evidence", self.reserve) if config.evidence else None
        self.harvest = Evidence(config.harvest, "harvest", self.reserve) if config.harvest else None
        self.stop_event = threading.Event()
        self.queue = FrameQueue(config.queue_size, self._dropped)
        self.links = {name: CameraLink(config.broker, name, self.outbox,
                                       (lambda payload, cam=name: self.threshold.set(cam, payload))
                                       if config.control.threshold else None,
                                       self._trigger, self._broker_state, config.control.trigger_max_bytes,
                                       line_trigger=name == names[0])
                      for name in names}
        for link in self.links.values():
            link.on_refused = self._broker_refused
        self.camera = {c.name: CameraThread(c, self._deliver(c.name, c.trigger), self.stop_event, self._camera_state)
                       for c in config.cameras}  # capture threads by camera name
        self.sparkplug = None
        if config.sparkplug:
            from coft.runtime.comms.sparkplug import SparkplugNode  # protobuf only on boxes that speak Sparkplug
            self.sparkplug = SparkplugNode(  # MQTT 3.1.1: over 5 its QoS 0 DDATA showed a seq gap, cause not yet found
                config.broker.model_copy(update={"protocol": "3.1.1"}), config.sparkplug, self.outbox, names, config.outbox.path.parent / "sparkplug-bdseq",
                lambda camera, value: self.set_threshold(camera, repr(value), "sparkplug"), self.threshold_of,
                self.verdict_counts, lambda: self.bundle.model_id)
            self.sparkplug.on_refused = self._broker_refused
        self.opcua = None
        if config.opcua:
            from coft.runtime.comms.opcua import OpcUaServer  # asyncua only on boxes that serve OPC UA
            self.opcua = OpcUaServer(self, config.opcua)
        self.failsafe = FailSafe(config.control.trigger_deadline_ms / 1000, self._failsafe_reject, self._delivering,
                                 self.stop_event) if any(c.trigger for c in config.cameras) else None
        self.beats = 0  # the heartbeat counter a PLC watches
        self.inspector = threading.Thread(target=self._inspect_loop, name="inspector", daemon=True)
        self.inspector_turned = time.monotonic()  # the inspector's loop came round (the heartbeat's counter follows it)
        self.in_flight = 0  # frames the engine is scoring now
        self.drained_at = 0.0  # when the inspector last found nothing waiting
        self.warmed = threading.Event()
        self.cameras_started = False
        self.stalled: str | None = None  # why frames wait with no verdict, once that has lasted stall_s
        self.started = time.time()
        self.watchdog = Watchdog()
        self.rois = {c.name: c.roi for c in config.cameras}
        self.recent = {name: deque(maxlen=RECENT) for name in names}
        self.views: dict[str, tuple] = {}  # camera -> (frame, anomaly map, verdict) last scored: the live image
        self.problems = LastProblems(names)
        self.web = None
        if config.web:
            from coft.runtime.comms.web import WebServer  # aiohttp only on boxes that serve the page
            self.web = WebServer(self, config.web)
        self.throttled = Throttled(log)
        self.refusing = False  # the outbox cannot store verdicts (disk full)
        self.last_inspection_ok = time.monotonic()
        self.commissioning = self._commissioning(names, commission)
        self.learning: dict | None = None  # the learner's state after commissioning (status)
        self._grown = None  # (bundle, engine) the learner made, for the inspector to take

    def _commissioning(self, cameras: list[str], again: bool) -> Commissioning | None:
        """Commission only a bundle not yet commissioned for these cameras (or when asked again): a restart, by
        the watchdog, a crash or a reboot, resumes inspection at once with the commissioned threshold."""
        plan = self.config.commissioning
        if not plan:
            return None
        if not again:
            done = self.bundle.manifest.get("commissioning") or {}
            if set(cameras) <= set(done.get("cameras", [])):
                log.info("commissioning: %s was commissioned for %s on %d frames; inspecting at once at its threshold "
                         "(%.6g); 'coft commission' fits it again", self.bundle.model_id, ", ".join(cameras),
                         done.get("frames", 0), self.bundle.threshold)
                return None
            revision = commissioned_revision(self.bundle.path, self.bundle.model_id, cameras)
            if revision is not None:
                self._adopt(load_bundle(revision, self.config.trusted_keys), cameras)
                log.warning("commissioning: %s was already commissioned as %s; running that (threshold %.6g). Point "
                            "bundle: in the config at it", self.config.bundle, revision, self.bundle.threshold)
                return None
        if plan.rejects:
            log.info("commissioning: the first %d frames set the threshold; meanwhile rejects fire at the bundle's "
                     "threshold (%.6g), flagged commissioning", plan.frames, self.bundle.threshold)
        else:
            log.warning("commissioning: REJECTS ARE OFF until %d frames have set the threshold "
                        "(commissioning.rejects: false): every part passes meanwhile", plan.frames)
        return Commissioning(plan.frames, plan.target_false_reject_rate,
                             self.config.outbox.path.parent / f"commissioning-{self.bundle.model_id}"
                             if plan.keep_frames else None, self.reserve)

    def _adopt(self, bundle, cameras: list[str]) -> None:
        """Judge with this bundle from now on: its threshold (or the live ones saved for it) and its drift reference."""
        self.bundle = bundle
        self.threshold = ThresholdState(self.config.state_path, bundle.threshold, bundle.model_id, cameras,
                                        self.config.control)
        self.drift = DriftWatch(bundle.manifest["threshold"])

    # -- frames in ---------------------------------------------------------------------------
    def _deliver(self, camera: str, triggered: bool):
        def deliver(frame: Frame) -> None:
            self.metrics.frames_in.labels(camera).inc()
            if triggered:  # the first frame after a trigger is that part's; others are not inspected
                frame.part = self.failsafe.frame_for(camera, frame.frame_id)
                if frame.part is None:
                    return
                frame.part_id = frame.part.part_id or None
            self.queue.put(frame)
        return deliver

    def trigger_from_plc(self, camera: str, part_id: str) -> None:
        """A part id from a controller (an OPC UA write): the limits an MQTT trigger has, then the same path."""
        if len(part_id.encode()) > self.config.control.trigger_max_bytes or not part_id.isprintable():
            raise CoftError(f"part id must be printable text of at most {self.config.control.trigger_max_bytes} bytes")
        self._trigger(camera, part_id)

    def _trigger(self, camera: str, part_id: str) -> None:
        if not part_id:
            raise CoftError("part id is empty; a trigger names the part it is for (e.g. A-1017)")
        if camera not in self.links:
            raise CoftError(f"trigger for camera {camera!r}, which this runtime does not have; cameras: "
                            f"{', '.join(self.links)}")
        if not self.camera[camera].camera.trigger:
            raise CoftError(f"camera {camera} inspects every frame (trigger: false in line.yaml); part {part_id} "
                            "was not registered")
        self.failsafe.trigger(camera, part_id)

    def threshold_of(self, camera: str) -> float:
        return self.threshold.value(camera)  # through self: commissioning replaces the threshold state

    def _sparkplug(self, camera: str, verdict: dict) -> list[tuple[str, bytes, str]]:
        """The verdict for the Sparkplug node's channel of the outbox (encoded as DDATA when it is sent)."""
        return [(camera, json.dumps(verdict).encode(), SPARKPLUG_CHANNEL)] if self.sparkplug else []

    def _delivering(self, camera: str) -> bool:
        return self.camera[camera].state == "delivering"

    def _failsafe_reject(self, part: Part, reason: str) -> None:
        """A triggered part whose verdict could not be in by its deadline: a reject that says why, stored and
        published like any verdict (the same seq space, the same outbox)."""
        broker = self.config.broker
        verdict = {"camera": part.camera, "line": broker.line, "frame_id": part.frame_id, "part_id": part.part_id,
                   "captured_at": datetime.fromtimestamp(part.triggered_at, timezone.utc).isoformat(timespec="milliseconds"),
                   "capture_ts": part.triggered_at, "score": None, "threshold": self.threshold.value(part.camera),
                   "verdict": "reject", "reason": reason, "failsafe": True, "model_id": self.bundle.model_id}

        def messages(seq: int) -> list[tuple[str, bytes]]:
            verdict["seq"] = seq
            verdict["latency_ms"] = part.waited_ms()
            plc = {"seq": seq, "part_id": part.part_id, "frame_id": part.frame_id, "score": None, "reason": reason}
            return [(camera_topic(broker, part.camera, "verdict"), json.dumps(verdict).encode()),
                    (camera_topic(broker, part.camera, "reject"), json.dumps(plc).encode()),
                    self._result(part, verdict)] + self._sparkplug(part.camera, verdict)

        self.outbox.put_verdict(part.camera, messages, True)
        self.metrics.failsafe_rejects.labels(part.camera, reason).inc()
        self._stored(verdict)

    def _gap(self, camera: str, first: int, last: int) -> list[tuple[str, bytes]]:
        """Told with the next verdict that is stored: these sequence numbers were lost, and why."""
        gap = {"camera": camera, "line": self.config.broker.line, "missing": [first, last], "count": last - first + 1,
               "reason": "the outbox could not store these verdicts (disk full)"}
        return [(camera_topic(self.config.broker, camera, "gap"), json.dumps(gap).encode())]

    def _stored(self, verdict: dict) -> None:
        """A verdict is in the outbox: count it, wake whoever sends it, and show it (recent list, OPC UA)."""
        camera = verdict["camera"]
        self.metrics.verdicts.labels(camera, "unfired_reject" if verdict.get("fired") is False else verdict["verdict"]).inc()
        self.links[camera].notify()
        if self.sparkplug:
            self.sparkplug.notify()
        if self.opcua:
            self.opcua.publish(verdict)
        self.recent[camera].append(verdict)

    def _result(self, part: Part, verdict: dict) -> tuple[str, bytes]:
        """The one answer a PLC waits for after a trigger: accept or reject, why, and how long it took."""
        answer = {"seq": verdict["seq"], "part_id": part.part_id, "frame_id": part.frame_id,
                  "result": verdict["verdict"], "reason": verdict.get("reason") or
                  ("score" if verdict["verdict"] == "reject" else None),
                  "score": verdict["score"], "answered_ms": part.waited_ms()}
        return camera_topic(self.config.broker, part.camera, "result"), json.dumps(answer).encode()

    def _dropped(self, frame: Frame) -> None:
        self.metrics.frames_dropped.labels(frame.camera).inc()
        log.debug("camera %s: dropped frame %d (inference behind)", frame.camera, frame.frame_id)

    def _broker_refused(self, link: str, what: str) -> None:  # noqa: ARG002  (the link logged what)
        self.metrics.broker_refused.labels(link).inc()

    def _camera_state(self, camera: str, up: bool) -> None:
        self.metrics.camera_up.labels(camera).set(int(up))
        if self.sparkplug:
            self.sparkplug.camera_state(camera, up)
        self.metrics.camera_ended.labels(camera).set(int(self.camera[camera].ended.is_set()))

    def _broker_state(self, camera: str, up: bool) -> None:
        self.metrics.broker_up.labels(camera).set(int(up))

    # -- scoring -----------------------------------------------------------------------------
    def inspect(self, frames: list[Frame]) -> None:
        if self._grown:  # the learner's model, taken here between two batches
            (grown, engine), self._grown = self._grown, None
            self._run(grown, engine, self.bundle.threshold, "learn")
        usable, unusable = [], []
        for frame in frames:
            (usable if min(frame.image.shape[:2]) >= MIN_FRAME_SIDE else unusable).append(frame)
        for frame in unusable:  # not a good part: a reject that says why
            self.throttled.log(logging.ERROR, ("small", frame.camera), "camera %s: a %dx%d frame is too small to "
                               "inspect (at least %d pixels a side); rejecting such frames: check the camera's mode "
                               "or cameras.roi", frame.camera, frame.image.shape[1], frame.image.shape[0],
                               MIN_FRAME_SIDE)
            self._verdict(frame, math.nan, self.threshold.value(frame.camera), reason="frame_too_small")
        frames = usable
        if not frames:
            return
        batch = np.stack([resize_to_input(f.image, self.bundle.input_size) for f in frames])
        started = time.perf_counter()
        result = self.engine.infer(batch)
        self.metrics.inference.observe(time.perf_counter() - started)
        maps = result.maps if result.maps is not None else [None] * len(frames)
        for frame, score, score_map in zip(frames, result.scores, maps):
            self._verdict(frame, float(score), self.threshold.value(frame.camera), score_map)
        self.metrics.outbox_depth.set(self.outbox.depth())

    def defect(self, frame: Frame, score_map: np.ndarray, threshold: float, reject: bool) -> dict:
        """Where the defect is, in the camera frame's pixels: the box around the hottest connected region of
        the map above the threshold and above half the peak (receptive fields spread a strong defect wide).
        A rejected frame whose smoothed map stays below the threshold gets the box of its hottest 10%."""
        if score_map.shape != self.bundle.input_size:
            raise CoftError(f"anomaly map of {score_map.shape} does not match the model input {self.bundle.input_size}; "
                            "re-export the bundle with 'coft export'")
        peak = float(score_map.max())
        box = defect_box(score_map, max(threshold, 0.5 * peak) if peak > threshold or not reject else 0.9 * peak)
        if box is not None:
            (ih, iw), (fh, fw) = self.bundle.input_size, frame.image.shape[:2]
            x0, y0 = self.origin(frame.camera)
            box = [round(box[0] * fw / iw) + x0, round(box[1] * fh / ih) + y0,
                   round(box[2] * fw / iw), round(box[3] * fh / ih)]
        return {"box": box, "peak": round(float(score_map.max()), 4)}

    def _verdict(self, frame: Frame, score: float, threshold: float, score_map: np.ndarray | None = None,
                 reason: str | None = None) -> None:
        judged = math.isfinite(score)
        if not judged and reason is None:  # a part the model could not judge is not a good part
            self.throttled.log(logging.ERROR, "score", "camera %s: the model returned a score of %s; rejecting such "
                               "parts (check the bundle and the engine)", frame.camera, score)
        reject = not judged or score > threshold
        if judged:
            median = self.drift.add(frame.camera, score)
            if median is not None:
                self.metrics.score_median.labels(frame.camera).set(median)
        commissioning = bool(self.commissioning) and not self.commissioning.complete
        if commissioning:
            self.commissioning.add(frame.camera, frame.frame_id, frame.image, score, frame.part_id)
        broker = self.config.broker
        part = frame.part
        late = part is not None and not self.failsafe.claim(part)  # the fail-safe answered this part already
        verdict = {
            "camera": frame.camera, "line": broker.line, "frame_id": frame.frame_id, "part_id": frame.part_id,
            "captured_at": datetime.fromtimestamp(frame.captured_at, timezone.utc).isoformat(timespec="milliseconds"),
            "capture_ts": frame.captured_at, "score": round(score, 6) if judged else None, "threshold": threshold,
            "verdict": "reject" if reject else "accept", "model_id": self.bundle.model_id,
            **({"reason": reason} if reason else {}),
            **({"commissioning": True} if commissioning else {}), **({"late": True} if late else {}),
        }
        fire = reject and not (commissioning and not self.config.commissioning.rejects)
        if reject and not fire:
            verdict["fired"] = False  # judged a reject, but nothing went to the line: counted and drawn apart
        if score_map is not None and judged:
            verdict["defect"] = self.defect(frame, score_map, threshold, reject)

        def messages(seq: int) -> list[tuple[str, bytes]]:
            verdict["seq"] = seq
            verdict["latency_ms"] = round((time.monotonic() - frame.captured_mono) * 1000, 2)
            out = [(camera_topic(broker, frame.camera, "verdict"), json.dumps(verdict).encode())]
            out += self._sparkplug(frame.camera, verdict)
            if late:  # recorded, but the part has its answer: nothing more for the PLC
                return out
            if part is not None:
                out.append(self._result(part, verdict))
            if fire:  # while commissioning with commissioning.rejects: false, nothing is fired at the line
                plc = {"seq": seq, "part_id": frame.part_id, "frame_id": frame.frame_id, "score": verdict["score"],
                       **({"reason": reason} if reason else {})}
                if "defect" in verdict:
                    plc["box"] = verdict["defect"]["box"]
                out.append((camera_topic(broker, frame.camera, "reject"), json.dumps(plc).encode()))
            return out

        if not self._store(frame, messages, reject):
            return
        self.metrics.latency.observe(time.monotonic() - frame.captured_mono)
        self._stored(verdict)
        self.views[frame.camera] = (frame, score_map, verdict)  # rendered by the web page's thread, if anyone looks
        if self.harvest and self.harvest.wanted(reject):
            self.harvest.save(frame.image, verdict)  # as the camera gave it: what retraining needs
        if self.evidence and self.evidence.wanted(reject):
            self.evidence.save(frame.image, verdict, annotate(frame.image, verdict, score_map, self.origin(frame.camera)))

    def origin(self, camera: str) -> tuple[int, int]:
        """Where the camera's frames start in its full picture (the ROI's corner): verdict boxes are given in those pixels."""
        roi = self.rois[camera]
        return (roi[0], roi[1]) if roi else (0, 0)

    def _store(self, frame: Frame, messages, reject: bool) -> bool:
        """Put a verdict in the outbox; while the disk refuses, count what is lost and say so loudly."""
        try:
            self.outbox.put_verdict(frame.camera, messages, reject)
        except OutboxRefused as exc:
            self.metrics.verdicts_refused.labels(frame.camera).inc()
            self.metrics.outbox_refusing.set(1)
            self.throttled.log(logging.ERROR, "outbox", "verdicts are NOT being recorded: %s", exc)
            if not self.refusing:
                self.refusing = True
                for link in self.links.values():
                    link.report("outbox", f"verdicts are not being recorded: {exc}")
            return False
        if self.refusing:
            self.refusing = False
            self.metrics.outbox_refusing.set(0)
            self.throttled.clear("outbox")
            log.warning("outbox accepts verdicts again (%.0f verdicts were refused in all)",
                        sum(self.metrics.registry.get_sample_value("coft_verdicts_refused_total", {"camera": c}) or 0
                            for c in self.links))
        return True

    def finish_commissioning(self) -> None:
        """Fit the line's threshold, write it as a new bundle revision, switch to it in place (no restart,
        no verdict lost) and, where `bundle:` is a box's `current` link, point that at it for the next start."""
        commissioning, self.commissioning = self.commissioning, None
        old = self.bundle.manifest["threshold"]
        try:
            fitted = commissioning.fit(old)
        except CoftError as exc:
            log.error("commissioning: %s", exc)
            return
        log.info("commissioning: %d frames, %d suspects dropped, threshold %.6g -> %.6g: %s\n%s", fitted["frames"],
                 fitted["suspects_dropped"], old["value"], fitted["value"], describe(fitted),
                 commissioning.histogram(old["value"], fitted["value"]))
        try:
            revision = revise(self.bundle.path.resolve(), {"threshold": fitted, "commissioning": {
                "frames": fitted["frames"], "suspects_dropped": fitted["suspects_dropped"],
                "quantile": 1 - fitted["target_false_reject_rate"], "cameras": sorted(self.links),
                "frames_folder": str(commissioning.folder) if commissioning.folder else None}})
        except (CoftError, OSError) as exc:
            log.error("commissioning: cannot write the new bundle revision beside %s (%s); keeping the old threshold",
                      self.bundle.path, exc)
            return
        self._run(load_bundle(revision, self.config.trusted_keys), self.engine, old["value"], "commissioning")
        if self.learns and commissioning.folder:
            self._start_learning(revision, commissioning.folder)

    def _start_learning(self, revision, frames) -> None:
        threading.Thread(target=self._learn, args=(revision, frames), name="learner", daemon=True).start()

    def _resume_learning(self) -> None:
        """A start that finds the bundle commissioned but not yet learned from its commissioning frames (the runtime
        stopped while learning, or learning failed) learns now: a restart must not drop the step silently."""
        if not self.learns:
            return
        if "learning" in self.bundle.manifest:
            self.learning = {"state": "done", "revision": self.bundle.model_id}
            self.metrics.learning.state("done")
            return
        done = self.bundle.manifest.get("commissioning") or {}
        folder = Path(done["frames_folder"]) if done.get("frames_folder") else None
        if self.commissioning is not None or folder is None:
            self.metrics.learning.state("waiting")
            return
        if not folder.is_dir():
            log.error("learn: %s was commissioned but its bank was never grown, and its commissioning frames (%s) are "
                      "gone; run 'coft learn' on a folder of the line's frames", self.bundle.model_id, folder)
            self.learning = {"state": "failed", "error": f"commissioning frames gone: {folder}"}
            self.metrics.learning.state("failed")
            return
        log.warning("learn: %s was commissioned but its bank was not yet grown from %s (the runtime stopped, or "
                    "learning failed, before); growing it now", self.bundle.model_id, folder)
        self._start_learning(self.bundle.path, folder)

    def _run(self, bundle, engine, old: float, why: str) -> None:
        """Judge with this revision from now on (between two batches: no verdict lost), say who owns each camera's
        threshold, and where `bundle:` is a box's `current` link, point that at it for the next start."""
        operators = self.threshold.operators()
        self.engine = engine
        self._adopt(bundle, list(self.links))
        for camera in self.links:
            self._owner_after(why, camera, old, bundle.threshold, operators.get(camera))
        for link in self.links.values():
            link.publish_state(self.threshold.describe(link.camera, self.threshold.sources[link.camera]))
        if self.config.bundle.is_symlink():
            try:
                switch(self.config.bundle, bundle.path)
            except OSError as exc:
                log.error("%s: cannot point %s at %s (%s); the next start runs the old bundle", why,
                          self.config.bundle, bundle.path, exc.strerror)
        log.warning("%s done: now running %s (threshold %.6g); it is in %s%s", why, self.bundle.model_id,
                    self.bundle.threshold, bundle.path,
                    "" if self.config.bundle.is_symlink() else "; point bundle: in the config at it for the next start")

    def _learn(self, revision, frames) -> None:
        """After commissioning: the bank grown from the commissioning frames (coft learn), in the background at
        a low priority (nice 10: about a tenth of a core a busy inspector leaves, so it still ends) and on one
        thread; the inspector takes the new model between batches. A failure keeps the commissioned model and
        says why."""
        from coft.runtime.line.learning import learn
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        self.learning = {"state": "learning", "frames": str(frames)}
        self.metrics.learning.state("learning")
        log.info("learn: growing the bank from the %s frames in %s, in the background", self.bundle.model_id, frames)
        try:
            grown = load_bundle(learn(revision, frames, threads=1), self.config.trusted_keys)
            self._grown = (grown, open_engine(grown, self.config.backend, self.config.threads))
        except Exception as exc:  # noqa: BLE001  (whatever it was, the line inspects on with the commissioned model)
            log.error("learn: %s; inspecting on with the commissioned bank", exc)
            self.learning = {"state": "failed", "error": str(exc)[:300]}
            self.metrics.learning.state("failed")
            return
        self.learning = {"state": "done", "revision": grown.model_id, **{
            k: grown.manifest["learning"][k] for k in ("frames", "frames_in_bank", "suspects", "rows_added")}}
        self.metrics.learning.state("done")

    def _owner_after(self, why: str, camera: str, bundle: float, fitted: float,
                     operator: tuple[float, str] | None) -> None:
        """Say who owns the camera's threshold now that commissioning (or learning) fitted one, with all three
        values: an operator's stays in force until an operator sets the fitted one (unless
        commissioning.keep_operator_threshold is false)."""
        if operator is None:
            log.info("%s: camera %s: threshold %.6g (fitted by %s; the previous bundle's was %.6g, no operator had "
                     "set one)", why, camera, fitted, why, bundle)
            return
        value, source = operator
        if not self.config.commissioning.keep_operator_threshold:
            log.warning("%s: camera %s: the fitted threshold %.6g replaces the operator's %.6g (%s; the previous "
                        "bundle's was %.6g): commissioning.keep_operator_threshold is false",
                        why, camera, fitted, value, source, bundle)
            return
        try:
            self.threshold.keep(camera, value, f"{source}, kept over {why}'s {fitted:.6g}")
        except CoftError as exc:
            log.warning("%s: camera %s: the operator's threshold %.6g (%s) cannot stay (%s); the fitted %.6g is in "
                        "force", why, camera, value, source, exc, fitted)
            return
        log.warning("%s: camera %s: the operator's threshold %.6g (%s) stays in force; %s fitted %.6g (the previous "
                    "bundle's was %.6g): an operator who accepts it sets %.6g (set/threshold or the page)",
                    why, camera, value, source, why, fitted, bundle, fitted)

    # -- lifecycle ---------------------------------------------------------------------------
    def verdict_counts(self, camera: str) -> dict:
        """Accepts and rejects so far (from the metrics: no disk read, cheap enough for every verdict sent)."""
        def count(verdict: str) -> int:  # a JSON integer on the wire, as a PLC's counter expects
            return int(self.metrics.registry.get_sample_value("coft_verdicts_total",
                                                              {"camera": camera, "verdict": verdict}) or 0)
        return {"accepts": count("accept"), "rejects": count("reject"), "unfired_rejects": count("unfired_reject")}

    def counters(self, camera: str) -> dict:
        def value(name: str, **labels) -> int:
            return int(self.metrics.registry.get_sample_value(name, {"camera": camera, **labels}) or 0)
        return {"frames": value("coft_frames_total"), "dropped": value("coft_frames_dropped_total"),
                **self.verdict_counts(camera), "refused": value("coft_verdicts_refused_total"),
                "outbox_dropped": value("coft_outbox_dropped_total"), "broker_refused": value("coft_broker_refused_total"),
                "camera": self.camera[camera].state,
                "outbox_depth": self.outbox.depth(camera), "uptime_s": round(time.time() - self.started, 1)}

    def commissioning_status(self) -> dict | None:
        """How far commissioning is, and whether rejects fire meanwhile; None when the line is not commissioning."""
        if not self.commissioning or self.commissioning.complete:
            return None
        return {"frames": len(self.commissioning.scores), "of": self.commissioning.wanted,
                "rejects_fired": self.config.commissioning.rejects}

    def status(self) -> dict:
        """Everything the live view and `coft status` show: the model, and per camera its state, threshold and
        where it came from, counters, latency percentiles of the recent verdicts and the last problem."""
        cameras = {}
        for name, link in self.links.items():
            recent = list(self.recent[name])
            latencies = [v["latency_ms"] for v in recent]
            oldest = self.outbox.oldest_created(name)
            cameras[name] = {
                **self.counters(name), "broker_connected": link.connected.is_set(),
                "ended": self.camera[name].ended.is_set(),
                **self.threshold.describe(name, self.threshold.sources[name]), "bundle_threshold": self.bundle.threshold,
                "outbox_oldest_s": round(time.time() - oldest, 1) if oldest else None,
                "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
                "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
                "last_verdict": recent[-1] if recent else None,
                "last_problem": self.problems.last.get(name),
            }
        manifest = self.bundle.manifest
        return {"model_id": self.bundle.model_id, "revision_of": manifest.get("revision_of"),
                "threshold_method": manifest["threshold"]["method"], "threshold_promise": describe(manifest["threshold"]),
                "engine": self.engine.name,
                "line": self.config.broker.line, "started": self.started, "uptime_s": round(time.time() - self.started, 1),
                "commissioning": self.commissioning_status(), "learning": self.learning,
                "inspection_waiting_s": round(self.inspection_waiting(), 1), "stalled": self.stalled,
                "outbox_refusing": self.refusing, "last_problem": self.problems.last.get("runtime"),
                "web_actions": bool(self.web and self.web.token), "cameras": cameras}

    def warm_up(self) -> None:
        """Score one blank frame before the first camera frame: an engine's first run allocates and plans (ONNX
        Runtime: hundreds of ms), which the first triggered part would otherwise pay against its deadline."""
        started = time.perf_counter()
        try:
            self.engine.infer(np.zeros((1, *self.bundle.input_size, 3), np.uint8))
        except Exception as exc:  # the frames will fail the same way, and say so; the stall check ends it
            log.error("engine warm-up failed: %s: %s", type(exc).__name__, exc)
            return
        log.info("engine warmed up in %.0f ms", (time.perf_counter() - started) * 1000)

    def set_threshold(self, camera: str, value: str, via: str) -> dict:
        """An operator's threshold change from the web page: the same guards and AUDIT line as over MQTT, and
        the new state published on the camera's state topic."""
        state = self.threshold.set(camera, value.encode(), via)
        self.links[camera].publish_state(state)
        return state

    def inspection_waiting(self) -> float:
        """Seconds since the inspector last scored a batch or found nothing waiting: grows while frames wait
        with no verdict (an engine that does not return, or one that keeps failing)."""
        return time.monotonic() - self.last_inspection_ok

    def health(self) -> str | None:
        """Why the runtime cannot be trusted to go on, or None while every part is alive and making progress."""
        waiting = self.inspection_waiting()
        self.metrics.inspection_waiting.set(round(waiting, 1))
        if waiting > self.config.stall_s:
            if self.in_flight:
                self.stalled = (f"the engine has not returned for {waiting:.0f}s ({self.in_flight + len(self.queue)} "
                                "frames waiting with no verdict): a hung engine or model")
            else:
                self.stalled = f"frames have waited {waiting:.0f}s with no verdict: inspection keeps failing"
            self.metrics.inspection_stalled.set(1)
            return self.stalled
        if not self.inspector.is_alive():
            return "the inspector thread died"
        for camera in self.camera.values() if self.cameras_started else ():
            if not camera.is_alive() and not camera.ended.is_set():
                return f"camera {camera.camera.name}: its capture thread died"
        for link in [*self.links.values(), *([self.sparkplug] if self.sparkplug else [])]:
            problem = link.health(self.config.stall_s)
            if problem:
                return problem
        if self.failsafe and self.cameras_started and not self.failsafe.is_alive():
            return "the fail-safe thread that answers triggered parts died"
        if self.opcua and not self.opcua.alive():
            return "the OPC UA server stopped"
        if self.web and not self.web.alive():
            return "the live view's web server stopped"
        return None

    def run(self, until_sources_end: bool = False) -> None:
        """Run until SIGTERM/SIGINT (or, for replay, until every source has ended and all is scored)."""
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_bind)
        logging.getLogger().addHandler(self.problems)
        if self.web:
            self.web.start()
        if self.opcua:
            self.opcua.start()  # its certificate is made or loaded by now, and does not change while it runs
            if self.opcua.certificate is not None:
                self.metrics.opcua_certificate_expiry.set(self.opcua.certificate.not_valid_after_utc.timestamp())
        for link in self.links.values():
            link.start()
            link.publish_state(self.threshold.describe(link.camera, "start"))
        if self.sparkplug:
            self.sparkplug.start()
        self.last_inspection_ok = time.monotonic()
        self._resume_learning()
        self.inspector.start()  # it warms the engine up first; the cameras start once it has
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        next_heartbeat = next_check = time.monotonic()
        self.watchdog.ready(f"inspecting {len(self.camera)} camera(s) with {self.bundle.model_id}")
        alive = self.config.outbox.path.with_name("alive")  # its age is what the Docker HEALTHCHECK reads
        unhealthy, ended_at = None, None
        try:
            while not self.stop_event.wait(min(0.25, self.config.heartbeat_s)):
                if time.monotonic() >= next_check:  # once a second: each link's check asks the outbox
                    unhealthy = self.health()
                    if unhealthy:
                        break
                    self.watchdog.feed()
                    _touch(alive)
                    next_check = time.monotonic() + 1.0
                if self.warmed.is_set() and not self.cameras_started:
                    self.start_cameras()
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.config.heartbeat_s
                if until_sources_end and self.cameras_started and all(c.ended.is_set() for c in self.camera.values()):
                    ended_at = ended_at or time.monotonic()
                    if self.drained_at > ended_at:  # the inspector found nothing left after the last frame
                        break
        finally:
            if unhealthy:
                log.error("%s; stopping with exit status 2 so that systemd restarts the runtime", unhealthy)
                for link in self.links.values():
                    link.goodbye = "stalled" if self.stalled else "failed"
                    link.publish_status(link.goodbye)
            self.stop_event.set()
            self.inspector.join(timeout=0 if self.stalled else 30)
            if until_sources_end and self.commissioning and not unhealthy and not self.inspector.is_alive():
                self.finish_commissioning()  # the replay ended first: fit on what came, or say why not
            self.shutdown(drain_s=30.0 if until_sources_end else 5.0)
        if unhealthy:
            message = (f"{unhealthy}; the runtime stopped so that systemd restarts it (verdicts not yet acknowledged "
                       "stay in the outbox)")
            if self.inspector.is_alive():  # stuck inside the engine: the interpreter's exit could wait on it
                print(f"coft: error: {message}", file=sys.stderr, flush=True)
                logging.shutdown()
                os._exit(2)
            raise Unhealthy(message)

    def start_cameras(self) -> None:
        for camera in self.camera.values():
            camera.start()
        if self.failsafe:
            self.failsafe.start()
        self.cameras_started = True

    def _inspect_loop(self) -> None:
        """The inspector: warm the engine up, then score what waits, triggered frames first; commissioning
        switches the threshold here."""
        self.in_flight = 1  # a warm-up that never returns is a hung engine too
        self.warm_up()
        self.in_flight = 0
        self.last_inspection_ok = time.monotonic()
        self.warmed.set()
        while not self.stop_event.is_set():
            self.inspector_turned = time.monotonic()
            frames = self.queue.take(1 if self.failsafe and not self.queue.triggered else self.config.max_batch,
                                     timeout=0.2)
            if not frames:
                self.last_inspection_ok = self.drained_at = time.monotonic()  # nothing to inspect is no failure
                continue
            self.in_flight = len(frames)
            self._inspect_guarded(frames)
            self.in_flight = 0
            if self.commissioning and self.commissioning.complete:
                self.finish_commissioning()

    def _heartbeat(self) -> None:
        if time.monotonic() - self.inspector_turned < BEAT_GRACE_S:
            self.beats += 1  # follows the inspector: when it hangs, the counter the PLC watches stands still
        try:
            counters = {name: self.counters(name) for name in self.links}
            for name, link in self.links.items():
                link.heartbeat({"beat": self.beats, **counters[name]})
            if self.opcua:
                self.opcua.heartbeat(self.beats, {name: {**counters[name], "broker_connected": link.connected.is_set()}
                                                  for name, link in self.links.items()})
            self.metrics.outbox_depth.set(self.outbox.depth())
            if self.sparkplug:
                self.metrics.sparkplug_up.set(int(self.sparkplug.born()))
            if self.opcua:
                self.metrics.opcua_up.set(int(self.opcua.alive()))
            self.metrics.judging_with(self.bundle.model_id, {name: self.threshold.value(name) for name in self.links})
        except Exception as exc:  # a heartbeat is news, not the job: say it failed, keep inspecting
            self.throttled.log(logging.ERROR, "heartbeat", "heartbeat failed: %s: %s", type(exc).__name__, exc)

    def _inspect_guarded(self, frames: list[Frame]) -> None:
        try:
            self.inspect(frames)
        except Exception as exc:  # an engine or image fault must not end the loop, nor pass unseen
            self.throttled.log(logging.ERROR, "inspect", "inspection failed for %d frame(s) of %s: %s: %s",
                               len(frames), ", ".join(sorted({f.camera for f in frames})), type(exc).__name__, exc,
                               exc_info=None if isinstance(exc, CoftError) else exc)
            self.metrics.inspection_failures.inc()
        else:
            self.last_inspection_ok = time.monotonic()
            self.throttled.clear("inspect")

    def shutdown(self, drain_s: float) -> None:
        """Stop the cameras, give the outbox `drain_s` to reach the broker, close everything."""
        self.watchdog.stopping()
        self.stop_event.set()
        for camera in self.camera.values():
            if camera.is_alive():
                camera.join(timeout=2)
        for link in [*self.links.values(), *([self.sparkplug] if self.sparkplug else [])]:
            try:
                link.stop(drain_s)
            except Exception as exc:  # one broken link must not keep the others from closing
                log.error("mqtt %s: could not stop cleanly: %s", link.name, exc)
        if self.web:
            self.web.stop()
        if self.opcua:
            self.opcua.stop()
        logging.getLogger().removeHandler(self.problems)
        left = self.outbox.depth()
        if left:
            log.warning("stopping with %d messages not yet acknowledged; they go out at the next start", left)
        if not self.inspector.is_alive():  # a hung engine's thread may still write: the process ends around it
            self.outbox.close()
        log.info("stopped")


def _touch(path) -> None:
    try:
        path.touch()
    except OSError:
        pass  # the HEALTHCHECK then sees it age, and the log has the disk's own errors
