"""A cheaper bank at equal accuracy? The knn bank's coreset cap, and the bank product in bfloat16.

    python bench/caps.py ../shared/datasets/magnetic_tile [--caps 2048 4096 8192 16384] [--seeds 0 1 2]
    python bench/caps.py elpv ...            (the elpv-dataset package's cells)

For each seed: k good shots as bench/fewshot.py draws them, every pose of them, cut by the greedy
coreset to each cap (the product's bank at that cap); the test set is every other image. On the
same frozen DINOv2 features (block 9, the product's input size), each image scored by the mean of
its worst 1% of patches, the similarities in float32 as the exported graph computes them, and at
each cap also in bfloat16 (what OpenVINO's bf16 hint does to the bank product). The bank product
costs 2 x patches x rows x 384 FLOP a frame. Writes caps.json and caps.md under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import knn_scores, machine  # noqa: E402
from learn import draw_shots, headline_cells, measure, product_features, shot_patches, write_report  # noqa: E402

from coft.runtime.model.coreset import greedy_coreset  # noqa: E402
from coft.runtime.model.scoring import pool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--caps", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--cache", type=Path, default=Path("bench-out/cache"), help="frozen features kept between runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out/caps"))
    args = parser.parse_args()

    category, data, frames, backbone, patches = product_features(args.dataset_root, args.cache)
    size = frames.shape[1:3]
    good = np.flatnonzero(data.labels == 0)
    runs = []
    for seed in args.seeds:
        shots, rng = draw_shots(good, args.shots, seed)
        test = np.setdiff1d(np.arange(len(frames)), shots)
        test_patches = torch.from_numpy(patches[test])
        rows = shot_patches(backbone, frames[shots], size)
        for cap in sorted(args.caps):
            bank = torch.from_numpy(np.ascontiguousarray(rows[greedy_coreset(rows, cap, seed)]))
            for precision in ("fp32", "bf16"):
                scores = pool(knn_scores(bank, test_patches, fp32=precision == "fp32"), "top1pct")
                row = {"seed": seed, "cap": min(cap, len(rows)), "precision": precision,
                       "gflop_bank": round(2 * patches.shape[1] * min(cap, len(rows)) * rows.shape[1] / 1e9, 2),
                       **measure(data.labels[test], scores, None)}
                runs.append(row)
                print(row, flush=True)
    write(args, category, size, runs)


def write(args, category: Path, size, runs: list[dict]) -> None:
    meta = {"dataset": str(category), "shots": args.shots, "seeds": args.seeds, "machine": machine(),
            "size": list(size)}
    lines = [f"# Coreset caps: {category.name}, {args.shots} shots, {size[0]}x{size[1]}", "",
             f"Seeds {args.seeds}, mean; escape at 1% / 5% false-reject on the test set (oracle thresholds).", "",
             "| cap | bank product | GFLOP / frame | AUROC | AP | escape@1% | escape@5% |", "|---|---|---|---|---|---|---|"]
    for cap, precision in dict.fromkeys((r["cap"], r["precision"]) for r in runs):
        rs = [r for r in runs if r["cap"] == cap and r["precision"] == precision]
        lines.append(f"| {cap} | {precision} | {rs[0]['gflop_bank']} | {headline_cells(rs)} |")
    write_report(args.out, "caps", {"meta": meta, "runs": runs}, lines)


if __name__ == "__main__":
    main()
