"""The runtime as a plant runs it: a line.yaml, a process started and stopped, every verdict checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, bundle: Path, port: int, cameras: list[dict], **extra) -> Path:
    config = {"bundle": str(bundle), "cameras": cameras, "queue_size": 1000,
              "broker": {"port": port, "line": "l1", "client_id": f"coft-test-{port}"},
              "outbox": {"path": str(tmp_path / "outbox.db")}, "heartbeat_s": 1, **extra}
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_runtime(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "coft.runtime", "--config", str(config), *extra],
                            cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)


def stop(runtime: subprocess.Popen) -> int:
    runtime.send_signal(signal.SIGTERM)
    return runtime.wait(timeout=30)


def assert_complete_and_ordered(verdicts: list[dict]) -> list[int]:
    """Every seq from 1 to the last, first occurrences in order; duplicates allowed (recognisable by seq)."""
    seqs = [v["seq"] for v in verdicts]
    first = list(dict.fromkeys(seqs))
    assert first == sorted(first), "verdicts arrived out of order"
    assert first == list(range(1, max(seqs) + 1)), f"missing seqs: {sorted(set(range(1, max(seqs) + 1)) - set(seqs))}"
    return first


def api(port: int, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    """The live page's JSON API: GET, or POST `body` with the operator token; (HTTP status, answer)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
