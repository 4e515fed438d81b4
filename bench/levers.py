"""Two levers beside the shipped knn, measured: test-time poses and a second, finer scale.

    python bench/levers.py ../shared/datasets/magnetic_tile [--seeds 0] [--test-limit 300]
    python bench/levers.py elpv ...            (the elpv-dataset package's cells)

For each seed: k good shots as bench/fewshot.py draws them and the product's bank (every pose
of the shots, greedy coreset to the cap); the test set is up to --test-limit good and as many
defective images of the rest (a frame in 8 poses costs 8 passes of the ViT). On frozen
DINOv2 features (block 9), each image scored by the mean of its worst 1% of patches:

- knn:      the shipped scorer at the product's input size
- poses:    every test frame in each pose the bank holds, scored against the same bank, each
            patch map turned back and the minimum taken per patch (a patch is odd only if it
            is odd in every pose: the ViT's features are not exactly turn-invariant)
- 2x:       the same scorer at twice the side (4x the patches), its bank from the shots at 2x
- fused:    both scales' patch maps, the 2x one averaged onto the 1x grid, each divided by the
            median of the shots' own image scores at that scale (no test labels), then summed

Reported: image AUROC, AP, escape at 1% and 5% false-reject (oracle thresholds on the test
set) and each step's ViT passes per frame. Writes levers.json and levers.md under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import find_category, knn_scores, machine, product_size  # noqa: E402
from learn import headline_cells, measure, shot_patches, unit, write_report  # noqa: E402

from coft.runtime.model.coreset import greedy_coreset  # noqa: E402
from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.runtime.model.scoring import pool  # noqa: E402
from coft.train.augment import AugmentConfig  # noqa: E402
from coft.train.backbones import load_backbone  # noqa: E402
from coft.train.embed import to_pixels  # noqa: E402
from coft.train.evaluate import labelled_images  # noqa: E402
from coft.train.pipeline import TrainOptions  # noqa: E402
from coft.train.scorers.knn import DEFAULT_CAP, posed, poses  # noqa: E402

PASSES = {"knn": 1, "poses": None, "2x": 4, "fused": 5}  # ViT cost per frame relative to knn (poses: its count)


class Scale:
    """The backbone at one input size with the k-shot bank built at that size."""

    def __init__(self, paths: list[Path], shots: list[int], size: tuple[int, int], seed: int):
        self.size = size
        self.backbone = load_backbone(TrainOptions.backbone, None, size, None)
        self.grid = (size[0] // self.backbone.patch_stride, size[1] // self.backbone.patch_stride)
        self.shots = self.frames([paths[i] for i in shots])
        rows = shot_patches(self.backbone, self.shots, size)
        self.bank = torch.from_numpy(np.ascontiguousarray(rows[greedy_coreset(rows, DEFAULT_CAP, seed)]))

    def frames(self, paths: list[Path]) -> np.ndarray:
        return np.stack([resize_to_input(read_image(p), self.size) for p in paths])

    @torch.inference_mode()
    def maps(self, frames: np.ndarray, pose=(0, False)) -> np.ndarray:
        """Patch scores [n, h, w] of frames seen in `pose`, turned back onto the frames' own grid."""
        pixels = posed(to_pixels(list(frames), self.size), pose)
        patches = torch.from_numpy(unit(self.backbone.patch_features(pixels).float().numpy()))
        k, mirrored = pose
        h, w = (self.grid[1], self.grid[0]) if k % 2 else self.grid
        back = torch.rot90(torch.from_numpy(knn_scores(self.bank, patches)).view(-1, h, w), -k, dims=(-2, -1))
        return (back.flip(-1) if mirrored else back).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test-limit", type=int, default=300, help="good test images, and at most as many defective")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench-out/levers"))
    args = parser.parse_args()

    category = find_category(args.dataset_root)
    data = labelled_images(category)
    size = product_size(data, None)
    runs = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        good, defective = np.flatnonzero(data.labels == 0), np.flatnonzero(data.labels == 1)
        shots = rng.choice(good, args.shots, replace=False)
        rest = rng.permutation(np.setdiff1d(good, shots))[:args.test_limit]
        test = np.concatenate([rest, rng.permutation(defective)[:args.test_limit]])
        labels = data.labels[test]
        fine_size = (size[0] * 2, size[1] * 2)
        coarse, fine = Scale(data.paths, list(shots), size, seed), Scale(data.paths, list(shots), fine_size, seed)
        allowed = poses(AugmentConfig(), size[0] == size[1])
        maps = {"knn": [], "poses": [], "2x": []}
        for i in tqdm(range(0, len(test), args.batch), desc=f"seed {seed}: test frames", unit="batch"):
            chosen = [data.paths[j] for j in test[i:i + args.batch]]
            frames = coarse.frames(chosen)
            each = [coarse.maps(frames, pose) for pose in allowed]
            maps["knn"].append(each[0])
            maps["poses"].append(np.min(each, axis=0))
            maps["2x"].append(fine.maps(fine.frames(chosen)))
        maps = {k: np.concatenate(v) for k, v in maps.items()}
        own = {scale.size: np.median(pool(scale.maps(scale.shots).reshape(args.shots, -1), "top1pct"))
               for scale in (coarse, fine)}
        fine_on_coarse = F.adaptive_avg_pool2d(torch.from_numpy(maps["2x"]), coarse.grid).numpy()
        maps["fused"] = maps["knn"] / own[size] + fine_on_coarse / own[fine_size]
        for step, m in maps.items():
            passes = PASSES[step] or len(allowed)
            row = {"seed": seed, "step": step, "passes": passes, "good": int((labels == 0).sum()),
                   "defective": int(labels.sum()), **measure(labels, pool(m.reshape(len(m), -1), "top1pct"), None)}
            runs.append(row)
            print(row, flush=True)
    write(args, category, size, runs)


def write(args, category: Path, size, runs: list[dict]) -> None:
    meta = {"dataset": str(category), "shots": args.shots, "seeds": args.seeds, "test_limit": args.test_limit,
            "machine": machine(), "backbone": TrainOptions.backbone, "size": list(size), "cap": DEFAULT_CAP}
    lines = [f"# Test-time poses and a second scale: {category.name}, {args.shots} shots, {size[0]}x{size[1]}", "",
             f"Seeds {args.seeds}; test {runs[0]['good']} good and {runs[0]['defective']} defective images. Mean over "
             "seeds; escape at 1% / 5% false-reject on the test set (oracle thresholds).", "",
             "| step | ViT passes | AUROC | AP | escape@1% | escape@5% |", "|---|---|---|---|---|---|"]
    for step in dict.fromkeys(r["step"] for r in runs):
        rs = [r for r in runs if r["step"] == step]
        lines.append(f"| {step} | {rs[0]['passes']} | {headline_cells(rs)} |")
    write_report(args.out, "levers", {"meta": meta, "runs": runs}, lines)


if __name__ == "__main__":
    main()
