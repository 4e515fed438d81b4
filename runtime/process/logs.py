"""Log a problem that repeats once, then a count, so a camera that fails 25 times a second
leaves one line a minute an integrator can read instead of a full disk."""

from __future__ import annotations

import logging
import threading
import time


class Throttled:
    """Per key: the first occurrence of a message is logged; identical repeats are counted and summarised
    every `every_s` seconds; a different message (or `clear`) ends the run with its count."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0):
        self.logger, self.every_s = logger, every_s
        self.runs: dict[object, list] = {}  # key -> [level, text, repeats, last logged]
        self.lock = threading.Lock()

    def log(self, level: int, key: object, message: str, *args, exc_info=None) -> None:
        text = message % args if args else message
        now = time.monotonic()
        with self.lock:
            run = self.runs.get(key)
            if run is not None and run[1] == text:
                run[2] += 1
                if now - run[3] < self.every_s:
                    return
                self.logger.log(level, "%s (%d more times in the last %.0fs)", text, run[2], now - run[3])
                run[2], run[3] = 0, now
                return
            self._finish(key)
            self.runs[key] = [level, text, 0, now]
        self.logger.log(level, text, exc_info=exc_info)

    def clear(self, key: object) -> None:
        """The problem is over: log how often it repeated since the last line."""
        with self.lock:
            self._finish(key)

    def _finish(self, key: object) -> None:
        run = self.runs.pop(key, None)
        if run is not None and run[2]:
            self.logger.log(run[0], "%s (%d more times)", run[1], run[2])


class LastProblems(logging.Handler):
    """The last warning or error about each camera (and about the runtime as a whole), for the live view and
    `coft status`: what an integrator would otherwise grep the journal for."""

    def __init__(self, cameras: list[str]):
        super().__init__(logging.WARNING)
        self.cameras = cameras
        self.last: dict[str, dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging itself
            return
        about = next((c for c in self.cameras if f"camera {c}:" in message or f"mqtt {c}:" in message), "runtime")
        self.last[about] = {"time": record.created, "level": record.levelname, "message": message.splitlines()[0]}
