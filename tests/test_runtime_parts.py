"""The runtime's parts on their own: outbox policy, frame queue, config, evidence, threshold state."""

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from coft.runtime.cameras.sources import Frame, crop, source_kind
from coft.runtime.comms.outbox import Outbox, OutboxRefused
from coft.runtime.config import CameraConfig, ControlConfig, EvidenceConfig, load_config, valid_threshold
from coft.runtime.line.evidence import Evidence
from coft.runtime.line.inspector import FrameQueue
from coft.runtime.line.thresholds import ThresholdState
from coft.runtime.line.verdict import Verdict
from coft.runtime.model.errors import CoftError


def _put(outbox, camera, reject, n=1):
    for _ in range(n):
        outbox.put_verdict(camera, lambda seq: [(f"t/{camera}", json.dumps({"seq": seq}).encode())], reject)


def test_outbox_keeps_order_and_numbering_across_reopen(tmp_path):
    outbox = Outbox(tmp_path / "o.db")
    _put(outbox, "cam1", False, 3)
    _put(outbox, "cam2", False, 1)
    first = outbox.pending("cam1")
    outbox.ack(first[0].id)
    outbox.close()
    outbox = Outbox(tmp_path / "o.db")
    assert [json.loads(m.payload)["seq"] for m in outbox.pending("cam1")] == [2, 3]
    _put(outbox, "cam1", False)
    assert json.loads(outbox.pending("cam1")[-1].payload)["seq"] == 4  # numbering continues after a restart
    assert json.loads(outbox.pending("cam2")[0].payload)["seq"] == 1  # each camera counts its own


def _epoch_outbox(tmp_path, told: list) -> Outbox:
    return Outbox(tmp_path / "o.db", gap=lambda camera, info: told.append((camera, info)) or [],
                  watermark=tmp_path / "seq-watermark.json")


def _seqs(outbox: Outbox, camera: str = "cam1") -> list[int]:
    return [json.loads(m.payload)["seq"] for m in outbox.pending(camera, limit=1000)]


@pytest.mark.parametrize("fault", ["deleted", "restored from a backup", "its -wal lost", "cut in half", "garbled page"])
def test_a_lost_rolled_back_or_corrupt_outbox_starts_a_new_epoch_and_never_reuses_a_number(tmp_path, caplog, fault):
    """Issue 34: 30 unsent verdicts, then the outbox emptied, deleted, restored without its -wal or cut: the start
    numbered again from 1 (or the rolled-back counter), without a word. Now the numbers go on in a new epoch, a gap
    message per camera says what may be lost, a corrupt file is moved aside (kept), and the start says why."""
    import shutil
    told: list = []
    outbox = _epoch_outbox(tmp_path, told)
    first_epoch = outbox.epoch
    _put(outbox, "cam1", True, 10)
    outbox.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(tmp_path / "o.db", tmp_path / "backup.db")
    _put(outbox, "cam1", True, 30)
    outbox.db.close()
    if fault == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp_path}/o.db{suffix}").unlink(missing_ok=True)
    elif fault == "restored from a backup":
        shutil.copy(tmp_path / "backup.db", tmp_path / "o.db")
    elif fault == "its -wal lost":  # the 30 lived in the log only: without it the file is as after the first 10
        shutil.copy(tmp_path / "backup.db", tmp_path / "o.db")
        Path(f"{tmp_path}/o.db-wal").unlink(missing_ok=True)
    elif fault == "cut in half":
        data = (tmp_path / "o.db").read_bytes()
        (tmp_path / "o.db").write_bytes(data[:len(data) // 2])
    else:
        with open(tmp_path / "o.db", "r+b") as f:
            f.seek(4096)  # the message table's page
            f.write(bytes(range(256)) * 16)
    outbox = _epoch_outbox(tmp_path, told)
    _put(outbox, "cam1", True, 1)
    assert outbox.epoch != first_epoch and outbox.started_anew
    assert _seqs(outbox)[-1] == 41  # never a number of the old epoch again, and still increasing for the PLC
    assert told and told[-1][1]["previous_epoch"] == first_epoch and told[-1][1]["last_seq"] == 40
    assert "new epoch" in caplog.text and "ERROR" in caplog.text.upper()
    if fault in ("cut in half", "garbled page"):
        kept = list(tmp_path.glob("o.db.corrupt-*"))
        assert kept and "moved aside" in outbox.started_anew
    elif fault != "deleted":
        assert _seqs(outbox) == [*range(1, 11), 41]  # what survived is still sent, in its own epoch
    outbox.close()
    again = _epoch_outbox(tmp_path, told)
    assert again.epoch == outbox.epoch and again.started_anew is None  # a clean restart keeps the epoch


def test_full_outbox_drops_accepts_before_rejects_counts_them_and_logs_once(tmp_path, caplog):
    heard = []
    outbox = Outbox(tmp_path / "o.db", max_messages=100, on_drop=lambda camera, n: heard.append((camera, n)))
    _put(outbox, "cam1", True, 10)
    _put(outbox, "cam1", False, 95)
    assert outbox.depth() == 100 and outbox.dropped == {"cam1": 5} and sum(n for _, n in heard) == 5
    kinds = [json.loads(m.payload)["seq"] for m in outbox.pending("cam1", limit=200)]
    assert kinds[:10] == list(range(1, 11))  # all rejects kept
    _put(outbox, "cam1", True, 100)  # only rejects fit now
    _put(outbox, "cam2", False, 1000)
    assert outbox.depth() == 100 and outbox.dropped["cam1"] == 105 and outbox.dropped["cam2"] == 1000
    assert 1 <= caplog.text.count("outbox full") <= 3  # a broker away for hours leaves lines, not a full disk


def test_frame_queue_drops_oldest_and_counts():
    dropped = []
    queue = FrameQueue(2, dropped.append)
    for i in range(5):
        queue.put(Frame("cam1", i, 0.0, np.zeros((2, 2, 3), np.uint8)))
    assert [f.frame_id for f in dropped] == [0, 1, 2]
    assert not queue.has_room("cam1") and queue.has_room("cam2")  # a full camera's frames are not resized ahead
    assert [f.frame_id for f in queue.take(8, 0.1)] == [3, 4]
    assert queue.has_room("cam1")
    assert queue.take(8, 0.01) == []


def test_config_examples_and_errors(tmp_path):
    example = load_config("deploy/line.yaml")
    assert example.cameras[0].name == "cam1" and example.broker.line == "line3"
    path = tmp_path / "c.yaml"
    path.write_text("bundle: b\ncameras: []\n")
    with pytest.raises(CoftError, match="line 2, cameras: List should have at least 1 item"):
        load_config(path)
    path.write_text("bundle: b\ncameras: [{name: a, source: 0}]\nbroker: {password_env: X}\n")
    with pytest.raises(CoftError, match="without username"):
        load_config(path)
    path.write_text("bundle: [unclosed\n")
    with pytest.raises(CoftError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(CoftError, match="cannot read the config"):
        load_config(tmp_path / "missing.yaml")


def test_broker_password_from_env_or_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("bundle: b\ncameras: [{name: a, source: 0}]\nbroker: {username: u, password_env: COFT_PW}\n")
    config = load_config(path)
    with pytest.raises(CoftError, match="COFT_PW is not set"):
        config.broker.password()
    monkeypatch.setenv("COFT_PW", "s3cret")
    assert config.broker.password() == "s3cret"


def test_source_kinds_and_roi(tmp_path):
    kinds = {"0": "usb", "/dev/video2": "usb", "rtsp://h/s": "rtsp", "videotestsrc ! appsink": "gstreamer",
             str(tmp_path): "folder", "clip.mp4": "file"}
    for source, kind in kinds.items():
        assert source_kind(CameraConfig(name="c", source=source)) == kind
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert crop(image, (5, 2, 10, 4)).shape == (4, 10, 3)
    with pytest.raises(ValueError, match="outside"):
        crop(image, (15, 0, 10, 4))


def test_threshold_commands_are_validated_bounded_per_camera_persisted_and_audited(tmp_path, caplog):
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="coft.audit")
    path = tmp_path / "state.json"
    state = ThresholdState(path, 5.0, "m1", ["cam1", "cam2"], ControlConfig(threshold_factor=2))
    for payload, message in [(b"abc", "not a number"), (b"-1", "positive"), (b"nan", "not a number"),
                                 (b"2_5", "not a number"), ("٢٥".encode(), "not a number"), (b"inf", "not a number"),
                             (b"1e-300", "outside the allowed 2.5 .. 10"), (b"11", "outside the allowed"),
                             (b"5" + b"0" * (1 << 20), "of 1048577 bytes is too long")]:
        with pytest.raises(CoftError, match=message):
            state.set("cam1", payload)
    assert state.set("cam1", b"7.5")["threshold"] == 7.5
    assert state.value("cam2") == 5.0  # one camera's command leaves the others alone
    assert "AUDIT threshold camera=cam1 previous=5 new=7.5 model=m1" in caplog.text
    assert path.stat().st_mode & 0o777 == 0o600
    again = ThresholdState(path, 5.0, "m1", ["cam1", "cam2"])
    assert (again.value("cam1"), again.value("cam2")) == (7.5, 5.0)
    assert ThresholdState(path, 5.0, "another-model", ["cam1"]).value("cam1") == 5.0  # new model, new threshold
    locked = ThresholdState(path, 5.0, "m1", ["cam1", "cam2"], ControlConfig(threshold=False))
    for via in ("mqtt", "web 10.0.0.7", "opcua", "sparkplug"):  # one guard on every path, Sparkplug's DCMD included
        with pytest.raises(CoftError, match=r"threshold changes are off \(control.threshold: false"):
            locked.set("cam1", b"6", via)
    assert locked.value("cam1") == 7.5
    path.write_text("{not json")
    assert ThresholdState(path, 5.0, "m1", ["cam1"]).value("cam1") == 5.0 and "ignoring" in caplog.text
    with pytest.raises(CoftError):
        valid_threshold("inf")


def test_unwritable_state_file_refuses_the_change_and_keeps_the_old_value(tmpfs):
    folder = tmpfs(1)
    state = ThresholdState(folder / "state.json", 5.0, "m1", ["cam1"])
    state.set("cam1", b"6")
    tmpfs.read_only(folder)
    with pytest.raises(CoftError, match="cannot save the threshold .*Read-only file system.* the threshold is unchanged"):
        state.set("cam1", b"7")
    assert state.value("cam1") == 6.0


def test_outbox_bounded_in_bytes_and_disk_full_loses_nothing_stored(tmp_path):
    gap = lambda camera, info: [("t/gap", json.dumps(info["missing"]).encode())]  # noqa: E731
    outbox = Outbox(tmp_path / "o.db", max_bytes=2000, gap=gap)
    for i in range(50):
        outbox.put_verdict("cam1", lambda seq: [("t", b"x" * 100)], reject=i < 5)
    assert outbox.bytes <= 2000 and outbox.depth() == 20 and outbox.dropped == {"cam1": 30}
    assert (tmp_path / "o.db").stat().st_mode & 0o777 == 0o600
    pages = outbox.db.execute("PRAGMA page_count").fetchone()[0]
    outbox.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full: no page can be added
    refused = 0  # in a row, at the end
    for _ in range(300):
        try:
            outbox.put_verdict("cam1", lambda seq: [("t", b"y" * 4000)], reject=True)
            refused = 0
        except OutboxRefused as exc:
            assert "database or disk is full" in str(exc) and "verdicts stored before are kept" in str(exc)
            refused += 1
            if refused == 3:
                break
    assert refused == 3 and outbox.depth() >= 20  # what was accepted before is still there
    last = max(json.loads(m.payload)["seq"] if m.topic == "s" else 0 for m in outbox.pending("cam1", limit=1000))
    outbox.db.execute("PRAGMA max_page_count = 1073741823")  # space returns
    seq = outbox.put_verdict("cam1", lambda seq: [("t", b"z")], reject=True)
    told = [json.loads(m.payload) for m in outbox.pending("cam1", limit=1000) if m.topic == "t/gap"]
    assert told[-1] == [seq - 3, seq - 1]  # the lost keep their numbers: a PLC checking seq sees the gap, and why
    del last


def test_evidence_keeps_rejects_every_nth_pass_within_budget(tmp_path):
    evidence = Evidence(EvidenceConfig(dir=tmp_path, every_nth_pass=3, max_mb=0.05))
    assert [evidence.wanted(False) for _ in range(6)] == [False, False, True, False, False, True]
    assert evidence.wanted(True)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for seq in range(1, 30):
        evidence.save(image, Verdict("cam1", "l1", seq, None, 0.0, 0.9, 0.5, True, "m1", seq=seq))
    files = sorted((tmp_path / "cam1").iterdir())
    assert sum(f.stat().st_size for f in files) <= 0.05 * 1024 * 1024
    assert files[-1].name == "cam1-000000029-reject.json"  # the newest kept, the oldest deleted


def test_a_verdict_s_wire_encodings_are_pinned_mqtt_json_sparkplug_metrics_and_opc_ua_values():
    """One verdict, every encoding a PLC or host reads: a change to any of them must be a change to this test."""
    from coft.runtime.comms.opcua import VERDICT_NODES
    from coft.runtime.comms.sparkplug import DEVICE_METRICS
    from coft.runtime.line.verdict import Verdict

    verdict = Verdict("cam1", "l1", 42, "A-1017", 1767225600.125, 0.731, 0.5, True, "m-r2", commissioning=True,
                      defect={"box": [10, 20, 30, 40], "peak": 0.9}, seq=7, epoch="5f0c9e2a41d7b366",
                      latency_ms=12.5)
    wire = verdict.as_dict()
    assert json.dumps(wire) == (
        '{"camera": "cam1", "line": "l1", "frame_id": 42, "part_id": "A-1017", '
        '"captured_at": "2026-01-01T00:00:00.125+00:00", "capture_ts": 1767225600.125, "score": 0.731, '
        '"threshold": 0.5, "verdict": "reject", "model_id": "m-r2", "commissioning": true, '
        '"defect": {"box": [10, 20, 30, 40], "peak": 0.9}, "seq": 7, "epoch": "5f0c9e2a41d7b366", "latency_ms": 12.5}')
    assert verdict.plc_reject() == {"seq": 7, "epoch": "5f0c9e2a41d7b366", "part_id": "A-1017", "frame_id": 42,
                                    "score": 0.731, "box": [10, 20, 30, 40]}
    assert verdict.answer(30.0) == {"seq": 7, "epoch": "5f0c9e2a41d7b366", "part_id": "A-1017", "frame_id": 42,
                                    "result": "reject", "reason": "score", "score": 0.731, "answered_ms": 30.0}
    assert [(name, read(wire)) for name, _, read in DEVICE_METRICS] == [
        ("Verdict/Seq", 7), ("Verdict/Epoch", "5f0c9e2a41d7b366"), ("Verdict/Part ID", "A-1017"), ("Verdict/Frame ID", 42), ("Verdict/Reject", True),
        ("Verdict/Reason", "score"), ("Verdict/Score", 0.731), ("Verdict/Threshold", 0.5),
        ("Verdict/Box", "[10, 20, 30, 40]"), ("Verdict/Latency ms", 12.5), ("Verdict/Time", 1767225600125)]
    values = {name: read(wire) for name, _, read in VERDICT_NODES}
    assert values.pop("Json") == json.dumps(wire)
    assert values == {"Seq": 7, "Epoch": "5f0c9e2a41d7b366", "PartId": "A-1017", "FrameId": 42, "Result": "reject", "Reject": True,
                      "Reason": "score", "Score": 0.731, "Threshold": 0.5, "Box": "[10, 20, 30, 40]", "LatencyMs": 12.5,
                      "Time": datetime(2026, 1, 1, 0, 0, 0, 125000, tzinfo=timezone.utc)}
    # a fail-safe reject has no score: every encoding says so its own way
    failsafe = Verdict("cam1", "l1", 0, "A-1018", 1767225600.0, None, 0.5, True, "m-r2", reason="deadline",
                       failsafe=True, seq=8, latency_ms=250.0).as_dict()
    assert failsafe["score"] is None and failsafe["failsafe"] is True and "defect" not in failsafe
    opcua = {name: read(failsafe) for name, _, read in VERDICT_NODES}
    assert math.isnan(opcua["Score"]) and opcua["Reason"] == "deadline" and opcua["Reject"] is True
    sparkplug = {name: read(failsafe) for name, _, read in DEVICE_METRICS}
    assert sparkplug["Verdict/Score"] is None and sparkplug["Verdict/Reason"] == "deadline"
