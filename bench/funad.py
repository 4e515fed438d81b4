"""FUN-AD benchmark: training from a contaminated pool, with the protocol of the issue.

    python bench/funad.py ../shared/datasets/magnetic_tile [--seeds 0 1 2]

For each contamination c in {0, 5, 10, 20}% (defects per 100 good images) and seed: a
pool of 100 good images plus c defective ones, drawn with the seed; the test set is every
image outside the pool. Compared, all with the shipped scorer (frozen Lite0 features,
Ledoit-Wolf Gaussian on augmented views):

- naive:  trained on the whole contaminated pool;
- fun-ad: FUN-AD drops its suspects, trained on the rest;
- oracle: trained on the pool's good images only (perfect filtering).

Also the precision and recall of FUN-AD's suspect list. Writes funad.json and funad.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import find_category, machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.train.augment import AugmentConfig  # noqa: E402
from coft.train.backbones import load_backbone  # noqa: E402
from coft.train.embed import embed_views, to_pixels  # noqa: E402
from coft.train.evaluate import labelled_images  # noqa: E402
from coft.train.funad import FunadConfig, find_suspects  # noqa: E402
from coft.train.metrics import detection_metrics  # noqa: E402
from coft.train.patches import patch_features  # noqa: E402
from coft.train.scorers.gaussian import fit_gaussian  # noqa: E402

CONTAMINATION = (0, 5, 10, 20)


def _mean_std(runs: list[dict], key: str) -> str:
    v = np.array([r[key] for r in runs], dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


def _mean(runs: list[dict], key: str) -> str:
    v = [r[key] for r in runs if r[key] is not None]
    return f"{np.mean(v):.2f}" if v else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--good", type=int, default=100, help="good images per pool")
    parser.add_argument("--views", type=int, default=4, help="N_A views per training image")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("bench-out/funad"))
    args = parser.parse_args()

    data = labelled_images(find_category(args.dataset_root))
    size = (args.size, args.size)
    frames = [resize_to_input(read_image(p), size) for p in tqdm(data.paths, desc="reading", unit="img")]
    backbone = load_backbone("efficientnet_lite0")
    generator = torch.Generator().manual_seed(0)
    views, patches = [], []
    for i in tqdm(range(0, len(frames), 32), desc="features", unit="batch"):
        pixels = to_pixels(frames[i:i + 32], size)
        views.append(embed_views(backbone, pixels, args.views, AugmentConfig(), generator))
        patches.append(patch_features(backbone, pixels, coarse=True))
    views, patches = np.concatenate(views), torch.cat(patches)  # [N, V, D], [N, P, C]
    good, bad = np.flatnonzero(data.labels == 0), np.flatnonzero(data.labels == 1)

    def auroc(train: np.ndarray, test: np.ndarray) -> float:
        gaussian = fit_gaussian(views[train].reshape(-1, views.shape[2]))
        return detection_metrics(data.labels[test], gaussian.score(views[test, 0]))["auroc"]

    runs = []
    for c in CONTAMINATION:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            pool_good = rng.choice(good, args.good, replace=False)
            pool_bad = rng.choice(bad, c * args.good // 100, replace=False)
            pool = np.concatenate([pool_good, pool_bad])
            test = np.setdiff1d(np.arange(len(frames)), pool)
            started = time.perf_counter()
            result = find_suspects(patches[pool], FunadConfig(), seed, progress=False)
            funad_s = time.perf_counter() - started
            kept = pool[~result.suspects]
            truly_bad = data.labels[pool] == 1
            caught = int((result.suspects & truly_bad).sum())
            run = {"contamination_pct": c, "seed": seed, "pool": len(pool), "suspects": int(result.suspects.sum()),
                   "precision": caught / max(1, int(result.suspects.sum())) if result.suspects.any() else None,
                   "recall": caught / len(pool_bad) if len(pool_bad) else None,
                   "naive": auroc(pool, test), "fun_ad": auroc(kept, test), "oracle": auroc(pool_good, test),
                   "funad_seconds": round(funad_s, 1)}
            runs.append(run)
            print(json.dumps(run), flush=True)

    lines = [f"# FUN-AD on {data.paths[0].parents[1]}", "",
             f"Pools of {args.good} good + c% defective images, {len(args.seeds)} seeds, {machine()}. "
             "Image AUROC on everything outside the pool (mean ± std); suspects' precision and recall.", "",
             "| contamination | naive | FUN-AD then train | oracle (clean) | suspects | precision | recall | FUN-AD s |",
             "|---|---|---|---|---|---|---|---|"]
    for c in CONTAMINATION:
        rs = [r for r in runs if r["contamination_pct"] == c]

        lines.append(f"| {c}% | {_mean_std(rs, 'naive')} | {_mean_std(rs, 'fun_ad')} | {_mean_std(rs, 'oracle')} | "
                     f"{np.mean([r['suspects'] for r in rs]):.1f} | {_mean(rs, 'precision')} | {_mean(rs, 'recall')} | "
                     f"{np.mean([r['funad_seconds'] for r in rs]):.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "funad.json").write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2) + "\n")
    (args.out / "funad.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
