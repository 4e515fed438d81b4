"""`coft retrain BUNDLE HARVEST_DIR`: from few shots to many, on frames the line itself kept.

The runtime's `harvest:` keeps every Nth accepted frame and every reject, each with its
verdict JSON (camera, model id, score). Retraining fits a new bundle with the same
settings on those frames, leaving out first the frames the line's own scores mark as
suspects (runtime.commissioning's trimmed fit), then FUN-AD's, and records where it came
from (`revision_of`, `harvest`). Operators may
sort frames into `good/` and `defect/` folders inside the harvest, and `--defects` names
a folder of real defects kept anywhere: marked defects are never trained on, a knn
bundle's bank takes their worst patches as defect rows (as `coft learn` does on the box),
and with `--recalibrate` the labelled frames set the threshold.
Frames of another camera or another model's line are refused: their JSON says whose they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from coft.runtime.model.bank_growth import with_marked_defects
from coft.runtime.model.bundle import BANK, lineage, load_bundle, update_manifest
from coft.runtime.model.errors import CoftError
from coft.runtime.model.frames import LineFrames, line_frames
from coft.runtime.model.images import list_images
from coft.runtime.model.threshold import MIN_FRAMES, suspects
from coft.train.augment import AugmentConfig
from coft.train.coftad import FinetuneConfig
from coft.train.pipeline import TrainOptions


def trainable_frames(frames: LineFrames) -> list[Path]:
    """Sorted-good frames, and unsorted ones the line neither rejected nor, by its scores, marks as suspects
    (FUN-AD then looks again at what is left); never a sorted defect."""
    scores = frames.scores
    scored = np.isfinite(scores) & (scores > 0)  # frames of a plain folder carry no score: FUN-AD judges them
    suspect = np.zeros(len(scores), bool)
    if scored.sum() >= MIN_FRAMES:
        suspect[scored] = suspects(scores[scored])
    return [p for p, label, s, rejected in zip(frames.paths, frames.labels, suspect, frames.rejected)
            if label == "good" or (label == "" and not s and not rejected)]


def options_of(manifest: dict, progress: bool, weights: str | None) -> TrainOptions:
    """The training options a bundle was made with, so the retrained model is the same kind of model."""
    training = manifest["training"]
    tiles = manifest.get("patch", {}).get("tiles")  # the same windows at the same scale of the frames
    return TrainOptions(
        backbone=manifest["backbone"]["name"], weights=weights, tiles=tiles["scale"] if tiles else None,
        size=tuple(tiles["window"]) if tiles else (manifest["input"]["height"], manifest["input"]["width"]),
        method=training["method"],
        scorer=manifest.get("scorer", "global"), pooling=manifest.get("patch", {}).get("pooling"),
        layers=tuple(manifest["backbone"]["layers"]) if "layers" in manifest["backbone"] else None,
        coreset=manifest.get("knn", {}).get("coreset_cap", TrainOptions.coreset), seed=training["seed"],
        views=training["views"], shrinkage=training["shrinkage"],
        target_false_reject_rate=manifest["threshold"].get("target_false_reject_rate", 0.01), progress=progress,
        finetune=FinetuneConfig(**(training["finetune"] or {})), augment=AugmentConfig(**training["augment"]))


def marked_defects(frames: LineFrames, folder: str | Path | None) -> LineFrames:
    """The harvest's frames with the images of `folder` (--defects) added, each sorted as a defect."""
    if folder is None:
        return frames
    extra = list_images(Path(folder), recursive=True)
    if not extra:
        raise CoftError(f"{folder}: no images of marked defects (looked for .png/.jpg files); give the folder "
                        "the operators' real defects were saved in")
    return LineFrames(frames.paths + extra, frames.labels + ["defect"] * len(extra),
                      np.concatenate([frames.rejected, np.ones(len(extra), bool)]),
                      np.concatenate([frames.scores, np.full(len(extra), np.nan)]), frames.camera)


def with_defect_rows(staged: Path, paths: list[Path], progress: bool) -> int:
    """A knn bundle's bank with the marked defects' worst patches as defect rows; how many frames gave them."""
    from coft.train.evaluate import frame_features
    bundle = load_bundle(staged)
    if bundle.manifest.get("scorer") != "knn" or not paths:
        return 0
    features = frame_features(bundle, paths, progress)
    update_manifest(staged, {}, files={BANK: with_marked_defects(bundle.scoring, features).save})
    return len(features)


def retrain(bundle_dir: str | Path, harvest: str | Path, out: str | Path | None = None, camera: str | None = None,
            recalibrate: str | None = None, weights: str | None = None, progress: bool = True,
            defects: str | Path | None = None) -> Path:
    from coft.train.evaluate import bundle_scores
    from coft.train.threshold import labelled_threshold
    from coft.train.unlabelled import train_unlabelled

    bundle = load_bundle(bundle_dir)
    harvest = Path(harvest)
    frames = marked_defects(line_frames(harvest, bundle.model_id, camera), defects)
    labels, camera = frames.labels, frames.camera
    commissioned = bundle.manifest.get("commissioning", {}).get("cameras")
    if commissioned and camera and camera not in commissioned:
        raise CoftError(f"{harvest}: frames of camera {camera}, but {bundle.model_id} was commissioned on "
                        f"{', '.join(commissioned)}; retrain that camera's bundle")
    trainable = trainable_frames(frames)
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
        marked = with_defect_rows(staged, [frames.paths[i] for i in sorted_ if labels[i] == "defect"], progress)
        threshold = None
        if recalibrate:
            if {labels[i] for i in sorted_} != {"good", "defect"}:
                raise CoftError(f"--recalibrate needs frames sorted into both good/ and defect/ in {harvest}")
            scored = bundle_scores(load_bundle(staged), [frames.paths[i] for i in sorted_], progress)
            truth = np.array([labels[sorted_[i]] == "defect" for i in scored.kept], dtype=int)
            threshold = labelled_threshold(truth, scored.scores, recalibrate)
        update_manifest(staged, {"revision_of": bundle.model_id, "harvest": {
            "folder": str(harvest), "camera": camera, "frames": len(frames.paths), "trained_pool": len(trainable),
            "sorted_good": labels.count("good"), "sorted_defects": labels.count("defect"), "defects_folder": str(defects) if defects else None,
            "defect_rows_from": marked},
            **({"threshold": threshold} if threshold else {})})
        shutil.move(str(staged), out)
        if (Path(work) / "bundle.funad").exists():
            shutil.move(str(Path(work) / "bundle.funad"), out.with_name(out.name + ".funad"))
    return out
