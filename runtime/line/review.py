"""The commissioning review: the frames the commissioned threshold rejects, for an operator to sort one click each.

Until someone says otherwise, the stated promise counts every commissioning frame as a good part, so each frame the
threshold rejects counts as a false reject. Sorting one as a defect takes it out of the count, sorting one as good
keeps it in for good: the promise moves with every click (model/threshold.py, reviewed_promise). A sorted frame is
moved into good/ or defect/ beside the kept frames, where `coft learn` reads an operator's word.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from coft.runtime.line.evidence import LABELS
from coft.runtime.model.errors import CoftError
from coft.runtime.model.promise import describe
from coft.runtime.model.threshold import review_queue, reviewed_promise


class Review:
    def __init__(self, folder: Path, threshold: dict):
        self.folder, self.threshold = folder, threshold
        try:
            with (folder / "scores.csv").open() as f:
                rows = [row for row in csv.DictReader(f) if row["file"]]
        except (OSError, KeyError, csv.Error) as exc:
            raise CoftError(f"commissioning review: cannot read {folder / 'scores.csv'} ({exc}); the frames kept at "
                            "commissioning are gone") from None
        self.files = [row["file"] for row in rows]
        self.cameras = [row["camera"] for row in rows]
        self.scores = np.array([float(row["score"]) for row in rows])

    def label(self, file: str) -> str | None:
        return next((label for label in LABELS if (self.folder / label / file).is_file()), None)

    def sorted_as(self) -> dict[str, str]:
        """Every sorted frame's label, from one listing of good/ and defect/ (the page asks every few seconds)."""
        return {path.name: label for label in LABELS if (self.folder / label).is_dir()
                for path in (self.folder / label).iterdir()}

    def state(self) -> dict:
        """The queue (worst first, with what each frame was sorted as) and the promise as sorted so far."""
        sorted_as = self.sorted_as()
        labels = [sorted_as.get(file) for file in self.files]
        good = np.array([label == "good" for label in labels])
        defect = np.array([label == "defect" for label in labels])
        value = float(self.threshold["value"])
        promise = reviewed_promise(self.scores, value, good, defect)
        queue = review_queue(self.scores, value)
        return {"threshold": value, "frames": len(self.files), "promise": describe({"promise": promise}),
                "false_reject_rate": promise["false_reject_rate"], "stated_at_commissioning": describe(self.threshold),
                "sorted": int(good.sum() + defect.sum()), "left": int(sum(labels[i] is None for i in queue)),
                "queue": [{"file": self.files[i], "camera": self.cameras[i], "score": float(self.scores[i]),
                           "sorted": labels[i]} for i in queue]}

    def image(self, file: str) -> Path:
        """Where a queued frame's JPEG is now (beside the others, or in the folder it was sorted into)."""
        self._queued(file)
        label = self.label(file)
        path = self.folder / label / file if label else self.folder / file
        if not path.is_file():
            raise CoftError(f"commissioning review: {file} is gone from {self.folder}")
        return path

    def sort(self, file: str, label: str) -> Path:
        """Move a queued frame into good/ or defect/ (from the other, where it was sorted before)."""
        if label not in LABELS:
            raise CoftError(f"commissioning review: sort a frame as good or defect, not {label!r}")
        source = self.image(file)
        target = self.folder / label / file
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(source, target)
        return target

    def _queued(self, file: str) -> None:
        queued = {self.files[i] for i in review_queue(self.scores, float(self.threshold["value"]))}
        if file not in queued:
            raise CoftError(f"commissioning review: {file} is not among the frames the threshold rejects")
