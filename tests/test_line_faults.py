"""How a plant runs the line, and what used to let parts through uninspected: a hung engine, a crowd of
idle viewers, a triggered camera beside a continuous one, a filling disk, two runtimes on one config,
a full outbox, camera names that are labels, and bad input that passed the check. The real runtime,
a real Mosquitto, real files."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from coft.runtime.config import load_config
from coft.runtime.model.bundle import MANIFEST, _seal
from coft.runtime.model.errors import CoftError
from tests.support.broker import Mosquitto, Subscriber, acl_broker, free_port, metric
from tests.support.parts import good_part
from tests.support.runtime import ROOT, start_runtime, stop, write_config

COFT = str(Path(sys.executable).parent / "coft")


def spinning_bundle(exported: Path, target: Path) -> Path:
    """A sealed bundle whose graph never returns: an ONNX Loop with no trip count whose condition stays true."""
    import onnx
    from onnx import TensorProto, helper

    bundle = shutil.copytree(exported, target)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])], "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["start"], value=helper.make_tensor("s", TensorProto.FLOAT, [1], [0.0])),
         helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])),
         helper.make_node("Loop", ["", "go", "start"], ["final"], body=body),
         helper.make_node("Identity", ["final"], ["score"]), helper.make_node("Identity", ["final"], ["embedding"])],
        "hung", [helper.make_tensor_value_info("frame", TensorProto.UINT8, ["n", None, None, 3])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, bundle / "model.onnx")
    reseal(bundle)
    return bundle


def reseal(bundle: Path) -> None:
    """Checksums that match what is in the folder now: only loading the graph can tell it is wrong."""
    _seal(bundle, json.loads((bundle / MANIFEST).read_text()))


def metric_now(port: int, name: str, camera: str | None = None) -> float:
    """The metric's value, 0 while the runtime is still starting (nothing listens yet)."""
    try:
        return metric(port, name, camera) or 0.0
    except OSError:
        return 0.0


def status_of(port: int) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5).read())


# -- item 2: a hung engine is a stall -------------------------------------------------------------------------
def test_a_hung_engine_shows_in_status_metrics_and_retained_status_then_ends_with_exit_2(
        tmp_path, exported_bundle, mosquitto, parts):
    bundle = spinning_bundle(exported_bundle, tmp_path / "hung.bundle")
    metrics_port, web_port = free_port(), free_port()
    config = write_config(tmp_path, bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 10}],
                          stall_s=4, metrics_port=metrics_port, web={"port": web_port})
    plc = Subscriber(mosquitto.port)
    started = time.monotonic()
    runtime = subprocess.Popen([COFT, "run", "--config", str(config)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    seen_waiting = seen_status = 0.0
    try:
        while runtime.poll() is None and time.monotonic() - started < 60:
            seen_waiting = max(seen_waiting, metric_now(metrics_port, "coft_inspection_waiting_seconds"))
            try:
                seen_status = max(seen_status, status_of(web_port)["inspection_waiting_s"])
            except OSError:
                pass
            time.sleep(0.3)
        exited_after = time.monotonic() - started
        assert runtime.wait(timeout=30) == 2
    finally:
        runtime.kill()
    stderr = runtime.stderr.read()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("coft: error: the engine has not returned for") and "systemd restarts it" in last
    assert seen_waiting >= 2 and seen_status >= 2  # the wait grew where an integrator looks
    assert plc.wait_for("status", 2)[-1] == "stalled"  # retained: a PLC that checks status rejects
    assert not plc.payloads("verdict")
    plc.close()
    print(f"hung engine: exit 2 after {exited_after:.1f}s (stall_s 4, start included)")


# -- item 3: viewers cannot starve inspection ------------------------------------------------------------------
def _verdict_rate(plc: Subscriber, seconds: float) -> float:
    before, started = len(plc.payloads("verdict")), time.monotonic()
    time.sleep(seconds)
    return (len(plc.payloads("verdict")) - before) / (time.monotonic() - started)


def test_a_thousand_idle_viewers_under_1024_open_files_do_not_slow_inspection(tmp_path, exported_bundle, mosquitto,
                                                                               parts):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the test opens 1,100 connections and needs more than {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    web_port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 20}],
                          web={"port": web_port, "idle_timeout_s": 5}, metrics_port=metrics_port)
    plc = Subscriber(mosquitto.port)
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # systemd's default soft limit # noqa: E731
    runtime = subprocess.Popen([COFT, "run", "--config", str(config)], cwd=ROOT, preexec_fn=limit,
                               stdout=open(tmp_path / "runtime.log", "w"), stderr=subprocess.STDOUT)
    viewers = []
    try:
        plc.wait_for("verdict", 20)
        alone = _verdict_rate(plc, 6)
        for _ in range(1100):  # each asks for the live stream, then never reads
            viewer = socket.create_connection(("127.0.0.1", web_port), timeout=5)
            viewer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                viewer.sendall(b"GET /api/cameras/cam1/live.mjpg HTTP/1.1\r\nHost: box\r\n\r\n")
            except OSError:
                pass  # closed at once by the runtime: over web.max_connections
            viewers.append(viewer)
        crowded = _verdict_rate(plc, 6)
        assert runtime.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
            assert page.status == 200  # the box still answers
    finally:
        for viewer in viewers:
            viewer.close()
        assert stop(runtime) == 0
        plc.close()
    print(f"verdicts/s alone {alone:.2f}, with 1,100 idle viewers {crowded:.2f}")
    assert crowded >= 0.9 * alone
    log = (tmp_path / "runtime.log").read_text()
    assert "Too many open files" not in log and "Traceback" not in log
    assert log.count("connections are open (web.max_connections)") <= 3  # throttled
    assert len(log) < 200_000


# -- item 4: triggered parts first ------------------------------------------------------------------------------
SLOW_ENGINE = """
import sys, time
import coft.runtime.engines.onnxruntime as ort_engine
infer = ort_engine.OnnxRuntimeEngine.infer
def slow(self, frames):  # a CPU box scoring a big model: 40 ms a frame
    time.sleep(0.04 * len(frames))
    return infer(self, frames)
ort_engine.OnnxRuntimeEngine.infer = slow
from coft.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def test_triggered_parts_are_answered_in_time_beside_a_busy_continuous_camera(tmp_path, exported_bundle, mosquitto,
                                                                             parts):
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "station", "source": str(parts / "test/good"), "loop": True, "trigger": True},
                           {"name": "overview", "source": str(parts / "test/good"), "loop": True, "fps": 60}],
                          queue_size=4, max_batch=4)
    plc = Subscriber(mosquitto.port)
    runtime = subprocess.Popen([sys.executable, "-c", SLOW_ENGINE, str(config)], cwd=ROOT,
                               stdout=open(tmp_path / "runtime.log", "w"), stderr=subprocess.STDOUT)
    try:
        plc.wait_for("verdict", 5)
        plc.client.publish("coft/l1/station/trigger", b"", qos=1)  # an empty part id is refused, in one line
        for i in range(30):
            plc.client.publish("coft/l1/station/trigger", f"P-{i}", qos=1)
            time.sleep(0.2)
        results = plc.wait_for("result", 30, timeout=20)
    finally:
        assert stop(runtime) == 0
        plc.close()
    answered = {r["part_id"]: r for r in results}
    assert sorted(answered) == sorted(f"P-{i}" for i in range(30))
    failsafe = [r for r in answered.values() if r.get("reason") in ("timeout", "no_frame", "camera_down")]
    assert not failsafe, f"{len(failsafe)} of 30 triggered parts fail-safe rejected: {failsafe[:3]}"
    assert max(r["answered_ms"] for r in answered.values()) < 500
    assert any(e.get("command") == "trigger" and "part id is empty" in e["error"] for e in plc.payloads("error"))
    overview = [v for v in plc.payloads("verdict") if v["camera"] == "overview"]
    assert overview and all(v["latency_ms"] >= 0 for v in plc.payloads("verdict"))


# -- item 5: the outbox's disk is reserved ----------------------------------------------------------------------
def test_the_harvest_stops_loudly_before_the_outbox_runs_out_of_room(tmp_path, exported_bundle, mosquitto, tmpfs):
    disk = tmpfs(24)
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):  # big, noisy frames: each harvested one takes hundreds of kilobytes
        cv2.imwrite(str(frames / f"f{i:02d}.png"), rng.integers(0, 255, (600, 600, 3), dtype=np.uint8))
    metrics_port = free_port()
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(frames), "loop": True, "fps": 20}],
                          outbox={"path": str(disk / "outbox.db"), "reserve_mb": 12},
                          harvest={"dir": str(disk / "harvest"), "every_nth_pass": 1, "max_mb": 100},
                          metrics_port=metrics_port)
    plc = Subscriber(mosquitto.port)
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        plc.wait_for("verdict", 200, timeout=60)
        assert runtime.poll() is None
        assert metric(metrics_port, "coft_verdicts_refused_total", "cam1") == 0
        assert shutil.disk_usage(disk).free >= 6 * 2**20  # the floor held (SQLite's WAL takes up to ~4 MB of it)
    finally:
        assert stop(runtime) == 0
        plc.close()
    log = (tmp_path / "runtime.log").read_text()
    assert "harvest: not writing:" in log and "reserved for verdicts (outbox.reserve_mb)" in log
    assert "verdicts are NOT being recorded" not in log


# -- item 6: one runtime per line -------------------------------------------------------------------------------
def test_a_second_runtime_on_the_same_config_refuses_naming_the_first(tmp_path, exported_bundle, mosquitto, parts):
    config = write_config(tmp_path, exported_bundle, mosquitto.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 10}])
    plc = Subscriber(mosquitto.port)
    first = start_runtime(config, tmp_path / "first.log")
    try:
        plc.wait_for("verdict", 5)
        second = subprocess.run([COFT, "run", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"another coft runtime (PID {first.pid}) is running on" in second.stderr.strip().splitlines()[-1]
        count = len(plc.payloads("verdict"))
        plc.wait_for("verdict", count + 10)
        assert first.poll() is None
        check = ROOT.joinpath("deploy/cpu/Dockerfile").read_text().split("HEALTHCHECK", 1)[1].split("CMD", 1)[1]
        command = json.loads(check.splitlines()[0].strip())
        command[-1] = command[-1].replace("/var/lib/coft", str(tmp_path))
        assert subprocess.run(command).returncode == 0  # the image's HEALTHCHECK, against this runtime
    finally:
        assert stop(first) == 0
        plc.close()
    assert "offline" not in plc.payloads("status")  # the first never lost its connection to the second


# -- item 7: drops are counted ----------------------------------------------------------------------------------
@pytest.mark.broker
def test_outbox_overflow_is_counted_in_metrics_status_and_heartbeat(tmp_path, exported_bundle, parts):
    broker = Mosquitto(tmp_path / "broker")  # not started: the broker is away
    metrics_port, web_port = free_port(), free_port()
    config = write_config(tmp_path, exported_bundle, broker.port,
                          [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 100}],
                          outbox={"path": str(tmp_path / "outbox.db"), "max_messages": 100},
                          metrics_port=metrics_port, web={"port": web_port})
    runtime = start_runtime(config, tmp_path / "runtime.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and metric_now(metrics_port, "coft_outbox_dropped_total", "cam1") < 100:
            time.sleep(0.5)
        dropped = metric(metrics_port, "coft_outbox_dropped_total", "cam1")
        assert dropped >= 100
        assert status_of(web_port)["cameras"]["cam1"]["outbox_dropped"] >= dropped
        broker.start()
        plc = Subscriber(broker.port)
        beat = plc.wait_for("heartbeat", 1)[0]
        assert isinstance(beat["outbox_dropped"], int) and beat["outbox_dropped"] >= 100
        plc.close()
    finally:
        assert stop(runtime) == 0
        broker.stop()
    assert (tmp_path / "runtime.log").read_text().count("outbox full") <= 3


# -- item 8 and 9: bad input, one line each ---------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "line.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("bundle: b\ncameras:\n  - {name: good, source: x}\n", "'good' is the name of a folder the harvest keeps"),
    ("bundle: b\ncameras:\n  - {name: Defect, source: x}\n", "name the camera after its station"),
    ("bundle: b\nstall_s: 10\ncameras:\n  - {name: c, source: x}\nstall_s: 20\n",
     "line 2 and line 5 both set 'stall_s'; keep one of them"),
    ("bundle: b\ncameras:\n  - {name: c, source: x}\nbroker:\n  port: 1\n  port: 2\n", "line 5 and line 6 both set 'port'"),
    ("bundle: b\nstall_s: .inf\ncameras:\n  - {name: c, source: x}\n", "stall_s: Input should be a finite number"),
])
def test_config_refuses_label_names_repeated_keys_and_infinity(tmp_path, text, message):
    with pytest.raises(CoftError, match=message):
        load_config(_write(tmp_path, text))


def _check(config: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([COFT, *(command or ("run", "--check", "--config")), str(config)],
                          capture_output=True, text=True, timeout=120)


def test_check_and_verify_refuse_what_run_would_refuse(tmp_path, exported_bundle, mosquitto, parts):
    broken = shutil.copytree(exported_bundle, tmp_path / "broken.bundle")
    (broken / "model.onnx").write_bytes(random.Random(0).randbytes(4096))  # bytes that made a frontend print them
    reseal(broken)
    cases = {
        "random bytes for a graph": ({"bundle": str(broken)}, "ONNX Runtime cannot load this graph"),
        "token variable unset": ({"web": {"token_env": "COFT_NO_SUCH_TOKEN"}},
                                 "web.token_env: environment variable COFT_NO_SUCH_TOKEN is not set"),
        "outbox a folder": ({"outbox": {"path": str(tmp_path)}}, f"{tmp_path} is a folder"),
        "outbox under /proc": ({"outbox": {"path": "/proc/coft/outbox.db"}}, "/proc/coft/outbox.db"),
        "malformed trusted client": ({"opcua": {"allow_anonymous": True, "trusted_clients": [str(tmp_path / "plc.der")]}},
                                     "opcua.trusted_clients.0: %s is not a readable DER certificate" % (tmp_path / "plc.der")),
        # issue 34: --check said OK (or run failed with a traceback) for each of these
        "empty broker host": ({"broker": {"host": "", "port": mosquitto.port}}, "broker.host is empty"),
        "evidence under /proc": ({"evidence": {"dir": "/proc/coft-evidence"}}, "evidence.dir: /proc/coft-evidence"),
        "harvest a file": ({"harvest": {"dir": str(tmp_path / "plc.der")}}, f"{tmp_path / 'plc.der'} is not a writable"),
        "web port is the metrics port": ({"web": {"port": 18555}, "metrics_port": 18555},
                                         "metrics_port 18555 is also web.port"),
        "web.bind not this box's": ({"web": {"bind": "203.0.113.7"}}, "web.bind: '203.0.113.7' is not an address of"),
        "empty token file": ({"web": {"token_file": str(tmp_path / "empty-token")}}, "empty-token is empty"),
        "a heartbeat that floods": ({"heartbeat_s": 0.0001}, "heartbeat_s: Input should be greater than or equal to"),
        "OPC UA without security and without a user": ({"opcua": {"security": ["None"]}},
                                                       "opcua: no user a PLC could log in as"),
        "a GStreamer pipeline without GStreamer": ({"cameras": [{"name": "cam1", "source": "videotestsrc ! appsink"}]},
                                                   "this box's OpenCV was built without GStreamer"),
    }
    (tmp_path / "plc.der").write_bytes(b"not a certificate")
    (tmp_path / "empty-token").write_text("\n")
    from coft.runtime.box.check import gstreamer_in_opencv
    if gstreamer_in_opencv():  # an OpenCV with GStreamer runs the pipeline: nothing to refuse
        del cases["a GStreamer pipeline without GStreamer"]
    for name, (extra, message) in cases.items():
        bundle = extra.pop("bundle", exported_bundle)
        cameras = extra.pop("cameras", [{"name": "cam1", "source": str(parts / "test/good")}])
        config = write_config(tmp_path, bundle, mosquitto.port, cameras, **extra)
        for command in (("run", "--check", "--config"), ("run", "--until-end", "--config")):
            result = _check(config, *command)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and message in lines[-1], (name, command, result.stderr[-1500:])
            assert "Traceback" not in result.stderr, (name, command)
    result = _check(broken, "verify")
    assert result.returncode == 2 and "ONNX Runtime cannot load this graph" in result.stderr
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config = write_config(fresh, exported_bundle, free_port(), [{"name": "cam1", "source": str(parts / "test/good")}])
    result = _check(config)
    assert result.returncode == 0 and "NOT reachable now" in result.stdout  # reported, not fatal
    assert sorted(p.name for p in fresh.iterdir()) == ["line.yaml"]  # nothing made that a root shell would own


@pytest.mark.broker
def test_check_logs_in_to_the_broker_as_the_runtime_will(tmp_path, exported_bundle, parts, monkeypatch):
    """Issue 34: `coft run --check` said "broker reachable" with a wrong password: it never logged in."""
    broker = acl_broker(tmp_path, ROOT / "deploy/mosquitto/coft.acl")
    try:
        config = write_config(tmp_path, exported_bundle, broker.port, [{"name": "cam1", "source": str(parts / "test/good")}],
                              broker={"port": broker.port, "line": "l1", "username": "l1",
                                      "password_env": "COFT_TEST_MQTT_PASSWORD"})
        monkeypatch.setenv("COFT_TEST_MQTT_PASSWORD", "wrong")
        refused = _check(config)
        monkeypatch.setenv("COFT_TEST_MQTT_PASSWORD", "l1-pw")
        accepted = _check(config)
    finally:
        broker.stop()
    assert refused.returncode == 2 and "refused the login (Not authorized)" in refused.stderr, refused.stderr
    assert accepted.returncode == 0 and "logged in as l1" in accepted.stdout, accepted.stderr


CLOCK_STEPS_BACK = """
import sys, time
real = time.time
t0 = real()
time.time = lambda: t0 - 2 * (real() - t0)  # the wall clock runs backwards (an NTP step, a bad RTC)
from coft.cli import main
sys.exit(main(["run", "--until-end", "--config", sys.argv[1]]))
"""


def test_tiny_frames_are_rejected_with_a_reason_and_latency_survives_a_clock_step(tmp_path, exported_bundle,
                                                                                 mosquitto):
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        cv2.imwrite(str(folder / f"p{i}.png"), good_part(rng))
    cv2.imwrite(str(folder / "p3-tiny.png"), np.full((1, 1), 128, np.uint8))
    config = write_config(tmp_path, exported_bundle, mosquitto.port, [{"name": "cam1", "source": str(folder)}])
    plc = Subscriber(mosquitto.port)
    runtime = subprocess.run([sys.executable, "-c", CLOCK_STEPS_BACK, str(config)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert runtime.returncode == 0, runtime.stderr[-2000:]
    verdicts = plc.wait_for("verdict", 7)
    plc.close()
    assert len(verdicts) == 7 and all(v["latency_ms"] >= 0 for v in verdicts)
    tiny = [v for v in verdicts if v["part_id"] == "p3-tiny"]
    assert tiny and tiny[0]["verdict"] == "reject" and tiny[0]["reason"] == "frame_too_small"
    assert "a 1x1 frame is too small to inspect" in runtime.stderr


# -- item 10: mends -------------------------------------------------------------------------------------------
def test_importing_the_runtime_changes_neither_pillows_guard_nor_the_environment():
    probe = ("import os, PIL.Image as I; limit = I.MAX_IMAGE_PIXELS; import coft.runtime.model.images, coft.runtime.cameras.sources;"
             "print(I.MAX_IMAGE_PIXELS == limit, 'OPENCV_FFMPEG_CAPTURE_OPTIONS' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_CAPTURE_OPTIONS"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_a_service_whose_set_up_outlives_its_timeout_says_so():
    import asyncio

    from coft.runtime.comms.loops import LoopService

    class Slow(LoopService):
        async def setup(self):
            await asyncio.sleep(5)

        async def teardown(self, resource):
            pass

    with pytest.raises(CoftError, match="slow: setting up took longer than 0s"):
        Slow("slow").launch(timeout_s=0.3)
