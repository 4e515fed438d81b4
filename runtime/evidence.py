"""Evidence on disk: rejected frames (and every Nth accepted one) as JPEG beside their verdict JSON,
each as the camera gave it and, for evidence, annotated (map, box, verdict) as an operator reads it.

Kept within a disk budget: once the folder grows past it, the oldest evidence goes first.
Readable by the service's user only: frames of a line's parts are its owner's business.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path

import cv2
import numpy as np

from coft.runtime.config import EvidenceConfig

log = logging.getLogger(__name__)
ANNOTATED = "-annotated.jpg"


class Evidence:
    def __init__(self, config: EvidenceConfig):
        self.config = config
        self.budget = int(config.max_mb * 1024 * 1024)
        config.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        existing = sorted((p for p in config.dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
        self.files: deque[tuple[Path, int]] = deque((p, p.stat().st_size) for p in existing)
        self.total = sum(size for _, size in self.files)
        self.passes = 0

    def wanted(self, reject: bool) -> bool:
        if reject:
            return self.config.save_rejects
        self.passes += 1
        n = self.config.every_nth_pass
        return bool(n) and self.passes % n == 0

    def save(self, image: np.ndarray, verdict: dict, annotated: np.ndarray | None = None) -> None:
        stem = f"{verdict['camera']}-{verdict['seq']:09d}-{verdict['verdict']}"
        folder = self.config.dir / verdict["camera"]
        folder.mkdir(mode=0o700, exist_ok=True)
        files = [(folder / f"{stem}.jpg", image)] + ([(folder / f"{stem}{ANNOTATED}", annotated)]
                                                       if annotated is not None else [])
        for path, picture in files:
            ok, jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                log.warning("evidence: could not encode frame %s", stem)
                return
            if not self._write(path, jpeg.tobytes()):
                return
        if not self._write(folder / f"{stem}.json", json.dumps(verdict).encode()):
            return
        while self.total > self.budget and self.files:
            path, size = self.files.popleft()
            path.unlink(missing_ok=True)
            self.total -= size

    def _write(self, path: Path, data: bytes) -> bool:
        try:
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
        except OSError as exc:
            log.error("evidence: cannot write %s (%s); check evidence.dir", path, exc.strerror)
            return False
        self.files.append((path, len(data)))
        self.total += len(data)
        return True

    def rejects(self, camera: str | None = None, limit: int = 24) -> list[Path]:
        """Verdict files of rejected frames, newest first."""
        def written(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except OSError:  # deleted for the disk budget since the listing
                return 0.0
        found = self.config.dir.glob(f"{camera or '*'}/*-reject.json")
        return sorted(found, key=written, reverse=True)[:limit]
