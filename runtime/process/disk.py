"""The disk the outbox lives on: free space kept for verdicts alone, and the lock that keeps one runtime per
outbox (two would take the broker connection from each other and interleave their verdicts)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from coft.runtime.model.errors import CoftError
from coft.runtime.process.logs import Throttled

log = logging.getLogger(__name__)


class Reserve:
    """Free space on the outbox's filesystem that only verdicts may use: other writers ask `allows` first and,
    refused, stop writing (and say so, throttled) before a verdict would be refused for want of room."""

    def __init__(self, outbox_path: Path, reserve_bytes: int, on_refuse: Callable[[str], None] = lambda writer: None):
        self.folder, self.reserve, self.on_refuse = Path(outbox_path).parent, reserve_bytes, on_refuse
        self.device = os.stat(self.folder).st_dev
        self.throttled = Throttled(log)

    def allows(self, folder: Path, size: int, writer: str) -> bool:
        try:
            if os.stat(folder).st_dev != self.device:
                return True  # another filesystem: it cannot take the outbox's room
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return True  # the writer finds out itself, and says so
        if free - size >= self.reserve:
            self.throttled.clear(writer)
            return True
        self.on_refuse(writer)
        self.throttled.log(logging.ERROR, writer, "%s: not writing: %.0f MB free on the outbox's filesystem (%s), "
                           "%.0f MB of it reserved for verdicts (outbox.reserve_mb); free disk space or move %s to "
                           "another disk", writer, free / 2**20, self.folder, self.reserve / 2**20, writer)
        return False


def hold_line(outbox_path: Path) -> TextIO:
    """An exclusive lock beside the outbox for as long as the returned file stays open: two runtimes on one
    outbox would take the broker connection from each other and interleave their verdicts."""
    path = Path(outbox_path).with_name(Path(outbox_path).name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a+")
    except OSError as exc:
        raise CoftError(f"outbox {outbox_path}: cannot create its lock file {path} ({exc.strerror}); "
                        "check outbox.path and that the folder is writable") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise CoftError(f"another coft runtime (PID {holder}) is running on {outbox_path}; stop it first, or give "
                        "this one its own outbox.path (one runtime per line)") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
