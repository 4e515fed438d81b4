"""`coft status`: what an integrator checks first at a line, on one screen."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from runtime.config import load_config
from runtime.outbox import Outbox

WATCHED = ("coft_frames_total", "coft_frames_dropped_total", "coft_verdicts_total", "coft_broker_connected",
           "coft_camera_connected", "coft_outbox_depth")


def print_status(config_path: str | Path) -> None:
    config = load_config(config_path)
    print(f"config      {config_path}")
    print(f"bundle      {config.bundle}")
    state = config.state_path
    threshold = json.loads(state.read_text())["threshold"] if state.is_file() else "bundle's (never changed live)"
    print(f"threshold   {threshold}")
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
        with urllib.request.urlopen(f"http://127.0.0.1:{config.metrics_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError as exc:
        print(f"metrics     runtime not answering on port {config.metrics_port} ({exc})")
        return
    for line in text.splitlines():
        if line.startswith(WATCHED):
            print(f"  {line}")
