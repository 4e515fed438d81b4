"""A few marked defects: what an operator's "real defect" marks buy, per defect type.

    python bench/defects.py ../shared/datasets/magnetic_tile [--marked 10] [--seeds 0 1 2]
    python bench/defects.py elpv ...            (the elpv-dataset package's cells)

For each seed: k good shots as bench/fewshot.py draws them (the product's bank: every
pose, greedy coreset) and `--marked` defects an operator marked, drawn round-robin over
the defect types; the test set is every other image. Compared on the same frozen DINOv2
features, each scored with the shipped knn scorer (mean of the worst 1% of patches):

- shots:        the k-shot bank alone
- marked:       the bank with the marked defects' worst patches as defect rows
                (runtime/bank_growth.with_marked_defects, as `coft learn` does on the box)
- marked-some:  the same number of marks drawn from only some types (the first half of them,
                shuffled by seed): what happens to the types never marked

Reported: image AUROC, AP, escape at 1% and 5% false-reject (oracle thresholds on the test
set; the marked defects are not in it), and per defect type AUROC and escape at 1%.
Writes defects.json and defects.md under --out.
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
from learn import draw_shots, headline_cells, measure, product_features, shots_bank, write_report  # noqa: E402

from coft.runtime.model.bank_growth import with_marked_defects  # noqa: E402
from coft.runtime.model.scoring import defect_pull, pool  # noqa: E402
from coft.train.metrics import escape_at_false_reject, per_type_auroc  # noqa: E402
from coft.train.pipeline import TrainOptions  # noqa: E402
from coft.train.scorers.knn import DEFAULT_CAP  # noqa: E402


def round_robin(bad: np.ndarray, types: np.ndarray, kinds: list[str], n: int, rng: np.random.Generator) -> np.ndarray:
    """n defects drawn in turn from each of `kinds`, so that every kind is marked about as often."""
    queues = {k: list(rng.permutation(bad[types[bad] == k])) for k in kinds}
    chosen: list[int] = []
    while len(chosen) < n and any(queues.values()):
        for k in kinds:
            if len(chosen) < n and queues[k]:
                chosen.append(queues[k].pop())
    return np.array(chosen)


def per_type(labels: np.ndarray, scores: np.ndarray, types: np.ndarray) -> dict:
    """Each defect type's AUROC against every good image, and its escape at the 1% false-reject threshold."""
    aurocs = per_type_auroc(labels, scores, list(types))
    return {k: {"auroc": round(aurocs[k], 4), "escape_at_1pct_frr": round(escape_at_false_reject(
        labels[(types == k) | (labels == 0)], scores[(types == k) | (labels == 0)], 0.01), 4)}
        for k in sorted(set(types[labels == 1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--marked", type=int, default=10, help="defects an operator marked")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=Path("bench-out/cache"), help="frozen features kept between runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out/defects"))
    args = parser.parse_args()

    category, data, frames, backbone, patches = product_features(args.dataset_root, args.cache)
    size = frames.shape[1:3]
    types = np.array(data.types)
    good, bad = np.flatnonzero(data.labels == 0), np.flatnonzero(data.labels == 1)
    kinds = sorted(set(types[bad]))
    runs = []
    for seed in args.seeds:
        shots, rng = draw_shots(good, args.shots, seed)
        bank = shots_bank(backbone, frames[shots], size, seed)
        draws = {"marked": round_robin(bad, types, kinds, args.marked, rng)}
        if len(kinds) > 1:  # a set with one defect type has no type left unmarked
            draws["marked-some"] = round_robin(bad, types, list(rng.permutation(kinds))[:len(kinds) // 2], args.marked, rng)
        test = np.setdiff1d(np.arange(len(frames)), np.concatenate([shots, *draws.values()]))
        labels = data.labels[test]
        distances = knn_scores(torch.from_numpy(bank.features), torch.from_numpy(patches[test]))
        steps = {"shots": pool(distances, "top1pct")}
        for step, marked in draws.items():
            rows = with_marked_defects(bank, patches[marked]).defect_rows
            steps[step] = pool(defect_pull(1.0 - distances, (patches[test] @ rows.T).max(axis=2)), "top1pct")
        for step, scores in steps.items():
            row = {"seed": seed, "step": step, **measure(labels, scores, None),
                   "per_type": per_type(labels, scores, types[test])}
            if step != "shots":
                row["marked_types"] = sorted(set(types[draws[step]]))
            runs.append(row)
            print(json.dumps(row), flush=True)
    write(args, category, runs)


def write(args, category: Path, runs: list[dict]) -> None:
    meta = {"dataset": str(category), "shots": args.shots, "marked": args.marked, "seeds": args.seeds,
            "machine": machine(), "backbone": TrainOptions.backbone, "cap": DEFAULT_CAP}
    kinds = sorted(runs[0]["per_type"])
    lines = [f"# Marked defects: {category.name}, {args.shots} shots + {args.marked} marked defects", "",
             f"Seeds {args.seeds}, {meta['machine']['cpu']} ({meta['machine']['cpu_threads']} threads). Mean over seeds; "
             "escape at 1% / 5% false-reject on the test set (oracle thresholds), marked defects left out of it.", "",
             "| step | AUROC | AP | escape@1% | escape@5% |", "|---|---|---|---|---|"]
    steps = list(dict.fromkeys(r["step"] for r in runs))
    for step in steps:
        rs = [r for r in runs if r["step"] == step]
        lines.append(f"| {step} | {headline_cells(rs)} |")
    lines += ["", "Per defect type, AUROC / escape at 1% false-reject (marked-some: * a type marked in that seed; "
              "the rest were never marked):", "", "| step | seed | " + " | ".join(kinds) + " |",
              "|---|---|" + "---|" * len(kinds)]
    for r in runs:
        cells = [f"{r['per_type'][k]['auroc']:.3f} / {r['per_type'][k]['escape_at_1pct_frr']:.2f}"
                 + ("*" if r["step"] == "marked-some" and k in r["marked_types"] else "") for k in kinds]
        lines.append(f"| {r['step']} | {r['seed']} | " + " | ".join(cells) + " |")
    write_report(args.out, "defects", {"meta": meta, "runs": runs}, lines)


if __name__ == "__main__":
    main()
