"""Few-shot benchmark on a real defect set, with the protocol of shared/datasets/README.md.

    python bench/fewshot.py ../shared/datasets/magnetic_tile [--shots 1 5 10] [--seeds 0 1 2 3 4]
    python bench/fewshot.py elpv ...        (the elpv-dataset package's cells: 0 good, 1.0 defective)

For each k and seed: k good training images chosen by
`np.random.default_rng(seed).choice(n_good, k, replace=False)` over the sorted good paths;
every other good image and every defective one is the test set. Methods:

- frozen:       pretrained backbone, Gaussian on N_A augmented views (no fine-tuning)
- coftad:       COFT-AD fine-tuning, L_Con + L_PP + L_NP (synthetic defects on)
- coftad-no-pp: ablation without the cross-instance positive pairs
- coftad-no-np: ablation without the synthetic-defect negative pairs
- patch-knn:    PatchCore-style reference: frozen stride-8/16 features, 3x3 averaged,
                image score = largest nearest-neighbour distance of any patch
- patch:        one shared Gaussian over the same patch features of N_A views of the good
                images, patch score = Mahalanobis distance, image score = worst patch;
                ablations: patch-top1pct (mean of the worst 1% of patches), patch-mid
                (stride-8 layer only), patch-deep (stride-16 layer only)
- patch+global: both scorers, each scaled by its own calibration scores (median and 99th
                percentile of leave-one-out scores of good views: no defect involved) and
                added; a candidate, not yet a bundle scorer
- knn:          the memory-bank scorer (train/scorers/knn.py): the shots' patch features in
                every pose (rotations/flips), greedy coreset to --cap rows, cosine distance
                to the nearest, image score = mean of the worst 1% of patches; ablations:
                knn-norot (the shots as they are), knn-l1 (first of --layers only),
                knn-full (no cap), knn-cap1024 / knn-cap4096 (smaller caps), knn-shift
                (each pose also shifted by half a patch right, down and both)
- coftad-knn:   COFT-AD fine-tuning of the last --trainable stages, then knn on its features

Nearest-neighbour similarities are computed in bfloat16 where the CPU multiplies it natively (AMX made
that 4x faster on an Intel Xeon; elsewhere torch emulates bf16, far slower than float32, so float32 is
used; the bundle's graph uses float32); `--fp32-knn` checks that this changes nothing.

Frozen features of every image are computed once; a fine-tuned model re-runs only its
trained last stage on the cached maps of the frozen stages (valid since those stages
and BatchNorm never change). With --pixel, the patch method's maps are scored against the
masks (pixel AUROC and PRO). Writes fewshot.json and fewshot.md under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import cpu_name, native_bf16  # noqa: E402

from coft.cli import size_argument  # noqa: E402
from coft.runtime.model.coreset import greedy_coreset  # noqa: E402
from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.runtime.model.scoring import pool  # noqa: E402
from coft.train.augment import AugmentConfig  # noqa: E402
from coft.train.backbones import Backbone, load_backbone  # noqa: E402
from coft.train.coftad import FinetuneConfig, finetune  # noqa: E402
from coft.train.embed import embed_views, to_pixels  # noqa: E402
from coft.train.evaluate import labelled_images, pixel_metrics  # noqa: E402
from coft.train.metrics import detection_metrics, per_type_auroc, rates_at  # noqa: E402
from coft.train.pipeline import TrainOptions, fingerprint, resolve_device  # noqa: E402
from coft.train.scorers.gaussian import (
    fit_gaussian,  # noqa: E402
    global_fit,  # noqa: E402
)
from coft.train.scorers.knn import DEFAULT_CAP, bank_views, fit_and_calibrate, knn_fit  # noqa: E402
from coft.train.scorers.patch import (  # noqa: E402
    BLUR_SIGMA,
    calibration_views,
    fit_patch_gaussian,
    patch_fit,
    patch_views,
)
from coft.train.shape import input_size  # noqa: E402
from coft.train.threshold import calibration_scores, good_only_threshold, threshold_from_scores  # noqa: E402

METHODS = ("frozen", "coftad", "coftad-no-pp", "coftad-no-np", "patch-knn", "patch", "patch-top1pct", "patch-mid",
           "patch-deep", "patch+global", "knn", "knn-norot", "knn-l1", "knn-full", "knn-cap1024", "knn-cap4096",
           "knn-shift", "coftad-knn")
TARGET_FRR = 0.01  # training's default --target-frr
# Channels of the concatenated patch feature that each layer ablation keeps (Lite0: 40 at stride 8, 112 at 16).
DINO_DIM = 384  # one DINOv2 layer's share of the patch feature
PATCH_LAYERS = {"patch": slice(None), "patch-top1pct": slice(None), "patch-mid": slice(0, 40), "patch-deep": slice(40, None)}


def elpv_layout(work: Path) -> Path:
    """The elpv-dataset package's cells as good/ and defect/<cell type>/ (links; probability 0 good, 1 defective)."""
    from coft.demo import _link, elpv_cells
    paths, probability, cell_type = elpv_cells()
    for path, q, kind in zip(paths, probability, cell_type):
        if q in (0.0, 1.0):
            target = work / ("good" if q == 0.0 else f"defect/{kind}") / path.name
            if not target.exists():
                _link(path, target)
    return work


def find_category(root: Path) -> Path:
    """Accept the category folder itself or a set folder holding exactly one category ('elpv': the pip package)."""
    if str(root) == "elpv":
        return elpv_layout(Path("bench-out/elpv"))
    if (root / "good").is_dir():
        return root
    categories = [p for p in sorted(root.iterdir()) if (p / "good").is_dir()]
    if len(categories) != 1:
        sys.exit(f"{root}: expected a folder with good/ (or one category folder holding it), found {len(categories)}")
    return categories[0]


@torch.inference_mode()
def frozen_features(backbone: Backbone, frames: np.ndarray, size: tuple[int, int], trainable: int, batch: int = 16):
    """Global embeddings, patch features (float16) and the maps entering the last `trainable` stages."""
    device = next(backbone.parameters()).device
    globals_, patches, trunk = [], [], []
    for i in tqdm(range(0, len(frames), batch), desc="frozen features", unit="batch"):
        maps = backbone.feature_maps(to_pixels(list(frames[i:i + batch]), size).to(device))
        globals_.append(backbone.pool(maps[-1]).cpu())
        patches.append(backbone.patches_from_maps(maps).half().cpu())
        trunk.append(maps[-trainable - 1].cpu())
    return torch.cat(globals_).numpy(), torch.cat(patches), torch.cat(trunk)


def good_shapes(data) -> list[tuple[int, int]]:
    """(height, width) of the set's good images, read from their headers."""
    shapes = []
    for path in (p for p, label in zip(data.paths, data.labels) if label == 0):
        with Image.open(path) as image:
            shapes.append((image.height, image.width))
    return shapes


def product_size(data, asked: tuple[int, int] | None) -> tuple[int, int]:
    """--size, or the product's rule (train/shape.py) applied to the set's good images: the benchmarks share one
    feature pass over every seed's shots, so the set stands in for each seed's shots."""
    if asked:
        return asked
    size, why = input_size(good_shapes(data))
    print(f"input {size[0]}x{size[1]}: {why}", flush=True)
    return size


def cached_features(backbone: Backbone, frames: np.ndarray, size: tuple[int, int], trainable: int, cache: Path | None,
                    key: str):
    """frozen_features, kept on disk between runs of the benchmark (the ViT takes minutes per pass)."""
    path = cache / f"{key}.pt" if cache else None
    if path and path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached["globals"].numpy(), cached["patches"], cached["trunk"]
    out = frozen_features(backbone, frames, size, trainable)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"globals": torch.from_numpy(out[0]), "patches": out[1], "trunk": out[2]}, path)
    return out


def knn_scores(bank: torch.Tensor, test_patches: torch.Tensor, fp32: bool | None = None, chunk: int = 16):
    """Patch distances [n, P] of test patch features [n, P, C] to a bank [M, C] of unit rows (1 - max cosine),
    in float32 or bfloat16 (None: bfloat16 where native_bf16)."""
    dtype = torch.float32 if (not native_bf16() if fp32 is None else fp32) else torch.bfloat16
    bank_t = bank.to(dtype).T.contiguous()
    out = []
    for i in range(0, len(test_patches), chunk):
        t = test_patches[i:i + chunk]
        sims = (t.reshape(-1, t.shape[-1]).to(dtype) @ bank_t).amax(dim=1).float()
        out.append(1 - sims.view(len(t), -1))
    return torch.cat(out).numpy()


def knn_variant(method: str, args, model_layers: tuple[int, ...]):
    """(poses on, feature columns, coreset cap) of a knn method; knn@8+9 keeps blocks 8 and 9 of --layers."""
    cap = {"knn-full": 0, "knn-cap1024": 1024, "knn-cap4096": 4096}.get(method, args.cap)
    columns = slice(0, DINO_DIM) if method == "knn-l1" else slice(None)
    if method.startswith("knn@"):
        chosen = [int(b) for b in method[4:].split("+")]
        columns = np.concatenate([np.arange(DINO_DIM) + DINO_DIM * model_layers.index(b) for b in chosen])
    return method != "knn-norot", columns, cap


def method_name(text: str) -> str:
    """A known method, or knn@B[+B...] for a subset of the ViT's --layers."""
    if text in METHODS or (text.startswith("knn@") and all(b.isdigit() for b in text[4:].split("+"))):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(METHODS)}, or knn@9, knn@8+9, ...")


@torch.inference_mode()
def finetuned_patches(model: Backbone, trunk: torch.Tensor, trainable: int, batch: int = 16):
    """Patch features of a model whose last `trainable` stages were fine-tuned, from the cached maps entering them."""
    first = len(model.stages) - trainable
    if any(layer - 1 < first - 1 for layer in model.layers):
        raise SystemExit(f"--trainable {trainable} would change layers below the first of {model.layers}")
    out = []
    for i in range(0, len(trunk), batch):
        maps: list = [None] * len(model.stages)
        x = maps[first - 1] = trunk[i:i + batch].float()
        for j in range(first, len(model.stages)):
            x = maps[j] = model.stages[j](x)
        out.append(model.patches_from_maps(maps).half())
    return torch.cat(out)


def patch_knn_scores(bank: torch.Tensor, test_patches: torch.Tensor, chunk: int = 8) -> np.ndarray:
    scores = []
    for i in range(0, len(test_patches), chunk):
        t = test_patches[i:i + chunk]
        d = torch.cdist(t.reshape(-1, t.shape[-1]), bank).min(dim=1).values.view(len(t), -1)
        scores.append(d.max(dim=1).values)
    return torch.cat(scores).numpy()


@torch.inference_mode()
def tail_embeddings(backbone: Backbone, trunk_maps: torch.Tensor, batch: int = 64) -> np.ndarray:
    device = next(backbone.parameters()).device
    out = [backbone.pool(backbone.stages[-1](trunk_maps[i:i + batch].to(device))).cpu()
           for i in range(0, len(trunk_maps), batch)]
    return torch.cat(out).numpy()


def combined_scores(backbone: Backbone, pixels: torch.Tensor, test_embeddings: np.ndarray, test_patches: torch.Tensor,
                    n_views: int, augment_config: AugmentConfig, seed: int) -> np.ndarray:
    """Global plus patch score, each as (score - median) / (q99 - median) of its good-only calibration scores."""
    def scaled(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
        median = np.median(calibration)
        return (scores - median) / (np.quantile(calibration, 0.99) - median)

    global_views = embed_views(backbone, pixels, n_views, augment_config, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    patch_train = patch_views(backbone, pixels, n_views, augment_config, generator)
    patch_held = calibration_views(backbone, pixels, n_views, augment_config, generator)
    global_scores = fit_gaussian(global_views.reshape(-1, global_views.shape[2])).score(test_embeddings)
    gaussian = fit_patch_gaussian(patch_train)
    patch_scores = np.concatenate([pool(gaussian.score(test_patches[i:i + 64].numpy()))
                                   for i in range(0, len(test_patches), 64)])
    return (scaled(global_scores, calibration_scores(global_views, global_fit())[0])
            + scaled(patch_scores, calibration_scores(patch_train, patch_fit(), patch_held)[0]))


def finetune_config(method: str, args) -> FinetuneConfig:
    return FinetuneConfig(steps=args.steps, lr=args.lr, negatives=method != "coftad-no-np",
                          lambda_pp=0.0 if method == "coftad-no-pp" else 1.0, trainable_stages=args.trainable,
                          l2sp=args.l2sp)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarise(runs: list[dict]) -> dict:
    summary: dict = {}
    for run in runs:
        summary.setdefault(run["method"], {}).setdefault(str(run["k"]), []).append(run)
    table = {}
    for method, by_k in summary.items():
        table[method] = {}
        for k, rs in by_k.items():
            au, ap = np.array([r["auroc"] for r in rs]), np.array([r["ap"] for r in rs])
            types = sorted(rs[0]["per_type"])
            table[method][k] = {
                "auroc_mean": float(au.mean()), "auroc_std": float(au.std()), "ap_mean": float(ap.mean()),
                "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])), "seeds": len(rs),
                "per_type_auroc": {t: float(np.mean([r["per_type"][t] for r in rs])) for t in types},
            }
            for key in ("pixel_auroc", "pro", "false_reject_rate", "escape_rate", "escape_at_1pct_frr", "escape_at_5pct_frr"):
                if key in rs[0]:
                    values = np.array([r[key] for r in rs])
                    table[method][k] |= {f"{key}_mean": float(values.mean()), f"{key}_std": float(values.std())}
    return table


def markdown(table: dict, meta: dict) -> str:
    ks = sorted({int(k) for m in table.values() for k in m})
    lines = [f"# Few-shot benchmark: {meta['dataset']}", "",
             f"Backbone {meta['backbone']} at {meta['size'][0]}x{meta['size'][1]}, device {meta['device']}, "
             f"{meta['machine']}; COFT-AD {meta['steps']} steps, lr {meta['lr']}. Image AUROC mean ± std over seeds "
             "(AP in brackets), training seconds per model.", "",
             "| method | " + " | ".join(f"k={k}" for k in ks) + " | train s |",
             "|---|" + "---|" * (len(ks) + 1)]
    for method, by_k in table.items():
        cells = [f"{by_k[str(k)]['auroc_mean']:.3f} ± {by_k[str(k)]['auroc_std']:.3f} ({by_k[str(k)]['ap_mean']:.3f})"
                 if str(k) in by_k else "-" for k in ks]
        secs = np.mean([v["train_seconds_mean"] for v in by_k.values()])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {secs:.1f} |")
    pixel = [(m, by_k) for m, by_k in table.items() if any("pixel_auroc_mean" in v for v in by_k.values())]
    if pixel:
        lines += ["", "Pixel AUROC and PRO (up to 30% FPR) of the anomaly maps, at half the input size:", "",
                  "| method | " + " | ".join(f"k={k} pixel AUROC | k={k} PRO" for k in ks) + " |",
                  "|---|" + "---|" * (2 * len(ks))]
        for method, by_k in pixel:
            cells = [f"{by_k[str(k)]['pixel_auroc_mean']:.3f} ± {by_k[str(k)]['pixel_auroc_std']:.3f} | "
                     f"{by_k[str(k)]['pro_mean']:.3f} ± {by_k[str(k)]['pro_std']:.3f}" if str(k) in by_k else "- | -"
                     for k in ks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Escape at 1% / 5% false-reject (the oracle threshold on the test set: the best any threshold does):",
              "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for method, by_k in table.items():
        cells = [f"{by_k[str(k)]['escape_at_1pct_frr_mean']:.1%} / {by_k[str(k)]['escape_at_5pct_frr_mean']:.1%}"
                 if str(k) in by_k else "-" for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    rated = [(m, by_k) for m, by_k in table.items() if any("escape_rate_mean" in v for v in by_k.values())]
    if rated:
        lines += ["", f"At the threshold set from the k good images alone (target false-reject rate {TARGET_FRR:.0%}): "
                  "false-reject rate / escape rate on the test set:", "",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for method, by_k in rated:
            cells = [f"{by_k[str(k)]['false_reject_rate_mean']:.1%} / {by_k[str(k)]['escape_rate_mean']:.1%}"
                     if str(k) in by_k else "-" for k in ks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per defect type (AUROC, mean over seeds, largest k):", ""]
    kmax = str(max(ks))
    types = sorted({t for m in table.values() if kmax in m for t in m[kmax]["per_type_auroc"]})
    lines += ["| method | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for method, by_k in table.items():
        if kmax in by_k:
            lines.append(f"| {method} | " + " | ".join(f"{by_k[kmax]['per_type_auroc'][t]:.3f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", type=method_name, default=["knn"],
                        help="default: knn, the product's default scorer (the others are studies)")
    parser.add_argument("--backbone", default=TrainOptions.backbone, help="default: coft train's")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--size", type=size_argument, default=TrainOptions.size,
                        help="model input, 224 or HEIGHTxWIDTH as coft train takes it (default: its default)")
    parser.add_argument("--views", type=int, default=16, help="N_A augmented views per training image")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--l2sp", type=float, default=0.0)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="ViT blocks whose patch tokens are compared")
    parser.add_argument("--cap", type=int, default=DEFAULT_CAP, help="coreset cap of the knn bank (0: none)")
    parser.add_argument("--trainable", type=int, default=1, help="last stages COFT-AD trains (ViT: blocks)")
    parser.add_argument("--fp32-knn", action="store_true", help="nearest neighbours in float32 instead of bfloat16")
    parser.add_argument("--cache", type=Path, default=Path("bench-out/cache"), help="frozen features kept between runs")
    parser.add_argument("--pixel", action="store_true", help="pixel AUROC and PRO of the patch and knn maps (needs masks)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench-out/fewshot"))
    args = parser.parse_args()

    category = find_category(args.dataset_root)
    data = labelled_images(category)
    size = product_size(data, args.size)
    device = resolve_device(args.device)
    frames = np.stack([resize_to_input(read_image(p), size) for p in tqdm(data.paths, desc="reading", unit="img")])
    backbone = load_backbone(args.backbone, args.weights, size, tuple(args.layers) if args.layers else None).to(device)
    key = (f"{category.name}-{fingerprint(data.paths)[:16]}-{args.backbone}-{size[0]}x{size[1]}-"  # the files' content
           f"{'_'.join(map(str, getattr(backbone, 'layers', [])))}-t{args.trainable}")
    global_emb, patch_feats, trunk_maps = cached_features(backbone, frames, size, args.trainable, args.cache, key)
    grid = (size[0] // backbone.patch_stride, size[1] // backbone.patch_stride)
    good = np.flatnonzero(data.labels == 0)  # sorted by path, as the protocol asks
    augment_config = AugmentConfig()
    runs = []
    for k in args.shots:
        for seed in args.seeds:
            train = good[np.random.default_rng(seed).choice(len(good), k, replace=False)]
            test = np.setdiff1d(np.arange(len(frames)), train)
            labels, types = data.labels[test], [data.types[i] for i in test]
            train_pixels = to_pixels(list(frames[train]), size).to(device)
            for method in args.methods:
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                started = time.perf_counter()
                pixel = at_threshold = None
                if method.startswith("knn") or method == "coftad-knn":  # the memory-bank scorer
                    use_poses, layers, cap = knn_variant(method, args, getattr(backbone, "layers", ()))
                    augment_poses = AugmentConfig() if use_poses else AugmentConfig(hflip=False, vflip=False, rot90=False)
                    model, test_patches = backbone, patch_feats[test]
                    if method == "coftad-knn":
                        model = copy.deepcopy(backbone)
                        finetune(model, train_pixels, finetune_config(method, args), augment_config, generator, progress=False)
                        test_patches = finetuned_patches(model, trunk_maps[test], args.trainable)
                    shift = backbone.patch_stride // 2 if method == "knn-shift" else 0
                    views = bank_views(model, train_pixels, augment_poses, shift)[..., layers]
                    views = views / np.linalg.norm(views, axis=-1, keepdims=True)
                    flat = views.reshape(-1, views.shape[-1])
                    bank = torch.from_numpy(flat[greedy_coreset(flat, cap, seed)])
                    train_seconds = time.perf_counter() - started
                    test_patches = test_patches[..., torch.as_tensor(layers) if isinstance(layers, np.ndarray) else layers].float()
                    test_patches = test_patches / test_patches.norm(dim=-1, keepdim=True)
                    patch_scores = knn_scores(bank, test_patches, args.fp32_knn or None)
                    scores = pool(patch_scores, "top1pct")
                    if method == "knn":  # the shipped scorer's good-only threshold, calibrated as training does
                        _, loo = fit_and_calibrate(views, cap, "top1pct", seed)
                        value = (threshold_from_scores(loo, "leave-one-out", TARGET_FRR) if loo is not None
                                 else good_only_threshold(views, TARGET_FRR, knn_fit(cap)))["value"]
                        at_threshold = rates_at(labels, scores, value)
                    if args.pixel and method == "knn":
                        pixel = pixel_metrics(category, [data.paths[i] for i in test], labels,
                                              patch_scores.reshape(len(test), *grid), size, BLUR_SIGMA)
                elif method == "patch-knn":
                    bank = patch_feats[train].reshape(-1, patch_feats.shape[-1]).float()
                    train_seconds = time.perf_counter() - started
                    scores = patch_knn_scores(bank.float(), patch_feats[test].float())
                elif method == "patch+global":
                    scores = combined_scores(backbone, train_pixels, global_emb[test], patch_feats[test], args.views,
                                             augment_config, seed)
                    train_seconds = time.perf_counter() - started
                elif method.startswith("patch"):
                    layers = PATCH_LAYERS[method]
                    views = patch_views(backbone, train_pixels, args.views, augment_config, generator)[..., layers]
                    gaussian = fit_patch_gaussian(views)
                    train_seconds = time.perf_counter() - started
                    pooling = "top1pct" if method == "patch-top1pct" else "max"
                    patch_scores = np.concatenate([gaussian.score(patch_feats[test[i:i + 64]][..., layers].float().numpy())
                                                   for i in range(0, len(test), 64)])
                    scores = pool(patch_scores, pooling)
                    if method == "patch":  # the shipped scorer: its threshold too, calibrated as training does
                        held = calibration_views(backbone, train_pixels, args.views, augment_config, generator)
                        at_threshold = rates_at(labels, scores, good_only_threshold(
                            views, TARGET_FRR, patch_fit(pooling=pooling), held)["value"])
                    if args.pixel and method == "patch":
                        pixel = pixel_metrics(category, [data.paths[i] for i in test], labels,
                                              patch_scores.reshape(len(test), *grid), size, BLUR_SIGMA)
                else:
                    model = backbone
                    if method.startswith("coftad"):
                        model = copy.deepcopy(backbone)
                        finetune(model, train_pixels, finetune_config(method, args), augment_config, generator, progress=False)
                    views = embed_views(model, train_pixels, args.views, augment_config, generator)
                    gaussian = fit_gaussian(views.reshape(-1, views.shape[2]))
                    train_seconds = time.perf_counter() - started
                    test_emb = global_emb[test] if model is backbone else tail_embeddings(model, trunk_maps[test])
                    scores = gaussian.score(test_emb)
                    at_threshold = rates_at(labels, scores, good_only_threshold(views, TARGET_FRR, global_fit())["value"])
                metrics = detection_metrics(labels, scores)
                per_type = per_type_auroc(labels, scores, types)
                run = {"method": method, "k": k, "seed": seed, "auroc": metrics["auroc"], "ap": metrics["ap"],
                       "escape_at_1pct_frr": metrics["escape_at_1pct_frr"], "escape_at_5pct_frr": metrics["escape_at_5pct_frr"],
                       "train_seconds": round(train_seconds, 2), "per_type": per_type, **(pixel or {}),
                       **(at_threshold or {})}
                runs.append(run)
                shown = f" pixel AUROC {pixel['pixel_auroc']:.4f} PRO {pixel['pro']:.4f}" if pixel else ""
                print(f"k={k} seed={seed} {method:13s} AUROC {run['auroc']:.4f} AP {run['ap']:.4f}{shown} "
                      f"train {train_seconds:.1f}s", flush=True)
    meta = {"dataset": str(category), "backbone": args.backbone, "size": size, "device": str(device),
            "layers": list(getattr(backbone, "layers", [])), "cap": args.cap, "trainable": args.trainable,
            "knn_precision": "float32" if args.fp32_knn or not native_bf16() else "bfloat16",
            "machine": machine(), "steps": args.steps, "lr": args.lr, "l2sp": args.l2sp, "views": args.views,
            "n_good": int(len(good)), "n_defect": int((data.labels == 1).sum())}
    table = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fewshot.json").write_text(json.dumps({"meta": meta, "summary": table, "runs": runs}, indent=2) + "\n")
    (args.out / "fewshot.md").write_text(markdown(table, meta))
    print(markdown(table, meta))


if __name__ == "__main__":
    main()
