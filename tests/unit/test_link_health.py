"""A broker link's health, without a broker: messages held back on purpose are no stall, and once they are let
go they get stall_s to leave before the runtime is told the link stalled."""

from __future__ import annotations

import json
import threading
import time

from coft.runtime.comms.outbox import SPARKPLUG_CHANNEL, Outbox
from coft.runtime.comms.sparkplug import SparkplugNode
from coft.runtime.config import BrokerConfig, SparkplugConfig
from coft.runtime.process.metrics import Metrics


def node_waiting_for_its_host(tmp_path) -> SparkplugNode:
    outbox = Outbox(tmp_path / "outbox.db", fsync=False)
    outbox.put_verdict("cam1", lambda seq: [("cam1", json.dumps({"seq": seq}), SPARKPLUG_CHANNEL)], reject=False)
    node = SparkplugNode(BrokerConfig(line="l1"), SparkplugConfig(primary_host_id="scada1"), outbox, ["cam1"],
                         tmp_path / "bdseq", on_threshold=lambda camera, value: {}, threshold=lambda camera: 0.5,
                         verdict_counts=lambda camera: {"accepts": 0, "rejects": 0}, model_id=lambda: "m1",
                         metrics=Metrics(["cam1"], sparkplug=True))
    node.network = node.sender = threading.current_thread()  # its threads' work is what this test does by hand
    node.before_connect()
    node.connected_now()
    node.connected.set()
    node.connected_at = time.time()
    return node


def state(online: bool, at: float) -> bytes:
    return json.dumps({"online": online, "timestamp": round(at * 1000)}).encode()


def test_a_backlog_held_for_the_host_is_no_stall_until_it_has_had_stall_s_after_the_host_came(tmp_path,
                                                                                              monkeypatch):
    """The race a loaded box lost: the host came online after the verdicts had waited longer than stall_s, and the
    health check ran before the sender's first acknowledgement; the runtime ended with exit 2."""
    node = node_waiting_for_its_host(tmp_path)
    later = time.time() + 10
    monkeypatch.setattr(time, "time", lambda: later)  # ten seconds on, nothing acknowledged
    assert node.health(stall_s=2) is None  # held for the host on purpose
    node._host_state(state(True, later))
    assert node.health(stall_s=2) is None  # let go just now: the sender has not had its turn
    monkeypatch.setattr(time, "time", lambda: later + 3)
    assert "no acknowledgement for 3s with 1 messages waiting" in node.health(stall_s=2)
