"""The durable outbox: every message is on disk before it is published, and leaves only on the broker's ack.

SQLite in WAL mode with synchronous=FULL: a message that `put` returned for survives a
power cut, a SIGKILL or a broker outage, and goes out in order afterwards. With `fsync`
off (synchronous=NORMAL) it still survives crashes, SIGKILL and restarts, not a power cut. Each verdict
gets its sequence number here, from a counter stored in the same transaction, so numbers
keep increasing across restarts and a subscriber recognises duplicates by them.

When full (`max_messages`, or `max_bytes` of payload), the oldest *accept* messages are
dropped first, then, only if nothing else is left, the oldest rejects; every drop is
counted per camera (`dropped`, `on_drop` for the metric) and logged, throttled, never
silent. When the disk itself is full, a verdict cannot be stored: `put_verdict` raises
`OutboxRefused` (nothing already stored is touched), and the next verdict that fits skips
the lost verdicts' sequence numbers and carries a gap message naming them, so a PLC that
checks sequence numbers sees the loss. `Reserve` keeps free space for the outbox that the
other writers (harvest, evidence, commissioning frames) leave alone, and `hold_line`
keeps a second runtime off the same outbox. The file is readable by its owner only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coft.runtime.model.errors import CoftError
from coft.runtime.process.logs import Throttled

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    camera TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    reject INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS message_camera ON message (camera, id);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


SPARKPLUG_CHANNEL = "@sparkplug"  # verdicts for the Sparkplug node (camera names cannot start with @)


class OutboxRefused(CoftError):
    """A verdict could not be stored (disk full, or the file is unwritable); nothing stored before is lost."""


@dataclass(frozen=True)
class Message:
    id: int
    camera: str
    topic: str
    payload: bytes


Gap = Callable[[str, dict], list[tuple[str, bytes]]]  # (camera, what the gap message says) -> its messages


class Watermark:
    """The epoch and each camera's highest sequence number, in a file apart from the outbox, written (fsync'd where
    the outbox is) after every verdict: an outbox deleted, restored from a backup or cut short is then seen for what
    it is, and numbering goes on in a new epoch instead of giving a number twice."""

    def __init__(self, path: Path, fsync: bool):
        self.path, self.fsync, self.size = Path(path), fsync, 0
        self.fd: int | None = None
        self.throttled = Throttled(log)

    def read(self) -> dict | None:
        try:
            mark = json.loads(self.path.read_text())
            return {"epoch": str(mark["epoch"]), "seq": {str(c): int(n) for c, n in mark["seq"].items()}}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("outbox: the sequence watermark %s is unreadable (%s); a lost outbox could not be told from a "
                      "new one this start", self.path, exc)
            return None

    def write(self, epoch: str, seqs: dict[str, int]) -> None:
        """In place, padded to the longest write so far (a shorter one would leave a torn tail)."""
        data = json.dumps({"epoch": epoch, "seq": seqs}).encode()
        self.size = max(self.size, len(data))
        try:
            if self.fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.pwrite(self.fd, data.ljust(self.size), 0)
            if self.fsync:
                os.fdatasync(self.fd)
        except OSError as exc:  # the verdict is stored; only the check at the next start is weaker
            self.throttled.log(logging.ERROR, "write", "outbox: cannot write the sequence watermark %s (%s); a lost "
                               "outbox would not be told from a new one at the next start", self.path, exc)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _move_aside(path: Path) -> Path:
    """A corrupt outbox (and its -wal, -shm) renamed for forensics; the name the database now has."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


class Outbox:
    """`gap(camera, info)` makes the messages that tell subscribers numbers were lost (stored with the next verdict
    that fits, or at the start of a new epoch); `on_drop(camera, n)` hears of every message dropped for room.

    With a `watermark` file (the runtime's), the outbox has an epoch: a random id made with it and kept in it, which
    every verdict carries beside its seq. A corrupt outbox is moved aside, a lost or rolled-back one is seen against
    the watermark; either starts a new epoch, says why in `started_anew` and in a gap message per camera, and never
    gives a number twice within an epoch."""

    def __init__(self, path: str | Path, max_messages: int = 100_000, fsync: bool = True, max_bytes: int = 256 << 20,
                 gap: Gap | None = None, on_drop: Callable[[str, int], None] | None = None,
                 watermark: Path | None = None):
        path = Path(path)
        if path.is_dir():
            raise CoftError(f"outbox.path: {path} is a folder; name the database file in it, e.g. {path}/outbox.db")
        self.path, self.max_messages, self.max_bytes = path, max_messages, max_bytes
        self.gap, self.on_drop = gap, on_drop or (lambda camera, n: None)
        self.started_anew: str | None = None  # why this start began a new epoch, until an operator acknowledges
        try:
            self._open(fsync)
        except sqlite3.DatabaseError as exc:
            if watermark is None or isinstance(exc, sqlite3.OperationalError):  # unreadable file, locked, no room
                raise CoftError(f"outbox {path}: cannot open ({exc}); check outbox.path and that the folder is "
                                "writable") from exc
            self.db.close()
            aside = _move_aside(path)
            self.started_anew = f"the outbox was corrupt ({exc}) and was moved aside to {aside.name}"
            log.error("outbox %s: %s; starting a new one", path, self.started_anew)
            self._open(fsync)
        except OSError as exc:
            raise CoftError(f"outbox {path}: cannot open ({exc}); check outbox.path and that the folder is writable") from exc
        self.lock = threading.Lock()
        self.dropped: Counter[str] = Counter()  # messages dropped for room, per channel
        self.lost: Counter[str] = Counter()  # verdicts refused (disk full) since the camera's last stored one
        self.throttled = Throttled(log)
        self.watermark = Watermark(watermark, fsync) if watermark else None
        self.epoch = self._meta("epoch")
        self.seqs: dict[str, int] = {}  # each camera's last number given, for the watermark
        if self.watermark:
            self._check_epoch()

    def _open(self, fsync: bool) -> None:
        """Connect and check the file: sqlite3.DatabaseError (not OperationalError) where it is corrupt."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)  # verdicts are the line's business; also fixes a file made by an older version
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self.db.executescript(SCHEMA)
        check = self.db.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise sqlite3.DatabaseError("; ".join(str(row[0]) for row in check[:3]))
        self.bytes = self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM message").fetchone()[0]

    def _meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _check_epoch(self) -> None:
        """Keep the outbox's epoch where the watermark agrees with it; else start a new one and say what was lost."""
        assert self.watermark is not None
        mark = self.watermark.read()
        counters = {c: n for c, n in self.db.execute("SELECT name, value FROM counter") if not c.startswith("@")}
        given = (mark or {"seq": {}})["seq"]
        behind = {c: (counters.get(c, 0) + 1, n) for c, n in given.items() if n > counters.get(c, 0)}
        why = self.started_anew
        if mark is None or (self.epoch == mark["epoch"] and not behind):
            why = why or (None if self.epoch else "a new outbox")
        elif self.epoch is None:
            why = why or "the outbox was gone (deleted, or replaced by an empty one)"
        elif self.epoch != mark["epoch"]:
            why = f"the outbox is of epoch {self.epoch}, not {mark['epoch']} that gave the last numbers (a restore?)"
        else:
            why = "the outbox was rolled back (restored, or its write-ahead log lost): it lacks numbers it had given"
        self.seqs = {**counters, **{c: n for c, (_, n) in behind.items()}}  # numbers go on: monotonic for the PLC
        if why is None:
            self._write_watermark()
            return
        previous, self.epoch = (mark or {}).get("epoch"), secrets.token_hex(8)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('epoch', ?)", (self.epoch,))
            self.db.executemany("INSERT OR REPLACE INTO counter (name, value) VALUES (?, ?)", self.seqs.items())
            for camera in (self.seqs if previous else ()):
                first, last = behind.get(camera, (None, self.seqs[camera]))
                info = {"epoch": self.epoch, "previous_epoch": previous, "last_seq": last, "reason": why,
                        "may_be_missing": None if self.started_anew or first is None else [first, last]}
                for topic, payload in (self.gap(camera, info) if self.gap else []):
                    self.db.execute("INSERT INTO message (camera, topic, payload, reject, created) VALUES "
                                    "(?, ?, ?, 1, ?)", (camera, topic, payload, time.time()))
        self._write_watermark()
        if previous is None and self.started_anew is None:
            log.info("outbox %s: epoch %s (%s)", self.path, self.epoch, why)
            return
        self.started_anew = why
        lost = ", ".join(f"{c} seq {a}..{b}" for c, (a, b) in behind.items())
        log.error("outbox %s: %s; new epoch %s (was %s); verdicts not yet sent then are lost%s. What a PLC does: "
                  "docs/plc.md, 'A new epoch'", self.path, why, self.epoch, previous,
                  f" (numbers given that this outbox lacks: {lost})" if lost else "")

    def _write_watermark(self) -> None:
        if self.watermark and self.epoch:
            self.watermark.write(self.epoch, self.seqs)

    def next_seq(self, camera: str, cursor: sqlite3.Cursor, step: int = 1) -> int:
        cursor.execute("INSERT INTO counter (name, value) VALUES (?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET value = value + ?", (camera, step, step))
        return cursor.execute("SELECT value FROM counter WHERE name = ?", (camera,)).fetchone()[0]

    def put_verdict(self, camera: str, build: Callable[[int], list[tuple]], reject: bool) -> int:
        """Assign the camera's next sequence number, let `build(seq)` make [(topic, payload)], store all atomically.
        A message may name another channel than the camera's as a third item (`(topic, payload, channel)`): the
        link that publishes that channel sends it (Sparkplug's, for one)."""
        with self.lock:
            cursor = self.db.cursor()
            added, lost = 0, self.lost[camera]
            try:
                cursor.execute("BEGIN IMMEDIATE")
                seq = self.next_seq(camera, cursor, 1 + lost)
                now = time.time()
                messages = build(seq)
                if lost and self.gap:
                    messages = self.gap(camera, {"missing": [seq - lost, seq - 1], "count": lost, "reason":
                                                 "the outbox could not store these verdicts (disk full)"}) + messages
                for topic, payload, *channel in messages:
                    cursor.execute("INSERT INTO message (camera, topic, payload, reject, created) VALUES (?, ?, ?, ?, ?)",
                                   (channel[0] if channel else camera, topic, payload, int(reject), now))
                    added += len(payload)
                removed = self._enforce_limit(cursor, self.bytes + added)
                cursor.execute("COMMIT")
            except sqlite3.Error as exc:
                if self.db.in_transaction:  # SQLite may have rolled back already (disk full): don't mask its error
                    self.db.execute("ROLLBACK")
                self.lost[camera] += 1
                raise OutboxRefused(f"outbox {self.path}: cannot store a verdict ({exc}); free disk space or check "
                                    "the disk; verdicts stored before are kept") from exc
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.bytes += added - removed
            self.seqs[camera] = seq
            self._write_watermark()
            if lost:
                log.warning("outbox: camera %s stores verdicts again; seq %d..%d were lost (disk full) and a gap "
                            "message says so", camera, seq - lost, seq - 1)
                del self.lost[camera]
        return seq

    def _enforce_limit(self, cursor: sqlite3.Cursor, total_bytes: int) -> int:
        """Drop the oldest accepts (then rejects) until both limits hold; returns the payload bytes dropped."""
        excess = cursor.execute("SELECT COUNT(*) FROM message").fetchone()[0] - self.max_messages
        excess_bytes = total_bytes - self.max_bytes
        removed = 0
        for reject in (0, 1):
            if excess <= 0 and excess_bytes <= 0:
                break
            dropped: list[tuple[int]] = []
            by_camera: Counter[str] = Counter()
            for message_id, camera, size in self.db.execute(  # read lazily: only as far as needed
                    "SELECT id, camera, LENGTH(payload) FROM message WHERE reject = ? ORDER BY id", (reject,)):
                if excess <= 0 and excess_bytes <= 0:
                    break
                dropped.append((message_id,))
                by_camera[camera] += 1
                excess, excess_bytes, removed = excess - 1, excess_bytes - size, removed + size
            cursor.executemany("DELETE FROM message WHERE id = ?", dropped)
            for camera, n in by_camera.items():
                self.dropped[camera] += n
                self.on_drop(camera, n)
            if dropped:
                self.throttled.log(logging.ERROR, "full", "outbox full (%d messages or %.0f MB): dropping the oldest "
                                   "messages to make room, accepts before rejects (coft_outbox_dropped_total counts "
                                   "them); is the broker reachable?", self.max_messages, self.max_bytes / 2**20)
        return removed

    def pending(self, camera: str, after_id: int = 0, limit: int = 100) -> list[Message]:
        with self.lock:
            rows = self.db.execute("SELECT id, camera, topic, payload FROM message WHERE camera = ? AND id > ? "
                                   "ORDER BY id LIMIT ?", (camera, after_id, limit)).fetchall()
        return [Message(*row) for row in rows]

    def ack(self, message_id: int) -> None:
        with self.lock:
            row = self.db.execute("DELETE FROM message WHERE id = ? RETURNING LENGTH(payload)", (message_id,)).fetchone()
            self.bytes -= row[0] if row else 0

    def depth(self, camera: str | None = None) -> int:
        with self.lock:
            if camera is None:
                return self.db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
            return self.db.execute("SELECT COUNT(*) FROM message WHERE camera = ?", (camera,)).fetchone()[0]

    def oldest_created(self, camera: str) -> float | None:
        """When the camera's oldest unacknowledged message was stored (time.time()), or None."""
        with self.lock:
            row = self.db.execute("SELECT created FROM message WHERE camera = ? ORDER BY id LIMIT 1", (camera,)).fetchone()
        return row[0] if row else None

    def oldest_age_s(self) -> float | None:
        with self.lock:
            row = self.db.execute("SELECT MIN(created) FROM message").fetchone()
        return None if row[0] is None else time.time() - row[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
            if self.watermark:
                self.watermark.close()
