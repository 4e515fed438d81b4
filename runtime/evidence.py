"""Evidence on disk: rejected frames (and every Nth accepted one) as JPEG beside their verdict JSON.

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

from runtime.config import EvidenceConfig

log = logging.getLogger(__name__)


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

    def save(self, image: np.ndarray, verdict: dict) -> None:
        stem = f"{verdict['camera']}-{verdict['seq']:09d}-{verdict['verdict']}"
        folder = self.config.dir / verdict["camera"]
        folder.mkdir(mode=0o700, exist_ok=True)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            log.warning("evidence: could not encode frame %s", stem)
            return
        for path, data in ((folder / f"{stem}.jpg", jpeg.tobytes()), (folder / f"{stem}.json", json.dumps(verdict).encode())):
            try:
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                    f.write(data)
            except OSError as exc:
                log.error("evidence: cannot write %s (%s); check evidence.dir", path, exc.strerror)
                return
            self.files.append((path, len(data)))
            self.total += len(data)
        while self.total > self.budget and self.files:
            path, size = self.files.popleft()
            path.unlink(missing_ok=True)
            self.total -= size
