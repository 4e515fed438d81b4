"""The durable outbox: every message is on disk before it is published, and leaves only on the broker's ack.

SQLite in WAL mode with synchronous=FULL: a message that `put` returned for survives a
power cut, a SIGKILL or a broker outage, and goes out in order afterwards. With `fsync`
off (synchronous=NORMAL) it still survives crashes, SIGKILL and restarts, not a power cut. Each verdict
gets its sequence number here, from a counter stored in the same transaction, so numbers
keep increasing across restarts and a subscriber recognises duplicates by them.

When full (`max_messages`), the oldest *accept* messages are dropped first, then, only
if nothing else is left, the oldest rejects; every drop is counted and logged, never silent.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import CoftError

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
"""


@dataclass(frozen=True)
class Message:
    id: int
    camera: str
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, path: str | Path, max_messages: int = 100_000, fsync: bool = True):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise CoftError(f"outbox {path}: cannot open ({exc}); check outbox.path and that the folder is writable") from exc
        self.path, self.max_messages = path, max_messages
        self.lock = threading.Lock()
        self.dropped = 0

    def next_seq(self, camera: str, cursor: sqlite3.Cursor) -> int:
        cursor.execute("INSERT INTO counter (name, value) VALUES (?, 1) "
                       "ON CONFLICT (name) DO UPDATE SET value = value + 1", (camera,))
        return cursor.execute("SELECT value FROM counter WHERE name = ?", (camera,)).fetchone()[0]

    def put_verdict(self, camera: str, build: "callable", reject: bool) -> int:
        """Assign the camera's next sequence number, let `build(seq)` make [(topic, payload)], store all atomically."""
        with self.lock:
            cursor = self.db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                seq = self.next_seq(camera, cursor)
                now = time.time()
                for topic, payload in build(seq):
                    cursor.execute("INSERT INTO message (camera, topic, payload, reject, created) VALUES (?, ?, ?, ?, ?)",
                                   (camera, topic, payload, int(reject), now))
                self._enforce_limit(cursor)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        return seq

    def _enforce_limit(self, cursor: sqlite3.Cursor) -> None:
        excess = cursor.execute("SELECT COUNT(*) FROM message").fetchone()[0] - self.max_messages
        if excess <= 0:
            return
        for reject in (0, 1):
            if excess <= 0:
                break
            ids = [row[0] for row in cursor.execute(
                "SELECT id FROM message WHERE reject = ? ORDER BY id LIMIT ?", (reject, excess))]
            cursor.executemany("DELETE FROM message WHERE id = ?", [(i,) for i in ids])
            excess -= len(ids)
            self.dropped += len(ids)
            log.error("outbox full (%d messages): dropped the %d oldest %s messages; is the broker reachable?",
                      self.max_messages, len(ids), "reject" if reject else "accept")

    def pending(self, camera: str, after_id: int = 0, limit: int = 100) -> list[Message]:
        with self.lock:
            rows = self.db.execute("SELECT id, camera, topic, payload FROM message WHERE camera = ? AND id > ? "
                                   "ORDER BY id LIMIT ?", (camera, after_id, limit)).fetchall()
        return [Message(*row) for row in rows]

    def ack(self, message_id: int) -> None:
        with self.lock:
            self.db.execute("DELETE FROM message WHERE id = ?", (message_id,))

    def depth(self, camera: str | None = None) -> int:
        with self.lock:
            if camera is None:
                return self.db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
            return self.db.execute("SELECT COUNT(*) FROM message WHERE camera = ?", (camera,)).fetchone()[0]

    def oldest_age_s(self) -> float | None:
        with self.lock:
            row = self.db.execute("SELECT MIN(created) FROM message").fetchone()
        return None if row[0] is None else time.time() - row[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
