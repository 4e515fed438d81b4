"""The part's own shape: does the input size from the shots' aspect ratio beat the square?

    python bench/shape.py ../shared/datasets/magnetic_tile [--seeds 0 1 2]
    python bench/shape.py elpv ...            (the elpv-dataset package's cells)
    python bench/shape.py ../shared/datasets/magnetic_tile --aspect-between 1.6 9   (one shape of part: the
                                              set's tall tiles, height/width 1.6 or more)

For each seed: k good shots as bench/fewshot.py draws them; the test set is every other image.
Compared, each with the shipped knn scorer (every pose of the shots, greedy coreset, mean of
the worst 1% of patches) on frozen DINOv2 features at:

- square:     224x224, every image squashed into it (the default before)
- shape:      the shots' median aspect ratio at the square's patch budget (the same cost on the box)
- shape-long: the same aspect with the short side at 224 (more patches: the cost grows with the
              aspect ratio)
- letterbox:  the shape size, each image scaled to fit it whole and padded by edge replication
              (a set whose images differ in shape keeps each one's own)
- default:    what `coft train` does now (train/shape.py): shape-long where the shots agree on
              a shape (height/width within a factor of 2), the square where they do not

Reported per variant: the sizes chosen, image AUROC, AP, escape at 1% and 5% false-reject
(oracle thresholds on the test set) and the backbone's milliseconds per frame on this machine.
Writes shape.json and shape.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import cached_features, find_category, knn_scores, machine  # noqa: E402
from learn import draw_shots, headline_cells, measure, shots_bank, unit, write_report  # noqa: E402

from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.runtime.model.scoring import pool  # noqa: E402
from coft.train.backbones import load_backbone  # noqa: E402
from coft.train.evaluate import LabelledSet, labelled_images  # noqa: E402
from coft.train.pipeline import TrainOptions, fingerprint  # noqa: E402
from coft.train.shape import input_size, median_aspect, size_for_aspect  # noqa: E402

VARIANTS = ("square", "shape", "shape-long", "letterbox", "default")


def aspect_of(path: Path) -> float:
    with Image.open(path) as image:
        return image.height / image.width


def letterbox(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The whole image scaled into `size` keeping its aspect, the rest filled by replicating its edges."""
    height, width = size
    scale = min(height / image.shape[0], width / image.shape[1])
    fitted = resize_to_input(image, (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))))
    top, left = (height - fitted.shape[0]) // 2, (width - fitted.shape[1]) // 2
    return cv2.copyMakeBorder(fitted, top, height - fitted.shape[0] - top, left, width - fitted.shape[1] - left,
                              cv2.BORDER_REPLICATE)


def variant_size(variant: str, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """The input size of a variant for shots of these shapes."""
    aspect = median_aspect(shapes)
    if variant == "default":
        return input_size(shapes)[0]
    if variant == "square":
        return (224, 224)
    if variant == "shape-long":
        return size_for_aspect(aspect)
    rows = max(1, round(np.sqrt(256 * aspect)))  # the square's 16 x 16 patches, shaped like the shots
    return rows * 14, max(1, round(256 / rows)) * 14


def features(category: Path, data, images: list[np.ndarray], variant: str, size: tuple[int, int], cache: Path):
    """Every image at this variant and size: frames, backbone, unit patch features, ms per frame (None: cached)."""
    fit = letterbox if variant == "letterbox" else resize_to_input
    variant = "letterbox" if variant == "letterbox" else "resized"  # square, shape and default share features
    frames = np.stack([fit(image, size) for image in tqdm(images, desc=f"{variant} {size[0]}x{size[1]}", unit="img")])
    backbone = load_backbone(TrainOptions.backbone, None, size, None)
    key = (f"{category.name}-{fingerprint(data.paths)[:16]}-{TrainOptions.backbone}-{size[0]}x{size[1]}-"
           f"{'_'.join(map(str, getattr(backbone, 'layers', [])))}-t1" + ("-letterbox" if variant == "letterbox" else ""))
    started, was_cached = time.perf_counter(), (cache / f"{key}.pt").is_file()
    patches = cached_features(backbone, frames, size, 1, cache, key)[1]
    ms = None if was_cached else round(1000 * (time.perf_counter() - started) / len(frames), 1)
    return frames, backbone, unit(patches.float().numpy()), ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--aspect-between", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="only the images whose height/width lies in [LOW, HIGH): one shape of part from a set "
                             "that mixes several")
    parser.add_argument("--cache", type=Path, default=Path("bench-out/cache"), help="frozen features kept between runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out/shape"))
    args = parser.parse_args()

    category = find_category(args.dataset_root)
    data = labelled_images(category)
    if args.aspect_between:
        low, high = args.aspect_between
        keep = [i for i, p in enumerate(data.paths) if low <= aspect_of(p) < high]
        data = LabelledSet([data.paths[i] for i in keep], data.labels[keep], [data.types[i] for i in keep])
    images = [read_image(p) for p in tqdm(data.paths, desc="reading", unit="img")]
    good = np.flatnonzero(data.labels == 0)
    done: dict[tuple, tuple] = {}
    runs = []
    for seed in args.seeds:
        shots, rng = draw_shots(good, args.shots, seed)
        test = np.setdiff1d(np.arange(len(images)), shots)
        shapes = [images[i].shape for i in shots]
        aspect = median_aspect(shapes)
        for variant in args.variants:
            size = variant_size(variant, shapes)
            fitted = (variant == "letterbox", size)  # the other variants differ only in their size
            if fitted not in done:
                done[fitted] = features(category, data, images, variant, size, args.cache)
            frames, backbone, patches, ms = done[fitted]
            bank = shots_bank(backbone, frames[shots], size, seed)
            scores = pool(knn_scores(torch.from_numpy(bank.features), torch.from_numpy(patches[test])), "top1pct")
            row = {"seed": seed, "variant": variant, "aspect": round(aspect, 3), "size": list(size),
                   "patches": patches.shape[1], "ms_per_frame": ms, **measure(data.labels[test], scores, None)}
            runs.append(row)
            print(json.dumps(row), flush=True)
    write(args, category, runs)


def write(args, category: Path, runs: list[dict]) -> None:
    meta = {"dataset": str(category), "shots": args.shots, "seeds": args.seeds, "machine": machine(),
            "backbone": TrainOptions.backbone, "aspect_between": args.aspect_between}
    only = f", images of height/width {args.aspect_between[0]} to {args.aspect_between[1]}" if args.aspect_between else ""
    lines = [f"# Input shape: {category.name}{only}, {args.shots} shots", "",
             f"Seeds {args.seeds}, {meta['machine']['cpu']} ({meta['machine']['cpu_threads']} threads). Mean over "
             "seeds; escape at 1% / 5% false-reject on the test set (oracle thresholds); ms per frame: the backbone "
             "on this machine (- where the features came from the cache).", "",
             "| variant | sizes (per seed) | patches | AUROC | AP | escape@1% | escape@5% | ms/frame |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        sizes = ", ".join(dict.fromkeys(f"{r['size'][0]}x{r['size'][1]}" for r in rs))
        ms = [r["ms_per_frame"] for r in rs if r["ms_per_frame"] is not None]
        patches = ", ".join(dict.fromkeys(str(r["patches"]) for r in rs))
        lines.append(f"| {variant} | {sizes} | {patches} | {headline_cells(rs)}"
                     + (f" | {np.mean(ms):.0f} |" if ms else " | - |"))
    write_report(args.out, "shape", {"meta": meta, "runs": runs}, lines)


if __name__ == "__main__":
    main()
