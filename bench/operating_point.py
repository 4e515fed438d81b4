"""Operating point: false-reject and escape at the threshold a line actually runs with.

    python bench/operating_point.py ../shared/datasets/magnetic_tile [--seeds 0 1 2] [--shots 10]
    python bench/operating_point.py elpv ...

Protocol of shared/datasets/README.md: k good training images per seed, the rest (every
other good and every defective image) is the line. For each seed a bundle is trained with
the default options (`coft train`), every test image is scored once (cached), then:

(a) commissioning: N unlabelled frames (100 / 300 / 1000) drawn from the line with its
    natural share of defects, the threshold fitted on them as commissioning does (row
    "commissioning": the conformal fit, checked against the bundle's threshold where N is
    too few to promise the target) and by each fit alone (the alternatives it was chosen
    against; "conformal" is commissioning before that check), false-reject and escape
    measured on the frames not drawn (at least --measure-at-least of them; an N that
    leaves fewer is a "not run" row); against the bundle's good-only threshold and the oracle threshold
    (the one that rejects the target share of the remaining good frames; its escape is the
    best any threshold at that false-reject rate can do). 50 draws per N and seed.
(b) camera pipeline: the good test images resized to the model input as stills, through an
    MJPG video round trip (OpenCV's VideoWriter and VideoCapture) and as JPEG at 75 / 90:
    median score shift and false-reject at the stills' own 1% threshold.
(c) with --harvest N ...: the line's frames split in two halves; from one, N frames with 5%
    defects are "harvested" and `coft retrain`'s filtering (the k-shot bundle's scores,
    then FUN-AD) and training fit a new bundle on them;
    image AUROC of it and of the k-shot bundle on the other half (first seed only).

Writes operating_point.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewshot import find_category  # noqa: E402
from host import cpu_name  # noqa: E402

from coft.runtime.model.frames import LineFrames  # noqa: E402
from coft.runtime.model.images import list_images, read_image, resize_to_input  # noqa: E402
from coft.runtime.model.threshold import FITS, fit_threshold, in_pool, review_queue, reviewed_promise  # noqa: E402
from coft.train.evaluate import frame_scorer  # noqa: E402
from coft.train.metrics import detection_metrics, escape_at_false_reject, rates_at  # noqa: E402
from coft.train.pipeline import fingerprint  # noqa: E402
from coft.train.retrain import trainable_frames  # noqa: E402

DRAWS = 50


def split(category: Path, shots: int, seed: int) -> tuple[list[Path], list[Path], np.ndarray]:
    good = list_images(category / "good")
    defects = [p for p in list_images(category, recursive=True) if "good" not in p.relative_to(category).parts[:1]
               and "mask" not in p.relative_to(category).parts]
    chosen = set(np.random.default_rng(seed).choice(len(good), shots, replace=False).tolist())
    train = [good[i] for i in sorted(chosen)]
    test = [p for i, p in enumerate(good) if i not in chosen] + defects
    labels = np.array([0] * (len(good) - shots) + [1] * len(defects))
    return train, test, labels


def round_trips(frames: list[np.ndarray], work: Path) -> dict[str, list[np.ndarray]]:
    """The same frames as stills, through an MJPG video file and back, and as JPEG stills."""
    height, width = frames[0].shape[:2]
    video = work / "roundtrip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    capture, mjpg = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        mjpg.append(frame)
    out = {"stills": frames, "mjpg video": mjpg}
    for quality in (75, 90):
        out[f"jpeg {quality}"] = [cv2.imdecode(cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, quality])[1],
                                               cv2.IMREAD_COLOR) for f in frames]
    return out


def seed_bundle(category: Path, seed: int, args, work: Path) -> Path:
    """The seed's k-shot bundle, trained with coft train's defaults (once per run)."""
    from coft.train.pipeline import TrainOptions, train_bundle

    out = work / f"bundle-{seed}"
    if out.is_dir():
        return out
    shots = work / f"shots-{seed}"
    shots.mkdir(parents=True)
    for path in split(category, args.shots, seed)[0]:
        os.symlink(path.resolve(), shots / path.name)
    return train_bundle(shots, out, TrainOptions(backbone=args.backbone, scorer=args.scorer, seed=seed,
                                                 progress=False))


def seed_scores(category: Path, seed: int, args, work: Path) -> dict:
    """Train the seed's bundle, score the line and the camera-pipeline variants (cached)."""
    _, test, labels = split(category, args.shots, seed)
    content = fingerprint(test)[:16]  # two sets with a category of the same name never share scores
    cache = args.out / f"scores-{category.name}-{content}-{args.backbone}-{args.scorer}-k{args.shots}-s{seed}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    from coft.runtime.model.bundle import load_bundle

    bundle = load_bundle(seed_bundle(category, seed, args, work))
    score = frame_scorer(bundle)
    frames = [read_image(p) for p in test]
    scores = np.concatenate([score(frames[i:i + 32])[0] for i in range(0, len(frames), 32)])
    result = {"labels": labels, "scores": scores, "threshold": bundle.threshold}
    if seed == args.seeds[0] and not args.no_camera:
        goods = [resize_to_input(f, bundle.input_size) for f, label in zip(frames, labels) if label == 0]
        for name, variant in round_trips(goods, work).items():
            result[f"camera/{name}"] = np.concatenate([score(variant[i:i + 32])[0] for i in range(0, len(variant), 32)])
    np.savez(cache, **result)
    return result


def harvest_rows(category: Path, args, work: Path) -> list[dict]:
    """AUROC of bundles retrained on N harvested frames (5% defects) against the k-shot bundle, on held-out frames."""
    from coft.runtime.model.bundle import load_bundle
    from coft.train.pipeline import TrainOptions
    from coft.train.unlabelled import train_unlabelled

    seed = args.seeds[0]
    _, test, labels = split(category, args.shots, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(test))
    pool, held = order[: len(order) // 2], order[len(order) // 2:]
    held_frames = [read_image(test[i]) for i in held]

    def auroc(bundle_dir: Path) -> float:
        score = frame_scorer(load_bundle(bundle_dir))
        scores = np.concatenate([score(held_frames[i:i + 32])[0] for i in range(0, len(held_frames), 32)])
        return detection_metrics(labels[held], scores)["auroc"]

    rows = [{"frames": 0, "auroc": auroc(seed_bundle(category, seed, args, work)), "what": f"k={args.shots} bundle"}]
    goods, defects = pool[labels[pool] == 0], pool[labels[pool] == 1]
    for size in args.harvest:
        n_defects = round(0.05 * size)
        if size - n_defects > len(goods) or n_defects > len(defects):
            continue
        chosen = np.r_[rng.choice(goods, size - n_defects, replace=False), rng.choice(defects, n_defects, replace=False)]
        folder = work / f"harvest-{size}"
        folder.mkdir()
        scores = seed_scores(category, seed, args, work)["scores"]
        line = LineFrames(list(chosen), [""] * len(chosen), np.zeros(len(chosen), bool), scores[chosen], None)
        for i in trainable_frames(line):
            os.symlink(test[i].resolve(), folder / f"{i:05d}{test[i].suffix}")
        bundle, _ = train_unlabelled(folder, work / f"retrained-{size}", TrainOptions(
            backbone=args.backbone, scorer=args.scorer, seed=seed, progress=False))
        rows.append({"frames": size, "auroc": auroc(bundle), "what": f"retrained on {size} harvested (5% defects)"})
    return rows


MEASURED_AT_LEAST = 300  # frames left after commissioning to measure it on, unless --measure-at-least says fewer


def draw(labels: np.ndarray, size: int, share: float | None, rng: np.random.Generator) -> np.ndarray:
    """N frames of the line, with its natural share of defects or with `share` of them."""
    drawn = np.zeros(len(labels), bool)
    if share is None:
        drawn[rng.choice(len(labels), size, replace=False)] = True
    else:
        bad = round(share * size)
        drawn[rng.choice(np.flatnonzero(labels == 1), bad, replace=False)] = True
        drawn[rng.choice(np.flatnonzero(labels == 0), size - bad, replace=False)] = True
    return drawn


def not_run(runs: list[dict], size: int, share: float | None, measured: int) -> str | None:
    """Why commissioning on `size` frames cannot be measured on this line, or None."""
    frames = min(len(r["scores"]) for r in runs)
    if frames <= size:
        return f"the line has {frames} frames, not more than the {size} to commission on"
    if frames - size < measured:
        return (f"the line has {frames} frames, {frames - size} left after {size} to measure on "
                f"(--measure-at-least {frames - size} would measure on them)")
    bad = 0 if share is None else round(share * size)
    goods, defects = min((r["labels"] == 0).sum() for r in runs), min((r["labels"] == 1).sum() for r in runs)
    if share is not None and (size - bad > goods - min(100, measured // 3) or bad > defects - 10):
        return f"{size} frames at {share:.0%} defects leave too few of the line's {goods} good or {defects} defective"
    return None


REVIEWED = (1.5, 2.0)  # the review's goals: the promise stated within these many times the target (300 frames
# with one good part above the threshold promise at best 1.58%: 1.5x a 1% target needs every rejected frame a defect)


def review_clicks(scores: np.ndarray, labels: np.ndarray, value: float, goal: float) -> tuple[int, int | None]:
    """The review queue's length, and how many of its frames an operator sorts (worst first, one click each, the
    truth as the label) before the stated promise is within `goal`; 0 where it is before any, None where the whole
    queue does not bring it there."""
    queue = review_queue(scores, value)
    good, defect = np.zeros(len(scores), bool), np.zeros(len(scores), bool)
    for clicks in range(len(queue) + 1):
        if reviewed_promise(scores, value, good, defect)["false_reject_rate"] <= goal:
            return len(queue), clicks
        if clicks < len(queue):
            frame = queue[clicks]
            (defect if labels[frame] else good)[frame] = True
    return len(queue), None


def pool_errors(scores: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Where the promise pool's cut erred on these frames: good frames it took for defects (each a false reject the
    threshold is not fitted to keep), and defects it kept above every good frame in the pool (each raising the
    threshold over good parts' reach)."""
    pooled = in_pool(scores)
    top_good = scores[pooled & (labels == 0)].max(initial=-np.inf)
    return int((~pooled & (labels == 0)).sum()), int((pooled & (labels == 1) & (scores > top_good)).sum())


def review_summary(draws: list[list[tuple[int, int | None]]]) -> dict:
    """Per goal: the median queue, the share of draws whose review reaches it, the median clicks of those."""
    summary = {}
    for g, goal in enumerate(REVIEWED):
        reached = [d[g][1] for d in draws if d[g][1] is not None]
        summary[f"{goal:g}x"] = {"queue": float(np.median([d[g][0] for d in draws])),
                                 "reached": len(reached) / len(draws),
                                 "clicks": float(np.median(reached)) if reached else None}
    return summary


def commissioning_rows(runs: list[dict], target: float, sizes: list[int], share: float | None = None,
                       measured: int = MEASURED_AT_LEAST) -> list[dict]:
    rows = []
    for size in sizes:
        why = not_run(runs, size, share, measured)
        if why:
            rows.append({"frames": size, "threshold": "not run", "why": why})
            continue
        for fit in ["bundle", "oracle", "commissioning", *FITS]:
            frr, esc, held, kept_bundle, clicks, pooled = [], [], [], [], [], []
            for run in runs:
                labels, scores = run["labels"], run["scores"]
                rng = np.random.default_rng(size)
                for _ in range(DRAWS):
                    drawn = draw(labels, size, share, rng)
                    rest_labels, rest_scores = labels[~drawn], scores[~drawn]
                    if fit == "bundle":
                        threshold = float(run["threshold"])
                    elif fit == "oracle":
                        threshold = float(np.quantile(rest_scores[rest_labels == 0], 1 - target, method="higher"))
                    elif fit == "commissioning":
                        fitted = fit_threshold(scores[drawn], target, bundle=float(run["threshold"]))
                        threshold = fitted["value"]
                        kept_bundle.append(fitted["method"] == "commissioning-kept-bundle")
                        clicks.append([review_clicks(scores[drawn], labels[drawn], threshold, goal * target)
                                       for goal in REVIEWED])
                        pooled.append(pool_errors(scores[drawn], labels[drawn]))
                    else:
                        fitted = fit_threshold(scores[drawn], target, fit)
                        threshold = fitted["value"]
                    rates = rates_at(rest_labels, rest_scores, threshold)
                    frr.append(rates["false_reject_rate"])
                    esc.append(rates["escape_rate"])
                    if fit not in ("bundle", "oracle"):
                        stated = fitted["promise"]  # and what it says holds if the frames out beyond are defects
                        assumed = stated.get("if_defects", stated)["false_reject_rate"]
                        held.append((rates["false_reject_rate"] <= stated["false_reject_rate"],
                                     stated["false_reject_rate"], rates["false_reject_rate"] <= assumed, assumed))
            if frr:
                rows.append({"frames": size, "threshold": fit, "false_reject": float(np.mean(frr)),
                             "false_reject_std": float(np.std(frr)), "escape": float(np.mean(esc)),
                             "escape_std": float(np.std(esc)),
                             "promise_held": float(np.mean([h[0] for h in held])) if held else None,
                             "promised": float(np.mean([h[1] for h in held])) if held else None,
                             "if_defects_held": float(np.mean([h[2] for h in held])) if held else None,
                             "if_defects": float(np.mean([h[3] for h in held])) if held else None,
                             "kept_bundle": float(np.mean(kept_bundle)) if kept_bundle else None,
                             "review": review_summary(clicks) if clicks else None,
                             "pool": dict(zip(("good_cut", "defects_on_top"), np.mean(pooled, axis=0).tolist()))
                             if pooled else None})
    return rows


def camera_rows(run: dict, target: float) -> list[dict]:
    stills = run["camera/stills"]
    threshold = float(np.quantile(stills, 1 - target, method="higher"))
    return [{"frames": name.split("/", 1)[1], "median_score": float(np.median(run[name])),
             "median_shift": float(np.median(run[name]) - np.median(stills)),
             "false_reject_at_stills_1pct": float((run[name] > threshold).mean())}
            for name in run if name.startswith("camera/")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a category folder (good/, defect/<type>/) or 'elpv'")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--backbone", default="dinov2_vits14", help="as coft train's (default: its default)")
    parser.add_argument("--scorer", default="knn", help="as coft train's (default: its default)")
    parser.add_argument("--camera-only", action="store_true", help="(b) only: one seed, no commissioning table")
    parser.add_argument("--no-camera", action="store_true", help="leave out (b), the camera-pipeline round trips")
    parser.add_argument("--harvest", type=int, nargs="*", default=[], help="(c): harvested frames to retrain on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--target-frr", type=float, default=0.01)
    parser.add_argument("--defect-share", type=float, default=None,
                        help="commissioning frames drawn with this share of defects (default: the set's own)")
    parser.add_argument("--measure-at-least", type=int, default=MEASURED_AT_LEAST,
                        help="frames left after commissioning to measure it on (default %(default)s); a short line "
                             "measures on fewer, stated in the table")
    parser.add_argument("--out", type=Path, default=Path("bench-out/operating_point"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    category = find_category(Path(args.dataset))
    work = Path(tempfile.mkdtemp(prefix="coft-op-"))
    runs = [seed_scores(category, seed, args, work) for seed in args.seeds[:1 if args.camera_only else None]]
    commissioning = [] if args.camera_only else commissioning_rows(runs, args.target_frr, args.frames,
                                                                     args.defect_share, args.measure_at_least)
    camera = [] if args.no_camera else camera_rows(runs[0], args.target_frr)
    harvest = harvest_rows(category, args, work) if args.harvest else []
    name = (f"{'elpv' if args.dataset == 'elpv' else category.name}-{args.backbone}-{args.scorer}"
            + (f"-defects{args.defect_share:g}" if args.defect_share is not None else ""))
    machine = cpu_name()
    lines = [f"Operating point on {name} (backbone-scorer), k={args.shots}, seeds {args.seeds}, target false-reject "
             f"{args.target_frr:.0%}, {DRAWS} draws per N and seed ({machine}); share of defects in the "
             f"commissioning frames {args.defect_share if args.defect_share is not None else np.mean([r['labels'].mean() for r in runs]):.0%}"
             + ("" if args.defect_share is None else " (drawn at that share)")
             + f"; measured on the frames not drawn, at least {args.measure_at_least}", "",
             f"Whole line at the oracle threshold (the best any threshold does): escape at 1% false-reject "
             f"{np.mean([escape_at_false_reject(r['labels'], r['scores'], 0.01) for r in runs]):.1%}, at 5% "
             f"{np.mean([escape_at_false_reject(r['labels'], r['scores'], 0.05) for r in runs]):.1%}; image AUROC "
             f"{np.mean([detection_metrics(r['labels'], r['scores'])['auroc'] for r in runs]):.4f}", "",
             "| commissioning frames | threshold | false-reject | escape | promised false-reject (95%) | promise held "
             "| if the frames beyond the cut are defects | held |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['frames']} | not run: {r['why']} | | | | | | |" if r["threshold"] == "not run" else
              f"| {r['frames']} | {r['threshold']}"
              + (f" (bundle's kept in {r['kept_bundle']:.0%})" if r.get("kept_bundle") is not None else "")
              + f" | {r['false_reject']:.2%} ± {r['false_reject_std']:.2%} | {r['escape']:.3f} ± {r['escape_std']:.3f} | "
              + (f"{r['promised']:.2%} | {r['promise_held']:.0%} | {r['if_defects']:.2%} | {r['if_defects_held']:.0%} |"
                 if r["promised"] is not None else "- | - | - | - |")
              for r in commissioning]
    reviewed = [r for r in commissioning if r.get("review")]
    if reviewed:
        lines += ["", "Commissioning review (the frames the threshold rejects, sorted worst first, one click each): "
                  "clicks until the stated promise is within the goal", "",
                  "| commissioning frames | goal | queue (median) | draws that reach it | clicks (median, of those) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['frames']} | {goal} x target | {v['queue']:.0f} | {v['reached']:.0%} | "
                  + (f"{v['clicks']:.0f} |" if v["clicks"] is not None else "- |")
                  for r in reviewed for goal, v in ((g[:-1], v) for g, v in r["review"].items())]
    pools = [r for r in commissioning if r.get("pool")]
    if pools:
        lines += ["", "Where the promise pool's cut erred (commissioning rows; frames per draw, mean): good frames "
                  "beyond the cut, taken for defects, and defects inside it above every good frame", "",
                  "| commissioning frames | good frames cut | defects kept on top |", "|---|---|---|"]
        lines += [f"| {r['frames']} | {r['pool']['good_cut']:.2f} | {r['pool']['defects_on_top']:.2f} |" for r in pools]
    if camera:
        lines += ["", f"Camera pipeline (seed {args.seeds[0]}, good test images at the model input):", "",
                  "| frames | median score | shift vs stills | false-reject at the stills' 1% threshold |",
                  "|---|---|---|---|"]
        lines += [f"| {r['frames']} | {r['median_score']:.4g} | {r['median_shift']:+.4g} | "
                  f"{r['false_reject_at_stills_1pct']:.2%} |" for r in camera]
    if harvest:
        lines += ["", f"Harvest (seed {args.seeds[0]}; image AUROC on the half of the line not harvested):", "",
                  "| bundle | image AUROC |", "|---|---|"]
        lines += [f"| {r['what']} | {r['auroc']:.4f} |" for r in harvest]
    (args.out / f"operating_point-{name}.json").write_text(json.dumps(
        {"dataset": name, "machine": machine, "commissioning": commissioning, "camera": camera, "harvest": harvest},
        indent=2) + "\n")
    (args.out / f"operating_point-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
