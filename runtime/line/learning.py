"""`coft learn BUNDLE FOLDER`: on the box, a knn bundle's bank grown from the line's own frames, as a new revision.

The folder: the commissioning frames, a harvest (each frame's verdict JSON beside it),
or any plain folder of frames; frames sorted into `good/` and `defect/` count as an
operator's word (the live view's "good part" and "real defect" marks file them there).
The bundle's own engine gives the frames' patch features, so this needs ONNX Runtime and
numpy, not torch; runtime/model/bank_growth.py decides what enters the bank, and the marked
defects' worst patches become defect rows that raise the score of patches like them.
The revision carries the grown bank, the graph with that bank and those rows as its
constants (checked against the bank in numpy before it is sealed), the threshold fitted
again with its promise, and what was added and dropped; `<revision>.learn.csv` lists
every frame.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coft.runtime.model.bank_growth import Growth, LearnConfig, grow, with_marked_defects
from coft.runtime.model.bundle import BANK, Bundle, load_bundle, next_revision, require_graph, revise, room_for, sha256
from coft.runtime.model.errors import CoftError, NoRoom
from coft.runtime.model.frames import LineFrames, line_frames
from coft.runtime.model.images import read_image, resize_to_input
from coft.runtime.model.promise import describe
from coft.runtime.model.scoring import BANK_CONSTANT, DEFECTS_CONSTANT, MemoryBank, pool
from coft.runtime.model.threshold import MIN_FRAMES, fit_threshold

log = logging.getLogger(__name__)

BATCH = 16


def patch_features(engine, bundle: Bundle, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The frames' patch features [n, P, C] and scores [n] from the bundle's engine, and which of `paths` were
    readable."""
    size = bundle.input_size
    features, scores, readable = [], [], []
    for start in range(0, len(paths), BATCH):
        batch = []
        for i in range(start, min(start + BATCH, len(paths))):
            image = read_image(paths[i])
            if image is not None:  # read_image said why where not
                batch.append(resize_to_input(image, size))
                readable.append(i)
        if batch:
            inference = engine.infer(np.stack(batch))
            features.append(inference.embeddings.astype(np.float32))
            scores.append(inference.scores)
        if (start // BATCH + 1) % max(1, len(paths) // BATCH // 10) == 0:
            log.info("learn: patch features, %d / %d frames", min(start + BATCH, len(paths)), len(paths))
    if not features:
        raise CoftError(f"none of the {len(paths)} frames could be read; check that they are not corrupt")
    return np.concatenate(features), np.concatenate(scores).astype(np.float64), readable


def graph_with_bank(onnx_path: Path, bank: MemoryBank, out: Path) -> None:
    """The bundle's graph with another bank and defect rows as its constants; shapes that named the old sizes are
    dropped (they are optional), so ONNX Runtime and TensorRT infer them again."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    constants = {c.name: c for c in model.graph.initializer}
    if BANK_CONSTANT not in constants:
        raise CoftError(f"{onnx_path}: no memory-bank constant {BANK_CONSTANT} in the graph; export the bundle again "
                        "with this version ('coft export')")
    replaced = {BANK_CONSTANT: bank.graph_constant(bank.features)}
    if DEFECTS_CONSTANT in constants:
        replaced[DEFECTS_CONSTANT] = bank.graph_constant(bank.defect_rows)
    elif bank.defects is not None:
        raise CoftError(f"{onnx_path}: the graph has no defect rows ({DEFECTS_CONSTANT}) for the marked defects; "
                        "export the bundle again with this version ('coft export')")
    old_sizes = set()
    for name, value in replaced.items():
        old_sizes.add(constants[name].dims[-1])  # the rows: [C, rows] or, a bank per block, [B, C / B, rows]
        constants[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
    shapes = [v for v in model.graph.value_info
              if not old_sizes & {d.dim_value for d in v.type.tensor_type.shape.dim}]
    del model.graph.value_info[:]
    model.graph.value_info.extend(shapes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _check_graph(path: Path, frames: np.ndarray, expected: np.ndarray) -> None:
    """The new graph must score as the grown bank does in numpy, or the revision is not written."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["score"], {"frame": frames})[0]
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise CoftError(f"the graph with the grown bank scores {got[:3]} where the bank gives {expected[:3]}; "
                        "the bundle's graph is not the one its manifest describes: export it again")


def _frames_csv(path: Path, frames: LineFrames, readable: list[int], growth: Growth) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "line_rejected", "score_before", "score_after", "offered", "rows_in_bank"])
        rows_in_bank = np.bincount(growth.owner[growth.owner >= 0], minlength=len(readable))
        for j, i in enumerate(readable):
            writer.writerow([frames.paths[i], frames.labels[i], int(frames.rejected[i]), f"{growth.scores_before[j]:.6g}",
                             f"{growth.scores_after[j]:.6g}", int(growth.offered[j]), int(rows_in_bank[j])])


def learn(bundle_dir: str | Path, folder: str | Path, out: str | Path | None = None, camera: str | None = None,
          target: float | None = None, config: LearnConfig | None = None, threads: int = 0,
          room: Callable[[Path, int, str], bool] | None = None) -> Path:
    """Grow the bundle's bank from the frames in `folder` and write the result as a new revision; returns its path.
    `room(folder, bytes, writer)`: whether the disk may take the revision (the runtime's reserve for verdicts);
    without it, the disk's free space decides. Either way a refusal is one line and nothing is written."""
    from coft.runtime.engines.onnxruntime import OnnxRuntimeEngine

    bundle = load_bundle(bundle_dir)
    if bundle.spec.scorer != "knn":
        raise CoftError(f"{bundle.path}: coft learn grows a memory bank, and this bundle's scorer is "
                        f"{bundle.spec.scorer}; train it with --scorer knn (the default)")
    require_graph(bundle.manifest, bundle.path)
    graph = bundle.spec.onnx
    assert graph is not None  # require_graph refused a bundle without one
    folder = Path(folder)
    frames = line_frames(folder, bundle.model_id, camera)
    out = Path(out) if out else next_revision(bundle.path.resolve(), bundle.model_id)[0]
    if out.exists():
        raise CoftError(f"{out}: already exists; choose another --out or remove it first")
    cap = (bundle.spec.knn.coreset_cap if bundle.spec.knn else None) or LearnConfig.cap
    config = config or LearnConfig(cap=cap)
    engine = OnnxRuntimeEngine(bundle, threads)
    patches, scores, readable = patch_features(engine, bundle, frames.paths)
    labels = np.array([frames.labels[i] for i in readable])
    good, defect = labels == "good", labels == "defect"
    barred = defect | (frames.rejected[readable] & ~good)  # the line's rejects, unless an operator said good
    threshold = bundle.spec.threshold
    pooling = bundle.patch.pooling
    commissioned = bundle.spec.commissioning is not None  # before that, its threshold is an estimate
    bank = with_marked_defects(bundle.bank, patches[defect])
    growth = grow(bank, patches, pooling, good, barred, config,
                  reject_above=threshold.value if commissioned else None, scores=scores, tiling=bundle.tiling)
    target = target or threshold.target_false_reject_rate or 0.01
    calibration = growth.scores_after[~defect]
    if len(calibration) < MIN_FRAMES:
        raise CoftError(f"{folder}: {len(calibration)} frames not sorted as defects; the threshold of a grown bank "
                        f"is fitted on at least {MIN_FRAMES}: give more frames")
    fitted = fit_threshold(calibration, target, good=good[~defect])
    fitted.update(method="learn-conformal", previous=threshold.value)
    growth.report.update(folder=str(folder), camera=frames.camera, unreadable=len(frames.paths) - len(readable),
                         sorted_defects=int(defect.sum()), line_rejects=int(frames.rejected[readable].sum()),
                         engine=engine.name, precision=engine.precision)
    stage = out.with_name(f".{out.name}.graph")
    onnx_file = graph.file
    bank_bytes = growth.bank.features.nbytes + (growth.bank.defects.nbytes if growth.bank.defects is not None else 0)
    need = (bundle.path / onnx_file).stat().st_size + 2 * bank_bytes  # a new graph with the bank in it, and bank.npz
    if room is None:
        room_for(out.parent, need, f"the revision {out.name}")
    elif not room(out.parent, need, "learn"):
        raise NoRoom(f"the revision {out.name} ({need / 2**20:.0f} MB) would take disk space kept for verdicts "
                        "(outbox.reserve_mb); not written: free disk space or keep the models on another disk")
    try:
        graph_with_bank(bundle.path / onnx_file, growth.bank, stage)
        images = [read_image(frames.paths[i]) for i in readable[:2]]
        if any(image is None for image in images):
            raise CoftError(f"{folder}: frames changed while it learned; run it again")
        sample = np.stack([resize_to_input(image, bundle.input_size) for image in images if image is not None])
        _check_graph(stage, sample, pool(growth.bank.score(patches[:2]), pooling, bundle.tiling))
        changes = {"threshold": fitted, "learning": growth.report,
                   "knn": {**bundle.manifest["knn"], "bank_size": len(growth.bank)}}
        engine_info = bundle.manifest.get("engine")
        if engine_info:  # the engine computes the patch features only (the fused kernel reads bank.npz): still valid
            changes["engine"] = {**engine_info, "onnx_sha256": sha256(stage)}
        revision = revise(bundle.path, changes, out, files={
            BANK: growth.bank.save,
            onnx_file: lambda path: stage.replace(path)})
    except OSError as exc:  # the disk filled after all (another writer), or the folder went read-only
        raise CoftError(f"the revision {out.name} could not be written ({exc.strerror}); nothing of it is kept: "
                        f"check the disk of {out.parent}") from None
    finally:
        stage.unlink(missing_ok=True)
    _frames_csv(revision.with_name(revision.name + ".learn.csv"), frames, readable, growth)
    r = growth.report
    log.info("learn: %d frames, %d of them in the bank (%d the line rejected or an operator sorted as defects, %d "
             "suspects left out); bank %d -> %d rows (%d added, %d of the old dropped); threshold %.5g -> %.5g, %s",
             r["frames"], r["frames_in_bank"], r["barred"], r["suspects"], r["bank_rows_before"], r["bank_rows_after"],
             r["rows_added"], r["rows_dropped"], threshold.value, fitted["value"], describe(fitted))
    return revision
