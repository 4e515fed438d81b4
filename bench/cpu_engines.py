"""CPU engines side by side on the exported graph: ONNX Runtime, OpenVINO f32 and bf16 (and any --extra graph).

    python bench/cpu_engines.py ../shared/datasets/magnetic_tile [--threads 2] [--rounds 5]
    python bench/cpu_engines.py elpv ...             (the elpv-dataset package's cells)

A bundle of the product's default (10 good shots, seed 0, `coft train` as shipped) and one of
EfficientNet-Lite0 (the fast backbone, patch scorer) are trained on the set and exported. Speed:
each engine scores the same 20 real frames at batch 1, the engines interleaved round by round
(so a busy machine slows them alike), median ms per frame over the rounds. Accuracy: each engine
scores every image not among the shots; reported are image AUROC, escape at 1% false-reject
(oracle threshold), false-reject and escape at the bundle's own threshold, the largest score
difference to the first engine listed, the mean cosine of the patch features to its, and the
verdicts that flip at the bundle's threshold. `--engines ... onnxruntime-int8 openvino-int8w` adds
the ViT's weights compressed to int8 (ONNX Runtime's dynamic quantisation, NNCF's weight compression:
`pip install -e '.[bench]'`). Writes
cpu_engines.json and cpu_engines.md under --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import find_category, machine  # noqa: E402
from learn import measure, write_report  # noqa: E402

from coft.export.onnx import export_onnx  # noqa: E402
from coft.runtime.engines import open_engine  # noqa: E402
from coft.runtime.model.bundle import load_bundle  # noqa: E402
from coft.runtime.model.images import read_image, resize_to_input  # noqa: E402
from coft.train.evaluate import labelled_images  # noqa: E402
from coft.train.pipeline import TrainOptions, train_bundle  # noqa: E402

ENGINES = ("onnxruntime", "openvino", "openvino-bf16", "onnxruntime-int8")
COMPRESSED = ("openvino-int8w",)  # the ViT's weights in int8 for OpenVINO; the bank's product left in float


def compressed_engine(bundle, threads: int):
    """NNCF's int8 weight compression on OpenVINO: the same engine class, another graph (measured, not shipped)."""
    import nncf
    import openvino as ov

    from coft.runtime.engines.openvino import OpenVinoEngine
    from coft.runtime.model.scoring import BANK_CONSTANT, DEFECTS_CONSTANT
    engine = OpenVinoEngine(bundle, threads)
    core = ov.Core()
    model = core.read_model(str(bundle.path / bundle.manifest["onnx"]["file"]))
    bank_ops = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul" and any(
        c in inp.get_source_output().get_node().get_friendly_name() for inp in op.inputs()
        for c in (BANK_CONSTANT, DEFECTS_CONSTANT))]
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                  ignored_scope=nncf.IgnoredScope(names=bank_ops, validate=False))
    engine.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                         "PERFORMANCE_HINT": "LATENCY"})
    engine.request = engine.compiled.create_infer_request()
    engine.name, engine.precision = "openvino-int8w", "int8"
    return engine


def patch_cosine(engine, reference, frames: np.ndarray) -> float:
    """Mean cosine between an engine's patch features and the reference engine's, on these frames."""
    a, b = engine.infer(frames).embeddings, reference.infer(frames).embeddings
    a, b = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    return round(float((a * b).sum(-1).mean()), 5)


def trained(category: Path, shots: list[Path], work: Path, options: TrainOptions) -> Path:
    name = options.backbone + (f"-tiles{options.tiles:g}" if options.tiles else "")
    folder = work / f"shots-{name}"
    folder.mkdir(parents=True)
    for i, path in enumerate(shots):
        (folder / f"{i:02d}{path.suffix}").symlink_to(path.resolve())
    bundle = train_bundle(folder, work / f"{name}.bundle", options)
    export_onnx(bundle, max_batch=8)
    return bundle


def timed(engines: dict, frames: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per frame at batch 1, the engines taking turns each round."""
    for engine in engines.values():
        engine.infer(frames[:1])  # warm-up: allocation and planning
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            started = time.perf_counter()
            for frame in frames:
                engine.infer(frame[None])
            times[name].append((time.perf_counter() - started) * 1000 / len(frames))
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def scored(engine, frames: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([engine.infer(frames[i:i + batch]).scores for i in range(0, len(frames), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: all cores)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), help=f"of {', '.join(ENGINES + COMPRESSED)}")
    parser.add_argument("--speed-only", action="store_true", help="time the engines, skip scoring the whole set")
    parser.add_argument("--tiles", type=float, default=None, metavar="SCALE",
                        help="also time the default with coft train --tiles SCALE (the frame in 224 px windows)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/cpu-engines"))
    args = parser.parse_args()

    category = find_category(args.dataset_root)
    data = labelled_images(category)
    good = np.flatnonzero(data.labels == 0)
    shots = np.random.default_rng(0).choice(good, 10, replace=False)
    test = np.setdiff1d(np.arange(len(data.paths)), shots)
    labels = data.labels[test]
    rows, speed = [], {}
    with tempfile.TemporaryDirectory() as work:
        variants = [TrainOptions(progress=False),
                    TrainOptions(backbone="efficientnet_lite0", method="frozen", scorer="patch", progress=False)]
        variants += [TrainOptions(tiles=args.tiles, progress=False)] if args.tiles else []
        for options in variants:
            bundle = load_bundle(trained(category, [data.paths[i] for i in shots], Path(work), options))
            if options.tiles:  # timed only, under its own name
                speed[f"tiles x{options.tiles:g} ({len(bundle.tiling or ())} windows)"] = timed(
                    {name: open_engine(bundle, name, args.threads) for name in args.engines if name not in COMPRESSED},
                    np.stack([resize_to_input(read_image(data.paths[i]), bundle.input_size) for i in test[:20]]),
                    args.rounds)
                continue
            engines = {name: compressed_engine(bundle, args.threads) if name in COMPRESSED
                       else open_engine(bundle, name, args.threads) for name in args.engines}
            frames = np.stack([resize_to_input(read_image(data.paths[i]), bundle.input_size) for i in test])
            speed[options.backbone] = timed(engines, frames[:20], args.rounds)
            print(options.backbone, speed[options.backbone], flush=True)
            if options.backbone != TrainOptions.backbone or args.speed_only:
                continue  # the fast backbone is timed only: its accuracy is another question (docs/accuracy.md)
            reference = None
            first = next(iter(engines.values()))
            for name, engine in engines.items():
                scores = scored(engine, frames)
                reference = scores if reference is None else reference
                flips = int(((scores > bundle.threshold) != (reference > bundle.threshold)).sum())
                row = {"engine": name, "ms_per_frame": speed[options.backbone][name],
                       **measure(labels, scores, bundle.threshold),
                       "max_score_diff": round(float(np.abs(scores - reference).max()), 6),
                       "patch_cosine": patch_cosine(engine, first, frames[:16]),
                       "score_range": [round(float(scores.min()), 4), round(float(scores.max()), 4)], "flips": flips}
                rows.append(row)
                print(row, flush=True)
    write(args, category, rows, speed)


def write(args, category: Path, rows: list[dict], speed: dict) -> None:
    meta = {"dataset": str(category), "machine": machine(), "threads": args.threads, "rounds": args.rounds}
    lite0 = speed.get("efficientnet_lite0", {})
    lines = [f"# CPU engines: {category.name}", "", f"{meta['machine']}; batch 1, median of {args.rounds} interleaved "
             "rounds over 20 real frames; accuracy on every image but the 10 shots.", "",
             "| engine | ms / frame (DINOv2 knn) | ms / frame (Lite0 patch) | AUROC | escape@1% | FRR / escape at the "
             "bundle's threshold | max score diff to the first | patch cosine | flips |",
             "|---|---|---|---|---|---|---|---|---|"]
    if not rows:  # --speed-only
        lines = lines[:4] + ["| engine | ms / frame (DINOv2 knn) | frames/s | ms / frame (Lite0 patch) | frames/s |",
                             "|---|---|---|---|---|"]
        lines += [f"| {name} | {ms} | {1000 / ms:.0f} | {lite0.get(name, '-')} | "
                  f"{1000 / lite0[name]:.0f} |" if name in lite0 else f"| {name} | {ms} | {1000 / ms:.0f} | - | - |"
                  for name, ms in speed.get(TrainOptions.backbone, {}).items()]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['ms_per_frame']} | {lite0.get(r['engine'], '-')} | {r['auroc']:.4f} | "
                     f"{r['escape_at_1pct_frr']:.1%} | {r['false_reject_rate']:.2%} / {r['escape_rate']:.1%} | "
                     f"{r['max_score_diff']:.2g} | {r['patch_cosine']:.4f} | {r['flips']} |")
    for variant in (v for v in speed if v.startswith("tiles")):
        lines += ["", f"The default with {variant}: " + ", ".join(f"{name} {ms} ms / frame"
                                                              for name, ms in speed[variant].items())]
    write_report(args.out, "cpu_engines", {"meta": meta, "rows": rows, "speed": speed}, lines)


if __name__ == "__main__":
    main()
