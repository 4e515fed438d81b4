"""Speed of the exported model on this machine: ONNX Runtime vs PyTorch eager, frame in, score out.

    python bench/backbone.py [BUNDLE] [--threads 2] [--batches 1 8] [--seconds 10]
    python bench/backbone.py BUNDLE --device cuda [--batches 1 8 64 256]

Without BUNDLE, two frozen Lite0 bundles are trained on 10 good cells of the elpv-dataset
package and exported first, one per scorer (global embedding, patch features), so the
table also gives the patch scorer's per-frame cost against the global one. Both paths run
the whole graph (preprocessing, backbone, scoring; the anomaly map for patch) on uint8
frames. Prints a markdown table and writes backbone.json under --out.

With --device cuda: the same torch module on the GPU, eager vs CUDA graphs, fp32 vs fp16
(autocast), frames already on the GPU, each batch synchronised; the fused scoring
kernel's time at that batch (bench/kernel.py) is given against the fp16 graph's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import cpu_name  # noqa: E402

from coft.export.onnx import export_onnx, inspection_model  # noqa: E402
from coft.runtime.engines import open_engine  # noqa: E402
from coft.runtime.model.bundle import load_bundle  # noqa: E402


def demo_bundle(work: Path, scorer: str = "global", backbone: str = "efficientnet_lite0") -> Path:
    """A bundle trained on 10 ELPV cells and exported: Lite0 by default, or the product's default model
    (`backbone="default"`: TrainOptions' own backbone and scorer)."""
    from coft.demo import prepare_folders
    from coft.train.pipeline import TrainOptions, train_bundle

    train_dir, _ = prepare_folders(work, shots=10, seed=0, test_limit=1)
    options = TrainOptions(progress=False) if backbone == "default" else \
        TrainOptions(backbone=backbone, method="frozen", scorer=scorer, progress=False)
    bundle = train_bundle(train_dir, work / f"bundle-{options.backbone}-{options.scorer}", options)
    export_onnx(bundle)
    return bundle


def elpv_video(path: Path, frames: int = 200, size: tuple[int, int] = (640, 480), codec: str = "mjpg") -> Path:
    """The package's first ELPV cells (good and defective, as they come) as a video at 30 fps, (width, height):
    MJPG (a USB camera's frames, decoded on the box) or raw (a machine-vision camera's: uncompressed BGR, at most
    600 MB of them, so at 2448x2048 it loops over 39 cells)."""
    import cv2

    from coft.demo import elpv_cells

    if codec == "raw":
        frames = max(10, min(frames, int(600e6 // (size[0] * size[1] * 3))))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG") if codec == "mjpg" else 0, 30, size)
    for cell in elpv_cells()[0][:frames]:
        writer.write(cv2.resize(cv2.imread(str(cell)), size))
    writer.release()
    return path


def runtime_bundle(given: Path | None, work: Path, scorer: str = "global", backbone: str = "efficientnet_lite0") -> Path:
    """What a runtime benchmark runs: the bundle given (exported first if it has no graph), or one trained on 10
    ELPV cells (`backbone="default"`: the product's default model)."""
    if given is None:
        return demo_bundle(work / "demo", scorer, backbone)
    if "onnx" not in load_bundle(given).manifest:
        export_onnx(given)
    return given


def measure(run, frames: np.ndarray, seconds: float) -> dict:
    """Per-batch latencies over `seconds` after a warm-up; throughput from the median."""
    for _ in range(3):
        run(frames)
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 5:
        t = time.perf_counter()
        run(frames)
        latencies.append(time.perf_counter() - t)
    median = float(np.median(latencies))
    return {"batch": len(frames), "median_ms": median * 1e3, "p90_ms": float(np.quantile(latencies, 0.9)) * 1e3,
            "images_per_s": len(frames) / median, "runs": len(latencies)}


def cuda_graph(run):
    """`run` captured once as a CUDA graph; the returned callable replays it (same input buffer)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture, as torch requires
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def gpu_rows(bundle, batches: list[int], seconds: float) -> list[dict]:
    """Eager vs CUDA graphs, fp32 vs fp16, per batch; the fused kernel's share beside the fp16 graph."""
    from bench.kernel import bench_case, bench_knn_case

    model = inspection_model(bundle).cuda().to(memory_format=torch.channels_last)
    h, w = bundle.input_size
    rows = []
    for batch in batches:
        frames = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device="cuda")
        for precision in ("fp32", "fp16"):
            @torch.inference_mode()
            def eager(frames=frames, half=precision == "fp16"):
                with torch.autocast("cuda", torch.float16, enabled=half):
                    return model(frames)
            for name, run in (("PyTorch eager", eager), ("CUDA graphs", cuda_graph(eager))):
                row = measure(lambda _, run=run: (run(), torch.cuda.synchronize()), frames, seconds)
                rows.append({"scorer": bundle.manifest["scorer"], "path": f"{name} {precision}", **row})
        rng = np.random.default_rng(0)
        kernel_us = (bench_knn_case(bundle.bank, batch, True, 200, rng) if bundle.manifest["scorer"] == "knn" else
                     bench_case(bundle.gaussian, batch, 0, False, 200, rng))["fused_us"]
        rows[-1]["fused_kernel_us"] = kernel_us
        rows[-1]["fused_kernel_share"] = kernel_us / (rows[-1]["median_ms"] * 1e3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-out/backbone"))
    args = parser.parse_args()
    if args.device == "cuda":
        return main_gpu(args)

    work = Path(tempfile.mkdtemp(prefix="coft-bench-"))
    bundles = [args.bundle] if args.bundle else [demo_bundle(work / s, s) for s in ("global", "patch")]
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for path in bundles:
        bundle = load_bundle(path)
        if "onnx" not in bundle.manifest:
            export_onnx(bundle.path)
            bundle = load_bundle(bundle.path)
        ort_engine = open_engine(bundle, "onnxruntime", threads=args.threads)
        model = inspection_model(bundle).to(memory_format=torch.channels_last)

        @torch.inference_mode()
        def torch_run(frames, model=model):
            return model(torch.from_numpy(frames))

        h, w = bundle.input_size
        for batch in args.batches:
            frames = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
            for name, run in (("ONNX Runtime", ort_engine.infer), ("PyTorch eager", torch_run)):
                rows.append({"scorer": bundle.manifest["scorer"], "path": name, **measure(run, frames, args.seconds)})
    meta = {"machine": cpu_name(), "threads": args.threads,
            "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
            "model": f"{bundle.manifest['backbone']['name']} {h}x{w}, frame to score"}
    lines = [f"Backbone speed, {meta['model']}, {meta['machine']} with {args.threads} threads "
             f"(ONNX Runtime {meta['onnxruntime']}, torch {meta['torch']})", "",
             "| scorer | path | batch | median ms/batch | p90 ms | images/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['scorer']} | {r['path']} | {r['batch']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
              f"{r['images_per_s']:.1f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbone.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


def main_gpu(args) -> None:
    if args.bundle is None:
        sys.exit("--device cuda needs a BUNDLE (train one with 'coft train' first)")
    bundle = load_bundle(args.bundle)
    rows = gpu_rows(bundle, args.batches, args.seconds)
    h, w = bundle.input_size
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "model": f"{bundle.manifest['backbone']['name']} {h}x{w}, frame to score"}
    lines = [f"Backbone speed on the GPU, {meta['model']}, {meta['gpu']} (torch {meta['torch']})", "",
             "| path | batch | median ms/batch | p90 ms | images/s | fused kernel µs (share) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['images_per_s']:.0f} | "
              + (f"{r['fused_kernel_us']:.1f} ({100 * r['fused_kernel_share']:.1f}%)" if "fused_kernel_us" in r else "")
              + " |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbone-gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
