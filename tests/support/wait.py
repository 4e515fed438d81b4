"""Waiting for the event a test needs, with a deadline, never for a fixed time: a loaded CI box is slow, a fast
one should not pay for it."""

from __future__ import annotations

import time
from pathlib import Path


def wait_until(condition, timeout: float = 30, what: str = "condition"):
    """The condition's first truthy value; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_for_log(log: Path, text: str, times: int = 1, timeout: float = 60, runtime=None, after: int = 0) -> None:
    """Until `text` appears `times` times in the log (from character `after`); a runtime process given that ends
    meanwhile fails at once, with the log's tail."""
    def seen() -> bool:
        if runtime is not None:
            assert runtime.poll() is None, f"the runtime ended: {log.read_text()[-2000:]}"
        return log.exists() and log.read_text()[after:].count(text) >= times

    try:
        wait_until(seen, timeout, f"{text!r} logged {times}x")
    except AssertionError as exc:
        tail = log.read_text()[-1500:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc}: {tail}") from None
