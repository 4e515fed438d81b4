"""`coft eval`: how good is a bundle on labelled images, in numbers and in pictures.

The data folder holds `good/` and any other folders of defective images; the name of a
defect image's own folder is its defect type (`defect/crack/x.png` or `crack/x.png`).
Folders of masks (`mask`, `masks`, `ground_truth`) are ignored.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from coft.runtime.model.bundle import PATCH_SCORERS, Bundle, load_bundle, revise
from coft.runtime.model.errors import CoftError
from coft.runtime.model.heatmap import anomaly_map, overlay
from coft.runtime.model.images import list_images, read_image, resize_to_input
from coft.runtime.model.promise import describe
from coft.runtime.model.scoring import pool
from coft.runtime.model.threshold import reference_median
from coft.train import progress as bars
from coft.train.backbones import restore_bundle_backbone
from coft.train.embed import embed, to_pixels
from coft.train.metrics import detection_metrics, per_type_auroc, rates_at
from coft.train.patches import frame_patch_features
from coft.train.pipeline import file_digests
from coft.train.threshold import held_out_rates, labelled_threshold

log = logging.getLogger(__name__)

MASK_FOLDERS = {"mask", "masks", "ground_truth"}


@dataclass
class LabelledSet:
    paths: list[Path]
    labels: np.ndarray  # 1 = defect
    types: list[str]


def labelled_images(data_dir: str | Path) -> LabelledSet:
    data_dir = Path(data_dir)
    if not (data_dir / "good").is_dir():
        raise CoftError(f"{data_dir}: expected a 'good' folder beside the defect folders (e.g. good/, defect/crack/)")
    paths, labels, types = [], [], []
    for path in list_images(data_dir, recursive=True):
        parts = path.relative_to(data_dir).parts
        if MASK_FOLDERS & set(parts[:-1]):
            continue
        good = parts[0] == "good"
        paths.append(path)
        labels.append(0 if good else 1)
        types.append("good" if good else path.parent.name)
    return LabelledSet(paths, np.array(labels), types)


@dataclass
class Scored:
    scores: np.ndarray  # [n] image scores of the readable images
    kept: list[int]  # their indices in the list given
    patch_maps: np.ndarray | None  # [n, h, w] patch scores (patch and knn scorers)


def bundle_scores(bundle: Bundle, paths: list[Path], progress: bool = True, batch: int = 32) -> Scored:
    """Score image files with a bundle (torch backbone, numpy scoring), as the exported graph will."""
    score = frame_scorer(bundle)
    scores, maps, kept = [], [], []
    for start in bars.bar(range(0, len(paths), batch), desc="scoring", unit="batch", show=progress):
        frames = []
        for i in range(start, min(start + batch, len(paths))):
            image = read_image(paths[i])
            if image is not None:
                frames.append(image)
                kept.append(i)
        if frames:
            batch_scores, batch_maps = score(frames)
            scores.append(batch_scores)
            maps.append(batch_maps)
    return Scored(np.concatenate(scores) if scores else np.zeros(0, np.float32), kept,
                  np.concatenate(maps) if maps and maps[0] is not None else None)


def bundle_pixels(bundle: Bundle, frames: list[np.ndarray]):
    """Decoded BGR frames as the bundle's input tensor, resized as the runtime does."""
    return to_pixels([resize_to_input(f, bundle.input_size) for f in frames], bundle.input_size)


def frame_features(bundle: Bundle, paths: list[Path], progress: bool = True, batch: int = 32) -> np.ndarray:
    """The readable images' patch features [n, P, C] from a patch bundle's backbone (unit rows, as it scores them)."""
    backbone = restore_bundle_backbone(bundle)
    features = []
    for start in bars.bar(range(0, len(paths), batch), desc="patch features", unit="batch", show=progress):
        frames = [f for f in map(read_image, paths[start:start + batch]) if f is not None]
        if frames:
            features.append(frame_patch_features(backbone, bundle_pixels(bundle, frames), bundle.tiling).numpy())
    if not features:
        raise CoftError(f"none of the {len(paths)} images could be read; check that they are not corrupt")
    return np.concatenate(features)


def frame_scorer(bundle: Bundle):
    """A function from decoded BGR frames (resized as the runtime does) to scores and, for patch scorers, maps."""
    m = bundle.manifest
    backbone = restore_bundle_backbone(bundle)

    def score(frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        pixels = bundle_pixels(bundle, frames)
        if bundle.scores_patches:
            tiling = bundle.tiling
            patch_scores = bundle.scoring.score(frame_patch_features(backbone, pixels, tiling).numpy())
            if tiling:  # the windows' scores on the frame's grid, as the graph stitches them
                patch_scores = tiling.stitched(patch_scores)
            return (pool(patch_scores, m["patch"]["pooling"]),
                    patch_scores.reshape(len(frames), *m["patch"]["grid"]))
        return bundle.gaussian.score(embed(backbone, pixels)), None
    return score


def good_drift(threshold: dict, good_scores: np.ndarray) -> dict | None:
    """How the known-good images score against what the bundle expected of good parts, and a one-line
    warning when too many of them are above the threshold for it to be chance (3x the target, 3 at least)."""
    if not len(good_scores):
        return None
    target = threshold.get("target_false_reject_rate", 0.01)
    above = int((good_scores > threshold["value"]).sum())
    reference = reference_median(threshold)
    drift = {"good_median": float(np.median(good_scores)), "trained_good_median": reference,
             "good_above_threshold": above / len(good_scores), "target_false_reject_rate": target, "warning": None}
    if above >= 3 and above / len(good_scores) > 3 * target:
        drift["warning"] = (f"{above / len(good_scores):.1%} of the {len(good_scores)} good images score above the "
                            f"threshold (target {target:.0%}); their median score is {drift['good_median']:.4g}"
                            + (f" against {reference:.4g} at training" if reference else "")
                            + ": these images differ from what the bundle was trained on (camera, lighting, video "
                            "path?), or the threshold is too tight: commission on the line or recalibrate")
    return drift


def find_mask(data_dir: Path, path: Path) -> Path | None:
    """A defect image's pixel mask: <data>/mask/<type>/<name>.png (magnetic tile) or ground_truth/<type>/<name>_mask.png (MVTec)."""
    root = data_dir if (data_dir / "mask").is_dir() or (data_dir / "ground_truth").is_dir() else data_dir.parent
    for candidate in (root / "mask" / path.parent.name / f"{path.stem}.png",
                      root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"):
        if candidate.is_file():
            return candidate
    return None


def pro_score(truth: list[np.ndarray], predicted: list[np.ndarray], fpr_limit: float = 0.3, steps: int = 200) -> float:
    """Per-region overlap (PRO), integrated over false-positive rates 0..fpr_limit and normalised to 0..1.

    Unlike pixel AUROC, every defect region counts equally, however small: a hairline
    crack weighs as much as a broken corner."""
    regions = [(i, labels == r) for i, mask in enumerate(truth) if mask.any()
               for count, labels in [cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)]
               for r in range(1, count)]
    normal = np.concatenate([p[~t] for t, p in zip(truth, predicted)])
    fprs, pros = [], []
    high, low = max(p.max() for p in predicted), min(p.min() for p in predicted)
    for threshold in np.linspace(high, low - 1e-6 * (high - low + 1), steps):  # ends below all: FPR reaches 1
        fpr = float((normal > threshold).mean())
        fprs.append(fpr)
        pros.append(float(np.mean([(predicted[i][region] > threshold).mean() for i, region in regions])))
        if fpr > fpr_limit:
            break
    fprs, pros = np.array(fprs), np.array(pros)
    if fprs[-1] > fpr_limit:  # cut the last segment exactly at the limit
        pros[-1] = np.interp(fpr_limit, fprs[-2:], pros[-2:])
        fprs[-1] = fpr_limit
    return float(np.trapezoid(pros, fprs) / fpr_limit)


def pixel_metrics(data_dir: Path, paths: list[Path], labels: np.ndarray, patch_maps: np.ndarray,
                  size: tuple[int, int], sigma: float) -> dict | None:
    """Pixel AUROC and PRO at half the input size, over good images (all-normal) and defects with masks; None without masks."""
    masks = {i: find_mask(data_dir, path) for i, path in enumerate(paths) if labels[i] == 1}
    if not any(masks.values()):
        return None
    truth, predicted = [], []
    for i, patch_map in enumerate(patch_maps):
        if labels[i] == 1 and masks[i] is None:
            continue
        mask = np.zeros(size, bool)
        if labels[i] == 1:
            mask = cv2.resize(cv2.imread(str(masks[i]), cv2.IMREAD_GRAYSCALE), size[::-1], interpolation=cv2.INTER_NEAREST) > 0
        truth.append(mask[::2, ::2])
        predicted.append(anomaly_map(patch_map, size, sigma)[::2, ::2])
    if not any(t.any() for t in truth):
        return None
    return {"pixel_auroc": float(roc_auc_score(np.concatenate([t.ravel() for t in truth]),
                                               np.concatenate([p.ravel() for p in predicted]))),
            "pro": pro_score(truth, predicted)}


SCORE_NAMES = {"global": "anomaly score (Mahalanobis distance of the pooled embedding)",
               "patch": "anomaly score (Mahalanobis distance of the worst patch)",
               "knn": "anomaly score (distance to the nearest good patch)"}


def short_name(name: str, width: int = 18) -> str:
    """A file name for a tile's title: its end, where frames of one camera or one batch differ."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _gallery(paths: list[Path], labels: np.ndarray, scores: np.ndarray, patch_maps: np.ndarray,
             size: tuple[int, int], sigma: float, threshold: float, out: Path) -> None:
    """The hardest cases and the clearest catches, each tile with its score, the threshold and its verdict
    (red when the verdict is wrong), and the colour scale of the anomaly map."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    plt = _pyplot()
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    rows = [("defects, lowest scores\n(accepted: escapes)", bad[np.argsort(scores[bad])][:6]),
            ("good parts, highest scores\n(rejected: false rejects)", good[np.argsort(-scores[good])][:6]),
            ("defects, highest scores\n(clearest catches)", bad[np.argsort(-scores[bad])][:6])]
    fig, axes = plt.subplots(3, 6, figsize=(13, 8), squeeze=False)
    for r, (title, idx) in enumerate(rows):
        for c in range(6):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(idx):
                i = idx[c]
                frame = resize_to_input(read_image(paths[i]), size)
                ax.imshow(overlay(frame, anomaly_map(patch_maps[i], size, sigma), threshold)[..., ::-1])
                reject = scores[i] > threshold
                wrong = reject != bool(labels[i])
                ax.set_title(f"{short_name(paths[i].name)}\nscore {scores[i]:.3g} / {threshold:.3g}: "
                             f"{'REJECT' if reject else 'accept'}", fontsize=7, color="#b3261e" if wrong else "black")
        axes[r, 0].text(-0.08, 0.5, title, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    scale = fig.add_axes((0.945, 0.15, 0.012, 0.7))
    fig.colorbar(ScalarMappable(Normalize(0, 2 * threshold), colormaps["jet"]), cax=scale,
                 label=f"anomaly map (threshold {threshold:.3g} in the middle)")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot(labels: np.ndarray, scores: np.ndarray, threshold: dict, bundle_threshold: dict, auroc: float,
          scorer: str, report_dir: Path) -> None:
    """ROC on a log false-reject axis (lines run at 0.1-1%) with the operating point(s), and the score
    histogram in whole images with the threshold(s)."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    marks = [(threshold, "k")] + ([(bundle_threshold, "grey")] if bundle_threshold["value"] != threshold["value"]
                                  else [])
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        floor = min(1e-3, 0.5 / (labels == 0).sum())
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.plot(np.maximum(fpr, floor), tpr, label=f"AUROC {auroc:.3f}", drawstyle="steps-post")
        for mark, colour in marks:
            rates = rates_at(labels, scores, mark["value"])
            ax.plot(max(rates["false_reject_rate"], floor), 1 - rates["escape_rate"], "o", color=colour,
                    label=f"threshold {mark['value']:.3g} ({mark['method']}): false-reject "
                          f"{rates['false_reject_rate']:.2%}, detection {1 - rates['escape_rate']:.2%}")
        ax.set_xscale("log")
        ax.set_xlim(floor, 1)
        ax.axvspan(1e-3, 1e-2, color="#2e7d32", alpha=0.08, label="where lines run (0.1-1%)")
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set(xlabel="false-reject rate (good parts rejected, log scale)", ylabel="detection rate (defects rejected)",
               title="ROC")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        fig.savefig(report_dir / "roc.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"good ({(labels == 0).sum()})")
    if (labels == 1).any():
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"defect ({(labels == 1).sum()})")
    for mark, colour in marks:
        ax.axvline(mark["value"], c=colour, ls="--", label=f"threshold {mark['value']:.3g} ({mark['method']})")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=SCORE_NAMES.get(scorer, "anomaly score"), ylabel="images", title="Score distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report_dir / "histogram.png", dpi=120)
    plt.close(fig)


def _markdown(report: dict) -> str:
    m, r = report["metrics"], report["at_threshold"]
    lines = [
        f"# Evaluation of {report['model_id']}",
        "",
        f"Data: `{report['data_dir']}`: {report['counts']['good']} good, {report['counts']['defect']} defective.",
        "",
        "| metric | value |", "|---|---|",
        f"| image AUROC | {m['auroc']:.4f} |",
        f"| average precision | {m['ap']:.4f} |",
        f"| F1-max | {m['f1_max']:.4f} |",
        f"| escape at 1% false-reject (best any threshold can do) | {m['escape_at_1pct_frr']:.2%} |",
        f"| escape at 5% false-reject (best any threshold can do) | {m['escape_at_5pct_frr']:.2%} |",
        f"| threshold ({report['threshold']['method']}) | {report['threshold']['value']:.4g} |",
        f"| false-reject rate at threshold | {r['false_reject_rate']:.2%} |",
        f"| escape rate at threshold | {r['escape_rate']:.2%} |",
        f"| what the threshold promises | {report['promise']} |",
        f"| cost per frame ({report['cost']['windows']} window(s), {report['cost']['measured']}) | "
        f"{report['cost']['ms_per_frame']:.0f} ms |",
    ]
    if report.get("held_out"):
        h = report["held_out"]
        lines += [f"| held out ({h['folds']}-fold: the threshold fitted without the part it judges) | false-reject "
                  f"{h['false_reject_rate']:.2%}, escape {h['escape_rate']:.2%} |"]
    if report["counts"].get("training_shots_left_out"):
        lines += ["", f"{report['counts']['training_shots_left_out']} images of the folder are the bundle's own "
                      "training shots: left out (scoring them would flatter the model)."]
    if report.get("pixel"):
        lines.append(f"| pixel AUROC (patch map) | {report['pixel']['pixel_auroc']:.4f} |")
        lines.append(f"| PRO up to 30% FPR (patch map) | {report['pixel']['pro']:.4f} |")
    if len(report["per_type"]) > 1:  # one folder of defects is no breakdown
        lines += ["", "| defect type | images | AUROC vs good |", "|---|---|---|"]
        lines += [f"| {t} | {v['count']} | {v['auroc']:.4f} |" for t, v in report["per_type"].items()]
    if report["revision"]:
        lines += ["", f"New bundle revision with this threshold: `{report['revision']}` (the evaluated bundle's "
                      f"own threshold is drawn in grey)."]
    lines += ["", "![ROC](roc.png)", "", "![Score histogram](histogram.png)", ""]
    if report["scorer"] in PATCH_SCORERS:
        lines += ["![Hardest cases and clearest catches](gallery.png)", ""]
    return "\n".join(lines)


def without_training_shots(data: LabelledSet, manifest: dict) -> tuple[LabelledSet, int]:
    """The labelled set less the bundle's own training shots (the manifest keeps their fingerprints), and how
    many were left out, with a warning: a model scored on what it learned from looks better than it is."""
    shots = set(manifest.get("training", {}).get("shot_fingerprints", []))
    if not shots:
        return data, 0
    keep = [i for i, digest in enumerate(file_digests(data.paths)) if digest not in shots]
    left_out = len(data.paths) - len(keep)
    if left_out:
        log.warning("%d of the %d images are the bundle's own training shots; leaving them out of the evaluation",
                    left_out, len(data.paths))
    return LabelledSet([data.paths[i] for i in keep], data.labels[keep], [data.types[i] for i in keep]), left_out


def evaluate(bundle_dir: str | Path, data_dir: str | Path, report_dir: str | Path,
             recalibrate: str | None = None, progress: bool = True, revision_out: str | Path | None = None) -> dict:
    """Score a labelled folder, write the report folder; with `recalibrate`, write a new bundle revision
    with the threshold these labels give (the bundle itself never changes)."""
    bundle = load_bundle(bundle_dir)
    bars.shown = False  # the scoring bar below covers every batch
    data = labelled_images(data_dir)
    if not data.paths:
        raise CoftError(f"{data_dir}: no images found under good/ or the defect folders")
    data, shots = without_training_shots(data, bundle.manifest)
    if not data.paths:
        raise CoftError(f"{data_dir}: every image is one of the bundle's training shots; evaluate on images it "
                        "was not trained on")
    started = time.perf_counter()
    scored = bundle_scores(bundle, data.paths, progress)
    ms_per_frame = (time.perf_counter() - started) * 1000 / max(1, len(scored.kept))
    scores, kept = scored.scores, scored.kept
    if not kept:
        raise CoftError(f"{data_dir}: none of the {len(data.paths)} images could be read")
    labels, types, paths = data.labels[kept], [data.types[i] for i in kept], [data.paths[i] for i in kept]
    threshold, revision, held_out = bundle.manifest["threshold"], None, None
    if recalibrate:
        threshold = labelled_threshold(labels, scores, recalibrate)
        held_out = held_out_rates(labels, scores, recalibrate)
        revision = revise(bundle.path, {"threshold": threshold}, revision_out)
        log.info("threshold %.4g by %s written as a new revision: %s", threshold["value"], threshold["method"], revision)
    metrics = detection_metrics(labels, scores)
    per_type = {t: {"count": types.count(t), "auroc": auroc}
                for t, auroc in per_type_auroc(labels, scores, types).items()}
    report = {
        "model_id": bundle.model_id,
        "data_dir": str(data_dir),
        "counts": {"good": int((labels == 0).sum()), "defect": int((labels == 1).sum()),
                   "unreadable": len(data.paths) - len(kept), "training_shots_left_out": shots},
        "promise": describe(threshold),
        "metrics": metrics,
        "threshold": threshold,
        "at_threshold": rates_at(labels, scores, threshold["value"]),
        "held_out": held_out,
        "per_type": per_type,
        "scorer": bundle.manifest["scorer"],
        "revision": str(revision) if revision else None,
        "cost": {"ms_per_frame": round(ms_per_frame, 1), "windows": len(bundle.tiling) if bundle.tiling else 1,
                 "measured": "torch and numpy on this machine, reading the images included"},
    }
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    if scored.patch_maps is not None:
        sigma = bundle.manifest["patch"]["blur_sigma"]
        report["pixel"] = pixel_metrics(Path(data_dir), paths, labels, scored.patch_maps, bundle.input_size, sigma)
        if (labels == 1).any() and (labels == 0).any():
            _gallery(paths, labels, scores, scored.patch_maps, bundle.input_size, sigma, threshold["value"],
                     report_dir / "gallery.png")
    report["drift"] = good_drift(bundle.manifest["threshold"], scores[labels == 0])
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (report_dir / "report.md").write_text(_markdown(report))
    with open(report_dir / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "type", "label", "score", "verdict"])
        for path, t, label, score in zip(paths, types, labels, scores):
            writer.writerow([path, t, int(label), f"{score:.6g}", "reject" if score > threshold["value"] else "accept"])
    _plot(labels, scores, threshold, bundle.manifest["threshold"], metrics["auroc"], report["scorer"], report_dir)
    return report
