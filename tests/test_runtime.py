"""The runtime against a real Mosquitto: every verdict arrives, in order, through outages and SIGKILL."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coft.runtime.box.status import health
from tests.support.broker import Mosquitto, Subscriber, free_port
from tests.support.parts import write_video
from tests.support.runtime import ROOT, assert_complete_and_ordered, start_runtime, write_config
from tests.support.wait import wait_for_log, wait_until


def outbox_depth(tmp_path: Path) -> int:
    """Messages waiting in the runtime's outbox; 0 before the runtime has made it."""
    try:
        with sqlite3.connect(tmp_path / "outbox.db") as db:
            return db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet: no such table
        return 0


@pytest.mark.broker
def test_broker_outage_mid_stream_loses_nothing(tmp_path, exported_bundle):
    broker = Mosquitto(tmp_path / "broker").start()
    plc = Subscriber(broker.port)
    video = write_video(tmp_path / "line.avi", 150)
    config = write_config(tmp_path, exported_bundle, broker.port, [{"name": "cam1", "source": str(video), "fps": 25}])
    runtime = start_runtime(config, tmp_path / "runtime.log", "--until-end")
    try:
        plc.wait_for("verdict", 10)
        broker.stop()  # the broker goes away for several seconds mid-stream
        time.sleep(4)
        broker.start()
        assert runtime.wait(timeout=120) == 0
    finally:
        runtime.kill()
    verdicts = plc.wait_for("verdict", 150, timeout=20)
    plc.close()
    broker.stop()
    seqs = assert_complete_and_ordered(verdicts)
    assert len(seqs) == 150  # queue large enough: no frame dropped, every one inspected
    rejects = plc.payloads("reject")
    assert {r["seq"] for r in rejects} == {v["seq"] for v in verdicts if v["verdict"] == "reject"}
    assert len({r["seq"] for r in rejects}) >= 10  # every 10th part is scratched
    assert outbox_depth(tmp_path) == 0
    log = (tmp_path / "runtime.log").read_text()
    assert "disconnected" in log and "verdicts wait in the outbox" in log
    assert "stopped" in plc.payloads("status")


@pytest.mark.broker
def test_a_broker_that_lost_its_retained_messages_has_the_state_again_and_counters_are_integers(
        tmp_path, exported_bundle, parts):
    broker = Mosquitto(tmp_path / "broker").start()
    config = write_config(tmp_path, exported_bundle, broker.port, [{"name": "cam1", "source": str(parts / "test/good"),
                                                                    "loop": True, "fps": 5}])
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        first = Subscriber(broker.port)
        assert first.wait_for("state", 1) and len(first.wait_for("heartbeat", 2)) >= 2
        first.close()
        beats = first.payloads("heartbeat")
        broker.stop()
        for stored in (tmp_path / "broker").glob("*.db"):
            stored.unlink()  # restarted without its store: every retained message is gone
        broker.start()
        later = Subscriber(broker.port)  # subscribes after the restart: gets only what is retained now
        states = later.wait_for("state", 1, timeout=20)
        later.close()
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=30)
        broker.stop()
    assert states and states[-1]["threshold"] == first.payloads("state")[-1]["threshold"]
    assert all(type(b[key]) is int for b in beats for key in ("beat", "frames", "accepts", "rejects", "unfired_rejects"))


def test_sigkill_mid_stream_then_restart_loses_nothing(tmp_path, exported_bundle, mosquitto):
    plc = Subscriber(mosquitto.port)
    video = write_video(tmp_path / "line.avi", 100)
    config = write_config(tmp_path, exported_bundle, mosquitto.port, [{"name": "cam1", "source": str(video), "fps": 25}])
    runtime = start_runtime(config, tmp_path / "runtime.log", "--until-end")
    plc.wait_for("verdict", 20)
    runtime.send_signal(signal.SIGKILL)
    runtime.wait(timeout=10)
    killed_at = max(v["seq"] for v in plc.payloads("verdict"))
    assert "offline" in plc.wait_for("status", 2)  # the broker published the Last Will
    runtime = start_runtime(config, tmp_path / "runtime.log", "--until-end")
    assert runtime.wait(timeout=120) == 0
    verdicts = plc.wait_for("verdict", killed_at + 100, timeout=20)
    plc.close()
    seqs = assert_complete_and_ordered(verdicts)
    assert max(seqs) >= killed_at + 100  # the restart replays the video: its verdicts continue the numbering
    assert outbox_depth(tmp_path) == 0


@pytest.mark.broker
def test_broker_down_at_start_then_up(tmp_path, exported_bundle):
    port = free_port()
    video = write_video(tmp_path / "line.avi", 30)
    config = write_config(tmp_path, exported_bundle, port, [{"name": "cam1", "source": str(video), "fps": 30}])
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        wait_until(lambda: outbox_depth(tmp_path) >= 30 or runtime.poll() is not None, 60,
                   "all frames scored while no broker exists")
        assert runtime.poll() is None, "the runtime must keep running without a broker"
        broker = Mosquitto(tmp_path / "broker", port).start()
        plc = Subscriber(port)
        verdicts = plc.wait_for("verdict", 30)
        plc.close()
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=20)
    broker.stop()
    assert len(assert_complete_and_ordered(verdicts)) == 30


def test_threshold_commands_and_trigger_mode(tmp_path, exported_bundle, mosquitto, parts):
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 5, "trigger": True}],
                          web={"port": free_port()})
    plc = Subscriber(mosquitto.port)
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        plc.wait_for("heartbeat", 2)  # sent after the link subscribed to its commands, on the same connection
        plc.client.publish("coft/l1/cam1/set/threshold", "not-a-number", qos=1)
        errors = plc.wait_for("error", 1)
        assert "is not a number" in errors[0]["error"]
        plc.client.publish("coft/l1/cam1/set/threshold", "1e6", qos=1)
        assert "outside the allowed" in plc.wait_for("error", 2)[1]["error"]  # bounded around the bundle's
        raised = 3 * json.loads((exported_bundle / "manifest.json").read_text())["threshold"]["value"]
        plc.client.publish("coft/l1/cam1/set/threshold", str(raised), qos=1)
        states = plc.wait_for("state", 2)
        assert states[-1]["threshold"] == raised and states[-1]["source"] == "mqtt"
        assert json.loads((tmp_path / "state.json").read_text())["cameras"]["cam1"] == raised
        assert plc.payloads("verdict") == []  # trigger mode: nothing inspected without a trigger
        report = wait_until(lambda: (lambda r: r if r["healthy"] else None)(health(config)), 30, "healthy")
        assert report["verdicts"] == 0 and report["problems"] == []  # a rollout waits on frames coming, not parts
        plc.client.publish("coft/l1/cam1/trigger", "part-42", qos=1)
        verdict = plc.wait_for("verdict", 1)[0]
        assert verdict["part_id"] == "part-42" and verdict["threshold"] == raised and verdict["verdict"] == "accept"
    finally:
        runtime.send_signal(signal.SIGTERM)
        assert runtime.wait(timeout=20) == 0
    plc.close()


def test_runtime_never_imports_torch_after_a_full_run(tmp_path, exported_bundle, mosquitto, parts):
    config = write_config(tmp_path, exported_bundle, mosquitto.port, [{"name": "cam1", "source": str(parts / "test/good")}],
                          evidence={"dir": str(tmp_path / "evidence"), "every_nth_pass": 2, "max_mb": 1})
    code = ("import sys; from coft.runtime.config import load_config; from coft.runtime.pipeline import Runtime; "
            f"Runtime(load_config({str(config)!r})).run(until_sources_end=True); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = sorted((tmp_path / "evidence" / "cam1").glob("*-accept.jpg"))  # raw frames; each also annotated
    assert len(saved) == 6 and all(p.with_suffix(".json").is_file() for p in saved)  # every 2nd of 12 good parts
    assert all(p.with_name(p.stem + "-annotated.jpg").is_file() for p in saved)
    assert {p.stat().st_mode & 0o777 for p in saved} == {0o600}  # evidence is the line's business only


def test_unreachable_camera_keeps_the_runtime_alive(tmp_path, exported_bundle, mosquitto):
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": f"rtsp://127.0.0.1:{free_port()}/nothing", "open_timeout_s": 1}])
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        wait_for_log(log, "retrying in", times=2, runtime=runtime)  # it tried twice and lives on
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=20)
    assert "camera cam1: cannot open" in log.read_text()


def test_bad_bundle_and_bad_config_fail_in_one_line(tmp_path, exported_bundle):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(exported_bundle, bundle)
    (bundle / "gaussian.npz").write_bytes(b"tampered")
    config = write_config(tmp_path, bundle, 1883, [{"name": "cam1", "source": "0"}])
    result = subprocess.run([sys.executable, "-m", "coft.runtime", "--config", str(config), "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "checksum mismatch for gaussian.npz" in result.stderr
    config.write_text("bundle: b\ncameras:\n  - name: cam1\n    source: 0\n    exposure: 3\n")
    result = subprocess.run([sys.executable, "-m", "coft.runtime", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "line 5, cameras.0.exposure: Extra inputs are not permitted" in result.stderr


def _start_rtsp(port: int) -> subprocess.Popen:
    system_python = "/usr/bin/python3"
    probe = subprocess.run([system_python, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.fail("GStreamer RTSP server not installed: apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi "
                    "gstreamer1.0-plugins-ugly (see .ci/run)")
    server = subprocess.Popen([system_python, str(ROOT / "tests/support/rtsp_server.py"), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout.readline().strip() == "ready"
    return server


def test_real_rtsp_stream_and_camera_reconnect(tmp_path, exported_bundle, mosquitto):
    port = free_port()
    server = _start_rtsp(port)
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": f"rtsp://127.0.0.1:{port}/line", "open_timeout_s": 2,
                            "reconnect_max_s": 1}], web={"port": free_port()})
    plc = Subscriber(mosquitto.port)
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        assert len(plc.wait_for("verdict", 5, timeout=60)) >= 5
        server.kill()  # the camera goes away
        server.wait()
        time.sleep(4)
        before = len(plc.payloads("verdict"))
        server = _start_rtsp(port)  # and comes back
        assert len(plc.wait_for("verdict", before + 5, timeout=60)) >= before + 5
        status = subprocess.run([sys.executable, "-m", "coft.cli", "status", "--config", str(config)],
                                cwd=ROOT, capture_output=True, text=True)
        assert status.returncode == 0 and "camera cam1: delivering; broker connected" in status.stdout
        assert "  last error  " in status.stdout and "WARNING camera cam1: " in status.stdout  # the outage, still shown
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=20)
        server.kill()
    plc.close()
    stopped = subprocess.run([sys.executable, "-m", "coft.cli", "status", "--config", str(config)], cwd=ROOT,
                             capture_output=True, text=True)
    assert stopped.returncode == 3 and "runtime     NOT RUNNING: nothing answers on port" in stopped.stdout
    log = (tmp_path / "runtime.log").read_text()
    assert "camera cam1: lost the stream; reconnecting" in log
    assert_complete_and_ordered(plc.payloads("verdict"))
