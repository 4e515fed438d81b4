"""A plant on one broker: N lines' runtimes publishing to one Mosquitto, the broker restarted in the middle.

    python bench/plant.py [BUNDLE] [--lines 5 10 20] [--fps 5] [--seconds 60]

Each line is a `python -m coft.runtime` process (its own outbox, line and account-free broker login) with one
folder camera replaying ELPV cells at --fps, and a fast bundle (EfficientNet-Lite0, trained on 10 cells, unless
BUNDLE is given). One subscriber (QoS 1, persistent session) counts every line's verdicts. Halfway, the broker is
stopped for 5 s and started again (persistence on). Measured per N: verdicts received, lost (a seq missing at the
end, per line and epoch), duplicated (a seq seen twice: allowed, recognisable), out of order (a seq lower than one
seen before, first copies only), capture-to-arrival latency p50/p99, and the broker's CPU (share of one core over
the run, from /proc). Writes plant.json and plant.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone import runtime_bundle  # noqa: E402
from host import cpu_name  # noqa: E402

from coft.demo import _link, elpv_cells  # noqa: E402
from tests.support.broker import Mosquitto  # noqa: E402
from tests.support.runtime import start_runtime, stop  # noqa: E402


class Counter:
    """Every line's verdicts as they arrive: (line, camera, epoch, seq) and the delay since capture."""

    def __init__(self, port: int):
        self.seen: list[tuple[str, str, int, float]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plant-counter", clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("coft/+/+/verdict", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        verdict = json.loads(message.payload)
        with self.lock:
            self.seen.append((message.topic.split("/")[1], verdict["epoch"], verdict["seq"],
                              time.time() - verdict["capture_ts"]))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(seen: list[tuple[str, str, int, float]]) -> dict:
    lost = duplicated = disordered = 0
    streams: dict[tuple[str, str], list[int]] = {}
    for line, epoch, seq, _ in seen:
        streams.setdefault((line, epoch), []).append(seq)
    for seqs in streams.values():
        firsts = list(dict.fromkeys(seqs))
        duplicated += len(seqs) - len(firsts)
        disordered += sum(1 for a, b in zip(firsts, firsts[1:]) if b < a)
        lost += max(firsts) - min(firsts) + 1 - len(firsts)
    delays = np.array([d for *_, d in seen]) * 1000
    return {"received": len(seen), "lost": lost, "duplicated": duplicated, "out_of_order": disordered,
            "p50_ms": round(float(np.percentile(delays, 50)), 1) if len(delays) else None,
            "p99_ms": round(float(np.percentile(delays, 99)), 1) if len(delays) else None}


def run_plant(n: int, bundle: Path, cells: Path, args, work: Path) -> dict:
    broker = Mosquitto(work / f"broker-{n}").start()
    counter = Counter(broker.port)
    runtimes = []
    try:
        for i in range(n):
            folder = work / f"n{n}" / f"line{i}"
            folder.mkdir(parents=True)
            config = {"bundle": str(bundle), "backend": "onnxruntime", "threads": 1,
                      "cameras": [{"name": "cam1", "source": str(cells), "loop": True, "fps": args.fps}],
                      "broker": {"port": broker.port, "line": f"line{i}"},
                      "outbox": {"path": str(folder / "outbox.db")}, "heartbeat_s": 1}
            (folder / "line.yaml").write_text(yaml.safe_dump(config))
            runtimes.append(start_runtime(folder / "line.yaml", folder / "runtime.log"))
        time.sleep(10)  # every runtime up
        start_cpu, started = cpu_seconds(broker.process.pid), time.monotonic()
        time.sleep(args.seconds / 2)
        used = cpu_seconds(broker.process.pid) - start_cpu
        broker.stop()
        time.sleep(5)
        broker.start()
        restarted_cpu = cpu_seconds(broker.process.pid)
        time.sleep(args.seconds / 2)
        used += cpu_seconds(broker.process.pid) - restarted_cpu
        elapsed = time.monotonic() - started
    finally:
        for runtime in runtimes:
            stop(runtime)
        time.sleep(2)
        counter.close()
        broker.stop()
    return {"lines": n, **summary(counter.seen), "broker_cpu": round(used / elapsed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--lines", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--fps", type=float, default=5.0, help="each line's camera (default 5)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured, the broker restart in the middle")
    parser.add_argument("--out", type=Path, default=Path("bench-out/plant"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="coft-plant-"))
    try:
        bundle = runtime_bundle(args.bundle, work)
        cells = work / "cells"
        for path in elpv_cells()[0][:100]:
            _link(path, cells / path.name)
        rows = []
        for n in args.lines:
            rows.append(run_plant(n, bundle, cells, args, work))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# A plant on one broker: {cpu_name()}", "",
             f"Each line one runtime, one camera at {args.fps:g} fps; {args.seconds:g} s measured with a 5 s broker "
             "restart in the middle; one QoS 1 subscriber for every line.", "",
             "| lines | received | lost | duplicated | out of order | p50 ms | p99 ms | broker CPU (cores) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['lines']} | {r['received']} | {r['lost']} | {r['duplicated']} | {r['out_of_order']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['broker_cpu']:.2f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plant.json").write_text(json.dumps({"machine": cpu_name(), "fps": args.fps, "rows": rows}, indent=2))
    (args.out / "plant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
