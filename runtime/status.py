"""`coft status`: what an integrator checks first at a line, on one screen."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from runtime.config import load_config
from runtime.control import STATE_ERRORS, read_state
from runtime.outbox import Outbox

WATCHED = ("coft_frames_total", "coft_frames_dropped_total", "coft_verdicts_total", "coft_broker_connected",
           "coft_camera_connected", "coft_camera_ended", "coft_outbox_depth", "coft_outbox_refusing",
           "coft_verdicts_refused_total", "coft_inspection_failures_total")


def live_thresholds(state: Path) -> str:
    """The thresholds changed over MQTT, per camera, or why there are none."""
    if not state.is_file():
        return "bundle's (never changed live)"
    try:
        model_id, cameras = read_state(state)
        return ", ".join(f"{camera} {value:.6g}" for camera, value in cameras.items()) + f" (model {model_id})"
    except STATE_ERRORS as exc:
        return f"unreadable {state} ({type(exc).__name__}: {exc}); the runtime ignores it and uses the bundle's"


def print_status(config_path: str | Path) -> None:
    config = load_config(config_path)
    print(f"config      {config_path}")
    print(f"bundle      {config.bundle}")
    state = config.state_path
    print(f"threshold   {live_thresholds(state)}")
    if config.outbox.path.is_file():
        outbox = Outbox(config.outbox.path, config.outbox.max_messages)
        age = outbox.oldest_age_s()
        print(f"outbox      {outbox.depth()} unacknowledged" + (f", oldest {age:.0f}s" if age else ""))
        outbox.close()
    else:
        print("outbox      not created yet (the runtime has not run)")
    if not config.metrics_port:
        print("metrics     off (set metrics_port to see live counters)")
        return
    try:
        host = "127.0.0.1" if config.metrics_bind in ("0.0.0.0", "::") else config.metrics_bind
        with urllib.request.urlopen(f"http://{host}:{config.metrics_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError as exc:
        print(f"metrics     runtime not answering on port {config.metrics_port} ({exc})")
        return
    for line in text.splitlines():
        if line.startswith(WATCHED):
            print(f"  {line}")
        if line.startswith("coft_camera_ended{") and line.endswith(" 1.0"):
            camera = line.split('"')[1]
            print(f"camera      {camera}: its file or folder source ended; no more frames come from it")
