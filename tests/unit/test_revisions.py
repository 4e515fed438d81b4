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


def test_a_sorted_review_says_how_the_line_learns_from_it_where_it_does_not_learn_now(tmp_path):
    """The click that sorts the review's last frame asks the revisions to learn: a line that does not learn by
    itself, or is learning already, answers with the coft learn command that does it, and starts nothing."""
    from coft.runtime.model.manifest import LineRecord

    revision, frames = tmp_path / "models/a-r2", tmp_path / "state/commissioning-a"
    revision.mkdir(parents=True), frames.mkdir(parents=True)
    bundle = judging_bundle("a-r2", 0.5, SIZE, revision)
    bundle.manifest["threshold"]["method"] = "commissioning-conformal"
    bundle.spec = bundle.spec.model_copy(update={"commissioning": LineRecord(frames=300, frames_folder=str(frames))})
    command = f"coft learn {revision.resolve()} {frames}"
    for learns, learning, said in ((False, None, "does not learn by itself"), (True, {"state": "learning"},
                                                                               "learning is running now")):
        config = RuntimeConfig.model_validate({"bundle": str(revision), "cameras": [{"name": "cam1", "source": "0"}],
                                               "outbox": {"path": str(tmp_path / "state/outbox.db")},
                                               "commissioning": {"learn": learns}})
        inspector = Inspector(config, bundle, ScriptedEngine(), FrameQueue(4, lambda frame: None), Metrics(["cam1"]),
                              lambda *args: {}, None, None, None, threading.Event(), lambda: None, lambda: None)
        revisions = Revisions(config, inspector, Metrics(["cam1"]), Reserve(config.outbox.path, 0), lambda: None)
        revisions.learning = learning
        answer = revisions.learn_from_review("web:127.0.0.1")
        assert said in answer and command in answer, answer
        assert revisions.learning == learning and not any(t.name == "learner" for t in threading.enumerate())
