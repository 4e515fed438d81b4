"""Speed and accuracy of the fused scoring kernel against unfused torch ops, on this machine's GPU.

    python bench/kernel.py [--dim 1280] [--batches 1 8 64 256] [--patch-batches 1 8 16 64]
                           [--knn-batches 1 8 64] [--bank 16384]

Global scorer: raw embeddings [N, D] in, one score per image out (L2 normalisation,
centring, product with the Cholesky factor, reduction). Patch scorer: raw patch features
[N, P, 152] in, a score per patch and each image's worst patch out. knn scorer: unit
DINOv2 patch features [N, 256, 384] against a memory bank of --bank rows, a cosine
distance per patch and each image's mean of its worst 1% out. Both sides read device
memory and write device memory; the unfused reference is the same arithmetic as separate
torch kernels (what PyTorch eager runs). Times are GPU time per call from CUDA events over
calls queued back to back (see gpu_time_us), plus the median of single timed calls (what
one frame waits, launch included). Accuracy is the largest relative error against the numpy reference in runtime/.
Prints a markdown table and writes kernel.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pycuda
import pycuda.autoprimaryctx  # noqa: F401  (shares the CUDA context with torch)
import pycuda.driver as cuda
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coft.runtime.engines.fused_nearest import FusedNearest  # noqa: E402
from coft.runtime.engines.fused_scoring import FusedScorer  # noqa: E402
from coft.runtime.model.scoring import Gaussian, MemoryBank, pool, pooled_patches  # noqa: E402

HOLD_CYCLES = 400_000_000  # about 0.2 s of GPU sleep at 2 GHz: longer than queueing the calls takes
PATCH_DIM, PATCHES = 152, 784  # Lite0 patch features at 224 px: 28 x 28 stride-8 patches
KNN_DIM, KNN_PATCHES = 384, 256  # DINOv2 ViT-S/14 block-9 tokens at 224 px: 16 x 16 patches


def random_gaussian(dim: int, normalised: bool, rng: np.random.Generator) -> Gaussian:
    """A well-conditioned Gaussian of the right size; the kernel's speed does not depend on its values."""
    a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    precision = a @ a.T + np.eye(dim)
    mean = rng.normal(size=dim) / np.sqrt(dim) if normalised else rng.normal(size=dim)
    return Gaussian(mean.astype(np.float32), precision.astype(np.float32),
                    np.linalg.cholesky(precision).astype(np.float32), normalised)


def gpu_time_us(call, repeats: int) -> tuple[float, float, bool]:
    """(GPU µs per call, median µs of single timed calls, whether the launches were hidden).

    For the first figure every call is queued while a sleeping kernel holds the GPU, so
    the calls then run back to back and the events time the GPU alone, not how fast
    Python launches. The second is what one frame waits, launch included."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    held, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    held.record()
    torch.cuda._sleep(HOLD_CYCLES)
    start.record()
    queued = time.perf_counter()
    for _ in range(repeats):
        call()
    queued = time.perf_counter() - queued
    end.record()
    torch.cuda.synchronize()
    hidden = queued * 1e3 < held.elapsed_time(start)
    gpu_us = start.elapsed_time(end) * 1e3 / repeats
    singles = []
    for _ in range(200):
        start.record()
        call()
        end.record()
        end.synchronize()
        singles.append(start.elapsed_time(end) * 1e3)
    return gpu_us, float(np.median(singles)), hidden


def unfused(gaussian: Gaussian, patches: int):
    """The scoring as separate torch ops, as PyTorch eager would run it."""
    mean = torch.from_numpy(gaussian.mean).cuda()
    factor = torch.from_numpy(gaussian.cholesky).cuda()

    def score(x: torch.Tensor):
        if not patches:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = (x - mean) @ factor
        scores = d.square().sum(dim=1).sqrt()
        return (scores, scores.view(-1, patches).amax(dim=1)) if patches else (scores, None)
    return score


def bench_case(gaussian: Gaussian, n: int, patches: int, half: bool, repeats: int, rng) -> dict:
    rows = n * max(1, patches)
    host = (rng.normal(size=(rows, gaussian.dim)) + (0 if gaussian.normalised else 1)).astype(np.float32)
    x = torch.from_numpy(host).cuda()
    scores = torch.zeros(rows, device="cuda")
    image_scores = torch.zeros(n, device="cuda")
    scorer = FusedScorer(gaussian, max_batch=n, half_factor=half, patches=patches)
    pointers = [np.uintp(t.data_ptr()) for t in (x, scores, image_scores)]

    def fused():  # on the default stream, where torch's events are recorded too
        scorer.launch(pointers[0], pointers[1], n, None, pointers[2] if patches else None)

    fused_us, fused_single_us, fused_hidden = gpu_time_us(fused, repeats)
    reference = gaussian.score(host)
    error = float(np.max(np.abs(scores.cpu().numpy() - reference) / reference))
    if patches:
        worst = reference.reshape(n, patches).max(axis=1)
        error = max(error, float(np.max(np.abs(image_scores.cpu().numpy() - worst) / worst)))
    torch_score = unfused(gaussian, patches)
    torch_us, torch_single_us, torch_hidden = gpu_time_us(lambda: torch_score(x), repeats)
    return {"scorer": "patch" if patches else "global", "batch": n, "rows": rows, "dim": gaussian.dim,
            "factor": "fp16" if half else "fp32", "fused_us": fused_us, "fused_single_us": fused_single_us,
            "torch_us": torch_us, "torch_single_us": torch_single_us, "speedup": torch_us / fused_us,
            "max_rel_error": error, "launches_hidden": fused_hidden and torch_hidden}


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def bench_knn_case(bank: MemoryBank, n: int, half: bool, repeats: int, rng) -> dict:
    rows = n * KNN_PATCHES
    host = unit_rows(rng.normal(size=(rows, bank.dim)))
    x = torch.from_numpy(host).cuda()
    scores, image_scores = torch.zeros(rows, device="cuda"), torch.zeros(n, device="cuda")
    scorer = FusedNearest(bank, max_batch=n, patches=KNN_PATCHES, pooling="top1pct", half_bank=half)
    pointers = [np.uintp(t.data_ptr()) for t in (x, scores, image_scores)]
    fused_us, fused_single_us, fused_hidden = gpu_time_us(lambda: scorer.launch(*pointers[:2], n, None, pointers[2]),
                                                          repeats)
    reference = bank.score(host)
    error = float(np.max(np.abs(scores.cpu().numpy() - reference)))
    error = max(error, float(np.max(np.abs(image_scores.cpu().numpy() - pool(reference.reshape(n, -1), "top1pct")))))
    bank_t = torch.from_numpy(bank.features).cuda().T.contiguous()
    top = pooled_patches(KNN_PATCHES, "top1pct")

    def unfused_knn():
        d = 1 - (x @ bank_t).amax(dim=1)
        return d, d.view(n, -1).topk(top, dim=1).values.mean(dim=1)
    torch_us, torch_single_us, torch_hidden = gpu_time_us(unfused_knn, repeats)
    return {"scorer": "knn", "batch": n, "rows": rows, "dim": bank.dim, "factor": f"bank {len(bank)} " + ("fp16" if half else "fp32"),
            "fused_us": fused_us, "fused_single_us": fused_single_us, "torch_us": torch_us,
            "torch_single_us": torch_single_us, "speedup": torch_us / fused_us,
            "max_rel_error": error, "launches_hidden": fused_hidden and torch_hidden}  # knn: absolute error of distances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--patch-batches", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--knn-batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--bank", type=int, default=16384, help="memory-bank rows of the knn case (the default coreset cap)")
    parser.add_argument("--repeats", type=int, default=100, help="calls per timing (kept under the GPU's launch queue)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/kernel"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel.py needs a CUDA GPU (torch.cuda.is_available() is False)")

    rng = np.random.default_rng(0)
    rows = []
    for dim, patches, batches in ((args.dim, 0, args.batches), (PATCH_DIM, PATCHES, args.patch_batches)):
        gaussian = random_gaussian(dim, normalised=not patches, rng=rng)
        for half in (False, True):
            for n in batches:
                rows.append(bench_case(gaussian, n, patches, half, args.repeats, rng))
                print(json.dumps(rows[-1]), flush=True)
    bank = MemoryBank(unit_rows(rng.normal(size=(args.bank, KNN_DIM))))
    for half in (False, True):
        for n in args.knn_batches:
            rows.append(bench_knn_case(bank, n, half, args.repeats, rng))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "pycuda": pycuda.VERSION_TEXT,
            "cuda_driver": cuda.get_driver_version()}
    lines = [f"Fused scoring kernel vs unfused torch ops, {meta['gpu']} (torch {meta['torch']}, "
             f"pycuda {meta['pycuda']}); GPU µs per call, queued back to back (median of single timed calls, "
             "launch included).", "",
             "| scorer | batch | rows x D | factor / bank | fused µs | torch µs | speed-up | max error (rel.; knn abs.) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scorer']} | {r['batch']} | {r['rows']} x {r['dim']} | {r['factor']} | "
              f"{r['fused_us']:.1f} ({r['fused_single_us']:.1f}) | {r['torch_us']:.1f} ({r['torch_single_us']:.1f}) | "
              f"{r['speedup']:.1f}x | {r['max_rel_error']:.1e} |" for r in rows]
    if not all(r["launches_hidden"] for r in rows):
        lines.append("\nWARNING: the GPU ran out of queued calls in some rows; raise HOLD_CYCLES.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
