"""The revisions alone: a model the learner made is taken between two batches, in one step, and the box's
`current` link follows it for the next start; without one, nothing moves."""

from __future__ import annotations

import threading

from coft.runtime.config import RuntimeConfig
from coft.runtime.line.inspector import FrameQueue, Inspector
from coft.runtime.line.revisions import Revisions
from coft.runtime.process.disk import Reserve
from coft.runtime.process.metrics import Metrics
from tests.support.fakes import ScriptedEngine, judging_bundle

SIZE = (32, 32)


def test_a_grown_model_is_taken_between_batches_whole_and_the_current_link_follows(tmp_path):
    models = tmp_path / "models"
    for name in ("a", "b"):
        (models / name).mkdir(parents=True)
    current = tmp_path / "current"
    current.symlink_to(models / "a")
    config = RuntimeConfig.model_validate({"bundle": str(current), "cameras": [{"name": "cam1", "source": "0"}],
                                           "outbox": {"path": str(tmp_path / "state/outbox.db")}})
    (tmp_path / "state").mkdir()
    old, grown = judging_bundle("a", 0.5, SIZE, models / "a"), judging_bundle("b", 0.8, SIZE, models / "b")
    inspector = Inspector(config, old, ScriptedEngine(), FrameQueue(4, lambda frame: None), Metrics(["cam1"]),
                          lambda *args: {}, None, None, None, threading.Event(), lambda: None, lambda: None)
    switched = []
    revisions = Revisions(config, inspector, Metrics(["cam1"]), Reserve(config.outbox.path, 0),
                          lambda: switched.append(inspector.bundle.model_id))
    revisions.between_batches()
    assert inspector.bundle is old and switched == [] and current.resolve() == models / "a"  # nothing grown yet

    before = inspector.in_force
    engine = ScriptedEngine()
    revisions._grown = (grown, engine)  # what the learner's thread leaves for the inspector's
    revisions.between_batches()
    now = inspector.in_force
    assert now is not before and (now.bundle, now.engine) == (grown, engine)  # swapped whole
    assert now.threshold.value("cam1") == 0.8 and switched == ["b"]
    assert current.resolve() == models / "b" and (tmp_path / "previous").resolve() == models / "a"
    revisions.between_batches()
    assert inspector.in_force is now  # taken once
