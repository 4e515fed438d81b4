"""The inspector: the frames waiting for the engine, the engine, and judging each frame into a verdict.

One thread scores what waits, triggered frames first (a PLC waits on their deadline), and hands each verdict to
the recorder the composition root gives it (runtime/pipeline.py): the line never speaks to the plant itself.
The model it judges with (bundle, engine, thresholds, drift reference) is swapped only between two batches."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np

from coft.runtime.cameras.sources import Frame
from coft.runtime.config import RuntimeConfig
from coft.runtime.engines import Engine
from coft.runtime.line.commissioning import Commissioning
from coft.runtime.line.drift import DriftWatch
from coft.runtime.line.evidence import Evidence
from coft.runtime.line.failsafe import FailSafe
from coft.runtime.line.thresholds import ThresholdState
from coft.runtime.line.verdict import Verdict
from coft.runtime.model.bundle import Bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.heatmap import annotate, defect_box
from coft.runtime.model.images import resize_to_input
from coft.runtime.process.logs import Throttled
from coft.runtime.process.metrics import Metrics

log = logging.getLogger(__name__)
MIN_FRAME_SIDE = 16  # pixels: below this a frame holds no part to judge (a broken ROI or camera mode)

# verdict, latency_ms(), answered_ms() or None, fire -> stored (False: the outbox refused it)
Record = Callable[[Verdict, Callable[[], float], Callable[[], float] | None, bool], bool]


def resize_ahead(frame: Frame, size: tuple[int, int]) -> None:
    """On the camera's capture thread: the frame resized to the model input, so that the inspector's thread
    spends its time in the engine (at 2448x2048 the resize costs about half a bf16 inference on a CPU box;
    docs/speed.md). A frame it cannot resize, or did not (FrameQueue.has_room), is resized, or refused,
    where it is inspected."""
    if min(frame.image.shape[:2]) >= MIN_FRAME_SIDE:
        try:
            frame.model_input = resize_to_input(frame.image, size)
        except Exception:  # noqa: BLE001  (the inspector meets it again and says what it is)
            frame.model_input = None


class FrameQueue:
    """Frames waiting for the engine, per camera: bounded, drop-oldest, and it counts what it drops.

    A triggered frame has a PLC waiting on its deadline: triggered frames are served first, in a batch of
    their own, and never make room for continuous ones; continuous cameras take turns."""

    def __init__(self, size: int, on_drop: Callable[[Frame], None]):
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
            self.ready.notify_all()  # the inspector, and replays waiting for room

    def __len__(self) -> int:
        return len(self.triggered) + sum(len(q) for q in self.continuous.values())

    def has_room(self, camera: str) -> bool:
        """Whether a continuous camera's next frame joins without pushing one out: where it would, the engine is
        behind, and a frame resized now may be dropped unused (a 30 fps camera at 2448x2048 would spend most
        of a core resizing frames a 10 fps engine never sees)."""
        with self.ready:
            return len(self.continuous.get(camera, ())) < self.size

    def wait_for_room(self, camera: str, stop: threading.Event) -> None:
        """A replay's next frame waits for room instead of pushing one out: a file has no real time to keep up
        with, so a replay without fps: goes at the engine's pace and drops nothing (commissioning on it included)."""
        with self.ready:
            while len(self.continuous.get(camera, ())) >= self.size and not stop.is_set():
                self.ready.wait(0.2)

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
            self.ready.notify_all()  # room for a waiting replay
            return taken


@dataclass(frozen=True)
class InForce:
    """What the line judges with, replaced whole between two batches: a reader on another thread (the status,
    a PLC's view) never sees one model's bundle beside another's thresholds."""
    bundle: Bundle
    engine: Engine
    threshold: ThresholdState  # the live thresholds, saved per model
    drift: DriftWatch  # where good parts scored under this model


class Inspector:
    def __init__(self, config: RuntimeConfig, bundle: Bundle, engine: Engine, queue: FrameQueue, metrics: Metrics,
                 record: Record, failsafe: FailSafe | None, evidence: Evidence | None, harvest: Evidence | None,
                 stop_event: threading.Event, between_batches: Callable[[], None], after_batch: Callable[[], None],
                 choose_engine: Callable[[], Engine] | None = None):
        self.config, self.queue, self.metrics, self.record = config, queue, metrics, record
        self.failsafe, self.evidence, self.harvest, self.stop_event = failsafe, evidence, harvest, stop_event
        self.between_batches, self.after_batch = between_batches, after_batch  # the root's model switches
        self.choose_engine = choose_engine  # backend auto: timed in the warm-up, under the stall check
        self.cameras = [c.name for c in config.cameras]
        self.rois = {c.name: c.roi for c in config.cameras}
        self.throttled = Throttled(log)
        self.commissioning: Commissioning | None = None  # set by the root while the line commissions
        self.views: dict[str, tuple] = {}  # camera -> (frame, anomaly map, verdict) last scored: the live image
        self.thread = threading.Thread(target=self.loop, name="inspector", daemon=True)
        self.turned = time.monotonic()  # the loop came round (the heartbeat's counter follows it)
        self.in_flight = 0  # frames the engine is scoring now
        self.drained_at = 0.0  # when it last found nothing waiting
        self.last_ok = time.monotonic()  # when it last scored a batch or found nothing waiting
        self.stalled: str | None = None  # why frames wait with no verdict, once that has lasted stall_s
        self.warmed = threading.Event()
        self.in_force = self._in_force(bundle, engine)

    def _in_force(self, bundle: Bundle, engine: Engine) -> InForce:
        return InForce(bundle, engine, ThresholdState(self.config.state_path, bundle.threshold, bundle.model_id,
                                                      self.cameras, self.config.control),
                       DriftWatch(bundle.manifest["threshold"]))

    def adopt(self, bundle: Bundle, engine: Engine | None = None) -> None:
        """Judge with this bundle from now on: its threshold (or the live ones saved for it) and its drift
        reference, in one step; called before the thread starts or, from between_batches, on it."""
        self.in_force = self._in_force(bundle, engine or self.engine)

    @property
    def bundle(self) -> Bundle:
        return self.in_force.bundle

    @property
    def engine(self) -> Engine:
        return self.in_force.engine

    @property
    def threshold(self) -> ThresholdState:
        return self.in_force.threshold

    @property
    def drift(self) -> DriftWatch:
        return self.in_force.drift

    def waiting_s(self) -> float:
        """Seconds since the inspector last scored a batch or found nothing waiting: grows while frames wait
        with no verdict (an engine that does not return, or one that keeps failing)."""
        return time.monotonic() - self.last_ok

    def health(self, stall_s: float) -> str | None:
        """Why inspection cannot be trusted to go on (frames waiting stall_s with no verdict, or its thread dead)."""
        waiting = self.waiting_s()
        self.metrics.inspection_waiting.set(round(waiting, 1))
        if waiting > stall_s:
            if self.in_flight:
                self.stalled = (f"the engine has not returned for {waiting:.0f}s ({self.in_flight + len(self.queue)} "
                                "frames waiting with no verdict): a hung engine or model")
            else:
                self.stalled = f"frames have waited {waiting:.0f}s with no verdict: inspection keeps failing"
            self.metrics.inspection_stalled.set(1)
            return self.stalled
        return None if self.thread.is_alive() else "the inspector thread died"

    def warm_up(self) -> None:
        """Score one blank frame before the first camera frame: an engine's first run allocates and plans (ONNX
        Runtime: hundreds of ms), which the first triggered part would otherwise pay against its deadline."""
        started = time.perf_counter()
        try:
            if self.choose_engine is not None:  # each candidate warms up as it is timed
                self.in_force = replace(self.in_force, engine=self.choose_engine())
            else:
                self.engine.infer(np.zeros((1, *self.bundle.input_size, 3), np.uint8))
        except Exception as exc:  # the frames will fail the same way, and say so; the stall check ends it
            log.error("engine warm-up failed: %s: %s", type(exc).__name__, exc)
            return
        log.info("engine warmed up in %.0f ms", (time.perf_counter() - started) * 1000)

    def loop(self) -> None:
        """Warm the engine up, then score what waits, triggered frames first."""
        self.in_flight = 1  # a warm-up that never returns is a hung engine too
        self.warm_up()
        self.in_flight = 0
        self.last_ok = time.monotonic()
        self.warmed.set()
        while not self.stop_event.is_set():
            self.turned = time.monotonic()
            frames = self.queue.take(1 if self.failsafe and not self.queue.triggered else self.config.max_batch,
                                     timeout=0.2)
            if not frames:
                self.last_ok = self.drained_at = time.monotonic()  # nothing to inspect is no failure
                continue
            self.in_flight = len(frames)
            self._inspect_guarded(frames)
            self.in_flight = 0
            self.after_batch()

    def _inspect_guarded(self, frames: list[Frame]) -> None:
        try:
            self.inspect(frames)
        except Exception as exc:  # an engine or image fault must not end the loop, nor pass unseen
            self.throttled.log(logging.ERROR, "inspect", "inspection failed for %d frame(s) of %s: %s: %s",
                               len(frames), ", ".join(sorted({f.camera for f in frames})), type(exc).__name__, exc,
                               exc_info=None if isinstance(exc, CoftError) else exc)
            self.metrics.inspection_failures.inc()
        else:
            self.last_ok = time.monotonic()
            self.throttled.clear("inspect")

    def _model_input(self, frame: Frame) -> np.ndarray:
        ready = frame.model_input
        size = self.bundle.input_size
        return ready if ready is not None and ready.shape[:2] == size else resize_to_input(frame.image, size)

    def inspect(self, frames: list[Frame]) -> None:
        self.between_batches()
        usable: list[Frame] = []
        for frame in frames:
            if min(frame.image.shape[:2]) >= MIN_FRAME_SIDE:
                usable.append(frame)
                continue
            self.throttled.log(logging.ERROR, ("small", frame.camera), "camera %s: a %dx%d frame is too small to "
                               "inspect (at least %d pixels a side); rejecting such frames: check the camera's mode "
                               "or cameras.roi", frame.camera, frame.image.shape[1], frame.image.shape[0],
                               MIN_FRAME_SIDE)
            self.judge(frame, math.nan, self.threshold.value(frame.camera), reason="frame_too_small")
        if not usable:
            return
        batch = np.stack([self._model_input(f) for f in usable])
        started = time.perf_counter()
        result = self.engine.infer(batch)
        self.metrics.inference.observe(time.perf_counter() - started)
        maps = result.maps if result.maps is not None else [None] * len(usable)
        for frame, score, score_map in zip(usable, result.scores, maps):
            self.judge(frame, float(score), self.threshold.value(frame.camera), score_map)
            if self.commissioning is not None and self.commissioning.complete:
                self.after_batch()  # its revision has the same graph: the rest of this batch is judged on it

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

    def origin(self, camera: str) -> tuple[int, int]:
        """Where the camera's frames start in its full picture (the ROI's corner): verdict boxes are given in those pixels."""
        roi = self.rois[camera]
        return (roi[0], roi[1]) if roi else (0, 0)

    def judge(self, frame: Frame, score: float, threshold: float, score_map: np.ndarray | None = None,
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
        commissioning = self.commissioning is not None and not self.commissioning.complete
        if self.commissioning is not None and commissioning:
            self.commissioning.add(frame.camera, frame.frame_id, frame.image, score, frame.part_id)
        part = frame.part
        late = part is not None and self.failsafe is not None and not self.failsafe.claim(part)  # answered already
        rejects_off = commissioning and self.config.commissioning is not None and not self.config.commissioning.rejects
        verdict = Verdict(frame.camera, self.config.broker.line, frame.frame_id, frame.part_id, frame.captured_at,
                          round(score, 6) if judged else None, threshold, reject, self.bundle.model_id, reason=reason,
                          commissioning=commissioning, late=late, fired=not (reject and rejects_off))
        if score_map is not None and judged:
            verdict.defect = self.defect(frame, score_map, threshold, reject)
        if not self.record(verdict, lambda: round((time.monotonic() - frame.captured_mono) * 1000, 2),
                           part.waited_ms if part is not None else None, reject and verdict.fired):
            return  # the outbox refused it: counted and said by the recorder
        self.metrics.latency.observe(time.monotonic() - frame.captured_mono)
        self.views[frame.camera] = (frame, score_map, verdict)  # rendered by the web page's thread, if anyone looks
        if self.harvest and self.harvest.wanted(reject):
            self.harvest.save(frame.image, verdict)  # as the camera gave it: what retraining needs
        if self.evidence and self.evidence.wanted(reject):
            self.evidence.save(frame.image, verdict, annotate(frame.image, verdict, score_map, self.origin(frame.camera)))
