"""Sparkplug B against a real Mosquitto, read back by a subscriber that decodes with the protobuf classes
generated from our .proto (births, aliases, seq continuity, broker restart, rebirth, commands, death), and by a
host we did not write: Eclipse Tahu's sparkplug-payload with MQTT.js, through the shipped ACL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from coft.runtime.comms.sparkplug.sparkplug_b_pb2 import DataType, Payload
from tests.support.broker import Mosquitto, Subscriber, acl_broker
from tests.support.clients import CLIENTS
from tests.support.runtime import ROOT, start_runtime, stop, write_config
from tests.support.wait import wait_for_log

SPARKPLUG = ROOT / "runtime/comms/sparkplug"


def test_the_generated_module_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the module")
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{SPARKPLUG}", f"--python_out={tmp_path}",
                             str(SPARKPLUG / "sparkplug_b.proto")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sparkplug_b_pb2.py").read_text() == (SPARKPLUG / "sparkplug_b_pb2.py").read_text(), \
        "runtime/comms/sparkplug/sparkplug_b_pb2.py is stale: regenerate it (command in sparkplug_b.proto)"


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

    def command(self, topic: str, *metrics: dict) -> None:
        payload = Payload(timestamp=round(time.time() * 1000))
        for metric in metrics:
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


@pytest.mark.broker
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
            assert not any(m.HasField("datatype") for m in data.metrics)  # 3.0: data does not repeat datatypes
            assert len(data.metrics) < len(declared)  # by exception: the model id, unchanged, is not repeated

        shutil.move(line, tmp_path / "line-gone")  # the camera is lost: DDEATH
        deaths = host.wait("DDEATH", 1)
        time.sleep(1)
        shutil.move(tmp_path / "line-gone", line)  # and back: DBIRTH again
        host.wait("DBIRTH", 2)
        kinds = [t.split("/")[2] for t, _ in host.messages]
        after_death = kinds[kinds.index("DDEATH") + 1:]
        assert deaths[0][0] == "spBv1.0/plant/DDEATH/box7/cam1"
        assert "DDATA" not in after_death[:after_death.index("DBIRTH")]  # nothing for a dead device

        broker.stop()  # the broker goes away; verdicts keep going into the outbox
        time.sleep(3)
        broker.start()
        host.wait("NBIRTH", 2)
        host.wait("DDATA", len(host.of("DDATA")) + 10)
        born = host.of("NBIRTH")[1][1].timestamp
        backlog = [p for _, p in host.of("DDATA") if p.metrics and p.metrics[0].is_historical]
        assert backlog, "verdicts captured during the outage must come as historical data"
        assert all(m.timestamp < born and m.is_historical for p in backlog for m in p.metrics)  # capture time

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


@pytest.mark.broker
def test_with_a_primary_host_births_and_data_wait_for_its_state_online_and_stop_when_it_goes(tmp_path, exported_bundle,
                                                                                            parts):
    """Sparkplug 3.0 Primary Host awareness, as Ignition's store and forward expects: nothing before the host's
    STATE says online (the verdicts wait in the outbox, and that is no stall), births and the backlog when it
    does; NDEATH and a new session that waits again when it goes offline; no verdict lost across it all."""
    broker = Mosquitto(tmp_path / "broker").start()
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 10}],
                          sparkplug={"group_id": "plant", "edge_node_id": "box7", "primary_host_id": "scada1"},
                          stall_s=2)
    host = Host(broker.port)

    def state(online: bool) -> None:
        payload = json.dumps({"online": online, "timestamp": round(time.time() * 1000)})
        host.client.publish("spBv1.0/STATE/scada1", payload, qos=1, retain=True).wait_for_publish(5)

    state(False)
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        time.sleep(6)  # three stall_s: a runtime that took the waiting for a stall would have ended
        assert runtime.poll() is None, log.read_text()[-2000:]
        assert host.of("NBIRTH") == [] and host.of("DDATA") == []
        state(True)
        host.wait("DDATA", 5)
        state(False)
        host.wait("NDEATH", 1)
        quiet = len(host.messages)
        time.sleep(2)
        assert len(host.messages) == quiet  # nothing while the host is away
        state(True)
        host.wait("NBIRTH", 2)
        host.wait("DDATA", len(host.of("DDATA")) + 5)
    finally:
        runtime.send_signal(signal.SIGTERM)
        code = runtime.wait(timeout=30)
        host.close()
        broker.stop()
    assert code == 0, log.read_text()[-2000:]
    bdseqs = [value(next(m for m in p.metrics if m.name == "bdSeq")) for _, p in host.of("NBIRTH")]
    death = value(next(m for m in host.of("NDEATH")[0][1].metrics if m.name == "bdSeq"))
    assert death == bdseqs[0] and bdseqs[1] == (bdseqs[0] + 1) % 256  # the death ends the first session
    seq_alias = next(m.alias for m in host.of("DBIRTH")[0][1].metrics if m.name == "Verdict/Seq")
    seqs = list(dict.fromkeys(value(m) for _, p in host.of("DDATA") for m in p.metrics if m.alias == seq_alias))
    assert seqs == list(range(1, len(seqs) + 1))  # from the first verdict, the backlog included, no gap
    text = log.read_text()
    assert "waiting for primary host scada1 to be online" in text and "primary host scada1 is offline" in text

@pytest.mark.broker
def test_a_stray_state_or_a_flood_of_commands_neither_locks_the_node_out_nor_floods_it(tmp_path, exported_bundle,
                                                                                      parts):
    """A retained STATE stamped ten years ahead (a SCADA clock that ran ahead), `"online": "false"` as a string and
    a timestamp of 1e400 lock nothing out: the host's next real STATE brings the births. One NCMD with 20,000
    rebirth metrics rebirths once; a DCMD with 5,000 unknown metrics is refused in one line, the verdicts flow on."""
    broker = Mosquitto(tmp_path / "broker").start()
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 10}],
                          sparkplug={"group_id": "plant", "edge_node_id": "box7", "primary_host_id": "scada1"})
    host = Host(broker.port)

    def state(payload: str) -> None:
        host.client.publish("spBv1.0/STATE/scada1", payload, qos=1, retain=True).wait_for_publish(5)

    now = round(time.time() * 1000)
    state(json.dumps({"online": False, "timestamp": now + 10 * 365 * 86_400_000}))
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        wait_for_log(log, "waiting for primary host scada1 to be online")  # subscribed: each STATE reaches it
        state(json.dumps({"online": "true", "timestamp": round(time.time() * 1000)}))
        wait_for_log(log, "not 3.0's JSON")
        state('{"online": true, "timestamp": 1e400}')
        wait_for_log(log, "not 3.0's JSON", times=2)
        assert host.of("NBIRTH") == []  # neither is 3.0's STATE: the host is still offline
        state(json.dumps({"online": True, "timestamp": round(time.time() * 1000)}))
        host.wait("NBIRTH", 1, timeout=15)
        assert len(host.of("NBIRTH")) == 1, log.read_text()[-2000:]
        rebirth = {"name": "Node Control/Rebirth", "datatype": DataType.Boolean, "boolean_value": True}
        host.command("spBv1.0/plant/NCMD/box7", *[rebirth] * 20_000)
        host.wait("NBIRTH", 2)
        unknown = {"name": "Nonsense", "datatype": DataType.Double, "double_value": 1.0}
        host.command("spBv1.0/plant/DCMD/box7/cam1", *[unknown] * 5_000)
        time.sleep(3)
        data = len(host.of("DDATA"))
        host.wait("DDATA", data + 5)
    finally:
        code = stop(runtime)
        host.close()
        broker.stop()
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert len(host.of("NBIRTH")) == 2  # the births, then one rebirth for 20,000 asks
    assert len(host.of("DDATA")) >= data + 5  # verdicts still flow
    assert "ahead of this box's clock" in text and "Traceback" not in text
    assert text.count("not 3.0's JSON") == 2 and text.count("DCMD for cam1 ignored") == 1
    assert "64 of its metrics refused; the first: metric 'Nonsense' is not writable" in text
    assert "4936 metrics beyond the first 64 not read" in text and "19936 metrics beyond" in text


class TahuHost:
    """tests/clients/sparkplug_host.js: MQTT.js and Eclipse Tahu's sparkplug-payload, as a SCADA host runs them."""

    def __init__(self, port: int, username: str, password: str):
        if not (CLIENTS / "node_modules").is_dir():
            pytest.fail("the Node.js test clients are not installed: run tests/run (it runs npm ci in tests/clients)")
        args = {"url": f"mqtt://127.0.0.1:{port}", "username": username, "password": password,
                "clientId": f"tahu-host-{time.time_ns()}"}
        self.process = subprocess.Popen(["node", str(CLIENTS / "sparkplug_host.js"), json.dumps(args)], cwd=CLIENTS,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait_for(lambda: any(line.get("subscribed") for line in self.lines), "the host's subscription")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def messages(self, kind: str | None = None) -> list[tuple[str, dict]]:
        return [(m["topic"], m["payload"]) for m in list(self.lines)
                if "topic" in m and (kind is None or m["topic"].split("/")[2] == kind)]

    def wait_for(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline and self.process.poll() is None, f"no {what} at the Tahu host"
            time.sleep(0.05)

    def wait(self, kind: str, count: int) -> list[tuple[str, dict]]:
        self.wait_for(lambda: len(self.messages(kind)) >= count, f"{count} x {kind}")
        return self.messages(kind)

    def command(self, topic: str, metrics: list[dict]) -> None:
        self.process.stdin.write(json.dumps({"publish": topic, "metrics": metrics}) + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write('{"quit": true}\n')
            self.process.stdin.flush()
            self.process.wait(timeout=10)


def _metric(payload: dict, name: str):
    return next(m for m in payload["metrics"] if m.get("name") == name)


@pytest.mark.broker
def test_a_tahu_host_through_the_shipped_acl_sees_the_device_die_and_return_history_and_no_threshold_change(
        tmp_path, exported_bundle, parts, monkeypatch):
    """A host we did not write (Tahu's decoder, MQTT.js), with the scada account of deploy/mosquitto: births,
    aliases, seq per session, bdSeq, DDEATH and DBIRTH when the camera goes and comes back, an outage's backlog
    as historical data at its capture times, a rebirth asked for by name, and a DCMD refused with control off."""
    broker = acl_broker(tmp_path, ROOT / "deploy/mosquitto/coft.acl")
    line = shutil.copytree(parts / "test/good", tmp_path / "line")
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": "cam1", "source": str(line), "loop": True, "fps": 10}],
                          sparkplug={"group_id": "plant", "edge_node_id": "l1", "data_qos": 1},
                          control={"threshold": False})
    settings = yaml.safe_load(config.read_text())
    settings["broker"].update(username="l1", password_env="COFT_TEST_MQTT_PASSWORD")
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("COFT_TEST_MQTT_PASSWORD", "l1-pw")
    host = TahuHost(broker.port, "scada", "scada-pw")
    plc = Subscriber(broker.port, username="plc", password="plc-pw")
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        host.wait("DDATA", 5)
        shutil.move(line, tmp_path / "line-gone")  # the camera is lost
        host.wait("DDEATH", 1)
        time.sleep(1)
        shutil.move(tmp_path / "line-gone", line)  # and found again
        host.wait("DBIRTH", 2)
        host.wait("DDATA", len(host.messages("DDATA")) + 3)

        broker.stop()  # an outage: verdicts wait in the outbox, then come as history
        time.sleep(3)
        broker.start()
        host.wait("NBIRTH", 2)
        host.wait_for(lambda: any(m.get("isHistorical") for _, p in host.messages("DDATA") for m in p["metrics"]),
                      "historical DDATA")

        threshold = _metric(host.messages("DBIRTH")[0][1], "Control/Threshold")["value"]
        host.command("spBv1.0/plant/DCMD/l1/cam1", [{"name": "Control/Threshold", "type": "Double",
                                                        "value": threshold * 1.5}])
        host.command("spBv1.0/plant/NCMD/l1", [{"name": "Node Control/Rebirth", "type": "Boolean", "value": True}])
        host.wait("NBIRTH", 3)
        errors = plc.wait_for("error", 1)
        runtime.send_signal(signal.SIGKILL)
        runtime.wait(timeout=10)
        host.wait("NDEATH", 1)
    finally:
        if runtime.poll() is None:
            runtime.kill()
        host.close()
        plc.close()
        broker.stop()

    everything = host.messages()
    assert not [p for _, p in everything if "error" in p], "every message decodes with Tahu, types from the births"
    kinds = [t.split("/")[2] for t, _ in everything]
    nbirths = host.messages("NBIRTH")
    bdseqs = [_metric(p, "bdSeq") for _, p in nbirths]
    assert all(m["type"] == "Int64" for m in bdseqs)
    assert bdseqs[1]["value"] == bdseqs[0]["value"] + 1 and bdseqs[2]["value"] == bdseqs[1]["value"]  # rebirth: same
    assert _metric(host.messages("NDEATH")[-1][1], "bdSeq")["value"] == bdseqs[-1]["value"]
    assert "alias" not in _metric(nbirths[0][1], "Node Control/Rebirth")  # asked for by name
    runs, run = [], []
    for (_, payload), kind in zip(everything, kinds):
        if kind == "NBIRTH":
            run = [payload["seq"]]
            runs.append(run)
        elif kind == "NDEATH":  # the session is over: what the broker redelivers to the host after it is stale
            run = []
        elif kind in ("DBIRTH", "DDATA", "DDEATH") and run:
            run.append(payload["seq"])
    for run in runs:  # seq 0 at each NBIRTH, then +1 per message, wrapping at 256
        assert run == [i % 256 for i in range(len(run))], run
    death = kinds.index("DDEATH")
    assert kinds[death:].index("DBIRTH") < (kinds[death:] + ["DDATA"]).index("DDATA")  # no data for a dead device
    data = [p for _, p in host.messages("DDATA")]
    assert all(p["untyped"] == len(p["metrics"]) for p in data)  # no datatype repeated in data
    assert all("name" not in m and "alias" in m for p in data for m in p["metrics"])
    sessions_seen = [(k, _metric(p, "bdSeq")["value"]) for (_, p), k in zip(everything, kinds) if k in ("NBIRTH", "NDEATH")]
    for i, (kind, bdseq) in enumerate(sessions_seen):  # every death names the session it ends
        if kind == "NDEATH":
            assert bdseq == next(b for k, b in reversed(sessions_seen[:i]) if k == "NBIRTH")
    birth, history = None, 0
    for (_, payload), kind in zip(everything, kinds):
        if kind == "DBIRTH":
            birth = payload["timestamp"]
        elif kind == "DDATA" and payload["metrics"][0].get("isHistorical"):  # captured before the birth: their time
            history += 1
            assert all(m["isHistorical"] and m["timestamp"] < birth for m in payload["metrics"])
    assert history
    assert all(_metric(p, "Control/Threshold")["value"] == threshold for _, p in host.messages("DBIRTH"))
    assert any("threshold changes are off" in e["error"] for e in errors)  # the DCMD obeyed control.threshold
    assert "Traceback" not in log.read_text()
