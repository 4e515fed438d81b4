"""Fault injection: the real runtime, a real Mosquitto, and each fault a line meets.

Every test ends in one of two outcomes: verdicts keep flowing (and the fault is in the
log, the metrics and the error topic), or the process exits non-zero with the reason so
systemd restarts it. Never a silent stall.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import yaml

from coft.runtime.comms.mqtt import CameraLink
from coft.runtime.comms.outbox import Outbox
from coft.runtime.config import BrokerConfig
from coft.runtime.model.bundle import load_bundle
from tests.support.broker import Mosquitto, Subscriber, acl_broker, free_port, metric
from tests.support.parts import write_video
from tests.support.runtime import ROOT, assert_complete_and_ordered, start_runtime, stop, write_config

COFT = str(Path(sys.executable).parent / "coft")


def bundle_threshold(bundle: Path) -> float:
    return json.loads((bundle / "manifest.json").read_text())["threshold"]["value"]


def png_bomb(path: Path, side: int) -> Path:
    """A valid grayscale PNG of side x side pixels that is only a few hundred kilobytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row = zlib.compressobj(9), b"\0" * (side + 1)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# -- 1. no thread dies quietly ------------------------------------------------------------------
def test_read_only_state_file_is_refused_on_the_error_topic_and_verdicts_keep_flowing(
        tmp_path, exported_bundle, mosquitto, parts, tmpfs):
    state_dir = tmpfs(1)
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 10}],
                          state_file=str(state_dir / "state.json"))
    plc = Subscriber(mosquitto.port)
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        plc.wait_for("verdict", 5)
        tmpfs.read_only(state_dir)
        plc.client.publish("coft/l1/cam1/set/threshold", str(2 * bundle_threshold(exported_bundle)), qos=1)
        error = plc.wait_for("error", 1)[0]
        assert "Read-only file system" in error["error"] and "the threshold is unchanged" in error["error"]
        before = len(plc.payloads("verdict"))
        assert len(plc.wait_for("verdict", before + 20)) >= before + 20, "verdicts stopped after the fault"
        assert runtime.poll() is None
    finally:
        assert stop(runtime) == 0
    plc.close()
    assert {v["threshold"] for v in plc.payloads("verdict")} == {bundle_threshold(exported_bundle)}
    assert_complete_and_ordered(plc.payloads("verdict"))


def test_an_exception_in_any_callback_is_reported_and_the_link_lives_on(tmp_path, mosquitto):
    def broken_trigger(camera: str, part_id: str) -> None:
        raise RuntimeError("injected fault")
    outbox = Outbox(tmp_path / "o.db")
    link = CameraLink(BrokerConfig(port=mosquitto.port, line="l1"), "cam1", outbox, None, broken_trigger)
    plc = Subscriber(mosquitto.port)
    link.start()
    try:
        assert link.connected.wait(10)
        time.sleep(0.5)  # its subscription reaches the broker
        plc.client.publish("coft/l1/cam1/trigger", "part-1", qos=1)
        assert plc.wait_for("error", 1)[0] == {"command": "on_message", "error": "RuntimeError: injected fault"}
        outbox.put_verdict("cam1", lambda seq: [("coft/l1/cam1/verdict", json.dumps({"seq": seq}).encode())], False)
        link.notify()
        assert plc.wait_for("verdict", 1) == [{"seq": 1}]
        assert link.health(stall_s=60) is None and link.network.is_alive()
    finally:
        link.stop(1)
        plc.close()


INJECT = """
import sys
import threading
import coft.runtime.comms.mqtt
from coft.cli import main

def fault(*args):
    if sys.argv[2] == "crash" and threading.current_thread().name.startswith("mqtt-net"):
        raise RuntimeError("injected: an unguarded callback raised on paho's network thread")
    # "stall": the broker's acks never reach the sender

start = coft.runtime.comms.mqtt.CameraLink.start
def start_with_fault(self):
    self.client.on_publish = fault
    start(self)
coft.runtime.comms.mqtt.CameraLink.start = start_with_fault
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


@pytest.mark.parametrize("fault, reason", [("crash", "thread mqtt-net-cam1 died"),
                                           ("stall", "connected but no acknowledgement for")])
def test_a_dead_or_stalled_link_stops_the_watchdog_and_ends_the_process(
        tmp_path, exported_bundle, mosquitto, parts, fault, reason):
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 10}], stall_s=3)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.5)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    runtime = subprocess.Popen([sys.executable, "-c", INJECT, str(config), fault], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    messages = []
    deadline = time.monotonic() + 60
    while runtime.poll() is None and time.monotonic() < deadline:
        try:
            messages.append(notify.recv(1024).decode())
        except TimeoutError:
            pass
    runtime.kill()
    _, stderr = runtime.communicate()
    assert runtime.returncode == 2, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("coft: error: mqtt cam1: ") and reason in last_line and "systemd restarts it" in last_line
    assert messages[0].startswith("READY=1") and messages[-1] == "STOPPING=1"
    if fault == "stall":  # healthy for stall_s first; a thread that dies at once may never see a feed, rightly
        assert "WATCHDOG=1" in messages


# -- 2. camera supervision ------------------------------------------------------------------------
def test_camera_faults_are_contained_rate_limited_and_visible(tmp_path, exported_bundle, mosquitto, parts):
    vanishing = shutil.copytree(parts / "test/good", tmp_path / "vanishing")
    huge = shutil.copytree(parts / "test/good", tmp_path / "huge")
    png_bomb(huge / "aaa-bomb.png", 20000)
    video = write_video(tmp_path / "short.avi", 12)
    metrics_port = free_port()
    cameras = [
        {"name": "vanish", "source": str(vanishing), "loop": True, "fps": 20, "reconnect_max_s": 1},
        {"name": "roi", "source": str(parts / "test/good"), "loop": True, "fps": 20, "roi": [100, 100, 500, 500]},
        {"name": "ends", "source": str(parts / "test/good")},
        {"name": "loopfile", "source": str(video), "loop": True, "fps": 50},
        {"name": "huge", "source": str(huge), "loop": True, "fps": 20},
    ]
    config = write_config(tmp_path, exported_bundle, mosquitto.port, cameras, metrics_port=metrics_port,
                          web={"port": free_port()})
    log_path = tmp_path / "runtime.log"
    runtime = start_runtime(config, log_path)
    try:
        time.sleep(5)
        shutil.rmtree(vanishing)  # the folder (a network share, say) goes away
        time.sleep(8)
        assert runtime.poll() is None
        assert metric(metrics_port, "coft_camera_connected", "vanish") == 0
        assert metric(metrics_port, "coft_camera_ended", "ends") == 1
        assert metric(metrics_port, "coft_camera_connected", "ends") == 0
        assert metric(metrics_port, "coft_frames_total", "loopfile") > 12  # reopened at its end
        assert metric(metrics_port, "coft_frames_total", "huge") > 12  # the good images go on
        assert not metric(metrics_port, "coft_frames_total", "roi")
        assert metric(metrics_port, "coft_threshold", "ends") == pytest.approx(load_bundle(exported_bundle).threshold)
        model = f'coft_model_info{{model_id="{load_bundle(exported_bundle).model_id}"}} 1.0'
        assert model in urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        status = subprocess.run([COFT, "status", "--config", str(config)], capture_output=True, text=True)
        assert "camera ends: ended after 12 frames (the file or folder has no more)" in status.stdout
        assert "camera vanish: reconnecting: cannot open (folder" in status.stdout
        vanish = status.stdout.partition("\ncamera vanish:")[2].split("\ncamera ")[0]
        assert "last error" in vanish and "WARNING camera vanish: cannot open (folder" in vanish
    finally:
        assert stop(runtime) == 0
    log = log_path.read_text().splitlines()
    vanish_lines = [line for line in log if "camera vanish:" in line]
    assert any("cannot open (folder" in line and "does not exist" in line for line in vanish_lines)
    assert len(vanish_lines) < 20, f"{len(vanish_lines)} lines about one vanished folder"
    assert len([line for line in log if "camera roi:" in line and "outside" in line]) <= 2
    assert len([line for line in log if "above the 100 megapixel limit" in line]) == 1
    assert "Traceback" not in "\n".join(log)


# -- 3. bundle integrity at the runtime ---------------------------------------------------------
def test_runtime_refuses_a_hand_edited_threshold_in_one_line(tmp_path, exported_bundle):
    bundle = shutil.copytree(exported_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["threshold"]["value"] = 1e9
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    config = write_config(tmp_path, bundle, free_port(), [{"name": "cam1", "source": str(tmp_path)}])
    for command in (["run", "--config", str(config)], ["verify", str(bundle)]):
        result = subprocess.run([COFT, *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "manifest digest does not match its content" in result.stderr


# -- 4. guarded remote control --------------------------------------------------------------------
def test_thresholds_are_bounded_per_camera_and_audited_and_triggers_bounded(tmp_path, exported_bundle, mosquitto, parts):
    cameras = [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 5, "trigger": True},
               {"name": "cam2", "source": str(parts / "test/good"), "loop": True, "fps": 5}]
    config = write_config(tmp_path, exported_bundle, mosquitto.port, cameras, control={"threshold_factor": 2})
    base = bundle_threshold(exported_bundle)
    plc = Subscriber(mosquitto.port)
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        plc.wait_for("verdict", 3)
        plc.client.publish("coft/l1/cam1/set/threshold", "1e-300", qos=1)
        assert "outside the allowed" in plc.wait_for("error", 1)[0]["error"]
        plc.client.publish("coft/l1/cam1/set/threshold", str(1.5 * base), qos=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(s.get("source") == "mqtt" for s in plc.payloads("state")):
            time.sleep(0.1)
        plc.client.publish("coft/l1/cam1/trigger", b"x" * 10_000_000, qos=1)
        assert "longer than control.trigger_max_bytes" in plc.wait_for("error", 2)[1]["error"]
        plc.client.publish("coft/l1/cam1/trigger", "part-7", qos=1)
        plc.client.publish("coft/l1/cam9/set/threshold", str(base), qos=1)  # no such camera: said on the line's topic
        plc.wait_for("verdict", len(plc.payloads("verdict")) + 3)
        time.sleep(1)
    finally:
        assert stop(runtime) == 0
    plc.close()
    line_errors = [json.loads(p) for t, p in plc.messages if t == "coft/l1/error"]
    assert line_errors == [{"command": "cam9/set/threshold", "error": "camera 'cam9' is not on this line; cameras: "
                                                                       "cam1, cam2"}]
    states = {(s["source"], s["threshold"]) for s in plc.payloads("state")}
    assert ("mqtt", 1.5 * base) in states and len([s for s in states if s[0] == "mqtt"]) == 1
    verdicts = plc.payloads("verdict")
    assert {v["threshold"] for v in verdicts if v["camera"] == "cam2"} == {base}  # cam2 untouched
    assert [v["threshold"] for v in verdicts if v["part_id"] == "part-7"] == [1.5 * base]
    assert (tmp_path / "outbox.db").stat().st_size < 1_000_000  # the 10 MB trigger was never stored
    log = (tmp_path / "runtime.log").read_text()
    assert f"AUDIT threshold camera=cam1 previous={base:.6g} new={1.5 * base:.6g}" in log


def test_remote_threshold_control_can_be_switched_off(tmp_path, exported_bundle, mosquitto, parts):
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 5}],
                          control={"threshold": False})
    plc = Subscriber(mosquitto.port)
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        plc.wait_for("verdict", 2)
        plc.client.publish("coft/l1/cam1/set/threshold", str(bundle_threshold(exported_bundle) * 1.1), qos=1)
        time.sleep(2)
    finally:
        assert stop(runtime) == 0
    plc.close()
    assert all(s["source"] == "start" for s in plc.payloads("state")) and not (tmp_path / "state.json").exists()
    assert "set/threshold is off" in (tmp_path / "runtime.log").read_text()


def _acl_line(tmp_path: Path, bundle: Path, port: int, parts: Path, **extra) -> Path:
    config = write_config(tmp_path, bundle, port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 5},
                           {"name": "station", "source": str(parts / "test/good"), "loop": True, "fps": 20,
                            "trigger": True}], **extra)
    settings = yaml.safe_load(config.read_text())
    settings["broker"].update(username="l1", password_env="COFT_TEST_MQTT_PASSWORD")  # the line's own account
    config.write_text(yaml.safe_dump(settings))
    return config


@pytest.mark.broker
def test_every_feature_works_through_the_shipped_acl_and_only_the_operator_changes_thresholds(
        tmp_path, exported_bundle, parts, monkeypatch):
    broker = acl_broker(tmp_path, ROOT / "deploy/mosquitto/coft.acl")
    metrics_port = free_port()
    config = _acl_line(tmp_path, exported_bundle, broker.port, parts, metrics_port=metrics_port,
                       sparkplug={"group_id": "plant", "edge_node_id": "l1"})
    monkeypatch.setenv("COFT_TEST_MQTT_PASSWORD", "l1-pw")
    plc = Subscriber(broker.port, username="plc", password="plc-pw")
    scada = Subscriber(broker.port, topic="spBv1.0/#", username="scada", password="scada-pw")
    operator = Subscriber(broker.port, username="operator", password="operator-pw")
    runtime = start_runtime(config, tmp_path / "runtime.log")
    base = bundle_threshold(exported_bundle)
    try:
        assert plc.wait_for("verdict", 3), "the runtime's account must be able to publish verdicts"
        plc.client.publish("coft/l1/station/trigger", "P-1", qos=1)  # per camera
        plc.client.publish("coft/l1/trigger", json.dumps({"camera": "station", "part_id": "P-2"}), qos=1)  # line
        plc.client.publish("coft/l1/trigger", json.dumps({"camera": "cam9", "part_id": "P-3"}), qos=1)  # refused
        assert {r["part_id"] for r in plc.wait_for("result", 2, timeout=20)} == {"P-1", "P-2"}
        assert plc.wait_for("error", 1)[0]["command"] == "trigger"  # the line's error topic
        plc.client.publish("coft/l1/cam1/set/threshold", str(1.2 * base), qos=1)  # denied by the ACL
        time.sleep(2)
        assert not [s for s in plc.payloads("state") if s["source"] == "mqtt"]
        operator.client.publish("coft/l1/cam1/set/threshold", str(1.3 * base), qos=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [s for s in plc.payloads("state") if s["source"] == "mqtt"]:
            time.sleep(0.1)
        sparkplug = [topic.split("/")[2] for topic, _ in list(scada.messages)]
        assert {"NBIRTH", "DBIRTH", "DDATA"} <= set(sparkplug), sorted(set(sparkplug))
        assert {"heartbeat", "status", "state", "verdict"} <= {t.split("/")[-1] for t, _ in list(plc.messages)}
        for camera in ("cam1", "station", "sparkplug"):
            assert metric(metrics_port, "coft_broker_refused_total", camera) in (0, None), camera
        assert metric(metrics_port, "coft_sparkplug_connected") == 1
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        linted = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True)
        assert linted.returncode == 0, linted.stdout.decode() + linted.stderr.decode()  # Prometheus' own linter
    finally:
        assert stop(runtime) == 0
        for client in (plc, scada, operator):
            client.close()
        broker.stop()
    assert [s["threshold"] for s in plc.payloads("state") if s["source"] == "mqtt"] == [1.3 * base]
    assert "refused by the broker" not in (tmp_path / "runtime.log").read_text()


@pytest.mark.broker
def test_one_line_s_account_cannot_forge_another_line_s_verdicts_through_the_shipped_acl(tmp_path):
    """Issue 34: the shipped ACL let every box's account publish every line's verdict, so one box's password forged
    another line's `result: accept`. Mosquitto's own client, logged in as line l2, tries l1's topics."""
    broker = acl_broker(tmp_path, ROOT / "deploy/mosquitto/coft.acl")
    plc = Subscriber(broker.port, topic="#", username="plc", password="plc-pw")
    scada = Subscriber(broker.port, topic="spBv1.0/#", username="scada", password="scada-pw")

    def publish(topic: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", str(broker.port), "-u", "l2", "-P", "l2-pw",
                               "-q", "1", "-t", topic, "-m", '{"result": "accept"}'], capture_output=True, text=True)
    try:
        forged = [publish(t) for t in ("coft/l1/cam1/result", "coft/l1/cam1/verdict", "coft/l1/cam1/reject",
                                       "spBv1.0/plant/DDATA/l1/cam1", "spBv1.0/plant/NBIRTH/l1")]
        own = publish("coft/l2/cam1/result")
        deadline = time.monotonic() + 30  # the allowed one arrives; the forged ones, sent before it, did not
        while time.monotonic() < deadline and not plc.messages:
            time.sleep(0.1)
    finally:
        plc.close()
        scada.close()
        broker.stop()
    assert own.returncode == 0, own.stderr
    assert all("Not authorized" in f.stderr for f in forged), forged  # mosquitto_pub warns; its exit code is 0
    assert [t for t, _ in plc.messages] == ["coft/l2/cam1/result"] and scada.messages == []


@pytest.mark.broker
def test_a_publish_the_broker_refuses_is_counted_logged_and_shown(tmp_path, exported_bundle, parts, monkeypatch):
    acl = tmp_path / "no-result.acl"  # an ACL that forgot the fail-safe answers
    acl.write_text("\n".join(line for line in (ROOT / "deploy/mosquitto/coft.acl").read_text().splitlines()
                             if line != "pattern write coft/%u/+/result") + "\n")
    broker = acl_broker(tmp_path, acl)
    metrics_port, web_port = free_port(), free_port()
    config = _acl_line(tmp_path, exported_bundle, broker.port, parts, metrics_port=metrics_port,
                       web={"port": web_port})
    monkeypatch.setenv("COFT_TEST_MQTT_PASSWORD", "l1-pw")
    plc = Subscriber(broker.port, username="plc", password="plc-pw")
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        plc.wait_for("verdict", 3)
        for i in range(5):
            plc.client.publish("coft/l1/station/trigger", f"P-{i}", qos=1)
            time.sleep(0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not metric(metrics_port, "coft_broker_refused_total", "station"):
            time.sleep(0.2)
        assert metric(metrics_port, "coft_broker_refused_total", "station") >= 1
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/status", timeout=5).read())
        assert status["cameras"]["station"]["broker_refused"] >= 1
        assert "refused by the broker" in status["cameras"]["station"]["last_problem"]["message"]
        assert not plc.payloads("result")
    finally:
        assert stop(runtime) == 0
        plc.close()
        broker.stop()
    log = (tmp_path / "runtime.log").read_text()
    assert "mqtt station: publish to coft/l1/station/result refused by the broker (Not authorized)" in log
    assert log.count("publish to coft/l1/station/result refused") <= 2  # throttled


# -- 5. disk and resources ----------------------------------------------------------------------
@pytest.mark.broker
def test_full_disk_refuses_new_verdicts_loudly_keeps_the_old_and_recovers(tmp_path, exported_bundle, parts, tmpfs):
    disk = tmpfs(3)
    broker = Mosquitto(tmp_path / "broker").start()
    plc = Subscriber(broker.port)
    metrics_port = free_port()
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 20}],
                          outbox={"path": str(disk / "outbox.db")}, metrics_port=metrics_port)
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        plc.wait_for("verdict", 5)
        broker.stop()  # verdicts pile up in the outbox
        with open(disk / "filler", "wb") as filler:  # and the disk fills
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and metric(metrics_port, "coft_outbox_refusing") != 1:
            time.sleep(0.2)
        assert metric(metrics_port, "coft_outbox_refusing") == 1 and runtime.poll() is None
        assert metric(metrics_port, "coft_verdicts_refused_total", "cam1") > 0
        (disk / "filler").unlink()  # space returns
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and metric(metrics_port, "coft_outbox_refusing") != 0:
            time.sleep(0.2)
        assert metric(metrics_port, "coft_outbox_refusing") == 0
        broker.start()
        stored = len(plc.payloads("verdict"))
        plc.wait_for("verdict", stored + 20)
    finally:
        assert stop(runtime) == 0
        plc.close()
        broker.stop()
    seqs = list(dict.fromkeys(v["seq"] for v in plc.payloads("verdict")))
    assert seqs == sorted(seqs)  # every verdict that was stored arrived, in order
    missing = set(range(1, max(seqs) + 1)) - set(seqs)
    announced = {seq for gap in plc.payloads("gap") for seq in range(gap["missing"][0], gap["missing"][1] + 1)}
    assert missing and missing == announced  # the refused ones kept their numbers, and a gap message names them
    log = (tmp_path / "runtime.log").read_text()
    assert "verdicts are NOT being recorded" in log and "database or disk is full" in log
    assert "outbox accepts verdicts again" in log and "cannot rollback" not in log
    assert (disk / "outbox.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.broker
def test_a_corrupt_outbox_is_moved_aside_and_the_line_goes_on_in_a_new_epoch(tmp_path, exported_bundle,
                                                                                        parts):
    """Issue 34: a garbled outbox made every start exit 2 ("check outbox.path ..."), a restart loop with the line
    uninspected. Now the start moves it aside, numbers on in a new epoch, tells the PLC on the gap topic, and says
    it in the metric and the heartbeat until an operator acknowledges."""
    broker = Mosquitto(tmp_path / "broker").start()
    plc = Subscriber(broker.port)
    metrics_port = free_port()
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 20}],
                          metrics_port=metrics_port)
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        first = plc.wait_for("verdict", 5)
        broker.stop()  # verdicts wait in the outbox; a clean stop, then a disk fault garbles the file
        time.sleep(2)
        assert stop(runtime) == 0
        with open(tmp_path / "outbox.db", "r+b") as f:
            f.write(bytes(range(256)) * 16)  # its first page garbled: "file is not a database"
        broker.start()
        runtime = start_runtime(config, log)
        gap = plc.wait_for("gap", 1, timeout=60)[0]
        newer = [v for v in plc.wait_for("verdict", len(plc.payloads("verdict")) + 5) if v["epoch"] != first[0]["epoch"]]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("outbox_started_anew" in h for h in plc.payloads("heartbeat")):
            time.sleep(0.2)
        beats = [h for h in plc.payloads("heartbeat") if "outbox_started_anew" in h]
        assert runtime.poll() is None and metric(metrics_port, "coft_outbox_new_epoch") == 1
    finally:
        assert stop(runtime) == 0
        plc.close()
        broker.stop()
    assert gap["previous_epoch"] == first[0]["epoch"] and gap["epoch"] == newer[0]["epoch"]
    assert newer[0]["seq"] > max(v["seq"] for v in first)  # no number given twice
    assert beats and "moved aside" in beats[-1]["outbox_started_anew"] and list(tmp_path.glob("outbox.db.corrupt-*"))
    text = log.read_text()
    assert "moved aside" in text and "new epoch" in text and "Traceback" not in text


@pytest.mark.broker
def test_a_second_runtime_on_the_same_line_is_said_loudly_in_both(tmp_path, exported_bundle, parts):
    """Issue 34: a second runtime on the same line with its own outbox gave 109 number collisions in 40 s, and the
    first only logged `disconnected (Unspecified error)`. Each now sees the others' heartbeat epochs and says so,
    the pair with one client id too (Mosquitto 2.0 drops the older connection without MQTT 5's takeover code)."""
    broker = Mosquitto(tmp_path / "broker").start()
    runs = []
    try:
        for name, client_id in (("a", "box-a"), ("b", "box-b"), ("c", "box-a")):
            folder = tmp_path / name
            folder.mkdir()
            config = write_config(folder, exported_bundle, broker.port,
                                  [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 5}],
                                  broker={"port": broker.port, "line": "l1", "client_id": client_id})
            runs.append((start_runtime(config, folder / "runtime.log"), folder / "runtime.log"))
        said = "ANOTHER RUNTIME publishes verdicts for line l1, camera cam1"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(said in log.read_text() for _, log in runs):
            time.sleep(0.5)
    finally:
        for runtime, _ in runs:
            stop(runtime)
        broker.stop()
    texts = [log.read_text() for _, log in runs]
    assert all(said in t for t in texts), texts[0][-2000:]


# -- 6. one line instead of a traceback -------------------------------------------------------------
def _config(tmp_path, bundle, **changes) -> Path:
    config = write_config(tmp_path, bundle, 1883, [{"name": "cam1", "source": str(tmp_path)}])
    settings = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        holder = settings
        *parents, leaf = key.split(".")
        for parent in parents:
            holder = holder.setdefault(parent, {})
        holder[leaf] = value
    config.write_text(yaml.safe_dump(settings))
    return config


CASES = {
    "views 0": (lambda t, b: ["train", str(t), "--views", "0"], "--views: '0': give a whole number of at least 2"),
    "prefix with a wildcard": (lambda t, b: ["run", "--check", "--config", str(_config(t, b, **{"broker.prefix": "plant/#"}))],
                               "broker.prefix: String should match pattern"),
    "missing tls.ca": (lambda t, b: ["run", "--check", "--config", str(_config(t, b, **{"broker.tls": {"ca": "nowhere.pem"}}))],
                       "broker.tls.ca: file"),
    "broker port out of range": (lambda t, b: ["run", "--check", "--config", str(_config(t, b, **{"broker.port": 70000}))],
                                 "broker.port: Input should be less than or equal to 65535"),
    "camera folder missing": (lambda t, b: ["run", "--check", "--config", str(_config(t, b, cameras=[
        {"name": "cam1", "source": str(t / "no-such-folder")}]))], "camera cam1: "),
    "verify a missing file": (lambda t, b: ["verify", str(t / "missing.tar")], "no such file"),
    "pack onto an existing file": (lambda t, b: ["pack", str(b), "--out", str(t / "line.yaml")], "already exists"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(tmp_path, exported_bundle, case):
    command, message = CASES[case]
    (tmp_path / "line.yaml").write_text("exists")
    result = subprocess.run([COFT, *command(tmp_path, exported_bundle)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr.strip().splitlines()[-1]


def test_metrics_port_in_use_is_one_line(tmp_path, exported_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, exported_bundle, metrics_port=port)
        result = subprocess.run([COFT, "run", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"metrics_port {port} on 127.0.0.1: cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_state_file_in_status_and_archive_checks(tmp_path, exported_bundle):
    config = _config(tmp_path, exported_bundle)
    (tmp_path / "state.json").write_text("{truncated")
    result = subprocess.run([COFT, "status", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0 and "unreadable" in result.stdout and "uses the bundle's" in result.stdout
    assert "runtime     unknown: add a web: block" in result.stdout
    archive = tmp_path / "b.tar"
    with tarfile.open(archive, "w") as tar:  # what `tar -C bundle -cf b.tar .` makes
        tar.add(exported_bundle, arcname=".")
    shutil.copytree(exported_bundle, tmp_path / "b")  # and its bundle already unpacked beside it
    result = subprocess.run([COFT, "verify", str(archive)], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout)["ok"], result.stderr


def _certificate(subject: str, issuer_key, issuer_name, key, ca: bool):
    from datetime import datetime, timedelta, timezone
    from ipaddress import ip_address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)])
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _tls_files(tmp_path: Path) -> None:
    """broker_ca.pem, broker.pem and broker.key (for localhost), and other_ca.pem that signed nothing here."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def pem(item) -> bytes:
        if hasattr(item, "private_bytes"):
            return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
        return item.public_bytes(serialization.Encoding.PEM)

    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("broker_ca", "other_ca", "broker")}
    broker_ca = _certificate("broker CA", keys["broker_ca"], None, keys["broker_ca"], ca=True)
    other_ca = _certificate("another CA", keys["other_ca"], None, keys["other_ca"], ca=True)
    broker_cert = _certificate("localhost", keys["broker_ca"], broker_ca.subject, keys["broker"], ca=False)
    for name, item in [("broker_ca.pem", broker_ca), ("other_ca.pem", other_ca), ("broker.pem", broker_cert),
                       ("broker.key", keys["broker"])]:
        (tmp_path / name).write_bytes(pem(item))


def _tls_settings(tmp_path: Path) -> str:
    return f"cafile {tmp_path}/broker_ca.pem\ncertfile {tmp_path}/broker.pem\nkeyfile {tmp_path}/broker.key\n"


@pytest.mark.broker
def test_failed_tls_handshake_is_logged_with_its_cause(tmp_path, exported_bundle, parts):
    _tls_files(tmp_path)
    broker = Mosquitto(tmp_path / "broker", settings=f"allow_anonymous true\n{_tls_settings(tmp_path)}").start()
    config = write_config(tmp_path, exported_bundle, broker.port,  # the box trusts the wrong CA
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 5}])
    settings = yaml.safe_load(config.read_text())
    settings["broker"]["tls"] = {"ca": str(tmp_path / "other_ca.pem")}
    config.write_text(yaml.safe_dump(settings))
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        time.sleep(6)
        alive = runtime.poll() is None
    finally:
        assert stop(runtime) == 0
        broker.stop()
    assert alive
    lines = [line for line in (tmp_path / "runtime.log").read_text().splitlines() if "TLS handshake failed" in line]
    assert lines and "certificate verify failed" in lines[0] and "check broker.tls" in lines[0] and len(lines) <= 2


@pytest.mark.broker
def test_a_tls_link_under_load_through_the_shipped_acl_never_drops(tmp_path, exported_bundle, parts, monkeypatch):
    """Issue 34: the TLS link to the shipped TLS-only broker dropped every few minutes (Mosquitto: "unexpected eof
    while reading"), as publish() from the sender and heartbeat threads wrote to the SSL socket while paho read it.
    A soak, compressed: two cameras at 30 verdicts a second and a heartbeat every 20 ms each (about 20 times a
    line's publishing from other threads) for 60 s, over TLS, through the shipped ACL: no disconnect at all."""
    _tls_files(tmp_path)
    broker = acl_broker(tmp_path, ROOT / "deploy/mosquitto/coft.acl", _tls_settings(tmp_path))
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": n, "source": str(parts / "test/good"), "loop": True, "fps": 30}
                           for n in ("cam1", "cam2")], heartbeat_s=0.02)
    settings = yaml.safe_load(config.read_text())
    settings["broker"].update(username="l1", password_env="COFT_TEST_MQTT_PASSWORD",
                              tls={"ca": str(tmp_path / "broker_ca.pem")})
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("COFT_TEST_MQTT_PASSWORD", "l1-pw")
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        time.sleep(60)  # today's code dropped the link within seconds, then segfaulted
        alive = runtime.poll() is None
    finally:
        assert stop(runtime) == 0
        broker.stop()
    text, broker_log = log.read_text(), (tmp_path / "broker" / "mosquitto.log").read_text()
    served = broker_log[broker_log.index("New client connected"):]  # before it: the helper's probe of the port
    assert alive and text.count(": connected") == 2, text[-3000:]
    assert "disconnected (" not in text and "SSL routines" not in served, served[-2000:]
