"""The frames a line kept (a harvest, commissioning frames or a plain folder) with what their verdict JSONs say:
what `coft learn` on the box and `coft retrain` on a training machine both read."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coft.runtime.model.bundle import lineage
from coft.runtime.model.errors import CoftError
from coft.runtime.model.images import list_images


@dataclass
class LineFrames:
    """Frames a line kept, each with the operator's label ('good', 'defect' or '') and whether the line rejected it."""

    paths: list[Path]
    labels: list[str]
    rejected: np.ndarray  # bool; False where no verdict says
    scores: np.ndarray  # the line's score, nan where no verdict says
    camera: str | None


def line_frames(folder: Path, model_id: str, camera: str | None) -> LineFrames:
    """The frames of a harvest, a commissioning folder or a plain folder, with what their verdict JSONs say.

    A verdict of another model's line, or frames of several cameras without `camera`, are refused."""
    paths, labels, rejected, scores, cameras = [], [], [], [], set()
    listed = folder / "scores.csv"  # a commissioning folder: the frames it lists (not its histogram.png) and
    found = list_images(folder, recursive=True)  # the frames an operator sorted into its good/ and defect/
    if listed.is_file():
        with listed.open() as f:
            kept = {folder / row["file"] for row in csv.DictReader(f) if row["file"]}
        found = [p for p in found if p in kept or {"good", "defect"} & set(p.relative_to(folder).parts[:-1])]
    for path in found:
        verdict = {}
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                verdict = json.loads(sidecar.read_text())
            except (OSError, ValueError) as exc:
                raise CoftError(f"{sidecar}: not a readable verdict ({exc}); remove it or the frame beside it") from None
            if lineage(str(verdict.get("model_id"))) != lineage(model_id):
                raise CoftError(f"{folder}: {path.name} was inspected by model {verdict.get('model_id')}, not by "
                                f"{model_id} or its revisions; use the bundle that line ran")
            if camera and verdict.get("camera") != camera:
                continue
            cameras.add(verdict.get("camera"))
        parts = path.relative_to(folder).parts[:-1]
        paths.append(path)
        labels.append("defect" if "defect" in parts else "good" if "good" in parts else "")
        rejected.append(verdict.get("verdict") == "reject")  # line/verdict.py's JSON, as harvest writes it
        score = verdict.get("score")
        scores.append(float(score) if isinstance(score, (int, float)) else np.nan)
    if len(cameras) > 1:
        raise CoftError(f"{folder}: frames of cameras {', '.join(sorted(map(str, cameras)))}; a bundle serves one "
                        "view of a part: give --camera")
    if not paths:
        raise CoftError(f"{folder}: no frames{f' of camera {camera}' if camera else ''} (looked for .png/.jpg files); "
                        "give the commissioning frames, a harvest (harvest: in line.yaml) or a folder of frames")
    return LineFrames(paths, labels, np.array(rejected), np.array(scores, np.float64), cameras.pop() if cameras else None)
