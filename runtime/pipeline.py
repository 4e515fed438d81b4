"""`coft run`: camera frames -> score -> verdict -> durable outbox -> MQTT, for months. The composition root.

One capture thread per camera (cameras/) feeds the frame queue; the inspector (line/inspector.py) scores what
waits and judges each frame; the recorder (comms/recorder.py) stores each verdict, with every message it owes,
in the outbox before anything is published, and hands it to the sinks that send or show it; the revisions
(line/revisions.py) switch the model when commissioning or learning make a new one. The web page, OPC UA and
Sparkplug get a read-only view and the controls an operator or a PLC may use, not the runtime.

The main loop is the supervisor: it feeds the systemd watchdog only while every camera
thread and MQTT link is alive and frames that wait get verdicts, and otherwise ends the
process with exit status 2 and the reason, so systemd restarts it; an engine that never
returns shows in /api/status, the metrics and the retained status first. Nothing stalls
silently.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from coft.runtime.box.check import validate
from coft.runtime.comms.configured import configured_services
from coft.runtime.comms.mqtt import CameraLink
from coft.runtime.comms.outbox import Outbox
from coft.runtime.comms.recorder import Recorder, gap_messages
from coft.runtime.comms.service import Service
from coft.runtime.config import RuntimeConfig
from coft.runtime.engines import fitted_precision, provisional_engine
from coft.runtime.line.evidence import Evidence
from coft.runtime.line.inspector import Inspector
from coft.runtime.line.intake import Intake
from coft.runtime.line.review import Review
from coft.runtime.line.revisions import Revisions
from coft.runtime.line.thresholds import ThresholdState
from coft.runtime.line.verdict import Verdict
from coft.runtime.model.bundle import commissioned_ancestor, load_bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.promise import describe
from coft.runtime.process.disk import Reserve, hold_line
from coft.runtime.process.logs import LastProblems, Throttled
from coft.runtime.process.metrics import Metrics
from coft.runtime.process.watchdog import Watchdog

log = logging.getLogger(__name__)
audit = logging.getLogger("coft.audit")
RECENT = 300  # verdicts per camera kept for the live view, its chart and latency percentiles
BEAT_GRACE_S = 5.0  # the heartbeat's counter stands still once the inspector has not turned for this long


class Unhealthy(CoftError):
    """A part of the runtime stopped working; the process ends so that systemd restarts it."""


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one (systemd's default soft limit is 1,024): frames,
    the outbox, broker links and viewers all need descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open files: soft limit raised from %d to %d", soft, hard)


class RuntimeView:
    """The line's view (comms/view.py) for the live page, OPC UA and Sparkplug: never the runtime itself."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime
        self.config = runtime.config
        self.cameras = [c.name for c in runtime.config.cameras]
        self.recent = runtime.recent
        self.evidence, self.harvest = runtime.evidence, runtime.harvest

    @property
    def views(self) -> dict[str, tuple]:
        return self._runtime.inspector.views

    @property
    def model_id(self) -> str:
        return self._runtime.inspector.bundle.model_id

    @property
    def thresholds(self) -> ThresholdState:
        return self._runtime.inspector.threshold

    def threshold_of(self, camera: str) -> float:
        return self._runtime.inspector.threshold.value(camera)

    def origin(self, camera: str) -> tuple[int, int]:
        return self._runtime.inspector.origin(camera)

    def verdict_counts(self, camera: str) -> dict:
        """Accepts and rejects so far (from the metrics: no disk read, cheap enough for every verdict sent)."""
        def count(verdict: str) -> int:
            return self._runtime.metrics.count("coft_verdicts_total", camera, verdict=verdict)
        return {"accepts": count("accept"), "rejects": count("reject"), "unfired_rejects": count("unfired_reject")}

    def counters(self, camera: str) -> dict:
        r, count = self._runtime, self._runtime.metrics.count
        return {"frames": count("coft_frames_total", camera), "dropped": count("coft_frames_dropped_total", camera),
                **self.verdict_counts(camera), "refused": count("coft_verdicts_refused_total", camera),
                "outbox_dropped": count("coft_outbox_dropped_total", camera),
                "broker_refused": count("coft_broker_refused_total", camera),
                "camera": r.intake.cameras[camera].state, "epoch": r.outbox.epoch,
                **({"outbox_started_anew": r.outbox.started_anew} if r.outbox.started_anew else {}),
                "outbox_depth": r.outbox.depth(camera), "uptime_s": round(time.time() - r.started, 1)}

    def status(self) -> dict:
        """Everything the live view and `coft status` show: the model, and per camera its state, threshold and
        where it came from, counters, latency percentiles of the recent verdicts and the last problem."""
        r, now = self._runtime, self._runtime.inspector.in_force  # one model's bundle, engine and thresholds
        cameras = {}
        for name, link in r.links.items():
            recent = list(r.recent[name])
            latencies = [v.latency_ms for v in recent if v.latency_ms is not None]
            oldest = r.outbox.oldest_created(name)
            cameras[name] = {
                **self.counters(name), "broker_connected": link.connected.is_set(),
                "ended": r.intake.cameras[name].ended.is_set(),
                **now.threshold.describe(name, now.threshold.sources[name]), "bundle_threshold": now.bundle.threshold,
                "outbox_oldest_s": round(time.time() - oldest, 1) if oldest else None,
                "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
                "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
                "last_verdict": recent[-1].as_dict() if recent else None,
                "last_problem": r.problems.last.get(name),
            }
        spec = now.bundle.spec
        return {"model_id": now.bundle.model_id, "revision_of": spec.revision_of,
                "threshold_method": spec.threshold.method,
                "threshold_promise": describe(now.bundle.manifest["threshold"]),  # the record as the fit wrote it
                "engine": now.engine.name,
                "line": r.config.broker.line, "started": r.started, "uptime_s": round(time.time() - r.started, 1),
                "commissioning": r.revisions.status(), "learning": r.revisions.learning,
                "inspection_waiting_s": round(r.inspector.waiting_s(), 1), "stalled": r.inspector.stalled,
                "outbox_refusing": r.recorder.refusing, "epoch": r.outbox.epoch,
                "outbox_started_anew": r.outbox.started_anew, "last_problem": r.problems.last.get("runtime"),
                "web_actions": False, "cameras": cameras,
                **{key: value for service in r.services for key, value in service.status_fields().items()}}

    def review(self) -> Review:
        """The commissioning review of the model running (line/review.py), or a one-line CoftError saying why none.
        After learning, the frames are still judged on the threshold commissioning fitted (their scores' scale)."""
        bundle = self._runtime.inspector.bundle
        folder = bundle.spec.commissioning.frames_folder if bundle.spec.commissioning else None
        commissioned = commissioned_ancestor(bundle.path, bundle.manifest)
        if commissioned is None:
            raise CoftError(f"no commissioning review: the threshold of {bundle.model_id} was not fitted by "
                            "commissioning (commission the line: coft commission, or a commissioning: block)")
        if not folder:
            raise CoftError("no commissioning review: commissioning kept no frames (commissioning.keep_frames: false)")
        return Review(Path(folder), commissioned[1])


class RuntimeControls:
    """The line's controls (comms/view.py) for an operator (the page) or a PLC (OPC UA, Sparkplug): thresholds,
    triggering a part, acknowledging an outbox's new epoch, and learning from the sorted commissioning review."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    def set_threshold(self, camera: str, value: str, via: str) -> dict:
        """An operator's threshold change from the web page: the same guards and AUDIT line as over MQTT, and
        the new state published on the camera's state topic."""
        r = self._runtime
        state = r.inspector.threshold.set(camera, value.encode(), via)
        r.links[camera].publish_state(state)
        return state

    def acknowledge_new_epoch(self, via: str) -> dict:
        """An operator has seen why the outbox started a new epoch: status, heartbeat and metric stop saying it."""
        r = self._runtime
        why, r.outbox.started_anew = r.outbox.started_anew, None
        r.metrics.outbox_started_anew.set(0)
        if why:
            audit.info("AUDIT outbox-new-epoch epoch=%s acknowledged via=%s reason=%r", r.outbox.epoch, via, why)
        return {"epoch": r.outbox.epoch, "acknowledged": why}

    def trigger(self, camera: str, part_id: str) -> None:
        self._runtime.intake.trigger_from_plc(camera, part_id)

    def learn_from_review(self, via: str) -> str:
        return self._runtime.revisions.learn_from_review(via)


class Runtime:
    def __init__(self, config: RuntimeConfig, commission: bool = False):
        """`commission`: fit the threshold again even where the bundle was commissioned (`coft commission`)."""
        self.config = config
        validate(config)  # what `coft run --check` tries first, the same function: the two cannot disagree
        self.line_lock = hold_line(config.outbox.path)  # first: a second runtime must not touch anything
        raise_open_files_limit()
        bundle = load_bundle(config.bundle, config.trusted_keys)
        engine, choose_engine = provisional_engine(  # auto keeps the arithmetic the line's threshold was fitted on
            bundle, config.backend, config.threads, None if commission else fitted_precision(bundle.spec))
        log.info("model %s on %s, threshold %.6g", bundle.model_id,
                 "the fastest installed CPU engine (timed at warm-up)" if choose_engine
                 else engine.name, bundle.threshold)
        names = [c.name for c in config.cameras]
        if not config.control.threshold:
            log.info("set/threshold is off (control.threshold: false): thresholds change only with a new bundle")
        self.metrics = Metrics(names, sparkplug=config.sparkplug is not None, opcua=config.opcua is not None,
                               learning=Revisions.learns_with(config, bundle))
        self.outbox = Outbox(config.outbox.path, config.outbox.max_messages, config.outbox.fsync,
                             int(config.outbox.max_mb * 2**20),
                             functools.partial(gap_messages, config.broker),
                             lambda camera, n: self.metrics.outbox_dropped.labels(camera).inc(n),
                             config.outbox.path.with_name("seq-watermark.json"))  # not outbox.db*: rm leaves it
        self.metrics.outbox_started_anew.set(int(self.outbox.started_anew is not None))
        self.reserve = Reserve(config.outbox.path, int(config.outbox.reserve_mb * 2**20),
                               lambda writer: self.metrics.reserve_refusals.labels(writer).inc())
        self.evidence = Evidence(config.evidence, "evidence", self.reserve) if config.evidence else None
        self.harvest = Evidence(config.harvest, "harvest", self.reserve) if config.harvest else None
        self.recorder = Recorder(config.broker, self.outbox, self.metrics, config.sparkplug is not None,
                                 self._refusing)
        self.stop_event = threading.Event()
        self.intake = Intake(config, self.metrics, self.recorder.record, lambda: self.inspector.in_force,
                             self.stop_event, self._camera_state)
        self.links = {name: CameraLink(config.broker, name, self.outbox,
                                       functools.partial(self._threshold_command, name)
                                       if config.control.threshold else None,
                                       self.intake.trigger, self.metrics.broker_state, config.control.trigger_max_bytes,
                                       line_trigger=name == names[0], cameras=tuple(names))
                      for name in names}
        for link in self.links.values():
            link.on_refused = self.metrics.refused_by_broker
            link.on_foreign = lambda camera, epoch: self.metrics.foreign_runtime.labels(camera).inc()
        self.inspector = Inspector(config, bundle, engine, self.intake.queue, self.metrics, self.recorder.record,
                                   self.intake.failsafe, self.evidence, self.harvest, self.stop_event,
                                   between_batches=lambda: self.revisions.between_batches(),
                                   after_batch=self._after_batch, choose_engine=choose_engine)
        self.revisions = Revisions(config, self.inspector, self.metrics, self.reserve, self._publish_states)
        self.recent: dict[str, deque[Verdict]] = {name: deque(maxlen=RECENT) for name in names}
        self.view, self.controls = RuntimeView(self), RuntimeControls(self)
        self.services: list[Service] = configured_services(config, self.view, self.controls, self.outbox, self.metrics)
        self.recorder.sinks = [lambda verdict: self.links[verdict.camera].notify(),
                               *[service.verdict for service in self.services],
                               lambda verdict: self.recent[verdict.camera].append(verdict)]
        self.beats = 0  # the heartbeat counter a PLC watches
        self.started = time.time()
        self.watchdog = Watchdog()
        self.problems = LastProblems(names)
        self.throttled = Throttled(log)
        self.revisions.start_commissioning(commission)

    def _threshold_command(self, camera: str, payload: bytes) -> dict:
        """A threshold over MQTT (`set/threshold`): the guarded path of the thresholds in force now."""
        return self.inspector.threshold.set(camera, payload)

    def _publish_states(self) -> None:
        threshold = self.inspector.threshold
        for link in self.links.values():
            link.publish_state(threshold.describe(link.camera, threshold.sources[link.camera]))

    def _refusing(self, message: str) -> None:
        for link in self.links.values():
            link.report("outbox", message)

    def _after_batch(self) -> None:
        self.metrics.outbox_depth.set(self.outbox.depth())
        self.revisions.after_batch()

    def _camera_state(self, camera: str, up: bool) -> None:
        self.metrics.camera_up.labels(camera).set(int(up))
        for service in self.services:
            service.camera_state(camera, up)
        self.metrics.camera_ended.labels(camera).set(int(self.intake.cameras[camera].ended.is_set()))

    def health(self) -> str | None:
        """Why the runtime cannot be trusted to go on, or None while every part is alive and making progress."""
        parts: list[Inspector | Intake | CameraLink | Service] = [self.inspector, self.intake, *self.links.values(),
                                                                 *self.services]
        return next(filter(None, (part.health(self.config.stall_s) for part in parts)), None)

    def run(self, until_sources_end: bool = False) -> None:
        """Run until SIGTERM/SIGINT (or, for replay, until every source has ended and all is scored)."""
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_bind)
        logging.getLogger().addHandler(self.problems)
        for service in self.services:
            service.start()
        for link in self.links.values():
            link.start()
            link.publish_state(self.inspector.threshold.describe(link.camera, "start"))
        self.inspector.last_ok = time.monotonic()
        self.revisions.resume_learning()
        self.inspector.thread.start()  # it warms the engine up first; the cameras start once it has
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        next_heartbeat = next_check = time.monotonic()
        self.watchdog.ready(f"inspecting {len(self.intake.cameras)} camera(s) with {self.inspector.bundle.model_id}")
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
                if self.inspector.warmed.is_set() and not self.intake.started:
                    self.revisions.check_precision()  # the engine auto chose is known once warmed up
                    self.intake.start()
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.config.heartbeat_s
                if until_sources_end and self.intake.started and all(c.ended.is_set() for c in self.intake.cameras.values()):
                    ended_at = ended_at or time.monotonic()
                    if self.inspector.drained_at > ended_at:  # the inspector found nothing left after the last frame
                        break
        finally:
            if unhealthy:
                log.error("%s; stopping with exit status 2 so that systemd restarts the runtime", unhealthy)
                for link in self.links.values():
                    link.goodbye = "stalled" if self.inspector.stalled else "failed"
                    link.publish_status(link.goodbye)
            self.stop_event.set()
            self.inspector.thread.join(timeout=0 if self.inspector.stalled else 30)
            if until_sources_end and self.revisions.commissioning and not unhealthy and not self.inspector.thread.is_alive():
                self.revisions.finish_commissioning()  # the replay ended first: fit on what came, or say why not
            self.shutdown(drain_s=30.0 if until_sources_end else 5.0)
        if unhealthy:
            message = (f"{unhealthy}; the runtime stopped so that systemd restarts it (verdicts not yet acknowledged "
                       "stay in the outbox)")
            if self.inspector.thread.is_alive():  # stuck inside the engine: the interpreter's exit could wait on it
                print(f"coft: error: {message}", file=sys.stderr, flush=True)
                logging.shutdown()
                os._exit(2)
            raise Unhealthy(message)

    def _heartbeat(self) -> None:
        if time.monotonic() - self.inspector.turned < BEAT_GRACE_S:
            self.beats += 1  # follows the inspector: when it hangs, the counter the PLC watches stands still
        try:
            counters = {name: self.view.counters(name) for name in self.links}
            for name, link in self.links.items():
                link.heartbeat({"beat": self.beats, **counters[name]})
            connected = {name: {**counters[name], "broker_connected": link.connected.is_set()}
                         for name, link in self.links.items()}
            for service in self.services:
                service.heartbeat(self.beats, connected)
            self.metrics.outbox_depth.set(self.outbox.depth())
            now = self.inspector.in_force
            promise = now.bundle.spec.threshold.promise.false_reject_rate if now.bundle.spec.threshold.promise else None
            self.metrics.judging_with(now.bundle.model_id, {name: now.threshold.value(name) for name in self.links},
                                      (now.engine.name, now.engine.precision), promise)
        except Exception as exc:  # a heartbeat is news, not the job: say it failed, keep inspecting
            self.throttled.log(logging.ERROR, "heartbeat", "heartbeat failed: %s: %s", type(exc).__name__, exc)

    def shutdown(self, drain_s: float) -> None:
        """Stop the cameras, give the outbox `drain_s` to reach the broker, close everything."""
        self.watchdog.stopping()
        self.stop_event.set()
        for camera in self.intake.cameras.values():
            if camera.is_alive():
                camera.join(timeout=2)
        parts: list[CameraLink | Service] = [*self.links.values(), *reversed(self.services)]
        for part in parts:
            try:
                part.stop(drain_s)
            except Exception as exc:  # one broken part must not keep the others from closing
                log.error("%s: could not stop cleanly: %s", getattr(part, "name", type(part).__name__), exc)
        logging.getLogger().removeHandler(self.problems)
        left = self.outbox.depth()
        if left:
            log.warning("stopping with %d messages not yet acknowledged; they go out at the next start", left)
        if not self.inspector.thread.is_alive():  # a hung engine's thread may still write: the process ends around it
            self.outbox.close()
        log.info("stopped")


def _touch(path) -> None:
    try:
        path.touch()
    except OSError:
        pass  # the HEALTHCHECK then sees it age, and the log has the disk's own errors
