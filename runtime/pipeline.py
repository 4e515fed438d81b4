"""`coft run`: camera frames -> score -> verdict -> durable outbox -> MQTT, for months.

One capture thread per camera feeds one bounded queue; when inference falls behind,
the oldest frames are dropped and counted. The inference thread scores every frame that
is waiting in one batch, writes each verdict (and, for a reject, the PLC message) to the
outbox before anything is published, and wakes the camera's MQTT sender.

The main loop is also the supervisor: it feeds the systemd watchdog only while every
camera thread and MQTT link is alive and making progress, and otherwise ends the process
with a non-zero status and the reason, so systemd restarts it; nothing stalls silently.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections import deque
from datetime import datetime, timezone

import numpy as np

from coft.runtime.box import switch
from coft.runtime.bundle import load_bundle, revise
from coft.runtime.commissioning import Commissioning
from coft.runtime.config import RuntimeConfig
from coft.runtime.drift import DriftWatch
from coft.runtime.control import ThresholdState
from coft.runtime.engines import open_engine
from coft.runtime.errors import CoftError
from coft.runtime.evidence import Evidence
from coft.runtime.failsafe import FailSafe, Part
from coft.runtime.heatmap import annotate, defect_box
from coft.runtime.images import resize_to_input
from coft.runtime.logs import LastProblems, Throttled
from coft.runtime.metrics import Metrics
from coft.runtime.mqtt import CameraLink, camera_topic
from coft.runtime.outbox import SPARKPLUG_CHANNEL, Outbox, OutboxRefused
from coft.runtime.sources import CameraThread, Frame
from coft.runtime.watchdog import Watchdog

log = logging.getLogger(__name__)
RECENT = 300  # verdicts per camera kept for the live view, its chart and latency percentiles


class FrameQueue:
    """Bounded, drop-oldest, and it counts what it drops."""

    def __init__(self, size: int, on_drop):
        self.frames: deque[Frame] = deque()
        self.size, self.on_drop = size, on_drop
        self.ready = threading.Condition()

    def put(self, frame: Frame) -> None:
        with self.ready:
            if len(self.frames) >= self.size:
                self.on_drop(self.frames.popleft())
            self.frames.append(frame)
            self.ready.notify()

    def take(self, max_frames: int, timeout: float) -> list[Frame]:
        with self.ready:
            if not self.frames:
                self.ready.wait(timeout)
            return [self.frames.popleft() for _ in range(min(max_frames, len(self.frames)))]


class Unhealthy(CoftError):
    """A part of the runtime stopped working; the process ends so that systemd restarts it."""


class Runtime:
    def __init__(self, config: RuntimeConfig):
        self.config = config
        self.bundle = load_bundle(config.bundle, config.trusted_keys)
        self.engine = open_engine(self.bundle, config.backend, config.threads)
        log.info("model %s on %s, threshold %.6g", self.bundle.model_id, self.engine.name, self.bundle.threshold)
        names = [c.name for c in config.cameras]
        self._adopt(self.bundle, names)
        if not config.control.threshold:
            log.info("set/threshold is off (control.threshold: false): thresholds change only with a new bundle")
        self.metrics = Metrics()
        self.outbox = Outbox(config.outbox.path, config.outbox.max_messages, config.outbox.fsync,
                             int(config.outbox.max_mb * 2**20))
        self.evidence = Evidence(config.evidence) if config.evidence else None
        self.harvest = Evidence(config.harvest) if config.harvest else None
        self.stop_event = threading.Event()
        self.queue = FrameQueue(config.queue_size, self._dropped)
        self.links = {name: CameraLink(config.broker, name, self.outbox,
                                       (lambda payload, cam=name: self.threshold.set(cam, payload))
                                       if config.control.threshold else None,
                                       self._trigger, self._broker_state, config.control.trigger_max_bytes,
                                       line_trigger=name == names[0])
                      for name in names}
        self.camera = {c.name: CameraThread(c, self._deliver(c.name, c.trigger), self.stop_event, self._camera_state)
                       for c in config.cameras}  # capture threads by camera name
        self.sparkplug = None
        if config.sparkplug:
            from coft.runtime.sparkplug import SparkplugNode  # protobuf only on boxes that speak Sparkplug
            self.sparkplug = SparkplugNode(
                config.broker, config.sparkplug, self.outbox, names, config.outbox.path.parent / "sparkplug-bdseq",
                lambda camera, value: self.set_threshold(camera, repr(value), "sparkplug"), self.threshold_of,
                self.verdict_counts, lambda: self.bundle.model_id)
        self.opcua = None
        if config.opcua:
            from coft.runtime.opcua import OpcUaServer  # asyncua only on boxes that serve OPC UA
            self.opcua = OpcUaServer(self, config.opcua)
        self.failsafe = FailSafe(config.control.trigger_deadline_ms / 1000, self._failsafe_reject, self._delivering,
                                 self.stop_event) if any(c.trigger for c in config.cameras) else None
        self.beats = 0  # the heartbeat counter a PLC watches
        self.started = time.time()
        self.watchdog = Watchdog()
        self.rois = {c.name: c.roi for c in config.cameras}
        self.recent = {name: deque(maxlen=RECENT) for name in names}
        self.views: dict[str, tuple] = {}  # camera -> (frame, anomaly map, verdict) last scored: the live image
        self.problems = LastProblems(names)
        self.web = None
        if config.web:
            from coft.runtime.web import WebServer  # aiohttp only on boxes that serve the page
            self.web = WebServer(self, config.web)
        self.throttled = Throttled(log)
        self.refusing = False  # the outbox cannot store verdicts (disk full)
        self.last_inspection_ok = time.monotonic()
        plan = config.commissioning
        self.commissioning = plan and Commissioning(
            plan.frames, plan.target_false_reject_rate,
            config.outbox.path.parent / f"commissioning-{self.bundle.model_id}" if plan.keep_frames else None)
        if self.commissioning:
            log.info("commissioning: the first %d frames set the threshold; no reject is fired until then",
                     plan.frames)

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
            verdict["latency_ms"] = round((time.time() - part.triggered_at) * 1000, 2)
            plc = {"seq": seq, "part_id": part.part_id, "frame_id": part.frame_id, "score": None, "reason": reason}
            return [(camera_topic(broker, part.camera, "verdict"), json.dumps(verdict).encode()),
                    (camera_topic(broker, part.camera, "reject"), json.dumps(plc).encode()),
                    self._result(part, verdict)] + self._sparkplug(part.camera, verdict)

        self.outbox.put_verdict(part.camera, messages, True)
        self.metrics.failsafe_rejects.labels(part.camera, reason).inc()
        self._stored(verdict)

    def _stored(self, verdict: dict) -> None:
        """A verdict is in the outbox: count it, wake whoever sends it, and show it (recent list, OPC UA)."""
        camera = verdict["camera"]
        self.metrics.verdicts.labels(camera, verdict["verdict"]).inc()
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
                  "score": verdict["score"], "answered_ms": round((time.time() - part.triggered_at) * 1000, 2)}
        return camera_topic(self.config.broker, part.camera, "result"), json.dumps(answer).encode()

    def _dropped(self, frame: Frame) -> None:
        self.metrics.frames_dropped.labels(frame.camera).inc()
        log.debug("camera %s: dropped frame %d (inference behind)", frame.camera, frame.frame_id)

    def _camera_state(self, camera: str, up: bool) -> None:
        self.metrics.camera_up.labels(camera).set(int(up))
        self.metrics.camera_ended.labels(camera).set(int(self.camera[camera].ended.is_set()))

    def _broker_state(self, camera: str, up: bool) -> None:
        self.metrics.broker_up.labels(camera).set(int(up))

    # -- scoring -----------------------------------------------------------------------------
    def inspect(self, frames: list[Frame]) -> None:
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

    def _verdict(self, frame: Frame, score: float, threshold: float, score_map: np.ndarray | None = None) -> None:
        judged = math.isfinite(score)
        if not judged:  # a part the model could not judge is not a good part
            self.throttled.log(logging.ERROR, "score", "camera %s: the model returned a score of %s; rejecting such "
                               "parts (check the bundle and the engine)", frame.camera, score)
        reject = not judged or score > threshold
        if judged:
            median = self.drift.add(frame.camera, score)
            if median is not None:
                self.metrics.score_median.labels(frame.camera).set(median)
        commissioning = bool(self.commissioning) and not self.commissioning.complete
        if commissioning:
            self.commissioning.add(frame.camera, frame.frame_id, frame.image, score)
        broker = self.config.broker
        part = frame.part
        late = part is not None and not self.failsafe.claim(part)  # the fail-safe answered this part already
        verdict = {
            "camera": frame.camera, "line": broker.line, "frame_id": frame.frame_id, "part_id": frame.part_id,
            "captured_at": datetime.fromtimestamp(frame.captured_at, timezone.utc).isoformat(timespec="milliseconds"),
            "capture_ts": frame.captured_at, "score": round(score, 6) if judged else None, "threshold": threshold,
            "verdict": "reject" if reject else "accept", "model_id": self.bundle.model_id,
            **({"commissioning": True} if commissioning else {}), **({"late": True} if late else {}),
        }
        if score_map is not None and judged:
            verdict["defect"] = self.defect(frame, score_map, threshold, reject)

        def messages(seq: int) -> list[tuple[str, bytes]]:
            verdict["seq"] = seq
            verdict["latency_ms"] = round((time.time() - frame.captured_at) * 1000, 2)
            out = [(camera_topic(broker, frame.camera, "verdict"), json.dumps(verdict).encode())]
            out += self._sparkplug(frame.camera, verdict)
            if late:  # recorded, but the part has its answer: nothing more for the PLC
                return out
            if part is not None:
                out.append(self._result(part, verdict))
            if reject and not commissioning:  # while commissioning nothing is fired at the line
                plc = {"seq": seq, "part_id": frame.part_id, "frame_id": frame.frame_id, "score": verdict["score"]}
                if "defect" in verdict:
                    plc["box"] = verdict["defect"]["box"]
                out.append((camera_topic(broker, frame.camera, "reject"), json.dumps(plc).encode()))
            return out

        if not self._store(frame, messages, reject):
            return
        self.metrics.latency.observe(time.time() - frame.captured_at)
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
        log.info("commissioning: %d frames, %d suspects dropped, threshold %.6g -> %.6g\n%s", fitted["frames"],
                 fitted["suspects_dropped"], old["value"], fitted["value"],
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
        self._adopt(load_bundle(revision, self.config.trusted_keys), list(self.links))  # same model: same engine
        for link in self.links.values():
            link.publish_state(self.threshold.describe(link.camera, "commissioning"))
        if self.config.bundle.is_symlink():
            try:
                switch(self.config.bundle, revision)
            except OSError as exc:
                log.error("commissioning: cannot point %s at %s (%s); the next start runs the old bundle",
                          self.config.bundle, revision, exc.strerror)
        log.warning("commissioning done: now running %s (threshold %.6g); it is in %s%s", self.bundle.model_id,
                    self.bundle.threshold, revision,
                    "" if self.config.bundle.is_symlink() else "; point bundle: in the config at it for the next start")

    # -- lifecycle ---------------------------------------------------------------------------
    def verdict_counts(self, camera: str) -> dict:
        """Accepts and rejects so far (from the metrics: no disk read, cheap enough for every verdict sent)."""
        def count(verdict: str) -> float:
            return self.metrics.registry.get_sample_value("coft_verdicts_total",
                                                          {"camera": camera, "verdict": verdict}) or 0.0
        return {"accepts": count("accept"), "rejects": count("reject")}

    def counters(self, camera: str) -> dict:
        def value(name: str, **labels) -> float:
            return self.metrics.registry.get_sample_value(name, {"camera": camera, **labels}) or 0.0
        return {"frames": value("coft_frames_total"), "dropped": value("coft_frames_dropped_total"),
                **self.verdict_counts(camera), "refused": value("coft_verdicts_refused_total"),
                "camera": self.camera[camera].state,
                "outbox_depth": self.outbox.depth(camera), "uptime_s": round(time.time() - self.started, 1)}

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
                **self.threshold.describe(name, self.threshold.sources[name]),
                "outbox_oldest_s": round(time.time() - oldest, 1) if oldest else None,
                "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
                "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
                "last_verdict": recent[-1] if recent else None,
                "last_problem": self.problems.last.get(name),
            }
        manifest = self.bundle.manifest
        return {"model_id": self.bundle.model_id, "revision_of": manifest.get("revision_of"),
                "threshold_method": manifest["threshold"]["method"], "engine": self.engine.name,
                "line": self.config.broker.line, "started": self.started, "uptime_s": round(time.time() - self.started, 1),
                "commissioning": bool(self.commissioning) and not self.commissioning.complete,
                "outbox_refusing": self.refusing, "last_problem": self.problems.last.get("runtime"),
                "web_actions": bool(self.web and self.web.token), "cameras": cameras}

    def warm_up(self) -> None:
        """Score one blank frame before the first camera frame: an engine's first run allocates and plans (ONNX
        Runtime: hundreds of ms), which the first triggered part would otherwise pay against its deadline."""
        started = time.perf_counter()
        self.engine.infer(np.zeros((1, *self.bundle.input_size, 3), np.uint8))
        log.info("engine warmed up in %.0f ms", (time.perf_counter() - started) * 1000)

    def set_threshold(self, camera: str, value: str, via: str) -> dict:
        """An operator's threshold change from the web page: the same guards and AUDIT line as over MQTT, and
        the new state published on the camera's state topic."""
        state = self.threshold.set(camera, value.encode(), via)
        self.links[camera].publish_state(state)
        return state

    def health(self) -> str | None:
        """Why the runtime cannot be trusted to go on, or None while every part is alive and making progress."""
        for camera in self.camera.values():
            if not camera.is_alive() and not camera.ended.is_set():
                return f"camera {camera.camera.name}: its capture thread died"
        for link in [*self.links.values(), *([self.sparkplug] if self.sparkplug else [])]:
            problem = link.health(self.config.stall_s)
            if problem:
                return problem
        if self.failsafe and not self.failsafe.is_alive():
            return "the fail-safe thread that answers triggered parts died"
        if self.opcua and not self.opcua.alive():
            return "the OPC UA server stopped"
        if self.web and not self.web.alive():
            return "the live view's web server stopped"
        failing = time.monotonic() - self.last_inspection_ok
        if failing > self.config.stall_s:
            return f"inspection has failed for {failing:.0f}s"
        return None

    def run(self, until_sources_end: bool = False) -> None:
        """Run until SIGTERM/SIGINT (or, for replay, until every source has ended and all is scored)."""
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_bind)
        logging.getLogger().addHandler(self.problems)
        self.warm_up()
        if self.web:
            self.web.start()
        if self.opcua:
            self.opcua.start()
        for link in self.links.values():
            link.start()
            link.publish_state(self.threshold.describe(link.camera, "start"))
        if self.sparkplug:
            self.sparkplug.start()
        for camera in self.camera.values():
            camera.start()
        if self.failsafe:
            self.failsafe.start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        next_heartbeat = next_check = time.monotonic()
        self.watchdog.ready(f"inspecting {len(self.camera)} camera(s) with {self.bundle.model_id}")
        unhealthy = None
        try:
            while not self.stop_event.is_set():
                if time.monotonic() >= next_check:
                    unhealthy = self.health()
                    if unhealthy:
                        break
                    self.watchdog.feed()
                    next_check = time.monotonic() + 1.0
                frames = self.queue.take(self.config.max_batch, timeout=0.2)
                if frames:
                    self._inspect_guarded(frames)
                    if self.commissioning and self.commissioning.complete:
                        self.finish_commissioning()
                else:
                    self.last_inspection_ok = time.monotonic()  # nothing to inspect is not a failure
                    if until_sources_end and all(c.ended.is_set() for c in self.camera.values()):
                        if self.commissioning:  # the replay ended first: fit on what came, or say why not
                            self.finish_commissioning()
                        break
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.config.heartbeat_s
        finally:
            self.shutdown(drain_s=30.0 if until_sources_end else 5.0)
        if unhealthy:
            raise Unhealthy(f"{unhealthy}; the runtime stopped so that systemd restarts it (verdicts not yet "
                            "acknowledged stay in the outbox)")

    def _heartbeat(self) -> None:
        self.beats += 1  # from the inspection loop: when it stops, so does the counter the PLC watches
        try:
            counters = {name: self.counters(name) for name in self.links}
            for name, link in self.links.items():
                link.heartbeat({"beat": self.beats, **counters[name]})
            if self.opcua:
                self.opcua.heartbeat(self.beats, {name: {**counters[name], "broker_connected": link.connected.is_set()}
                                                  for name, link in self.links.items()})
            self.metrics.outbox_depth.set(self.outbox.depth())
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
        self.outbox.close()
        log.info("stopped")
