"""What the runtime costs on top of inference: frames/s and capture-to-publish latency.

    python bench/runtime.py [BUNDLE] [--backend auto] [--camera raw|mjpg] [--frame-size 1280x1024] [--seconds 30]

Runs `python -m coft.runtime` as a separate process against a real Mosquitto broker (Debian
package), with 1 and 2 cameras replaying a video written from ELPV cells (640x480, or --frame-size; uncompressed as
a machine-vision camera delivers them, or `--camera mjpg` as a USB camera's), and a
subscriber that timestamps each verdict on arrival. Measured:

- bare inference: the same engine on one resized frame (batch 1), in this process: the floor for latency;
- preprocessing: what the runtime does to a camera frame before the engine (JPEG decode, then the
  resize to the model input, colour order kept) at 640x480 and machine-vision sizes (1280x1024,
  2448x2048), against the bare inference;
- max load: unpaced cameras, verdicts/s sustained (frames beyond that are dropped and counted);
- paced load: cameras at 70% of what the bare engine sustains (1000 / inference ms, shared by the cameras;
  an unpaced file replays as fast as it reads, which starves the engine of a core), capture-to-publish
  latency p50/p99 and the runtime's overhead at p50 = (latency p50 - inference p50) / inference p50; one
  camera also at 25%, where frames seldom wait for the engine: the runtime's own cost;
- soak (optional): resident memory of the runtime process sampled over --soak-s seconds;
- live view (--viewers N): the 1-camera cases again with web: on and N browsers' worth of MJPEG
  streams open, to show what the page costs the inspection loop (frames/s, latency).

Without BUNDLE, a bundle of the product's default model (`--model default`, DINOv2 knn) or of
EfficientNet-Lite0 (`--model lite0`) is trained on 10 ELPV cells and exported first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone import elpv_video, runtime_bundle  # noqa: E402  (bench/ is on sys.path when run as a script)
from host import cpu_name  # noqa: E402

from coft.runtime.engines import open_engine  # noqa: E402
from coft.runtime.model.bundle import load_bundle  # noqa: E402
from coft.runtime.model.images import resize_to_input  # noqa: E402
from tests.support.broker import Mosquitto, free_port  # noqa: E402


def bare_inference_ms(bundle_dir: Path, video: Path, backend: str, threads: int, repeats: int = 100
                      ) -> tuple[float, str]:
    bundle = load_bundle(bundle_dir)
    engine = open_engine(bundle, backend, threads=threads)
    ok, frame = cv2.VideoCapture(str(video)).read()
    batch = resize_to_input(frame, bundle.input_size)[None]
    for _ in range(10):
        engine.infer(batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.infer(batch)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000), engine.name


def preprocessing_ms(bundle_dir: Path, video: Path, repeats: int = 30) -> dict[str, dict[str, float]]:
    """Median ms of decoding a camera's JPEG and of resizing the frame to the model input, per frame size."""
    size = load_bundle(bundle_dir).input_size
    ok, frame = cv2.VideoCapture(str(video)).read()
    out = {}
    for width, height in ((640, 480), (1280, 1024), (2448, 2048)):
        image = cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)
        jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        decode, resize = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            decoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
            decode.append(time.perf_counter() - t)
            t = time.perf_counter()
            resize_to_input(decoded, size)
            resize.append(time.perf_counter() - t)
        out[f"{width}x{height}"] = {"decode_ms": round(float(np.median(decode)) * 1000, 2),
                                    "resize_ms": round(float(np.median(resize)) * 1000, 2)}
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Collector:
    def __init__(self, port: int):
        self.arrivals: list[tuple[float, dict]] = []
        self.heartbeats: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{port}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("coft/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        now = time.time()
        if message.topic.endswith("/verdict"):
            with self.lock:
                self.arrivals.append((now, json.loads(message.payload)))
        elif message.topic.endswith("/heartbeat"):
            self.heartbeats[message.topic.split("/")[2]] = json.loads(message.payload)

    def window(self, start: float, end: float) -> list[tuple[float, dict]]:
        with self.lock:
            return [(t, v) for t, v in self.arrivals if start <= t < end]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Viewer(threading.Thread):
    """What a browser on the live view costs: reads the camera's MJPEG stream and counts its pictures."""

    def __init__(self, port: int, camera: str):
        super().__init__(daemon=True)
        self.url, self.pictures, self.stop = f"http://127.0.0.1:{port}/api/cameras/{camera}/live.mjpg", 0, False

    def run(self) -> None:
        import urllib.request

        for _ in range(100):  # the page answers once the runtime is up
            try:
                stream = urllib.request.urlopen(self.url, timeout=10)
                break
            except OSError:
                time.sleep(0.2)
        else:
            return
        with stream:
            while not self.stop:
                line = stream.readline()
                if not line:
                    return
                self.pictures += line.startswith(b"--frame")


def run_case(bundle: Path, port: int, video: Path, cameras: int, fps: float | None, seconds: float,
             work: Path, threads: int, soak: bool = False, fsync: bool = True, viewers: int = 0,
             backend: str = "auto") -> dict:
    work.mkdir(parents=True, exist_ok=True)
    web_port = free_port() if viewers else None
    config = {"bundle": str(bundle), "backend": backend, "threads": threads, "max_batch": 8, "queue_size": 4,
              "cameras": [{"name": f"cam{i}", "source": str(video), "loop": True, **({"fps": fps} if fps else {})}
                          for i in range(cameras)],
              "broker": {"port": port, "line": "bench"}, "outbox": {"path": str(work / "outbox.db"), "fsync": fsync},
              "heartbeat_s": 1, **({"web": {"port": web_port}} if viewers else {})}
    (work / "line.yaml").write_text(yaml.safe_dump(config))
    collector = Collector(port)
    process = subprocess.Popen([sys.executable, "-m", "coft.runtime", "--config", str(work / "line.yaml")],
                               cwd=ROOT, stdout=open(work / "runtime.log", "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watching = [Viewer(web_port, f"cam{i % cameras}") for i in range(viewers)]
    for viewer in watching:
        viewer.start()
    try:
        time.sleep(8)  # start-up and warm-up
        pictures_before = sum(v.pictures for v in watching)
        rss = [(0.0, rss_mb(process.pid))]
        start = time.time()
        drops_before = sum(h.get("dropped", 0) for h in collector.heartbeats.values())
        while time.time() - start < seconds:
            time.sleep(min(10.0, seconds / 10))
            rss.append((time.time() - start, rss_mb(process.pid)))
        end = time.time()
        drops = sum(h.get("dropped", 0) for h in collector.heartbeats.values()) - drops_before
        pictures = sum(v.pictures for v in watching) - pictures_before
    finally:
        for viewer in watching:
            viewer.stop = True
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        collector.close()
    arrivals = collector.window(start, end)
    latencies = np.array([(t - v["capture_ts"]) * 1000 for t, v in arrivals])
    result = {"cameras": cameras, "fps_per_camera": fps, "seconds": round(end - start, 1),
              "verdicts_per_s": len(arrivals) / (end - start), "dropped_per_s": drops / (end - start),
              "latency_p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
              "latency_p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
              "rss_mb_start": rss[0][1], "rss_mb_end": rss[-1][1], "viewers": viewers,
              "live_pictures_per_s_per_viewer": pictures / (end - start) / viewers if viewers else None}
    if soak:
        result["rss_samples"] = rss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--soak-s", type=float, default=0, help="also run a memory soak this long (e.g. 600)")
    parser.add_argument("--no-fsync", action="store_true", help="outbox.fsync false: crash-safe, not power-loss-safe")
    parser.add_argument("--soak-only", type=float, metavar="FPS",
                        help="skip the speed cases; soak one camera paced at FPS (memory does not need an idle CPU)")
    parser.add_argument("--viewers", type=int, default=0,
                        help="also run the 1-camera cases with the live view on and this many MJPEG viewers")
    parser.add_argument("--model", choices=("default", "lite0"), default="default",
                        help="without BUNDLE: the product's default model, or EfficientNet-Lite0 (with --scorer)")
    parser.add_argument("--scorer", choices=("global", "patch"), default="global",
                        help="the Lite0 bundle's scorer (patch: the live view draws maps)")
    parser.add_argument("--backend", default="auto", help="the engine, as line.yaml's backend: (default auto)")
    parser.add_argument("--camera", choices=("raw", "mjpg"), default="raw",
                        help="raw: uncompressed frames (GigE/USB3 Vision); mjpg: JPEG frames decoded on the box")
    parser.add_argument("--frame-size", default="640x480", help="the camera's frames, WIDTHxHEIGHT (e.g. 1280x1024)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/runtime"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="coft-runtime-bench-"))
    bundle = runtime_bundle(args.bundle, work, args.scorer, "default" if args.model == "default" else "efficientnet_lite0")
    video = elpv_video(work / "line.avi", size=tuple(int(v) for v in args.frame_size.split("x")), codec=args.camera)
    inference_ms, engine = bare_inference_ms(bundle, video, args.backend, args.threads)
    preprocessing = preprocessing_ms(bundle, video)
    broker = Mosquitto(work / "broker").start()
    rows = []
    try:
        for cameras in (1, 2) if not args.soak_only else ():
            top = run_case(bundle, broker.port, video, cameras, None, args.seconds, work / f"max{cameras}", args.threads,
                           fsync=not args.no_fsync, backend=args.backend)
            rows.append({"load": "max", **top})
            paced_fps = round(0.7 * 1000 / inference_ms / cameras, 1)
            for share in (0.7, 0.25) if cameras == 1 else (0.7,):  # 25%: the runtime's own cost, without queueing
                fps = paced_fps if share == 0.7 else round(share * 1000 / inference_ms, 1)
                rows.append({"load": f"{share:.0%} of the bare engine", **run_case(
                    bundle, broker.port, video, cameras, fps, args.seconds, work / f"paced{cameras}-{share}",
                    args.threads, fsync=not args.no_fsync, backend=args.backend)})
            if cameras == 1 and args.viewers:
                for load, fps in (("max", None), ("70% of the bare engine", paced_fps)):
                    rows.append({"load": load, **run_case(bundle, broker.port, video, 1, fps, args.seconds,
                                                          work / f"web-{load[:3]}", args.threads,
                                                          fsync=not args.no_fsync, viewers=args.viewers,
                                                          backend=args.backend)})
        soak = None
        if args.soak_s:
            fps = args.soak_only or round(0.7 * rows[0]["verdicts_per_s"], 1)
            soak = run_case(bundle, broker.port, video, 1, fps, args.soak_s, work / "soak", args.threads, soak=True,
                            backend=args.backend)
    finally:
        broker.stop()
    after_ms = bare_inference_ms(bundle, video, args.backend, args.threads)[0]  # a shared VM's speed drifts
    model = load_bundle(bundle).manifest
    machine = (f"{cpu_name()}, {engine} {args.threads} threads, "
               f"outbox fsync {'off' if args.no_fsync else 'on'}, camera frames {args.frame_size} {args.camera}")
    lines = [f"Runtime benchmark on {machine}; bare inference (batch 1, {model['input']['height']}x"
             f"{model['input']['width']} {model['backbone']['name']} {model['scorer']}, frame to score): "
             f"{inference_ms:.1f} ms before the runs, {after_ms:.1f} ms after (overheads against the first)", "",
             "| camera frame | JPEG decode ms | resize to the input ms | both, against the bare inference |",
             "|---|---|---|---|"]
    for size, p in preprocessing.items():
        lines.append(f"| {size} | {p['decode_ms']:.2f} | {p['resize_ms']:.2f} | "
                     f"{(p['decode_ms'] + p['resize_ms']) / inference_ms:.0%} |")
    lines += ["",
             "| cameras | load | live view | fps/camera | verdicts/s | dropped/s | capture-to-publish p50 ms | p99 ms | "
             "overhead at p50 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["latency_p50_ms"] is None:
            lines.append(f"| {r['cameras']} | {r['load']} | no verdict arrived: see {work}/*/runtime.log |")
            continue
        overhead = f"{(r['latency_p50_ms'] - inference_ms) / inference_ms:.0%}" if r["load"] != "max" else "-"
        view = f"{r['viewers']} viewers, {r['live_pictures_per_s_per_viewer']:.1f} pictures/s each" if r["viewers"] \
            else "off"
        lines.append(f"| {r['cameras']} | {r['load']} | {view} | {r['fps_per_camera'] or 'unpaced'} | "
                     f"{r['verdicts_per_s']:.1f} | "
                     f"{r['dropped_per_s']:.1f} | {r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | {overhead} |")
    if soak:
        lines += ["", f"Soak: {args.soak_s:.0f} s at {soak['fps_per_camera']} fps, {soak['verdicts_per_s']:.1f} verdicts/s; "
                  f"runtime RSS {soak['rss_mb_start']:.1f} MB -> {soak['rss_mb_end']:.1f} MB "
                  f"(samples: {', '.join(f'{m:.0f}' for _, m in soak['rss_samples'])})"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.json").write_text(json.dumps({"machine": machine, "inference_ms": inference_ms,
                                                        "inference_ms_after": after_ms, "rows": rows,
                                                        "preprocessing": preprocessing, "soak": soak}, indent=2) + "\n")
    (args.out / "runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
