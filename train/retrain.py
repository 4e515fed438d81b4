"""`coft retrain BUNDLE HARVEST_DIR`: from few shots to many, on frames the line itself kept.

The runtime's `harvest:` keeps every Nth accepted frame and every reject, each with its
verdict JSON (camera, model id, score). Retraining fits a new bundle with the same
settings on those frames, leaving out first the frames the line's own scores mark as
suspects (runtime.commissioning's trimmed fit), then FUN-AD's, and records where it came
from (`revision_of`, `harvest`). Operators may
sort frames into `good/` and `defect/` folders inside the harvest: sorted defects are
never trained on, and with `--recalibrate` the labelled frames set the threshold.
Frames of another camera or another model's line are refused: their JSON says whose they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from coft.runtime.bundle import load_bundle, update_manifest
from coft.runtime.commissioning import MIN_FRAMES, suspects
from coft.runtime.errors import CoftError
from coft.runtime.images import list_images
from coft.train.augment import AugmentConfig
from coft.train.coftad import FinetuneConfig
from coft.train.pipeline import TrainOptions


def lineage(model_id: str) -> str:
    """The model id a line's revisions share (without -r2, -r3 ...)."""
    return re.sub(r"(-r\d+)+$", "", model_id)


def harvested_frames(harvest: Path, bundle_model: str,
                     camera: str | None) -> tuple[list[Path], list[str], np.ndarray, str]:
    """The harvest's frames, each with its label ('good', 'defect' or '' when unsorted) and the score the line
    gave it, and the camera."""
    frames, labels, scores, cameras = [], [], [], set()
    for path in list_images(harvest, recursive=True):
        sidecar = path.with_suffix(".json")
        try:
            verdict = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            raise CoftError(f"{path}: no readable verdict {sidecar.name} beside it; a harvest holds frames as the "
                            "runtime kept them (harvest: in line.yaml)") from None
        if lineage(str(verdict.get("model_id"))) != lineage(bundle_model):
            raise CoftError(f"{harvest}: {path.name} was inspected by model {verdict.get('model_id')}, not by "
                            f"{bundle_model} or its revisions; retrain the bundle that line ran")
        if camera and verdict.get("camera") != camera:
            continue
        cameras.add(verdict.get("camera"))
        parts = path.relative_to(harvest).parts[:-1]
        frames.append(path)
        labels.append("defect" if "defect" in parts else "good" if "good" in parts else "")
        scores.append(float(verdict.get("score") or np.inf))
    if len(cameras) > 1:
        raise CoftError(f"{harvest}: frames of cameras {', '.join(sorted(map(str, cameras)))}; a bundle serves one "
                        "view of a part: give --camera")
    if not frames:
        raise CoftError(f"{harvest}: no harvested frames{f' of camera {camera}' if camera else ''}; "
                        "set harvest: in line.yaml and let the line run")
    return frames, labels, np.array(scores), cameras.pop()


def trainable_frames(frames: list[Path], labels: list[str], scores: np.ndarray) -> list[Path]:
    """Sorted-good frames, and unsorted ones the line's own scores do not mark as suspects (FUN-AD then looks
    again at what is left); never a sorted defect."""
    finite = np.isfinite(scores) & (scores > 0)
    suspect = ~finite
    if finite.sum() >= MIN_FRAMES:
        suspect[finite] = suspects(scores[finite])
    return [p for p, label, s in zip(frames, labels, suspect) if label == "good" or (label == "" and not s)]


def options_of(manifest: dict, progress: bool, weights: str | None) -> TrainOptions:
    """The training options a bundle was made with, so the retrained model is the same kind of model."""
    training = manifest["training"]
    return TrainOptions(
        backbone=manifest["backbone"]["name"], weights=weights,
        size=(manifest["input"]["height"], manifest["input"]["width"]), method=training["method"],
        scorer=manifest.get("scorer", "global"), pooling=manifest.get("patch", {}).get("pooling"),
        layers=tuple(manifest["backbone"]["layers"]) if "layers" in manifest["backbone"] else None,
        coreset=manifest.get("knn", {}).get("coreset_cap", TrainOptions.coreset), seed=training["seed"],
        views=training["views"], shrinkage=training["shrinkage"],
        target_false_reject_rate=manifest["threshold"].get("target_false_reject_rate", 0.01), progress=progress,
        finetune=FinetuneConfig(**(training["finetune"] or {})), augment=AugmentConfig(**training["augment"]))


def retrain(bundle_dir: str | Path, harvest: str | Path, out: str | Path | None = None, camera: str | None = None,
            recalibrate: str | None = None, weights: str | None = None, progress: bool = True) -> Path:
    from coft.train.evaluate import bundle_scores
    from coft.train.threshold import labelled_threshold
    from coft.train.unlabelled import train_unlabelled

    bundle = load_bundle(bundle_dir)
    harvest = Path(harvest)
    frames, labels, scores, camera = harvested_frames(harvest, bundle.model_id, camera)
    commissioned = bundle.manifest.get("commissioning", {}).get("cameras")
    if commissioned and camera not in commissioned:
        raise CoftError(f"{harvest}: frames of camera {camera}, but {bundle.model_id} was commissioned on "
                        f"{', '.join(commissioned)}; retrain that camera's bundle")
    trainable = trainable_frames(frames, labels, scores)
    out = Path(out) if out else bundle.path.resolve().with_name(f"{lineage(bundle.path.resolve().name)}-harvest")
    if out.exists():  # before minutes of training, not after
        raise CoftError(f"{out}: already exists; choose another --out or remove it first")
    with tempfile.TemporaryDirectory(prefix=".retrain-", dir=out.parent) as work:
        pool = Path(work) / "pool"
        pool.mkdir()
        for i, path in enumerate(trainable):
            os.symlink(path.resolve(), pool / f"{i:06d}-{path.name}")
        staged = Path(work) / "bundle"
        train_unlabelled(pool, staged, options_of(bundle.manifest, progress, weights))
        sorted_ = [i for i, label in enumerate(labels) if label]
        threshold = None
        if recalibrate:
            if {labels[i] for i in sorted_} != {"good", "defect"}:
                raise CoftError(f"--recalibrate needs frames sorted into both good/ and defect/ in {harvest}")
            scored = bundle_scores(load_bundle(staged), [frames[i] for i in sorted_], progress)
            truth = np.array([labels[sorted_[i]] == "defect" for i in scored.kept], dtype=int)
            threshold = labelled_threshold(truth, scored.scores, recalibrate)
        update_manifest(staged, {"revision_of": bundle.model_id, "harvest": {
            "folder": str(harvest), "camera": camera, "frames": len(frames), "trained_pool": len(trainable),
            "sorted_good": labels.count("good"), "sorted_defects": labels.count("defect")},
            **({"threshold": threshold} if threshold else {})})
        shutil.move(str(staged), out)
        if (Path(work) / "bundle.funad").exists():
            shutil.move(str(Path(work) / "bundle.funad"), out.with_name(out.name + ".funad"))
    return out
