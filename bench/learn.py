"""The line learns: a k-shot bundle's bank grown from unlabelled line frames, some of them defective.

    python bench/learn.py ../shared/datasets/magnetic_tile [--frames 100 300 1000] [--shares 0.05 0.15]
    python bench/learn.py elpv ...            (the elpv-dataset package's cells)

For each seed: k good shots as bench/fewshot.py draws them (the product's bank: every
pose, greedy coreset); then a stream of N frames from the rest with a given share of
defects; the test set is every image in neither. Compared, each scored with the shipped
knn scorer (mean of the worst 1% of patches) on the same frozen DINOv2 features:

- shots:   the k-shot bank, its threshold commissioned on the stream (runtime.commissioning)
- learn:   `coft learn`'s step (runtime/model/bank_growth.py) on the stream after commissioning (frames above the
           commissioned threshold are the line's rejects: never in the bank), its refitted threshold
- naive:   every stream frame in the bank, no defence (what growing blindly costs)
- clean:   only the stream's good frames (perfect filtering: the ceiling of this step)
- reviewed: `coft learn` after an operator sorted the commissioning review queue (the stream's frames above the
           commissioned threshold, one click each, the truth as the label): the good ones offer their patches, the
           defects are marked (their worst patches join the defect rows); "clicks" is the queue's length
- retrain: with --retrain, today's `coft retrain` (FUN-AD, then a new bundle on the rest)
           for the first seed and the first N and share: its time and peak memory

Reported per step: image AUROC, AP, escape at 1% and 5% false-reject (oracle thresholds on
the test set), false-reject and escape at the step's own threshold, defective frames that
entered the bank, seconds and peak memory of the step (numpy allocations, tracemalloc;
the engine's features of the frames are extra: see docs/learning.md). Frame counts a set cannot
supply are skipped and said. Writes learn.json and learn.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import cached_features, find_category, machine, product_size  # noqa: E402

from coft.runtime.model.bank_growth import LearnConfig, bank_of, grow, with_marked_defects  # noqa: E402
from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.runtime.model.scoring import MemoryBank, pool  # noqa: E402
from coft.runtime.model.threshold import fit_threshold, review_queue  # noqa: E402
from coft.train.augment import AugmentConfig  # noqa: E402
from coft.train.backbones import load_backbone  # noqa: E402
from coft.train.embed import to_pixels  # noqa: E402
from coft.train.evaluate import labelled_images  # noqa: E402
from coft.train.metrics import detection_metrics, rates_at  # noqa: E402
from coft.train.pipeline import TrainOptions, fingerprint  # noqa: E402
from coft.train.scorers.knn import DEFAULT_CAP, bank_views, fit_and_calibrate  # noqa: E402

TARGET_FRR = 0.01
STEPS = ("shots", "learn", "naive", "clean")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


HEADLINE = ("auroc", "ap", "escape_at_1pct_frr", "escape_at_5pct_frr")  # what every benchmark table leads with


def measure(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    m = detection_metrics(labels, scores)
    row = {k: round(float(m[k]), 4) for k in HEADLINE}
    if threshold is not None:
        row.update({k: round(v, 4) for k, v in rates_at(labels, scores, threshold).items()})
    return row


def product_features(root: Path, cache: Path, layers: tuple[int, ...] | None = None):
    """The set's images, the product's frozen backbone (its default blocks, or `layers`, as coft train --layers) and
    every image's unit patch features [n, P, C], from the cache bench/fewshot.py keeps (its key: one cache for every
    benchmark)."""
    category = find_category(root)
    data = labelled_images(category)
    options = TrainOptions()
    size = product_size(data, options.size)
    frames = np.stack([resize_to_input(read_image(p), size) for p in tqdm(data.paths, desc="reading", unit="img")])
    backbone = load_backbone(options.backbone, None, size, layers)
    key = (f"{category.name}-{fingerprint(data.paths)[:16]}-{options.backbone}-{size[0]}x{size[1]}-"
           f"{'_'.join(map(str, getattr(backbone, 'layers', [])))}-t1")
    patches = cached_features(backbone, frames, size, 1, cache, key)[1]
    return category, data, frames, backbone, unit(patches.float().numpy())


def draw_shots(good: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """k good shots as bench/fewshot.py draws them for a seed, and the generator for what a benchmark draws next."""
    rng = np.random.default_rng(seed)
    return good[rng.choice(len(good), shots, replace=False)], rng


def seed_split(labels: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.random.Generator, np.ndarray,
                                                                   np.ndarray]:
    """A seed's shots (draw_shots over the good images), the generator after them, every other image as the test set
    and its labels."""
    chosen, rng = draw_shots(np.flatnonzero(labels == 0), shots, seed)
    test = np.setdiff1d(np.arange(len(labels)), chosen)
    return chosen, rng, test, labels[test]


def headline_cells(runs: list[dict]) -> str:
    """AUROC, AP and the escapes at 1% and 5% false-reject, each the mean over these runs, as table cells."""
    return " | ".join(f"{np.mean([r[k] for r in runs]):.3f}" for k in HEADLINE)


def write_report(out: Path, name: str, report: dict, lines: list[str]) -> None:
    """<name>.json (everything measured) and <name>.md (the table) under `out`, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def shot_patches(backbone, shots: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Every pose of the shots, as unit patch features [rows, C]: what the product's bank is cut from."""
    views = unit(bank_views(backbone, to_pixels(list(shots), size), AugmentConfig()))
    return views.reshape(-1, views.shape[-1])


def shots_bank(backbone, shots: np.ndarray, size: tuple[int, int], seed: int) -> MemoryBank:
    """The product's k-shot bank: every pose of the shots, cut to the cap by the greedy coreset, its ViT blocks
    weighted as coft train weighs them."""
    views = unit(bank_views(backbone, to_pixels(list(shots), size), AugmentConfig()))
    return fit_and_calibrate(views.astype(np.float32), DEFAULT_CAP, "top1pct", seed, blocks=backbone.feature_blocks)[0]


def retrain_run(category: Path, data, shots: np.ndarray, stream: np.ndarray, work: Path, seed: int) -> dict:
    """Today's `coft retrain` on the stream as a plain folder, in a child process: seconds and peak memory."""
    from coft.train.pipeline import train_bundle
    for name, chosen in (("shots", shots), ("stream", stream)):
        (work / name).mkdir()
        for i in chosen:
            os.symlink(data.paths[i].resolve(), work / name / f"{i:05d}{data.paths[i].suffix}")
    train_bundle(work / "shots", work / "shots.bundle", TrainOptions(seed=seed, progress=False))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "coft.cli", "--quiet", "retrain", str(work / "shots.bundle"),
                             str(work / "stream"), "--out", str(work / "retrained")], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"coft retrain failed: {result.stderr[-1000:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": round(seconds, 1), "peak_mb": round(peak_mb), "bank": MemoryBank.load(work / "retrained/bank.npz"),
            "manifest": json.loads((work / "retrained/manifest.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 300, 1000], help="stream lengths N")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.15], help="defect shares of the stream")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--retrain", action="store_true", help="also today's coft retrain, once (slow: many minutes)")
    parser.add_argument("--layers", type=int, nargs="+", help="ViT blocks, as coft train --layers (default: its)")
    parser.add_argument("--cache", type=Path, default=Path("bench-out/cache"), help="frozen features kept between runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out/learn"))
    args = parser.parse_args()

    category, data, frames, backbone, patches = product_features(args.dataset_root, args.cache,
                                                                  tuple(args.layers) if args.layers else None)
    size = frames.shape[1:3]
    patches = torch.from_numpy(patches)
    good, bad = np.flatnonzero(data.labels == 0), np.flatnonzero(data.labels == 1)
    runs, skipped = [], []
    for seed in args.seeds:
        shots, rng = draw_shots(good, args.shots, seed)
        shot_bank = shots_bank(backbone, frames[shots], size, seed)
        for n in args.frames:
            for share in args.shares:
                n_bad = round(share * n)
                rest = np.setdiff1d(good, shots)
                if n - n_bad > len(rest) - 100 or n_bad > len(bad) - 20:
                    skipped.append(f"N={n} at {share:.0%}: the set has {len(rest)} good and {len(bad)} defective "
                                   "images beside the shots, too few to leave a test set")
                    continue
                draw = np.random.default_rng([seed, n, round(share * 1000)])
                stream = np.concatenate([draw.choice(rest, n - n_bad, replace=False), draw.choice(bad, n_bad, replace=False)])
                test = np.setdiff1d(np.arange(len(frames)), np.concatenate([shots, stream]))
                labels, line = data.labels[test], patches[stream].numpy()
                is_bad = data.labels[stream] == 1

                def scored(bank: MemoryBank) -> np.ndarray:  # as the product scores: each ViT block on its own
                    return pool(bank.score(patches[test].numpy()), "top1pct")

                def grown(chosen: np.ndarray) -> MemoryBank:  # the shots' bank and these frames, as learn does
                    return bank_of(shot_bank, line, chosen, LearnConfig(cap=DEFAULT_CAP, seed=seed))[0]

                # the product's order: commission on the stream, then learn; the commissioned threshold's rejects
                # are the line's and never enter the bank
                shot_scores = pool(shot_bank.score(line), "top1pct")
                commissioned = fit_threshold(shot_scores, TARGET_FRR)["value"]
                tracemalloc.start()
                started = time.perf_counter()
                growth = grow(shot_bank, line, "top1pct", np.zeros(n, bool), None, LearnConfig(seed=seed),
                              reject_above=commissioned)
                learn_s = time.perf_counter() - started
                peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
                learned = fit_threshold(growth.scores_after, TARGET_FRR)["value"]
                queue = review_queue(shot_scores, commissioned)
                sorted_good, sorted_bad = np.zeros(n, bool), np.zeros(n, bool)
                sorted_good[queue[~is_bad[queue]]], sorted_bad[queue[is_bad[queue]]] = True, True
                reviewed = grow(with_marked_defects(shot_bank, line[sorted_bad]), line, "top1pct", sorted_good,
                                sorted_bad, LearnConfig(seed=seed), reject_above=commissioned)
                refitted = fit_threshold(reviewed.scores_after[~sorted_bad], TARGET_FRR,
                                         good=sorted_good[~sorted_bad])["value"]
                banks = {"shots": (shot_bank, commissioned), "learn": (growth.bank, learned),
                         "reviewed": (reviewed.bank, refitted),
                         "naive": (grown(np.ones(n, bool)), None), "clean": (grown(~is_bad), None)}
                base = {"seed": seed, "frames": n, "share": share, "defects_in_stream": int(n_bad)}
                for step, (bank, threshold) in banks.items():
                    row = {**base, "step": step, **measure(labels, scored(bank), threshold)}
                    if step == "learn":
                        row.update(seconds=round(learn_s, 1), peak_mb=round(peak_mb),
                                   defects_in_bank=int((growth.offered & is_bad).sum()),
                                   good_left_out=int((~growth.offered & ~is_bad).sum()),
                                   rows_added=growth.report["rows_added"])
                    if step == "reviewed":
                        row.update(clicks=len(queue), defects_in_bank=int((reviewed.offered & is_bad).sum()))
                    runs.append(row)
                    print(json.dumps(row), flush=True)
                if args.retrain and seed == args.seeds[0] and n == args.frames[0] and share == args.shares[0]:
                    with tempfile.TemporaryDirectory(prefix="coft-learn-bench-") as work:
                        done = retrain_run(category, data, shots, stream, Path(work), seed)
                    kept = done["manifest"]["harvest"]["trained_pool"]
                    row = {**base, "step": "retrain", **measure(labels, scored(done["bank"]),
                                                                done["manifest"]["threshold"]["value"]),
                           "seconds": done["seconds"], "peak_mb": done["peak_mb"], "trained_pool": kept}
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    write(args, category, runs, skipped)


def write(args, category: Path, runs: list[dict], skipped: list[str]) -> None:
    meta = {"dataset": str(category), "shots": args.shots, "seeds": args.seeds, "machine": machine(),
            "backbone": TrainOptions.backbone, "layers": args.layers, "cap": DEFAULT_CAP}
    blocks = f", blocks {' '.join(map(str, args.layers))}" if args.layers else ""
    lines = [f"# The line learns: {category.name}, {args.shots} shots + N unlabelled frames{blocks}", "",
             f"Seeds {args.seeds}, {meta['machine']['cpu']} ({meta['machine']['cpu_threads']} threads). Mean over seeds; "
             "escape at 1% / 5% false-reject on the test set (oracle thresholds); FRR / escape at each step's own "
             "threshold (shots: commissioned on the stream; learn: refitted by the step).", "",
             "| N | defects | step | AUROC | AP | escape@1% | escape@5% | FRR / escape at its threshold | defective frames in bank | clicks | s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["frames"], run["share"], run["step"]), []).append(run)
    for (n, share, step), rs in groups.items():
        def mean(key: str, digits: int = 3) -> str:
            values = [r[key] for r in rs if r.get(key) is not None]
            return f"{np.mean(values):.{digits}f}" if values else "-"
        at = f"{float(mean('false_reject_rate')):.1%} / {float(mean('escape_rate')):.1%}" if rs[0].get("escape_rate") is not None else "-"
        lines.append(f"| {n} | {share:.0%} | {step} | {mean('auroc')} | {mean('ap')} | {mean('escape_at_1pct_frr')} | "
                     f"{mean('escape_at_5pct_frr')} | {at} | {mean('defects_in_bank', 1)} | {mean('clicks', 1)} | "
                     f"{mean('seconds', 0)} | "
                     f"{mean('peak_mb', 0)} |")
    lines += [""] + [f"Skipped: {s}" for s in dict.fromkeys(skipped)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learn.json").write_text(json.dumps({"meta": meta, "runs": runs, "skipped": skipped}, indent=2) + "\n")
    (args.out / "learn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
