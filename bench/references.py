"""What a frame is compared with, at the operating point: banks per ViT block, the shots under other light, the
image's own patches and the line's recent frames.

    python bench/references.py ../shared/datasets/bsdata [--seeds 0 1 2]     (a folder of categories)
    python bench/references.py ../shared/datasets/magnetic_tile ...          (a category folder, or a folder of them)
    python bench/references.py elpv ...

For each category and seed: k good shots as bench/fewshot.py draws them, every other image the test set, frozen
DINOv2 at the product's input size, banks of the shots in every pose cut to the product's cap by the greedy coreset,
image score the mean of the worst 1% of patches. Steps:

- knn:             block 9 alone (the default before blocks 6+9+12)
- block B:         the bank of block B's patch tokens instead
- blocks A+B(+C):  one bank per block, each block's patch distances put on one scale by the shots' own leave-one-out
                   distances (median 0, 99th percentile 1: no defect involved), averaged per patch (SuperADD)
- the product:     blocks 6+9+12 as shipped (runtime.scoring.MemoryBank's block_weights): one coreset over the
                   blocks side by side, so the rows are shared, each block searched on its own, weighted by the
                   spread of the shots' distances to the capped bank without their own rows (train/scorers/knn.py)
- light:           block 9, the bank also from the shots at 0.8x and 1.2x brightness and with camera noise (sigma 8):
                   coft train --light-views (train/augment.py)
- light + blocks:  both
- joint 6+9:       one bank over blocks 6 and 9 together (each unit, concatenated: the product's --layers 6 9), so a
                   patch's nearest neighbour is one row for both blocks; "light + joint 6+9" with the light bank
- own image:       each patch's distance the smaller of the bank's and that to the image's own 90% most normal
                   patches, its 3x3 neighbourhood left out (SNARM)
- recent frames:   the knn score judged against the 5 (or 20) most similar of the last 100 accepted frames of the stream
                   (RecentFrames below), the window seeded with the shots; a frame enters only if the line
                   accepted it (knn score at or below the 1%-false-reject threshold of the stream); "no rule": every
                   frame enters. In capture order where the category has stream.txt (BSData: pitting grows over time),
                   and in a shuffled order (the seed's)

Reported per category (and the mean over categories with defects): image AUROC, AP, escape at 1% and 5% false-reject
(oracle thresholds on the test set). Writes references.json and references.md under --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import knn_scores, machine, product_size  # noqa: E402
from learn import HEADLINE, headline_cells, measure, seed_split, unit, write_report  # noqa: E402
from tiles import category_parser, chosen_categories  # noqa: E402

from coft.runtime.model.coreset import greedy_coreset  # noqa: E402
from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.runtime.model.scoring import pool  # noqa: E402
from coft.train.augment import LIGHT_VIEWS, AugmentConfig  # noqa: E402
from coft.train.backbones import load_backbone  # noqa: E402
from coft.train.embed import to_pixels  # noqa: E402
from coft.train.evaluate import labelled_images  # noqa: E402
from coft.train.metrics import rates_at  # noqa: E402
from coft.train.pipeline import TrainOptions, fingerprint  # noqa: E402
from coft.train.scorers.knn import DEFAULT_CAP, bank_views, fit_and_calibrate, poses  # noqa: E402

BLOCKS = (6, 9, 12)
SINGLE_BLOCK = 9  # the default before blocks 6+9+12, what the other levers are set beside
DIM = 384
FUSIONS = ((6, 9), (9, 12), (6, 9, 12))
TARGET_FRR = 0.01
OWN_NORMAL = 0.9  # share of an image's patches, the lowest by bank distance, that serve as its own references


# -- the line's recent frames as references (MuSc's RsCIN made causal). Measured here, not shipped: it lost on every
# set (docs/accuracy.md). A frame unlike the shots but like the line's recent good frames scores high against the
# bank alone, and so do its look-alikes; judged relative to them, what they share falls away. Only the past is used,
# and only frames the line accepted enter the window. A frame's look: the mean of its unit patch features.
WINDOW = 100  # recent accepted frames kept per camera
NEIGHBOURS = 5  # most similar of them a score is judged against


class RecentFrames:
    """A bounded window of accepted frames' descriptors and image scores, seeded with the shots."""

    def __init__(self, descriptors: np.ndarray, scores: np.ndarray, window: int = WINDOW,
                 neighbours: int = NEIGHBOURS):
        """`descriptors` [k, C] and leave-one-out `scores` [k] of the shots: the window's first members and the
        level a frame like them is expected to score."""
        if len(descriptors) != len(scores) or not len(scores):
            raise ValueError(f"{len(descriptors)} descriptors for {len(scores)} shot scores: give one per shot")
        self.window, self.neighbours = max(window, len(scores)), neighbours
        self.baseline = float(np.median(scores))
        self._descriptors = np.zeros((self.window, descriptors.shape[1]), dtype=np.float32)
        self._scores = np.zeros(self.window, dtype=np.float32)
        self._filled, self._next = 0, 0
        for descriptor, score in zip(descriptors, scores):
            self.admit(descriptor, float(score))

    def __len__(self) -> int:
        return self._filled

    def reference(self, descriptor: np.ndarray) -> float:
        """Mean score of the `neighbours` window members most similar to this descriptor."""
        similarity = self._descriptors[:self._filled] @ descriptor
        k = min(self.neighbours, self._filled)
        nearest = np.argpartition(-similarity, k - 1)[:k]
        return float(self._scores[nearest].mean())

    def rescore(self, descriptor: np.ndarray, score: float) -> float:
        """The image score judged against the frame's recent look-alikes instead of the shots alone."""
        return score - (self.reference(descriptor) - self.baseline)

    def admit(self, descriptor: np.ndarray, score: float) -> None:
        """An accepted, unmarked frame joins the window; the oldest leaves when it is full."""
        self._descriptors[self._next] = descriptor
        self._scores[self._next] = score
        self._next = (self._next + 1) % self.window
        self._filled = min(self._filled + 1, self.window)


def descriptor(patch_features: np.ndarray) -> np.ndarray:
    """A frame's look: the mean of its unit patch features [P, C], unit length."""
    mean = patch_features.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def per_block(features: np.ndarray) -> dict[int, np.ndarray]:
    """Unit patch features [..., P, DIM] of each block from the backbone's concatenation."""
    return {b: unit(features[..., i * DIM:(i + 1) * DIM].astype(np.float32)) for i, b in enumerate(BLOCKS)}


@torch.inference_mode()
def frame_features(backbone, frames: np.ndarray, size: tuple[int, int], batch: int = 16) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(frames), batch), desc=f"ViT at {size[0]}x{size[1]}", unit="batch", leave=False):
        out.append(backbone.patch_features(to_pixels(list(frames[i:i + batch]), size)).half().numpy())
    return np.concatenate(out)


def joint(by_block: dict[int, np.ndarray]) -> np.ndarray:
    """Blocks 6 and 9 as the product's --layers 6 9 makes them: each unit, concatenated, unit again."""
    return np.concatenate([by_block[6], by_block[9]], axis=-1) / np.sqrt(2)


def cached(category: Path, paths: list[Path], compute, size: tuple[int, int]) -> np.ndarray:
    """The frames' patch features, kept under bench-out/cache between runs (a pass takes minutes)."""
    key = f"{category.name}-{fingerprint(paths)[:16]}-{size[0]}x{size[1]}-{'_'.join(map(str, BLOCKS))}"
    path = Path("bench-out/cache") / f"references-{key}.npy"
    if path.is_file():
        return np.load(path)
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def bank(rows: np.ndarray, seed: int, dim: int = DIM) -> torch.Tensor:
    flat = np.ascontiguousarray(rows.reshape(-1, dim), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(flat[greedy_coreset(flat, DEFAULT_CAP, seed)]))


def leave_one_out(views: np.ndarray) -> np.ndarray:
    """Each shot's patch distances [k, P] to the other shots in every pose (no cap): scores no defect touched."""
    k = len(views)
    return np.stack([knn_scores(torch.from_numpy(np.ascontiguousarray(views[np.arange(k) != i].reshape(-1, DIM))),
                                torch.from_numpy(views[i, :1]))[0] for i in range(k)])


def own_image(distances: np.ndarray, patches: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Patch distances [n, P]: the smaller of the bank's and that to the image's own most normal patches."""
    h, w = grid
    near = F.max_pool2d(torch.eye(h * w).view(h * w, 1, h, w), 3, 1, 1).view(h * w, h * w).bool().numpy()
    out = np.empty_like(distances)
    for i in range(len(distances)):
        normal = distances[i] <= np.quantile(distances[i], OWN_NORMAL)
        similarity = patches[i] @ patches[i].T
        similarity[:, ~normal] = -1
        similarity[near] = -1
        out[i] = np.minimum(distances[i], 1 - similarity.max(axis=1))
    return out


def fused(distances: dict[int, np.ndarray], loo: dict[int, np.ndarray], blocks: tuple[int, ...]) -> np.ndarray:
    """Per-patch mean of each block's distances on the scale of the shots' leave-one-out distances."""
    scaled = []
    for b in blocks:
        median, high = np.median(loo[b]), np.quantile(loo[b], 0.99)
        scaled.append((distances[b] - median) / max(high - median, 1e-6))
    return np.mean(scaled, axis=0)


def product_bank(views: dict[int, np.ndarray], features: dict[int, np.ndarray], test: np.ndarray, seed: int
                 ) -> np.ndarray:
    """Patch distances [n, P] of the test frames as the shipped bank gives them (train/scorers/knn.py)."""
    side_by_side = np.concatenate([views[b] for b in BLOCKS], axis=-1) / np.sqrt(len(BLOCKS))
    fitted, _ = fit_and_calibrate(side_by_side.astype(np.float32), DEFAULT_CAP, "top1pct", seed, blocks=len(BLOCKS))
    frames = np.concatenate([features[b][test] for b in BLOCKS], axis=-1).astype(np.float32) / np.sqrt(len(BLOCKS))
    return fitted.score(frames)


def recent_frames(scores: np.ndarray, descriptors: np.ndarray, order: np.ndarray, shots: tuple[np.ndarray, np.ndarray],
                  admit_at: float | None, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Each frame's score judged against the recent frames before it in `order`; `admit_at`: the line's threshold
    (None: every frame enters)."""
    window = RecentFrames(*shots, neighbours=neighbours)
    out = np.empty_like(scores)
    for i in order:
        out[i] = window.rescore(descriptors[i], float(scores[i]))
        if admit_at is None or scores[i] <= admit_at:
            window.admit(descriptors[i], float(scores[i]))
    return out


def capture_order(category: Path, paths: list[Path], test: np.ndarray) -> np.ndarray | None:
    """Positions in `test` in capture order (stream.txt), or None where the category has none."""
    listing = category / "stream.txt"
    if not listing.is_file():
        return None
    where = {p.resolve(): i for i, p in enumerate(paths)}
    position = {j: n for n, j in enumerate(test)}
    ordered = [where[(category / line.strip()).resolve()] for line in listing.read_text().splitlines() if line.strip()]
    return np.array([position[j] for j in ordered if j in position])


def category_features(category: Path):
    """A category's labelled images, the product's input size, its frames at that size, the ViT to blocks 6, 9 and
    12, its patch grid and every frame's unit patch features per block (cached)."""
    data = labelled_images(category)
    size = product_size(data, None)
    frames = np.stack([resize_to_input(read_image(p), size)
                       for p in tqdm(data.paths, desc=f"{category.name}: reading", unit="img", leave=False)])
    backbone = load_backbone(TrainOptions.backbone, None, size, BLOCKS)
    grid = (size[0] // backbone.patch_stride, size[1] // backbone.patch_stride)
    features = per_block(cached(category, data.paths, lambda: frame_features(backbone, frames, size), size))
    return data, size, frames, backbone, grid, features


def measure_category(category: Path, args) -> list[dict]:
    data, size, frames, backbone, grid, features = category_features(category)
    rows = []
    for seed in args.seeds:
        shots, rng, test, labels = seed_split(data.labels, args.shots, seed)
        base = {"category": category.name, "seed": seed, "good": int((labels == 0).sum()),
                "defective": int(labels.sum())}
        if not labels.sum():
            rows.append(base)
            continue
        pixels = to_pixels(list(frames[shots]), size)
        with torch.inference_mode():  # coft train --light-views' bank views: every pose under each light, light-major
            lit = per_block(bank_views(backbone, pixels, AugmentConfig(**LIGHT_VIEWS)))
        square = size[0] == size[1]
        plain = {b: views[:, :len(poses(AugmentConfig(), square))] for b, views in lit.items()}  # the first light: as is
        loo = {b: leave_one_out(plain[b]) for b in BLOCKS}
        plain_d, lit_d = {}, {}
        for b in BLOCKS:
            test_rows = torch.from_numpy(features[b][test])
            plain_d[b] = knn_scores(bank(plain[b], seed), test_rows)
            lit_d[b] = knn_scores(bank(lit[b], seed), test_rows)
        maps = {"knn": plain_d[SINGLE_BLOCK], **{f"block {b}": plain_d[b] for b in BLOCKS if b != SINGLE_BLOCK}}
        maps.update({"blocks " + "+".join(map(str, f)): fused(plain_d, loo, f) for f in FUSIONS})
        maps["light"] = lit_d[SINGLE_BLOCK]
        maps.update({"light + blocks " + "+".join(map(str, f)): fused(lit_d, loo, f) for f in FUSIONS})
        for name, views in (("joint 6+9", plain), ("light + joint 6+9", lit)):  # one bank over both blocks' tokens
            maps[name] = knn_scores(bank(joint(views), seed, 2 * DIM), torch.from_numpy(joint(features)[test]))
        maps["own image"] = own_image(plain_d[SINGLE_BLOCK], features[SINGLE_BLOCK][test], grid)
        maps["the product: blocks 6+9+12, shared rows"] = product_bank(plain, features, test, seed)
        scores = {name: pool(m, "top1pct") for name, m in maps.items()}

        looks = np.stack([descriptor(p) for p in features[SINGLE_BLOCK][test]])
        shot_looks = np.stack([descriptor(p) for p in features[SINGLE_BLOCK][shots]])
        seeded = (shot_looks, pool(loo[SINGLE_BLOCK], "top1pct"))
        line_threshold = float(np.quantile(scores["knn"][labels == 0], 1 - TARGET_FRR))
        orders = {"shuffled": rng.permutation(len(test))}
        chronological = capture_order(category, data.paths, test)
        if chronological is not None:
            orders = {"capture order": chronological, **orders}
        for name, order in orders.items():
            scores[f"recent frames, {name}"] = recent_frames(scores["knn"], looks, order, seeded, line_threshold)
            scores[f"recent frames, {name}, no rule"] = recent_frames(scores["knn"], looks, order, seeded, None)
            scores[f"recent frames, {name}, 20 nearest"] = recent_frames(scores["knn"], looks, order, seeded,
                                                                         line_threshold, 20)
        for step, s in scores.items():
            row = {**base, "step": step, **measure(labels, s, None)}
            rows.append(row)
            print(row, flush=True)
        escaped = labels == 1
        admitted = rates_at(labels, scores["knn"], line_threshold)
        print(f"{category.name} seed {seed}: the line's threshold lets {admitted['escape_rate']:.1%} of "
              f"{int(escaped.sum())} defects into the window", flush=True)
    return rows


def main() -> None:
    args = category_parser(__doc__, "bench-out/references").parse_args()
    write(args, [row for category in chosen_categories(args) for row in measure_category(category, args)])


def write(args, runs: list[dict], report: str = "references") -> None:
    measured = [r for r in runs if "auroc" in r]
    names = list(dict.fromkeys(r["category"] for r in measured))
    steps = list(dict.fromkeys(r["step"] for r in measured))
    lines = [f"# What a frame is compared with: {args.dataset}, {args.shots} shots, seeds {args.seeds}", "",
             f"{machine()['cpu']}. Mean over seeds (and over the {len(names)} categories with defects in the last "
             "rows); escape at 1% / 5% false-reject on the test set (oracle thresholds).", "",
             "| category | step | " + " | ".join(HEADLINE) + " |", "|---|---|" + "---|" * len(HEADLINE)]
    for name in names:
        for step in steps:
            rs = [r for r in measured if r["category"] == name and r["step"] == step]
            if rs:
                lines.append(f"| {name} | {step} | {headline_cells(rs)} |")
    if len(names) > 1:
        for step in steps:
            per = [[r for r in measured if r["category"] == n and r["step"] == step] for n in names]
            per = [p for p in per if p]
            means = {k: np.mean([np.mean([r[k] for r in p]) for p in per]) for k in HEADLINE}
            worst = min(np.mean([r["auroc"] for r in p]) for p in per)
            lines.append(f"| **mean of {len(per)}** | {step} | " + " | ".join(f"{means[k]:.3f}" for k in HEADLINE)
                         + f" (worst AUROC {worst:.3f}) |")
    write_report(args.out, report, {"meta": {"dataset": args.dataset, "machine": machine(), "shots": args.shots,
                                                   "seeds": args.seeds, "cap": DEFAULT_CAP, "blocks": BLOCKS},
                                          "runs": runs}, lines)


if __name__ == "__main__":
    main()
