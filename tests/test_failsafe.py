"""The fail-safe handshake, driven by a simulated PLC (tests/support/plc.py) against a real Mosquitto: every triggered
part is answered within its deadline (accept, reject, or a fail-safe reject saying why), or the heartbeat has
stopped so the PLC's default applies. No part is ever silently without an answer."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

from coft.runtime.config import load_config
from coft.runtime.pipeline import Runtime
from tests.support.broker import Subscriber
from tests.support.plc import SimulatedPlc
from tests.support.runtime import start_runtime, write_config
from tests.support.wait import wait_until

DEADLINE_MS = 400
HEARTBEAT_TIMEOUT_S = 0.6  # what the PLC allows between heartbeats (3 periods of heartbeat_s 0.2)


def _reasons(plc: SimulatedPlc, parts: list[str]) -> list:
    return [plc.answers(p)[0]["reason"] for p in parts if plc.answers(p)]


def test_every_part_is_answered_through_stalls_and_camera_loss(tmp_path, exported_bundle, mosquitto, parts):
    line = tmp_path / "line"
    shutil.copytree(parts / "test/good", line)
    config = write_config(tmp_path, exported_bundle, mosquitto.port, [
        {"name": "cam1", "source": str(line), "loop": True, "fps": 30, "trigger": True, "reconnect_max_s": 0.5},
        {"name": "slow", "source": str(parts / "test/good"), "loop": True, "fps": 0.5, "trigger": True},
    ], control={"trigger_deadline_ms": DEADLINE_MS}, heartbeat_s=0.2,
       backend="onnxruntime")  # the engine the fault is injected into: auto would time and swap it at warm-up
    runtime = Runtime(load_config(config))
    stall, infer = threading.Event(), runtime.inspector.engine.infer

    def stallable(batch):  # fault injection: inference hangs while `stall` is set
        while stall.is_set():
            time.sleep(0.01)
        return infer(batch)
    runtime.inspector.engine.infer = stallable
    worker = threading.Thread(target=runtime.run)
    plc, watcher = SimulatedPlc(mosquitto.port), Subscriber(mosquitto.port)
    worker.start()
    try:
        wait_until(lambda: runtime.intake.delivering("cam1") and runtime.links["cam1"].connected.is_set())
        time.sleep(0.5)

        normal = plc.run_line("cam1", 10, 20, "normal")
        plc.wait_for_answers(normal, timeout=5)
        stall.set()
        stalled = plc.run_line("cam1", 10, 8, "stalled")
        time.sleep(DEADLINE_MS / 1000 + 0.3)
        stall.clear()

        shutil.move(line, tmp_path / "line-gone")  # the camera goes away
        wait_until(lambda: not runtime.intake.delivering("cam1"))
        down = plc.run_line("cam1", 10, 5, "down")
        shutil.move(tmp_path / "line-gone", line)  # and comes back
        wait_until(lambda: runtime.intake.delivering("cam1"))
        back = plc.run_line("cam1", 10, 5, "back")

        starved = plc.run_line("slow", 1, 4, "starved")  # a camera giving a frame every 2 s
        watcher.client.publish("coft/l1/trigger", json.dumps({"camera": "cam9", "part_id": "p-1"}), qos=1)
        every = normal + stalled + down + back + starved
        plc.wait_for_answers(every, timeout=5)
        errors = watcher.wait_for("error", 1, timeout=5)
    finally:
        runtime.stop_event.set()
        worker.join(timeout=30)
        plc.close()
        watcher.close()

    judged = plc.judge(every, DEADLINE_MS / 1000, HEARTBEAT_TIMEOUT_S)
    assert judged["silent"] == [] and judged["late"] == [] and judged["defaulted"] == []
    assert all(len(plc.answers(p)) == 1 for p in every)  # exactly one answer per part
    assert {r["result"] for p in normal for r in plc.answers(p)} <= {"accept", "reject"}
    assert set(_reasons(plc, normal)) <= {None, "score"}
    assert _reasons(plc, stalled).count("timeout") >= 6  # the stall outlasted their deadlines
    assert set(_reasons(plc, down)) == {"camera_down"}
    assert max(plc.latencies_ms(down)) < DEADLINE_MS  # known at once, not after the deadline
    assert set(_reasons(plc, back)) <= {None, "score"}
    assert "no_frame" in _reasons(plc, starved)
    assert all(r["answered_ms"] <= DEADLINE_MS + 50 for p in every for r in plc.answers(p))  # the runtime's own clock
    assert errors[0]["error"].startswith("trigger for camera 'cam9', which this runtime does not have")
    late = [v for v in watcher.payloads("verdict") if v.get("late")]
    assert late and all(v["part_id"].startswith("stalled") for v in late)  # scored after the stall: recorded only
    failsafe = [v for v in watcher.payloads("verdict") if v.get("failsafe")]
    assert all(v["verdict"] == "reject" and v["score"] is None for v in failsafe)
    seqs = sorted(v["seq"] for v in watcher.payloads("verdict") if v["camera"] == "cam1")
    assert seqs == list(range(1, len(seqs) + 1))  # fail-safe rejects share the verdicts' numbering


def test_a_killed_runtime_leaves_no_part_silent(tmp_path, exported_bundle, mosquitto, parts):
    config = write_config(tmp_path, exported_bundle, mosquitto.port, [
        {"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 30, "trigger": True}],
        control={"trigger_deadline_ms": DEADLINE_MS}, heartbeat_s=0.2)
    plc = SimulatedPlc(mosquitto.port)
    watcher = Subscriber(mosquitto.port)
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        wait_until(lambda: len(plc.beats) >= 3, timeout=60)
        killed_at = []
        def kill(victim=runtime):
            killed_at.append(time.monotonic())
            victim.send_signal(signal.SIGKILL)
        killer = threading.Timer(2.0, kill)
        killer.start()
        before = plc.run_line("cam1", 10, 40, "kill")  # the runtime dies 2 s into these 4 s
        runtime.wait(timeout=10)
        runtime = start_runtime(config, log)
        beats = len(plc.beats)
        wait_until(lambda: len(plc.beats) > beats + 3, timeout=60)
        after = plc.run_line("cam1", 10, 10, "restarted")
        plc.wait_for_answers(after, timeout=5)
    finally:
        runtime.send_signal(signal.SIGTERM)
        runtime.wait(timeout=30)
        plc.close()
        watcher.close()
    judged = plc.judge(before + after, DEADLINE_MS / 1000, HEARTBEAT_TIMEOUT_S)
    assert judged["silent"] == [] and judged["late"] == []
    sent = {p: plc.sent[p][1] for p in before}
    after_kill = {p for p in before if sent[p] >= killed_at[0]}
    well_before = {p for p in before if sent[p] < killed_at[0] - 1.0}  # a deadline and a heartbeat timeout earlier
    assert len(after_kill) >= 5 and after_kill <= set(judged["defaulted"])  # the heartbeat had stopped
    assert well_before <= set(judged["answered"])  # a loaded machine may default the last second's, never earlier
    assert set(after) <= set(judged["answered"])
    assert "offline" in watcher.payloads("status")  # the Last Will: the broker says so at once
