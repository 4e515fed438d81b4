"""A PCA-subspace scorer (SubspaceAD) beside the shipped knn: does modelling the shots' patches as a linear
subspace find more defects than the nearest patch does?

    python bench/subspace.py ../shared/datasets/magnetic_tile [--seeds 0 1 2]
    python bench/subspace.py elpv ...            (the elpv-dataset package's cells)

For each seed: k good shots as bench/fewshot.py draws them, every pose of them (the rows the
product's bank is cut from); the test set is every other image. On the same frozen DINOv2
features (block 9, the product's input size), each image scored by the mean of its worst 1%
of patches:

- knn:       the shipped scorer, 1 - cosine to the nearest bank row (greedy coreset to the cap)
- subspace:  the squared residual of a patch off the shots' principal subspace (mean removed;
             components keeping --variance of the variance), as SubspaceAD does
- fused:     the mean of the two image scores, each divided by its median over the shots'
             own leave-one-in patch scores (no test labels used)

Reported: image AUROC, AP, escape at 1% and 5% false-reject (oracle thresholds on the test set).
Writes subspace.json and subspace.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import knn_scores, machine  # noqa: E402
from learn import draw_shots, headline_cells, measure, product_features, shot_patches, write_report  # noqa: E402

from coft.runtime.model.coreset import greedy_coreset  # noqa: E402
from coft.runtime.model.scoring import pool  # noqa: E402
from coft.train.pipeline import TrainOptions  # noqa: E402
from coft.train.scorers.knn import DEFAULT_CAP  # noqa: E402


def subspace(rows: np.ndarray, variance: float) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the principal directions [C, r] keeping `variance` of the rows' variance."""
    mean = rows.mean(axis=0)
    _, singular, directions = np.linalg.svd(rows - mean, full_matrices=False)
    kept = int(np.searchsorted(np.cumsum(singular**2) / np.sum(singular**2), variance)) + 1
    return mean, directions[:kept].T


def residuals(patches: np.ndarray, mean: np.ndarray, basis: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Squared distance of each patch [n, P, C] from the subspace: [n, P]."""
    out = []
    for i in range(0, len(patches), chunk):
        centred = patches[i:i + chunk] - mean
        out.append((centred**2).sum(-1) - ((centred @ basis) ** 2).sum(-1))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variance", type=float, default=0.99, help="share of the shots' variance the subspace keeps")
    parser.add_argument("--cache", type=Path, default=Path("bench-out/cache"), help="frozen features kept between runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out/subspace"))
    args = parser.parse_args()

    category, data, frames, backbone, patches = product_features(args.dataset_root, args.cache)
    size = frames.shape[1:3]
    good = np.flatnonzero(data.labels == 0)
    runs = []
    for seed in args.seeds:
        shots, rng = draw_shots(good, args.shots, seed)
        test = np.setdiff1d(np.arange(len(frames)), shots)
        rows = shot_patches(backbone, frames[shots], size)
        bank = torch.from_numpy(np.ascontiguousarray(rows[greedy_coreset(rows, DEFAULT_CAP, seed)]))
        mean, basis = subspace(rows, args.variance)
        steps = {"knn": pool(knn_scores(bank, torch.from_numpy(patches[test])), "top1pct"),
                 "subspace": pool(residuals(patches[test], mean, basis), "top1pct")}
        own = {"knn": pool(knn_scores(bank, torch.from_numpy(patches[shots])), "top1pct"),
               "subspace": pool(residuals(patches[shots], mean, basis), "top1pct")}
        steps["fused"] = sum(steps[k] / max(np.median(own[k]), 1e-9) for k in own) / 2
        for step, scores in steps.items():
            row = {"seed": seed, "step": step, "components": basis.shape[1], **measure(data.labels[test], scores, None)}
            runs.append(row)
            print(json.dumps(row), flush=True)
    write(args, category, size, runs)


def write(args, category: Path, size, runs: list[dict]) -> None:
    meta = {"dataset": str(category), "shots": args.shots, "seeds": args.seeds, "variance": args.variance,
            "machine": machine(), "backbone": TrainOptions.backbone, "size": list(size)}
    lines = [f"# Subspace scorer: {category.name}, {args.shots} shots, {size[0]}x{size[1]}", "",
             f"Seeds {args.seeds}; subspace keeping {args.variance:.0%} of the variance "
             f"({', '.join(str(r['components']) for r in runs if r['step'] == 'subspace')} components). Mean over "
             "seeds; escape at 1% / 5% false-reject on the test set (oracle thresholds).", "",
             "| scorer | AUROC | AP | escape@1% | escape@5% |", "|---|---|---|---|---|"]
    for step in dict.fromkeys(r["step"] for r in runs):
        rs = [r for r in runs if r["step"] == step]
        lines.append(f"| {step} | {headline_cells(rs)} |")
    write_report(args.out, "subspace", {"meta": meta, "runs": runs}, lines)


if __name__ == "__main__":
    main()
