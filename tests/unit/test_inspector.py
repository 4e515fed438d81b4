"""The inspector alone: frames in, verdicts to the recorder, with a small engine of our own instead of a graph
and a bundle that is only what judging reads. No broker, no process: seconds."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from coft.runtime.cameras.sources import Frame
from coft.runtime.config import RuntimeConfig
from coft.runtime.line.failsafe import FailSafe
from coft.runtime.line.inspector import FrameQueue, Inspector
from coft.runtime.process.metrics import Metrics
from tests.support.fakes import ScriptedEngine, judging_bundle

SIZE = (32, 32)


def frame(brightness: int, camera: str = "cam1", side: int = 32, unjudgeable: bool = False, part=None) -> Frame:
    image = np.full((side, side, 3), brightness, np.uint8)
    if unjudgeable:
        image[0, 0, 1] = 255
    return Frame(camera, frame_id=brightness, captured_at=time.time(), image=image, part=part,
                 part_id=part.part_id if part else None)


@pytest.fixture
def line(tmp_path):
    config = RuntimeConfig.model_validate({
        "bundle": str(tmp_path / "bundle"), "cameras": [{"name": "cam1", "source": "0"}, {"name": "cam2", "source": "1"}],
        "outbox": {"path": str(tmp_path / "outbox.db")}, "max_batch": 4})
    bundle = judging_bundle("m1", 0.5, SIZE)
    verdicts: list = []
    engine = ScriptedEngine()
    queue = FrameQueue(3, on_drop=lambda f: verdicts.append(("dropped", f.frame_id)))
    metrics = Metrics(["cam1", "cam2"])

    def record(verdict, latency_ms, answered_ms, fire):
        verdicts.append(verdict)
        return True

    inspector = Inspector(config, bundle, engine, queue, metrics, record, None, None, None, threading.Event(),
                          between_batches=lambda: None, after_batch=lambda: None)
    return SimpleNamespace(inspector=inspector, engine=engine, queue=queue, verdicts=verdicts, metrics=metrics,
                           config=config)


def test_a_score_above_the_threshold_rejects_and_one_the_model_cannot_give_rejects_too(line):
    line.inspector.inspect([frame(30), frame(80), frame(10, unjudgeable=True)])
    judged = [(v.score, v.reject) for v in line.verdicts]
    assert judged == [(0.3, False), (0.8, True), (None, True)]  # a part the model could not judge is not good


def test_a_frame_too_small_to_hold_a_part_is_rejected_with_its_reason_without_the_engine(line):
    line.inspector.inspect([frame(10, side=8)])
    assert [(v.reject, v.reason) for v in line.verdicts] == [(True, "frame_too_small")]
    assert line.engine.calls == 0


def test_an_engine_that_fails_is_counted_and_said_and_the_loop_goes_on(line, caplog):
    line.engine.fail = RuntimeError("device lost")
    line.inspector._inspect_guarded([frame(10)])
    line.inspector._inspect_guarded([frame(10)])
    assert line.verdicts == [] and line.metrics.inspection_failures._value.get() == 2
    assert caplog.text.count("inspection failed for 1 frame(s) of cam1: RuntimeError: device lost") == 1  # once
    line.engine.fail = None
    line.inspector._inspect_guarded([frame(10)])
    assert len(line.verdicts) == 1 and line.inspector.waiting_s() < 1


def test_the_queue_drops_a_camera_s_oldest_frame_and_serves_triggered_frames_first(line):
    for brightness in (1, 2, 3, 4):
        line.queue.put(frame(brightness))
    line.queue.put(frame(9, camera="cam2"))
    part = SimpleNamespace(part_id="p-1")
    line.queue.put(frame(7, part=part))
    assert line.verdicts == [("dropped", 1)]  # cam1 had 3 waiting: its oldest made room
    assert [f.frame_id for f in line.queue.take(4, timeout=0)] == [7]  # the triggered part, in a batch of its own
    assert sorted(f.frame_id for f in line.queue.take(4, timeout=0)) == [2, 3, 4, 9]  # the cameras take turns


def test_a_triggered_part_already_answered_by_the_fail_safe_is_judged_late_and_not_fired_twice(line):
    failsafe = FailSafe.__new__(FailSafe)  # only its claim: the deadline thread answered this part before
    failsafe.claim = lambda part: False
    line.inspector.failsafe = failsafe
    line.inspector.inspect([frame(90, part=SimpleNamespace(part_id="p-2", waited_ms=lambda: 12.0))])
    assert [(v.part_id, v.reject, v.late) for v in line.verdicts] == [("p-2", True, True)]
