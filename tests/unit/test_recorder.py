"""The recorder alone, on a real outbox file: what one verdict owes the plant is stored in one transaction, then
shown to every sink; a refusal is counted and said once, and its recovery too."""

from __future__ import annotations

import functools
import json
import time

from coft.runtime.comms.outbox import SPARKPLUG_CHANNEL, Outbox
from coft.runtime.comms.recorder import Recorder, gap_messages
from coft.runtime.config import BrokerConfig
from coft.runtime.line.verdict import Verdict
from coft.runtime.process.metrics import Metrics


def verdict(reject: bool, **extra) -> Verdict:
    return Verdict("cam1", "l1", 7, extra.pop("part_id", None), time.time(), 0.9 if reject else 0.1, 0.5, reject,
                   "m1", **extra)


def recorder(tmp_path, sparkplug: bool = False) -> tuple[Recorder, Outbox, list, list]:
    broker = BrokerConfig(line="l1")
    outbox = Outbox(tmp_path / "outbox.db", fsync=False, gap=functools.partial(gap_messages, broker))  # as wired
    told, shown = [], []
    rec = Recorder(broker, outbox, Metrics(["cam1"], sparkplug=sparkplug), sparkplug, told.append)
    rec.sinks.append(shown.append)
    return rec, outbox, told, shown


def topics(outbox: Outbox, channel: str = "cam1") -> list[str]:
    return [message.topic for message in outbox.pending(channel)]


def test_a_fired_reject_for_a_triggered_part_owes_verdict_result_and_reject_and_sparkplug_its_own(tmp_path):
    rec, outbox, _, shown = recorder(tmp_path, sparkplug=True)
    judged = verdict(True, part_id="p-1")
    assert rec.record(judged, lambda: 3.0, lambda: 4.0, fire=True)
    assert topics(outbox) == ["coft/l1/cam1/verdict", "coft/l1/cam1/result", "coft/l1/cam1/reject"]
    assert topics(outbox, SPARKPLUG_CHANNEL) == ["cam1"]
    assert judged.seq == 1 and judged.epoch == outbox.epoch and shown == [judged]  # the sinks get it typed
    stored = json.loads(outbox.pending("cam1")[0].payload)
    assert stored == judged.as_dict() and Verdict.from_json(stored) == judged  # the one way back from the outbox


def test_a_late_verdict_is_recorded_but_owes_the_plc_nothing_more(tmp_path):
    rec, outbox, _, _ = recorder(tmp_path)
    rec.record(verdict(True, part_id="p-2", late=True), lambda: 3.0, lambda: 4.0, fire=True)
    assert topics(outbox) == ["coft/l1/cam1/verdict"]


def test_a_disk_that_refuses_is_said_once_counted_per_verdict_and_its_recovery_said(tmp_path, caplog):
    rec, outbox, told, shown = recorder(tmp_path)
    outbox.db.execute("PRAGMA query_only = ON")  # the disk refuses every write from here
    assert not rec.record(verdict(False), lambda: 1.0, None, fire=False)
    assert not rec.record(verdict(False), lambda: 1.0, None, fire=False)
    assert len(told) == 1 and "verdicts are not being recorded" in told[0] and shown == []
    assert rec.metrics.refused() == 2
    outbox.db.execute("PRAGMA query_only = OFF")
    judged = verdict(False)
    assert rec.record(judged, lambda: 1.0, None, fire=False)
    assert judged.seq == 3 and topics(outbox) == ["coft/l1/cam1/gap", "coft/l1/cam1/verdict"]
    assert json.loads(outbox.pending("cam1")[0].payload)["missing"] == [1, 2]  # the PLC is told what it lost
    assert "outbox accepts verdicts again (2 verdicts were refused in all)" in caplog.text
