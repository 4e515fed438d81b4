"""Which of the bank's rows a patch is compared with, and how many of its worst patches make the image score.

    python bench/neighbours.py ../shared/datasets/bsdata [--seeds 0 1 2]     (a folder of categories)
    python bench/neighbours.py ../shared/datasets/magnetic_tile ...          (a category folder, or a folder of them)
    python bench/neighbours.py elpv ...

The product compares each patch with every row of the bank (the shots in every pose, cut to the cap) and scores an
image by the mean of its worst 1% of patches. Where a camera sees every part in the same place (ELPV's cells, BSData's
spindle), a patch could be compared only with the shots' patches near its own place, as anomaly methods for aligned
parts do; and a patch's distance could be the mean over its k nearest rows (less swayed by one lucky row), or the
image score pool more of its patches. Same frozen DINOv2 block 9 as the product, 10 shots, seeds as bench/fewshot.py
draws them, oracle thresholds on the test set. Steps:

- knn:               the product (every pose, capped by the greedy coreset; top 1%)
- as they are:       the shots without poses, every patch (the baseline of the positional steps: poses move places)
- near its place R:  as they are, each patch compared only with the shots' patches within R patches of its own place
- 3 nearest rows:    the product's bank, a patch's distance the mean of its 3 nearest rows
- pooling max / 5% / 10%: the product's patch distances, the image score their worst patch or worst 5% / 10%

Writes neighbours.json and .md under --out (the features come from bench/references.py's cache).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import knn_scores  # noqa: E402
from learn import measure, seed_split  # noqa: E402
from references import SINGLE_BLOCK, bank, category_features, per_block, write  # noqa: E402
from tiles import category_parser, chosen_categories  # noqa: E402

from coft.runtime.model.scoring import pool  # noqa: E402
from coft.train.augment import AugmentConfig  # noqa: E402
from coft.train.embed import to_pixels  # noqa: E402
from coft.train.scorers.knn import bank_views  # noqa: E402

RADII = (1, 2, 4)  # patches either way a positional neighbourhood reaches
NEAREST = 3
SHARES = (0.05, 0.10)


def near_its_place(shots: torch.Tensor, test: torch.Tensor, grid: tuple[int, int], radius: int,
                   chunk: int = 32) -> np.ndarray:
    """Patch distances [n, P]: 1 - the best cosine to the shots' [k, P, C] patches within `radius` of its place."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    near = torch.from_numpy(np.maximum(abs(rows[:, None] - rows[None]), abs(cols[:, None] - cols[None])) <= radius)
    out = []
    for i in range(0, len(test), chunk):
        sims = torch.einsum("npc,kqc->npkq", test[i:i + chunk], shots)
        out.append(1 - sims.masked_fill(~near[None, :, None, :], -2).amax(dim=(2, 3)))
    return torch.cat(out).numpy()


def k_nearest(rows: torch.Tensor, test: torch.Tensor, k: int, chunk: int = 16) -> np.ndarray:
    """Patch distances [n, P]: 1 - the mean cosine of a patch's k nearest bank rows."""
    out = []
    for i in range(0, len(test), chunk):
        sims = torch.einsum("npc,mc->npm", test[i:i + chunk], rows)
        out.append(1 - sims.topk(k, dim=-1).values.mean(-1))
    return torch.cat(out).numpy()


def worst_share(distances: np.ndarray, share: float) -> np.ndarray:
    top = max(1, round(share * distances.shape[1]))
    return np.sort(distances, axis=1)[:, -top:].mean(axis=1)


def measure_category(category: Path, args) -> list[dict]:
    data, size, frames, backbone, grid, features = category_features(category)
    patches = torch.from_numpy(features[SINGLE_BLOCK])
    rows = []
    for seed in args.seeds:
        shots, _, test, labels = seed_split(data.labels, args.shots, seed)
        base = {"category": category.name, "seed": seed, "good": int((labels == 0).sum()),
                "defective": int(labels.sum())}
        if not labels.sum():
            rows.append(base)
            continue
        with torch.inference_mode():
            views = per_block(bank_views(backbone, to_pixels(list(frames[shots]), size), AugmentConfig()))
        product_rows = bank(views[SINGLE_BLOCK], seed)
        product = knn_scores(product_rows, patches[test])
        scores = {"knn": pool(product, "top1pct"),
                  "as they are": pool(near_its_place(patches[shots], patches[test], grid, max(grid)), "top1pct")}
        scores.update({f"near its place {r}": pool(near_its_place(patches[shots], patches[test], grid, r), "top1pct")
                       for r in RADII})
        scores[f"{NEAREST} nearest rows"] = pool(k_nearest(product_rows, patches[test], NEAREST), "top1pct")
        scores["pooling max"] = pool(product, "max")
        scores.update({f"pooling {s:.0%}": worst_share(product, s) for s in SHARES})
        for step, s in scores.items():
            row = {**base, "step": step, **measure(labels, s, None)}
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    args = category_parser(__doc__, "bench-out/neighbours").parse_args()
    write(args, [row for category in chosen_categories(args) for row in measure_category(category, args)], "neighbours")


if __name__ == "__main__":
    main()
