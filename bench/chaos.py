"""Chaos run: does every verdict reach the PLC, in order, through a long broker outage and SIGKILLs?

    python bench/chaos.py [BUNDLE] [--cameras 2] [--fps 10] [--outage-s 60] [--kills 3]

Runs `coft run` as a separate process against a real Mosquitto broker (Debian package),
cameras replaying a video, and a PLC-like subscriber with a persistent session. Timeline:
steady running, the broker stopped for --outage-s (verdicts pile up in the outbox), the
broker back, then --kills SIGKILLs of the runtime, each restarted a second later (the
systemd unit's Restart=), then SIGTERM. Measured per camera: verdicts numbered (the
outbox's seq), received, missing, duplicated (allowed: QoS 1, recognisable by seq), out
of order; the backlog's drain time after the outage; the largest outbox depth; and any
traceback in the runtime's log. Without BUNDLE, a Lite0 bundle is trained on 10 ELPV cells,
and the cameras replay 200 cells of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone import elpv_video, runtime_bundle  # noqa: E402  (bench/ is on sys.path when run as a script)
from host import cpu_name  # noqa: E402

from tests.support.broker import Mosquitto, Subscriber  # noqa: E402


def outbox_depth(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
    except sqlite3.Error:
        return -1


def start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coft.runtime", "--config", str(config)], cwd=ROOT,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def settle(seconds: float, outbox: Path, depths: list[int]) -> None:
    """Wait, sampling the outbox depth every half second."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        depths.append(outbox_depth(outbox))
        time.sleep(0.5)


def per_camera(verdicts: list[dict], rejects: list[dict], camera: str) -> dict:
    seqs = [v["seq"] for v in verdicts if v["camera"] == camera]
    first = list(dict.fromkeys(seqs))
    top = max(seqs, default=0)
    reject_seqs = {v["seq"] for v in verdicts if v["camera"] == camera and v["verdict"] == "reject"}
    return {"numbered": top, "received_unique": len(first), "missing": len(set(range(1, top + 1)) - set(first)),
            "duplicates": len(seqs) - len(first),
            "out_of_order": sum(1 for a, b in zip(first, first[1:]) if b < a),
            "rejects": len(reject_seqs), "reject_messages_missing": len(reject_seqs - {r["seq"] for r in rejects})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--fps", type=float, default=10, help="per camera")
    parser.add_argument("--steady-s", type=float, default=10)
    parser.add_argument("--outage-s", type=float, default=60)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/chaos"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="coft-chaos-"))
    bundle = runtime_bundle(args.bundle, work)
    video = elpv_video(work / "line.avi")
    broker = Mosquitto(work / "broker").start()
    outbox = work / "outbox.db"
    config = work / "line.yaml"
    config.write_text(yaml.safe_dump({
        "bundle": str(bundle), "backend": "onnxruntime", "queue_size": 64,
        "cameras": [{"name": f"cam{i}", "source": str(video), "loop": True, "fps": args.fps} for i in range(args.cameras)],
        "broker": {"port": broker.port, "line": "chaos"}, "outbox": {"path": str(outbox)}, "heartbeat_s": 2}))
    plc = Subscriber(broker.port)
    log = work / "runtime.log"
    depths: list[int] = []
    exit_codes = []
    runtime = start(config, log)
    try:
        settle(args.steady_s, outbox, depths)
        broker.stop()
        settle(args.outage_s, outbox, depths)
        backlog = outbox_depth(outbox)
        broker.start()
        back = time.monotonic()
        while outbox_depth(outbox) > 2 * args.cameras * args.fps and time.monotonic() - back < 300:
            depths.append(outbox_depth(outbox))
            time.sleep(0.2)
        drain_s = time.monotonic() - back
        settle(args.steady_s, outbox, depths)
        for _ in range(args.kills):
            runtime.send_signal(signal.SIGKILL)
            exit_codes.append(runtime.wait(timeout=10))
            time.sleep(1)
            runtime = start(config, log)
            settle(8, outbox, depths)
        runtime.send_signal(signal.SIGTERM)
        exit_codes.append(runtime.wait(timeout=60))
        time.sleep(3)
    finally:
        if runtime.poll() is None:
            runtime.kill()
        plc.close()
        broker.stop()
    verdicts = plc.payloads("verdict")
    rejects = {f"cam{i}": [json.loads(p) for t, p in plc.messages if t == f"coft/chaos/cam{i}/reject"]
               for i in range(args.cameras)}
    cameras = {f"cam{i}": per_camera(verdicts, rejects[f"cam{i}"], f"cam{i}") for i in range(args.cameras)}
    text = log.read_text()
    machine = f"{cpu_name()}, Mosquitto on loopback"
    result = {"machine": machine, "cameras": args.cameras, "fps_per_camera": args.fps, "outage_s": args.outage_s,
              "kills": args.kills, "backlog_at_reconnect": backlog, "drain_s": round(drain_s, 1),
              "max_outbox_depth": max(depths), "final_outbox_depth": outbox_depth(outbox), "exit_codes": exit_codes,
              "tracebacks_in_log": text.count("Traceback"), "per_camera": cameras}
    lines = [f"Chaos run on {machine}: {args.cameras} cameras at {args.fps:g} fps, broker down {args.outage_s:g} s, "
             f"then {args.kills} SIGKILLs (each restarted after 1 s), then SIGTERM.", "",
             f"Backlog when the broker returned: {backlog} messages, drained in {drain_s:.1f} s; largest outbox depth "
             f"{max(depths)}; left at the end: {result['final_outbox_depth']}; exit codes {exit_codes}; "
             f"tracebacks in the log: {result['tracebacks_in_log']}.", "",
             "| camera | verdicts numbered | received (unique) | missing | duplicates | out of order | rejects | reject messages missing |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {c['numbered']} | {c['received_unique']} | {c['missing']} | {c['duplicates']} | "
              f"{c['out_of_order']} | {c['rejects']} | {c['reject_messages_missing']} |" for name, c in cameras.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "chaos.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
