"""Tiles at the camera's resolution against one resize of the frame, at the operating point.

    python bench/tiles.py ../shared/datasets/bsdata [--scales 0.75 1.0] [--seeds 0 1 2] [--poses]
    python bench/tiles.py ../shared/datasets/magnetic_tile ...     (a category folder, or a folder of them)
    python bench/tiles.py elpv ...

For each category (a folder with good/ and defect/<type>/; a folder holding several is measured category by
category, as BSData's 15 camera positions) and seed: k good shots as bench/fewshot.py draws them, every other image
the test set. Frozen DINOv2 (block 9), memory bank of the shots' patches capped by the greedy coreset at the
product's cap, image score the mean of the worst 1% of patches:

- resize:        the product today: the frame resized to the input the shots' shape calls for, the bank from
                 the shots in every pose
- resize-nopose: the same, the bank from the shots as they are
- tiles xS:      the frame at S times the shots' median size (1:1 at most), cut into overlapping windows of
                 224x224 (runtime/model/tiles.py), the bank from the shots' windows, the windows' patch scores
                 stitched onto the frame's grid and averaged where they overlap; with --poses also in every pose

Reported per category and as the mean over categories with defects: image AUROC, AP, escape at 1% and 5%
false-reject (oracle thresholds on the test set), ViT windows per frame and the backbone's ms per frame (torch,
this machine). Writes tiles.json and tiles.md under --out.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import find_category, good_shapes, knn_scores, machine, product_size  # noqa: E402
from learn import HEADLINE, headline_cells, measure, seed_split, unit, write_report  # noqa: E402

from coft.runtime.model.coreset import greedy_coreset  # noqa: E402
from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.runtime.model.scoring import pool  # noqa: E402
from coft.runtime.model.tiles import Tiling, tiled_size  # noqa: E402
from coft.train.augment import AugmentConfig  # noqa: E402
from coft.train.backbones import load_backbone  # noqa: E402
from coft.train.embed import to_pixels  # noqa: E402
from coft.train.evaluate import labelled_images  # noqa: E402
from coft.train.pipeline import TrainOptions  # noqa: E402
from coft.train.scorers.knn import DEFAULT_CAP, bank_views  # noqa: E402
from coft.train.shape import SHORT_SIDE, median_size  # noqa: E402

WINDOW = (SHORT_SIDE, SHORT_SIDE)


def categories(root: str) -> list[Path]:
    if root == "elpv" or (Path(root) / "good").is_dir():
        return [find_category(Path(root))]
    found = [p for p in sorted(Path(root).iterdir()) if (p / "good").is_dir()]
    if not found:
        sys.exit(f"{root}: no good/ folder in it or in its subfolders")
    return found


@torch.inference_mode()
def features(backbone, frames: np.ndarray, size: tuple[int, int], batch: int = 16) -> tuple[np.ndarray, float]:
    """Unit patch features [n, P, C] (float16) of frames already at `size`, and the ms per frame it took."""
    started, out = time.perf_counter(), []
    for i in tqdm(range(0, len(frames), batch), desc=f"ViT at {size[0]}x{size[1]}", unit="batch", leave=False):
        out.append(unit(backbone.patch_features(to_pixels(list(frames[i:i + batch]), size)).float().numpy()))
    return np.concatenate(out).astype(np.float16), (time.perf_counter() - started) * 1000 / len(frames)


def bank_of(rows: np.ndarray, seed: int) -> torch.Tensor:
    flat = np.ascontiguousarray(rows.reshape(-1, rows.shape[-1]), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(flat[greedy_coreset(flat, DEFAULT_CAP, seed)]))


def posed_rows(backbone, frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return unit(bank_views(backbone, to_pixels(list(frames), size), AugmentConfig())).astype(np.float16)


class Variant:
    """One way of scoring the category's frames: its windows' features once, a bank per seed."""

    def __init__(self, name: str, images: list[np.ndarray], size: tuple[int, int], tiling: Tiling | None, poses: bool):
        self.name, self.size, self.tiling, self.poses = name, size, tiling, poses
        window = tiling.window if tiling else size
        self.backbone = load_backbone(TrainOptions.backbone, None, window, None)
        frames = np.stack([resize_to_input(image, size) for image in images])
        self.windows = tiling.cut(frames).reshape(-1, *window, 3) if tiling else frames
        self.features, ms = features(self.backbone, self.windows, window)
        self.ms_per_frame = ms * (len(tiling) if tiling else 1)
        self.per_frame = len(tiling) if tiling else 1
        self.features = self.features.reshape(len(frames), self.per_frame, *self.features.shape[1:])

    def banked(self, name: str, poses: bool) -> Variant:
        """The same windows and features, another bank."""
        other = copy.copy(self)
        other.name, other.poses = name, poses
        return other

    def scores(self, shots: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
        if self.poses:
            rows = posed_rows(self.backbone, self.windows.reshape(len(self.features), self.per_frame,
                                                                 *self.windows.shape[1:])[shots].reshape(
                -1, *self.windows.shape[1:]), self.windows.shape[1:3])
        else:
            rows = self.features[shots]
        bank = bank_of(rows, seed)
        test_rows = torch.from_numpy(self.features[test].reshape(-1, *self.features.shape[2:]).astype(np.float32))
        patch = knn_scores(bank, test_rows).reshape(len(test), self.per_frame, -1)
        grid = self.tiling.stitch(patch) if self.tiling else patch
        return pool(grid.reshape(len(test), -1), "top1pct")


def measure_category(category: Path, args) -> list[dict]:
    data = labelled_images(category)
    images = [read_image(p) for p in tqdm(data.paths, desc=f"{category.name}: reading", unit="img", leave=False)]
    size = product_size(data, None)
    shape = median_size(good_shapes(data))
    variants = [Variant("resize", images, size, None, True)]
    variants.append(variants[0].banked("resize-nopose", False))
    for scale in args.scales:
        frame = tiled_size(shape, scale, 14)
        tiling = Tiling.over(frame, WINDOW, 14)
        variants.append(Variant(f"tiles x{scale:g}", images, frame, tiling, False))
        if args.poses:
            variants.append(variants[-1].banked(f"tiles x{scale:g} + poses", True))
    rows = []
    for seed in args.seeds:
        shots, _, test, labels = seed_split(data.labels, args.shots, seed)
        for variant in variants:
            row = {"category": category.name, "seed": seed, "variant": variant.name, "windows": variant.per_frame,
                   "frame": list(variant.size), "ms_per_frame": round(variant.ms_per_frame, 1),
                   "good": int((labels == 0).sum()), "defective": int(labels.sum())}
            if labels.sum():
                row.update(measure(labels, variant.scores(shots, test, seed), None))
            rows.append(row)
            print(row, flush=True)
    return rows


def category_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The arguments every per-category benchmark takes: the set, shots, seeds, which categories, where to write."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a category folder (good/, defect/<type>/), a folder of them, or 'elpv'")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", help="measure only these categories of a folder of them")
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def chosen_categories(args) -> list[Path]:
    return [c for c in categories(args.dataset) if not args.only or c.name in args.only]


def main() -> None:
    parser = category_parser(__doc__, "bench-out/tiles")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.75, 1.0], help="of the shots' size, 1 at most")
    parser.add_argument("--poses", action="store_true", help="also tiles with the bank in every pose (8x the shots)")
    args = parser.parse_args()
    if any(not 0 < s <= 1 for s in args.scales):
        sys.exit("--scales: between 0 and 1 (1:1 at most: tiles keep the camera's pixels, never magnify them)")
    write(args, [row for category in chosen_categories(args) for row in measure_category(category, args)])


def write(args, runs: list[dict]) -> None:
    measured = [r for r in runs if "auroc" in r]
    names = list(dict.fromkeys(r["category"] for r in runs))
    lines = [f"# Tiles against one resize: {args.dataset}, {args.shots} shots, seeds {args.seeds}", "",
             f"{machine()['cpu']}; ms per frame: the backbone in torch on this machine. Mean over seeds (and over the "
             f"{len({r['category'] for r in measured})} categories with defects in the last rows); escape at 1% / 5% "
             "false-reject on the test set (oracle thresholds).", "",
             "| category | variant | frame | windows | ms/frame | " + " | ".join(HEADLINE) + " |",
             "|---|---|---|---|---|" + "---|" * len(HEADLINE)]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for name in names:
        for variant in variants:
            rs = [r for r in measured if r["category"] == name and r["variant"] == variant]
            if rs:
                lines.append(f"| {name} | {variant} | {rs[0]['frame'][0]}x{rs[0]['frame'][1]} | {rs[0]['windows']} | "
                             f"{rs[0]['ms_per_frame']:.0f} | {headline_cells(rs)} |")
    if len(names) > 1:
        for variant in variants:
            rs = [r for r in measured if r["variant"] == variant]
            per = [[r for r in rs if r["category"] == n] for n in names]
            means = {k: np.mean([np.mean([r[k] for r in p]) for p in per if p]) for k in HEADLINE}
            worst = min(np.mean([r["auroc"] for r in p]) for p in per if p)
            lines.append(f"| **mean** | {variant} | | {rs[0]['windows']} | "
                         f"{np.mean([r['ms_per_frame'] for r in rs]):.0f} | "
                         + " | ".join(f"{means[k]:.3f}" for k in HEADLINE) + f" (worst AUROC {worst:.3f}) |")
    write_report(args.out, "tiles", {"meta": {"dataset": args.dataset, "machine": machine(), "shots": args.shots,
                                              "seeds": args.seeds, "scales": args.scales, "cap": DEFAULT_CAP},
                                     "runs": runs}, lines)


if __name__ == "__main__":
    main()
