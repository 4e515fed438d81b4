"""Evidence on disk: rejected frames (and every Nth accepted one) as JPEG beside their verdict JSON,
each as the camera gave it and, for evidence, annotated (map, box, verdict) as an operator reads it.

Kept within a disk budget: once the folder grows past it, the oldest evidence goes first;
and never written into the room the outbox keeps for verdicts (`Reserve`).
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
from coft.runtime.line.verdict import Verdict
from coft.runtime.process.disk import Reserve

log = logging.getLogger(__name__)
ANNOTATED = "-annotated.jpg"
LABELS = ("good", "defect")  # an operator's word on a frame: a good part (a false reject), or a real defect


def feedback_folder(label: str, harvest: Path | None, evidence: Path | None) -> Path | None:
    """Where frames an operator marked go: the harvest's good/ or defect/ (coft learn and coft retrain read them),
    else feedback/ and feedback-defect/ beside the evidence; None where the line keeps neither."""
    if harvest:
        return harvest / label
    return evidence / ("feedback" if label == "good" else "feedback-defect") if evidence else None


class Evidence:
    def __init__(self, config: EvidenceConfig, name: str = "evidence", reserve: Reserve | None = None):
        self.config, self.name, self.reserve = config, name, reserve
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

    def save(self, image: np.ndarray, verdict: Verdict, annotated: np.ndarray | None = None) -> None:
        stem = f"{verdict.camera}-{verdict.seq:09d}-{verdict.verdict}"
        folder = self.config.dir / verdict.camera
        folder.mkdir(mode=0o700, exist_ok=True)
        files = [(folder / f"{stem}.jpg", image)] + ([(folder / f"{stem}{ANNOTATED}", annotated)]
                                                       if annotated is not None else [])
        encoded = []
        for path, picture in files:
            ok, jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                log.warning("%s: could not encode frame %s", self.name, stem)
                return
            encoded.append((path, jpeg.tobytes()))
        if self.reserve and not self.reserve.allows(folder, sum(len(data) for _, data in encoded) + 4096, self.name):
            return
        for path, data in encoded:
            if not self._write(path, data):
                return
        if not self._write(folder / f"{stem}.json", json.dumps(verdict.as_dict()).encode()):
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
            log.error("%s: cannot write %s (%s); check %s.dir", self.name, path, exc.strerror, self.name)
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
