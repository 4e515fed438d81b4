"""`coft status`: what an integrator checks first at a line, on one screen.

Live figures come from the runtime's own `/api/status` (the live view's, `web:` in
line.yaml); what lies on disk (bundle, saved thresholds, outbox) is read directly, so
the screen says something useful, and says plainly so, when the runtime is not running.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from coft.runtime.comms.outbox import Outbox
from coft.runtime.config import WebConfig, load_config
from coft.runtime.line.thresholds import STATE_ERRORS, read_state
from coft.runtime.model.bundle import MANIFEST

NOT_RUNNING = 3  # exit status, as systemctl's for an inactive unit


def live_thresholds(state: Path) -> str:
    """The thresholds changed live, per camera, or why there are none."""
    if not state.is_file():
        return "bundle's (never changed live)"
    try:
        model_id, cameras = read_state(state)
        return ", ".join(f"{camera} {value:.6g}" for camera, value in cameras.items()) + f" (model {model_id})"
    except STATE_ERRORS as exc:
        return f"unreadable {state} ({type(exc).__name__}: {exc}); the runtime ignores it and uses the bundle's"


def fetch_status(web: WebConfig) -> dict:
    """The running runtime's /api/status; raises OSError when nothing answers."""
    host = "127.0.0.1" if web.bind in ("0.0.0.0", "::") else web.bind
    with urllib.request.urlopen(f"http://{host}:{web.port}/api/status", timeout=5) as response:
        return json.loads(response.read())


def duration(seconds: float) -> str:
    minutes, hours = int(seconds // 60) % 60, int(seconds // 3600)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {int(seconds) % 60:02d}s"


def camera_lines(name: str, c: dict, method: str) -> list[str]:
    broker = "connected" if c["broker_connected"] else "DISCONNECTED"
    source = {"bundle": f"the bundle ({method})", "saved": "the state file (changed live before a restart)"}.get(
        c["source"], c["source"])
    lines = [f"camera {name}: {c['camera']}; broker {broker}",
             f"  threshold   {c['threshold']:.6g} from {source} (allowed {c['bounds'][0]:.4g} .. {c['bounds'][1]:.4g})",
             f"  counted     {counted(c['frames'], 'frame')}, {int(c['dropped'])} dropped, "
             f"{counted(c['accepts'], 'accept')}, {counted(c['rejects'], 'reject')}"
             + (f", {int(c['refused'])} NOT RECORDED (disk)" if c["refused"] else "")
             + (f", {int(c['outbox_dropped'])} dropped from a full outbox" if c.get("outbox_dropped") else ""),
             f"  outbox      {c['outbox_depth']} waiting for the broker" +
             (f", oldest {c['outbox_oldest_s']:.0f}s" if c["outbox_oldest_s"] else "")]
    if c["latency_p50_ms"] is not None:
        lines.append(f"  latency     p50 {c['latency_p50_ms']:.1f} ms, p99 {c['latency_p99_ms']:.1f} ms "
                     "(capture to outbox, recent verdicts)")
    problem = c["last_problem"]
    lines.append(f"  last error  {time.strftime('%H:%M:%S', time.localtime(problem['time']))} {problem['level']} "
                 f"{problem['message']}" if problem else "  last error  none")
    return lines


def configured_model(bundle: Path) -> str | None:
    """The model id `bundle:` names now (a box's `current` link may have moved since the runtime started)."""
    try:
        return str(json.loads((Path(bundle) / MANIFEST).read_text())["model_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def health(config_path: str | Path) -> dict:
    """What a fleet tool waits on (`coft status --json`): healthy means this box runs the model it is configured for
    and every camera's verdicts are coming (a trigger camera's wait for parts: its frames must be coming); `promise`
    is stated once commissioning has fitted the threshold."""
    config = load_config(config_path)
    configured = configured_model(config.bundle)
    problems: list[str] = []
    report = {"config": str(config_path), "running": False, "healthy": False, "model_id": None,
              "configured_model": configured, "commissioning": None, "promise": None, "verdicts": 0,
              "problems": problems}
    if config.web is None:
        problems.append("no web: block in the config: the runtime's /api/status cannot be read")
        return report
    try:
        running = fetch_status(config.web)
    except OSError as exc:
        problems.append(f"not running: nothing answers on port {config.web.port} ({getattr(exc, 'reason', exc)})")
        return report
    if running.get("stalled"):
        problems.append(f"stalled: {running['stalled']}")
    if configured and configured != running["model_id"]:
        problems.append(f"runs {running['model_id']}, configured {configured}: restart the service to run it")
    triggered = {c.name for c in config.cameras if c.trigger}
    for name, camera in running["cameras"].items():
        if name in triggered:  # its verdicts wait for parts: its frames must come
            if camera["camera"] != "delivering":
                problems.append(f"camera {name}: {camera['camera']}, not delivering frames")
        else:
            if camera["accepts"] + camera["rejects"] == 0:
                problems.append(f"camera {name}: no verdict yet")
            if camera["camera"].startswith("reconnecting"):
                problems.append(f"camera {name}: {camera['camera']}")
        if not camera["broker_connected"]:
            problems.append(f"camera {name}: broker disconnected")
    report.update(running=True, healthy=not problems, model_id=running["model_id"],
                  commissioning=running.get("commissioning"), promise=running.get("threshold_promise"),
                  verdicts=int(sum(c["accepts"] + c["rejects"] for c in running["cameras"].values())),
                  engine=running["engine"], uptime_s=running["uptime_s"])
    return report


def print_status(config_path: str | Path) -> int:
    """Print the summary; returns NOT_RUNNING when the runtime does not answer, else 0."""
    config = load_config(config_path)
    print(f"config      {config_path}")
    running = None
    if config.web is None:
        print("runtime     unknown: add a web: block to the config for live figures (coft status reads /api/status)")
    else:
        try:
            running = fetch_status(config.web)
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            print(f"runtime     NOT RUNNING: nothing answers on port {config.web.port} ({reason}); "
                  "start it (systemctl start coft-runtime) and read its log (journalctl -u coft-runtime)")
    if running:
        revision = f" (revision of {running['revision_of']})" if running["revision_of"] else ""
        print(f"runtime     running for {duration(running['uptime_s'])}, line {running['line']}, "
              f"{running['engine']}" + commissioning_note(running.get("commissioning")))
        if running.get("stalled"):
            print(f"STALLED     {running['stalled']}")
        print(f"model       {running['model_id']}{revision}, threshold set by {running['threshold_method']}")
        configured = configured_model(config.bundle)
        if configured and configured != running["model_id"]:
            print(f"configured  {configured} ({config.bundle}): not what runs; the next start runs it (coft "
                  "rollback or coft adopt changed it; restart the service to run it now)")
        if running.get("threshold_promise"):
            print(f"promise     {running['threshold_promise']}")
        if running.get("outbox_started_anew"):
            print(f"outbox      NEW EPOCH {running['epoch']}: {running['outbox_started_anew']} "
                  "(acknowledge: POST /api/outbox/acknowledge)")
        if running["outbox_refusing"]:
            print("outbox      REFUSING VERDICTS (disk full?): see the log")
        if running["last_problem"]:
            problem = running["last_problem"]
            print(f"last error  {time.strftime('%H:%M:%S', time.localtime(problem['time']))} {problem['level']} "
                  f"{problem['message']}")
        for name, camera in running["cameras"].items():
            print("\n".join(camera_lines(name, camera, running["threshold_method"])))
        return 0
    print(f"bundle      {config.bundle}")
    print(f"threshold   {live_thresholds(config.state_path)}")
    if config.outbox.path.is_file():
        outbox = Outbox(config.outbox.path, config.outbox.max_messages)
        age = outbox.oldest_age_s()
        print(f"outbox      {outbox.depth()} unacknowledged" + (f", oldest {age:.0f}s" if age else ""))
        outbox.close()
    else:
        print("outbox      not created yet (the runtime has not run)")
    return NOT_RUNNING if config.web else 0


def commissioning_note(commissioning: dict | None) -> str:
    """', COMMISSIONING 120 / 300 frames (...)' while the line commissions, else nothing."""
    if not commissioning:
        return ""
    fired = "rejects fire at the bundle's threshold" if commissioning["rejects_fired"] else "REJECTS OFF: every part passes"
    return f", COMMISSIONING {commissioning['frames']} / {commissioning['of']} frames ({fired})"


def counted(n: float, thing: str) -> str:
    """'1 reject', '2 rejects'."""
    return f"{int(n)} {thing}{'' if int(n) == 1 else 's'}"
