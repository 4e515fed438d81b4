"""Sparkplug B against a real Mosquitto, read back by a subscriber that decodes with the protobuf classes
generated from our .proto: births, aliases, seq continuity, broker restart, rebirth, commands, death."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from coft.runtime.sparkplug.sparkplug_b_pb2 import DataType, Payload
from tests.conftest import Mosquitto
from tests.test_runtime import ROOT, Subscriber, start_runtime, write_config

SPARKPLUG = ROOT / "runtime/sparkplug"


def test_the_generated_module_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the module")
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{SPARKPLUG}", f"--python_out={tmp_path}",
                             str(SPARKPLUG / "sparkplug_b.proto")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sparkplug_b_pb2.py").read_text() == (SPARKPLUG / "sparkplug_b_pb2.py").read_text(), \
        "runtime/sparkplug/sparkplug_b_pb2.py is stale: regenerate it (command in sparkplug_b.proto)"


class Host:
    """A SCADA host's view: every Sparkplug message of the group, decoded, in arrival order."""

    def __init__(self, port: int):
        self.messages: list[tuple[str, Payload]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"scada-host-{time.time_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/plant/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, Payload.FromString(message.payload)))

    def of(self, kind: str) -> list[tuple[str, Payload]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.split("/")[2] == kind]

    def wait(self, kind: str, count: int, timeout: float = 30) -> list[tuple[str, Payload]]:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.of(kind)

    def command(self, topic: str, metric: dict) -> None:
        payload = Payload(timestamp=round(time.time() * 1000))
        payload.metrics.add(**metric)
        self.client.publish(topic, payload.SerializeToString(), qos=0)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def value(metric: Payload.Metric):
    return None if metric.is_null else getattr(metric, metric.WhichOneof("value"))


def sessions(messages: list[tuple[str, Payload]]) -> list[list[tuple[str, Payload]]]:
    """The node's messages split at each NBIRTH (seq starts again at 0 there)."""
    runs: list[list] = []
    for topic, payload in messages:
        kind = topic.split("/")[2]
        if kind == "NBIRTH":
            runs.append([])
        if runs and kind not in ("NDEATH", "NCMD", "DCMD"):
            runs[-1].append((topic, payload))
    return runs


def test_sparkplug_edge_node_births_data_commands_and_death(tmp_path, exported_bundle, parts):
    broker = Mosquitto(tmp_path / "broker").start()
    line = shutil.copytree(parts / "test/good", tmp_path / "line")
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": "cam1", "source": str(line), "loop": True, "fps": 10}],
                          sparkplug={"group_id": "plant", "edge_node_id": "box7", "data_qos": 1})
    host, plain = Host(broker.port), Subscriber(broker.port)
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        host.wait("DDATA", 10)
        (topic, nbirth), = host.of("NBIRTH")[:1]
        assert topic == "spBv1.0/plant/NBIRTH/box7" and nbirth.seq == 0
        node_metrics = {m.name: m for m in nbirth.metrics}
        assert {"bdSeq", "Node Control/Rebirth"} <= set(node_metrics)
        assert node_metrics["bdSeq"].datatype == DataType.Int64 and value(node_metrics["Node Control/Rebirth"]) is False
        assert not node_metrics["Node Control/Rebirth"].HasField("alias")  # asked for by name
        first_bdseq = value(node_metrics["bdSeq"])
        (topic, dbirth), = host.of("DBIRTH")[:1]
        assert topic == "spBv1.0/plant/DBIRTH/box7/cam1" and dbirth.seq == 1
        declared = {m.alias: m for m in dbirth.metrics}
        names = {m.name: m for m in dbirth.metrics}
        assert len(declared) == len(names) == len(dbirth.metrics)  # every metric its own alias
        assert names["Verdict/Score"].datatype == DataType.Double and names["Verdict/Reject"].datatype == DataType.Boolean
        assert names["Control/Threshold"].datatype == DataType.Double
        for _, data in host.of("DDATA")[:5]:
            assert all(not m.name and m.alias in declared for m in data.metrics)  # aliases only after the birth
            assert {declared[m.alias].datatype for m in data.metrics} == {m.datatype for m in data.metrics}

        broker.stop()  # the broker goes away; verdicts keep going into the outbox
        time.sleep(3)
        broker.start()
        host.wait("NBIRTH", 2)
        host.wait("DDATA", len(host.of("DDATA")) + 10)

        host.command("spBv1.0/plant/NCMD/box7", {"name": "Node Control/Rebirth", "datatype": DataType.Boolean,
                                                  "boolean_value": True})
        host.wait("NBIRTH", 3)
        old = value(names["Control/Threshold"])
        host.command("spBv1.0/plant/DCMD/box7/cam1", {"name": "Control/Threshold", "datatype": DataType.Double,
                                                       "double_value": old * 1.5})
        host.command("spBv1.0/plant/DCMD/box7/cam1", {"name": "Verdict/Score", "datatype": DataType.Double,
                                                       "double_value": 1.0})
        host.command("spBv1.0/plant/DCMD/box7/cam1", {"name": "Control/Threshold", "datatype": DataType.String,
                                                       "string_value": "high"})
        host.command("spBv1.0/plant/NCMD/box7", {"name": "Node Control/Reboot", "datatype": DataType.Boolean,
                                                  "boolean_value": True})
        errors = plain.wait_for("error", 3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                value(m) == pytest.approx(old * 1.5) for _, p in host.of("DDATA") for m in p.metrics
                if m.alias == names["Verdict/Threshold"].alias):
            time.sleep(0.1)
        before = len(host.of("NDEATH"))  # over MQTT 5 a restored session's will may already have come, at takeover
        runtime.send_signal(signal.SIGKILL)
        runtime.wait(timeout=10)
        deaths = host.wait("NDEATH", before + 1)
    finally:
        if runtime.poll() is None:
            runtime.kill()
        host.close()
        plain.close()
        broker.stop()

    bdseqs = [value(next(m for m in p.metrics if m.name == "bdSeq")) for _, p in host.of("NBIRTH")]
    assert bdseqs[1] == (first_bdseq + 1) % 256 and bdseqs[2] == bdseqs[1]  # a reconnect is a new session; a rebirth not
    death_metric = next(m for m in deaths[-1][1].metrics if m.name == "bdSeq")
    death_bdseq = value(death_metric)
    assert death_metric.datatype == DataType.Int64
    assert death_bdseq == bdseqs[-1]  # the will names the session the SIGKILL ended
    for run in sessions(host.messages):  # seq: 0 at NBIRTH, then +1 per message, wrapping at 256
        assert [p.seq for _, p in run] == [i % 256 for i in range(len(run))]
    seq_alias = names["Verdict/Seq"].alias
    verdict_seqs = [value(m) for _, p in host.of("DDATA") for m in p.metrics if m.alias == seq_alias and not m.is_null]
    first = list(dict.fromkeys(verdict_seqs))
    assert first == list(range(first[0], first[0] + len(first)))  # no verdict lost across the broker restart
    assert any(value(m) == pytest.approx(old * 1.5) for _, p in host.of("DDATA") for m in p.metrics
               if m.alias == names["Verdict/Threshold"].alias)  # the DCMD took effect on the verdicts
    assert any(isinstance(s, dict) and s.get("source") == "sparkplug" for s in plain.payloads("state"))
    reasons = " | ".join(e["error"] for e in errors)
    assert "'Verdict/Score' is not writable" in reasons and "must be a Double or Float" in reasons
    assert "unknown node metric 'Node Control/Reboot'" in reasons
    text = Path(log).read_text()
    assert "AUDIT threshold camera=cam1" in text and "via=sparkplug" in text and "Traceback" not in text
