"""Trigger-to-answer latency of triggered inspection, as a PLC sees it, at line rates.

    python bench/failsafe.py [BUNDLE] [--rates 10 30] [--seconds 30] [--deadline-ms 500] [--continuous-fps 10]

Runs `python -m coft.runtime` as its own process against a real Mosquitto, with one camera in
trigger mode replaying ELPV cells (640x480, 60 fps, so every part finds a fresh frame) and,
beside it, a continuous camera inspecting every frame at --continuous-fps (0: none), and the
simulated PLC of tests/support/plc.py triggering parts on a fixed schedule. Reports, per rate, the
distribution of trigger-sent to result-received, how many parts were answered by their
verdict and how many by a fail-safe reject (and why), any part left silent, and what the
continuous camera got (verdicts, frames dropped).
Without BUNDLE, the product's default model (DINOv2 ViT-S/14, knn) is trained on 10 ELPV cells
and exported first; --lite0 takes the fast EfficientNet-Lite0 one instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone import demo_bundle, elpv_video, runtime_bundle  # noqa: E402  (bench/ is on sys.path when run as a script)
from host import cpu_name  # noqa: E402

from coft.runtime.model.bundle import load_bundle  # noqa: E402
from tests.support.broker import Mosquitto, free_port  # noqa: E402
from tests.support.plc import SimulatedPlc  # noqa: E402


def camera_total(port: int, name: str, camera: str) -> float:
    """A Prometheus counter of the runtime summed over its other labels, for one camera."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'camera="{camera}"' in line)


def run_rate(bundle: Path, broker: Mosquitto, video: Path, rate: float, seconds: float, deadline_ms: int,
             threads: int, work: Path, continuous_fps: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    overview = [{"name": "overview", "source": str(video), "loop": True, "fps": continuous_fps}] if continuous_fps else []
    config = {"bundle": str(bundle), "backend": "onnxruntime", "threads": threads, "metrics_port": free_port(),
              "cameras": [{"name": "cam1", "source": str(video), "loop": True, "fps": 60, "trigger": True}, *overview],
              "broker": {"port": broker.port, "line": "l1"}, "outbox": {"path": str(work / "outbox.db")},
              "control": {"trigger_deadline_ms": deadline_ms}, "heartbeat_s": 0.2}
    (work / "line.yaml").write_text(yaml.safe_dump(config))
    plc = SimulatedPlc(broker.port)
    process = subprocess.Popen([sys.executable, "-m", "coft.runtime", "--config", str(work / "line.yaml")], cwd=ROOT,
                               stdout=open(work / "runtime.log", "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while len(plc.beats) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        plc.run_line("cam1", rate, 20, "warm")  # the first parts after start are not the line's steady state
        time.sleep(1)
        parts = plc.run_line("cam1", rate, int(rate * seconds), f"r{rate:g}")
        plc.wait_for_answers(parts, timeout=5)
        judged = plc.judge(parts, deadline_ms / 1000, 0.6)
        latencies = np.array(plc.latencies_ms(parts))
        answers = Counter((a[0]["result"], a[0]["reason"]) for a in (plc.answers(p) for p in parts) if a)
        continuous = {key: camera_total(config["metrics_port"], name, "overview") for key, name in
                      (("verdicts", "coft_verdicts_total"), ("dropped", "coft_frames_dropped_total"),
                       ("frames", "coft_frames_total"))} if continuous_fps else {}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        plc.close()
    return {"rate": rate, "parts": len(parts), "answered_in_time": len(judged["answered"]),
            "late": len(judged["late"]), "silent": len(judged["silent"]), "defaulted": len(judged["defaulted"]),
            "p50_ms": float(np.percentile(latencies, 50)), "p90_ms": float(np.percentile(latencies, 90)),
            "p99_ms": float(np.percentile(latencies, 99)), "max_ms": float(latencies.max()),
            "answers": {result if reason is None else f"{result} ({reason})": n for (result, reason), n in answers.items()},
            "continuous": continuous}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, help="an exported bundle (default: the demo's Lite0 one)")
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 30], help="parts per second (default 10 30)")
    parser.add_argument("--seconds", type=float, default=30, help="how long each rate runs (default 30)")
    parser.add_argument("--deadline-ms", type=int, default=500, help="control.trigger_deadline_ms (default 500)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    parser.add_argument("--continuous-fps", type=float, default=10,
                        help="a continuous camera beside the triggered one at this rate (default 10; 0: none)")
    parser.add_argument("--lite0", action="store_true", help="without BUNDLE: the fast Lite0 model, not the default")
    parser.add_argument("--out", type=Path, default=Path("bench-out/failsafe"), help="where the tables go")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="coft-failsafe-bench-"))
    bundle = runtime_bundle(args.bundle, work) if args.bundle or args.lite0 else demo_bundle(work / "demo", backbone="default")
    video = elpv_video(work / "line.avi")
    broker = Mosquitto(work / "broker").start()
    try:
        rows = [run_rate(bundle, broker, video, rate, args.seconds, args.deadline_ms, args.threads,
                         work / f"rate{rate:g}", args.continuous_fps) for rate in args.rates]
    finally:
        broker.stop()
    machine = f"{cpu_name()}, ONNX Runtime {args.threads} threads"
    model = load_bundle(bundle).manifest
    lines = [f"Trigger-to-answer at the PLC on {machine}; model {model['backbone']['name']} ({model.get('scorer')}), "
             f"deadline {args.deadline_ms} ms, triggered camera at 60 fps"
             + (f", a continuous camera beside it at {args.continuous_fps:g} fps" if args.continuous_fps else "")
             + f", {args.seconds:.0f} s per rate", "",
             "| parts/s | parts | answered in time | silent | p50 ms | p90 ms | p99 ms | max ms | answers | continuous: verdicts / frames (dropped) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["continuous"]
        lines.append(f"| {r['rate']:g} | {r['parts']} | {r['answered_in_time']} | {r['silent']} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r['answers'].items()))} | "
                     + (f"{c['verdicts']:.0f} / {c['frames']:.0f} ({c['dropped']:.0f})" if c else "none") + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "failsafe.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (args.out / "failsafe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
