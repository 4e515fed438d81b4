"""`coft train`: a folder of good images in, a sealed model bundle out."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from coft.runtime.model.bundle import BANK, GAUSSIAN, new_bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.images import load_folder
from coft.runtime.model.scoring import Gaussian, MemoryBank, pool
from coft.runtime.model.tiles import MIN_OVERLAP, Tiling, tiled_size
from coft.train import progress
from coft.train.anomalies import synthesise
from coft.train.augment import AugmentConfig, augment, light_count
from coft.train.backbones import load_backbone
from coft.train.backbones.dinov2 import NAME as DINOV2
from coft.train.backbones.dinov2 import PATCH as VIT_PATCH
from coft.train.backbones.dinov2 import round_to_patch
from coft.train.coftad import FinetuneConfig, finetune
from coft.train.embed import embed_views, to_pixels
from coft.train.patches import frame_patch_features, windows
from coft.train.scorers.gaussian import fit_gaussian, global_fit
from coft.train.scorers.knn import DEFAULT_CAP, bank_views, fit_and_calibrate, knn_fit, tiled_view_scores
from coft.train.scorers.patch import BLUR_SIGMA, calibration_views, fit_patch_gaussian, patch_fit, patch_views
from coft.train.shape import CNN_STRIDE, CNN_UNIT, SQUARE, input_size, median_size, rounded
from coft.train.threshold import good_only_threshold, threshold_from_scores

log = logging.getLogger(__name__)

BACKBONE_WEIGHTS = "backbone.pt"
CALIBRATION = "calibration.npz"  # frames for INT8 calibration of a TensorRT engine
CALIBRATION_FRAMES = 64
METHODS = ("coftad", "frozen")
SCORERS = ("global", "patch", "knn", "auto")
POOLING = {"patch": "max", "knn": "top1pct"}  # image score from patch scores, unless --pooling says otherwise


@dataclass
class TrainOptions:
    backbone: str = "dinov2_vits14"  # see docs/accuracy.md: the few-shot benchmark decides this default
    weights: str | None = None  # ImageNet weights file for backbones other than Lite0
    size: tuple[int, int] | None = None  # model input (height, width); None: from the shots' shape (train/shape.py)
    method: str = "frozen"  # see docs/accuracy.md: the few-shot benchmark decides this default
    scorer: str = "knn"  # knn | patch | global | auto (self-check on synthetic defects); see docs/accuracy.md
    pooling: str | None = None  # patch scorers: worst patch (max) or mean of the worst 1% (top1pct); None: POOLING
    layers: tuple[int, ...] | None = None  # ViT blocks whose patch tokens are compared; None: the backbone's default
    coreset: int = DEFAULT_CAP  # knn: most patches kept in the memory bank (0: all)
    tiles: float | None = None  # knn: score overlapping windows of the frame at this scale of the shots (1 at most)
    shots: int | None = None  # train on k images of the folder chosen with the seed; None = all
    seed: int = 0
    views: int = 16  # N_A: augmented views per good image for the Gaussian
    shrinkage: str = "ledoit-wolf"
    target_false_reject_rate: float = 0.01
    device: str = "auto"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CoftError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
    return torch.device(name)


def choose_shots(paths: list[Path], shots: int | None, seed: int) -> list[int]:
    """Indices of the k training images, as the few-shot protocol picks them."""
    if shots is None:
        return list(range(len(paths)))
    if shots < 1:
        raise CoftError(f"--shots {shots}: must be at least 1")
    if shots > len(paths):
        raise CoftError(f"--shots {shots}: the folder has only {len(paths)} readable images; lower --shots or add images")
    return sorted(np.random.default_rng(seed).choice(len(paths), shots, replace=False).tolist())


def file_digests(paths: list[Path]) -> list[str]:
    """SHA-256 of each file's bytes (hex): the manifest keeps the shots' (coft eval leaves them out)."""
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]


def fingerprint(paths: list[Path], digests: list[str] | None = None) -> str:
    """A hash of the training images' bytes, so a bundle says exactly what it learned from."""
    digest = hashlib.sha256()
    for file_digest in digests if digests is not None else file_digests(paths):
        digest.update(bytes.fromhex(file_digest))
    return digest.hexdigest()


def calibration_frames(pixels: torch.Tensor, augment_config: AugmentConfig, generator: torch.Generator,
                       count: int = CALIBRATION_FRAMES) -> np.ndarray:
    """The good images and augmented views of them, as the camera delivers them: uint8 BGR [N, H, W, 3]."""
    views = [pixels.cpu()]
    while sum(len(v) for v in views) < count:
        views.append(augment(pixels, augment_config, generator).cpu())
    rgb = torch.cat(views)[:count].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def scorer_self_check(backbone, pixels: torch.Tensor, options: TrainOptions,
                      generator: torch.Generator) -> dict[str, float]:
    """AUROC of each scorer on held-out good views vs synthetic defects: a choice that needs no real defect."""
    held = augment(pixels, options.augment, generator)
    defects = synthesise(augment(pixels, options.augment, generator), generator)
    labels = np.r_[np.zeros(len(pixels)), np.ones(len(pixels))]
    test = torch.cat([held, defects])
    global_views = embed_views(backbone, pixels, options.views, options.augment, generator)
    global_scores = fit_gaussian(global_views.reshape(-1, global_views.shape[2]), options.shrinkage).score(
        embed_views(backbone, test, 1, options.augment, generator)[:, 0])
    patch_train = patch_views(backbone, pixels, options.views, options.augment, generator)
    patch_scores = pool(fit_patch_gaussian(patch_train, options.shrinkage).score(
        patch_views(backbone, test, 1, options.augment, generator)[:, 0]), options.pooling or POOLING["patch"])
    return {"global": round(float(roc_auc_score(labels, global_scores)), 4),
            "patch": round(float(roc_auc_score(labels, patch_scores)), 4)}


def train_bundle(good_dir: str | Path, out: str | Path, options: TrainOptions) -> Path:
    """Train on a folder of good images and write a sealed bundle to `out`; nothing is written on failure."""
    _check_new(out, options)
    paths, images = load_folder(good_dir)
    chosen = choose_shots(paths, options.shots, options.seed)
    return train_on([paths[i] for i in chosen], [images[i] for i in chosen], out, options)


def _check_new(out: str | Path, options: TrainOptions) -> None:
    if Path(out).exists():
        raise CoftError(f"{out}: already exists; choose another --out or remove it first")
    if options.method not in METHODS:
        raise CoftError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    if options.scorer not in SCORERS:
        raise CoftError(f"unknown scorer {options.scorer!r}; choose one of {', '.join(SCORERS)}")


def chosen_size(options: TrainOptions, images: list[np.ndarray]) -> tuple[tuple[int, int], str]:
    """The input size --size gave, or the one the shots' shape calls for; and why, for the log and manifest. A CNN's
    sides are multiples of its deepest stride (the ViT rounds to its patch itself)."""
    multiple = VIT_PATCH if options.backbone == DINOV2 else CNN_STRIDE
    if options.size:
        return options.size if options.backbone == DINOV2 else rounded(options.size, multiple, CNN_UNIT), "--size"
    size, why = input_size([image.shape for image in images], multiple)
    log.info("input %dx%d: %s (--size chooses another)", *size, why)
    return size, why


def chosen_tiling(options: TrainOptions, images: list[np.ndarray]) -> Tiling | None:
    """The windows --tiles asks for over the shots' median size at that scale, or None where it fits one window."""
    if not options.tiles:
        return None
    if not 0 < options.tiles <= 1:
        raise CoftError(f"--tiles {options.tiles:g}: a scale between 0 and 1 of the shots' size (1:1 at most: tiles "
                        "keep the camera's pixels, never magnify them), e.g. --tiles 1")
    if options.scorer != "knn" or options.backbone != DINOV2:
        raise CoftError(f"--tiles scores windows of {DINOV2} patch features against a memory bank: use it with "
                        f"--scorer knn --backbone {DINOV2}")
    frame = tiled_size(median_size([image.shape for image in images]), options.tiles, VIT_PATCH)
    tiling = Tiling.over(frame, round_to_patch(options.size or SQUARE), VIT_PATCH)
    if len(tiling) == 1:
        log.info("tiles: the shots at x%g (%dx%d) fit one window; scoring them whole", options.tiles, *frame)
        return None
    log.info("tiles: %d windows of %dx%d over the shots at x%g (%dx%d), %.0f%% overlap at least", len(tiling),
             *tiling.window, options.tiles, *frame, 100 * MIN_OVERLAP)
    return tiling


@torch.inference_mode()
def backbone_cost(backbone, frame: torch.Tensor, tiling: Tiling | None) -> float:
    """Milliseconds the backbone takes on one frame here (its windows, where tiled): the cost coft train states."""
    frame_patch_features(backbone, frame, tiling)  # the first run allocates
    started = time.perf_counter()
    frame_patch_features(backbone, frame, tiling)
    ms = (time.perf_counter() - started) * 1000
    log.info("cost: %.0f ms a frame for the backbone (%s, torch on %s)", ms,
             f"{len(tiling)} windows of {tiling.window[0]}x{tiling.window[1]}" if tiling else "one window",
             next(backbone.parameters()).device)
    return round(ms, 1)


@dataclass
class FittedScorer:
    """What a scorer fitted on the shots' views gives a bundle: its scoring file, threshold, and how it was chosen."""

    name: str  # knn | patch | global
    scoring: MemoryBank | Gaussian
    file: str
    pooling: str | None
    poses: int | None  # knn: the poses each shot entered the bank in
    threshold: dict
    self_check: dict | None  # --scorer auto: each scorer's AUROC on synthetic defects


def fit_scorer(backbone, pixels: torch.Tensor, options: TrainOptions, generator: torch.Generator,
               shots: int, tiling: Tiling | None = None) -> FittedScorer:
    """The scorer the options ask for (or the self-check picks), fitted on the shots (a tiled frame's windows),
    with its good-only threshold."""
    scorer, self_check = options.scorer, None
    if scorer == "auto":
        self_check = scorer_self_check(backbone, pixels, options, generator)
        scorer = max(self_check, key=self_check.get)
        log.info("scorer self-check (AUROC, good views vs synthetic defects): %s -> %s", self_check, scorer)
    held = None  # views scored for the threshold, where they differ from the fitted ones
    pooling = options.pooling or POOLING.get(scorer)
    threshold = None
    if scorer == "knn":
        views = bank_views(backbone, windows(pixels, tiling), options.augment)  # a tiled frame's windows, each posed
        views = views.reshape(len(pixels), -1, *views.shape[2:])
        scoring, loo = fit_and_calibrate(views, options.coreset, pooling, options.seed,
                                         tiled_view_scores(tiling, options.augment, pooling) if tiling else None,
                                         backbone.feature_blocks)
        if loo is None and tiling:
            raise CoftError("--tiles: a tiled bundle's threshold is calibrated leaving one shot out; give 3 or more shots")
        file, fit = BANK, knn_fit(options.coreset, pooling, scoring.block_weights)
        if loo is not None:
            threshold = threshold_from_scores(loo, "leave-one-out", options.target_false_reject_rate)
    elif scorer == "patch":
        views = patch_views(backbone, pixels, options.views, options.augment, generator)
        scoring, file = fit_patch_gaussian(views, options.shrinkage), GAUSSIAN
        fit = patch_fit(options.shrinkage, pooling)
        held = calibration_views(backbone, pixels, options.views, options.augment, generator)
    else:
        views = embed_views(backbone, pixels, options.views, options.augment, generator)
        scoring, file = fit_gaussian(views.reshape(-1, views.shape[2]), options.shrinkage), GAUSSIAN
        fit = global_fit(options.shrinkage)
    threshold = threshold or good_only_threshold(views, options.target_false_reject_rate, fit, held)
    threshold["calibration_images"] = shots  # what an estimate from the shots rests on: no promise (runtime/model/promise.py)
    poses = views.shape[1] // (len(tiling) if tiling else 1) // light_count(options.augment) if scorer == "knn" else None
    return FittedScorer(scorer, scoring, file, pooling, poses, threshold, self_check)


def block_weights_of(bank) -> dict:
    """What the manifest says of a bank over several ViT blocks (bank.npz holds the weights the runtime uses)."""
    return {} if bank.block_weights is None else {"block_weights": [round(float(w), 4) for w in bank.block_weights]}


def bundle_manifest(paths: list[Path], options: TrainOptions, backbone, size: tuple[int, int], size_from: str,
                    fitted: FittedScorer, history: list[dict[str, float]], selection: dict | None, device,
                    seconds: float, tiling: Tiling | None = None, ms_per_frame: float | None = None) -> dict:
    """The new bundle's manifest: where every choice came from, so a bundle can be judged and retrained alike."""
    stride = backbone.patch_stride
    shot_digests = file_digests(paths)
    data_hash = fingerprint(paths, shot_digests)
    created = datetime.now(timezone.utc)
    return {
        "model_id": f"{options.backbone}-k{len(paths)}-{data_hash[:8]}-{created:%Y%m%dT%H%M%SZ}",
        "created": created.isoformat(timespec="seconds"),
        "backbone": {"name": options.backbone, "weights": BACKBONE_WEIGHTS,
                     **({"layers": list(backbone.layers), "pretrained": backbone.pretrained}
                        if hasattr(backbone, "layers") else {})},
        "input": {"height": size[0], "width": size[1], "colour_order": "BGR",
                  "dtype": "uint8", "layout": "NHWC", "size_from": size_from},
        "normalisation": {"colour_order": "RGB", "mean": backbone.mean.flatten().tolist(),
                          "std": backbone.std.flatten().tolist()},
        "embedding_dim": fitted.scoring.dim,
        "scorer": fitted.name,
        **({"patch": {"stride": stride, "pooling": fitted.pooling, "grid": [size[0] // stride, size[1] // stride],
                      "blur_sigma": BLUR_SIGMA, **({"tiles": tiling.as_manifest(options.tiles)} if tiling else {})}}
           if fitted.name in POOLING else {}),
        **({"knn": {"bank": BANK, "bank_size": len(fitted.scoring), "coreset_cap": options.coreset,
                    "metric": "cosine", "poses": fitted.poses, **block_weights_of(fitted.scoring)}}
           if fitted.name == "knn" else {}),
        "threshold": fitted.threshold,
        "training": {
            "method": options.method,
            "shots": len(paths),
            "seed": options.seed,
            "views": options.views,
            "shrinkage": options.shrinkage,
            "finetune": options.finetune.as_dict() if options.method == "coftad" else None,
            "augment": options.augment.as_dict(),
            "final_losses": history[-1] if history else None,
            "images": [p.name for p in paths],
            "selection": selection or {"method": "given", "note": "every image was taken as good"},
            "scorer_self_check": fitted.self_check,
            "dataset_fingerprint": data_hash,
            "shot_fingerprints": shot_digests,  # coft eval leaves them out
            "device": str(device),
            "seconds": seconds,
            "backbone_ms_per_frame": ms_per_frame,  # torch, on the machine that trained: what a frame costs
        },
    }


def train_on(paths: list[Path], images: list[np.ndarray], out: str | Path, options: TrainOptions,
             selection: dict | None = None) -> Path:
    """Train on these good images; `selection` says how they were chosen when not simply given."""
    out = Path(out)
    _check_new(out, options)
    started = time.perf_counter()
    progress.shown = options.progress
    tiling = chosen_tiling(options, images)
    if tiling:
        asked, size_from = tiling.frame, f"--tiles {options.tiles:g}: the shots' median size at that scale, in {len(tiling)} windows"
    else:
        asked, size_from = chosen_size(options, images)
    sizes = {image.shape[:2] for image in images}
    if len(sizes) > 1:
        log.info("image sizes vary (%d distinct); all are resized to %dx%d", len(sizes), *asked)
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    device = resolve_device(options.device)
    backbone = load_backbone(options.backbone, options.weights, tiling.window if tiling else asked,
                             options.layers).to(device)
    size = tiling.frame if tiling else getattr(backbone, "size", asked)  # a ViT rounds it to its patch size
    pixels = to_pixels(images, size).to(device)
    log.info("training on %d good images at %dx%d with %s on %s", len(images), *size, options.backbone, device)
    history: list[dict[str, float]] = []
    if options.finetune.trainable_stages is None:
        options.finetune = replace(options.finetune, trainable_stages=backbone.default_trainable)
    if options.method == "coftad" and options.finetune.steps > 0:
        history = finetune(backbone, pixels, options.finetune, options.augment, generator, options.progress)
    fitted = fit_scorer(backbone, pixels, options, generator, len(paths), tiling)
    ms_per_frame = backbone_cost(backbone, pixels[:1], tiling)
    manifest = bundle_manifest(paths, options, backbone, size, size_from, fitted, history, selection, device,
                               round(time.perf_counter() - started, 1), tiling, ms_per_frame)
    calibration = calibration_frames(pixels, options.augment, generator)
    with new_bundle(out, manifest) as staging:
        fitted.scoring.save(staging / fitted.file)
        np.savez(staging / CALIBRATION, frames=calibration)
        torch.save(backbone.cpu().state_dict(), staging / BACKBONE_WEIGHTS)
    log.info("wrote bundle %s (threshold %.4f by %s)", out, fitted.threshold["value"], fitted.threshold["method"])
    return out
