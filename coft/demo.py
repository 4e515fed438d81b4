"""`coft demo`: the whole flow on real solar cells, with nothing to set up.

The `elpv-dataset` package ships 2,624 electroluminescence images of solar cells, each
with a defect probability from experts. Cells rated 0 are good, 1.0 defective; the
uncertain 0.33 and 0.67 ratings are left out. The demo trains on K good cells (chosen
with the seed, as the few-shot protocol does), evaluates on the held-out ones, exports
the ONNX graph, and then runs the line: held-out cells stream through the edge runtime
as a camera, verdicts go over MQTT (an embedded broker unless --broker is given), and a
subscriber prints every reject as a PLC would see it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coft.runtime.model.errors import CoftError
from coft.train.evaluate import evaluate
from coft.train.metrics import rates_at
from coft.train.pipeline import TrainOptions, train_bundle
from coft.train.progress import bar

log = logging.getLogger(__name__)


def elpv_cells() -> tuple[list[Path], np.ndarray, list[str]]:
    """Paths of the package's cells, their defect probabilities and cell types (mono/poly)."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise CoftError("the demo needs the elpv-dataset package: pip install 'coft[train]'") from exc
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (data_dir / "labels.csv").read_text().splitlines() if line.strip()]
    return [data_dir / r[0] for r in rows], np.array([float(r[1]) for r in rows]), [r[2] for r in rows]


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(source.resolve(), target)  # a relative source (the default demo-out/) would dangle from there
    except OSError:
        shutil.copyfile(source, target)


def prepare_folders(work: Path, shots: int, seed: int, test_limit: int | None) -> tuple[Path, Path]:
    """Lay the cells out as a user would: train/good, and test/good + test/defect (ELPV rates cells as defective,
    without a defect type; mono/poly is the cell's type, not the defect's)."""
    paths, probability, cell_type = elpv_cells()
    good = sorted((p for p, q in zip(paths, probability) if q == 0.0))
    defect = [p for p, q in zip(paths, probability) if q == 1.0]
    rng = np.random.default_rng(seed)
    train_idx = set(rng.choice(len(good), shots, replace=False).tolist())
    held_good = [p for i, p in enumerate(good) if i not in train_idx]
    if test_limit:
        held_good = [held_good[i] for i in sorted(rng.choice(len(held_good), min(test_limit, len(held_good)), replace=False))]
        defect = [defect[i] for i in sorted(rng.choice(len(defect), min(test_limit, len(defect)), replace=False))]
    train_dir, test_dir = work / "data" / "train" / "good", work / "data" / "test"
    for i in sorted(train_idx):
        _link(good[i], train_dir / good[i].name)
    for p in held_good:
        _link(p, test_dir / "good" / p.name)
    for p in defect:
        _link(p, test_dir / "defect" / p.name)
    return train_dir, test_dir


class Plc:
    """Subscribes as a PLC would, prints each reject, and keeps every verdict with its arrival time."""

    def __init__(self, host: str, port: int, prefix: str):
        import paho.mqtt.client as mqtt

        self.verdicts: list[tuple[float, dict]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="coft-demo-plc")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        if message.topic.endswith("/verdict"):
            self.verdicts.append((time.time(), json.loads(message.payload)))
        elif message.topic.endswith("/reject"):
            reject = json.loads(message.payload)
            truth = "defective" if "-defect-" in (reject["part_id"] or "") else "GOOD (false reject)"
            tqdm.write(f"  PLC: reject seq {reject['seq']:4d}  part {reject['part_id']}  score {reject['score']:.3g}  [{truth}]")

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len({v["seq"] for _, v in self.verdicts}) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def line_folder(work: Path, test_dir: Path, count: int, seed: int, defect_share: float | None = 0.05) -> Path:
    """Held-out cells in a shuffled order, as parts pass a camera, with `defect_share` of them defective (a line
    runs mostly good parts; None: the held-out mix, a third defective); the file name tells the truth."""
    good = [(p, "good") for p in sorted((test_dir / "good").iterdir())]
    bad = [(p, "defect") for p in sorted((test_dir / "defect").rglob("*.png"))]
    rng = np.random.default_rng(seed)
    if defect_share is None:
        cells = good + bad
    else:
        n_bad = min(len(bad), round(defect_share * count))
        n_good = min(len(good), count - n_bad)
        cells = [good[i] for i in rng.choice(len(good), n_good, replace=False)] + \
                [bad[i] for i in rng.choice(len(bad), n_bad, replace=False)]
    order = rng.permutation(len(cells))[:count]
    line = work / "data" / "line"
    for i, k in enumerate(order):
        path, label = cells[k]
        _link(Path(os.path.realpath(path)), line / f"{i:04d}-{label}-{path.stem}.png")
    return line


def line_pace(bundle: Path, most: float = 20.0, load: float = 0.7) -> float:
    """Parts per second for the demo line: 70% of what this machine's ONNX Runtime sustains on the bundle, at most 20.

    A line is engineered so that inspection keeps up; pacing the camera faster than the
    model would only measure a growing queue."""
    from coft.runtime.engines import open_engine
    from coft.runtime.model.bundle import load_bundle

    loaded = load_bundle(bundle)
    engine = open_engine(loaded, "onnxruntime")
    frame = np.zeros((1, *loaded.input_size, 3), np.uint8)
    engine.infer(frame)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        engine.infer(frame)
        times.append(time.perf_counter() - started)
    return round(min(most, load / float(np.median(times))), 1)


def stream_through_runtime(bundle: Path, line: Path, work: Path, broker: str | None, count: int,
                           commission: int = 0) -> dict:
    """Run the edge runtime (ONNX Runtime, no torch) on the line folder, with a PLC listening; with `commission`,
    the first that many cells set the threshold (nothing fired meanwhile) before the rest are judged by it."""
    from coft.broker import EmbeddedBroker
    from coft.runtime.config import RuntimeConfig
    from coft.runtime.model.bundle import load_bundle
    from coft.runtime.pipeline import Runtime

    fps = line_pace(bundle)

    with (contextlib.nullcontext() if broker else EmbeddedBroker()) as embedded:
        host, port = (broker.rsplit(":", 1)[0], int(broker.rsplit(":", 1)[1])) if broker else ("127.0.0.1", embedded.port)
        config = RuntimeConfig.model_validate({
            "bundle": str(bundle), "backend": "onnxruntime", "queue_size": count + 1,
            "cameras": [{"name": "cam1", "source": str(line), "kind": "folder", "fps": fps}],
            "broker": {"host": host, "port": port, "line": "demo", "client_id": "coft-demo",
                       **({} if broker else {"protocol": "3.1.1"})},  # amqtt, the embedded broker, speaks 3.1.1
            "outbox": {"path": str(work / "outbox.db")},
            # the demo learns after the stream (learn_from_line), so that every cell is judged by one revision
            **({"commissioning": {"frames": commission, "learn": False}} if commission else {})})
        plc = Plc(host, port, f"{config.broker.prefix}/demo")
        started = time.time()
        Runtime(config).run(until_sources_end=True)
        plc.wait_for(count)
        plc.close()
    verdicts = [v for _, v in plc.verdicts]
    latencies = np.array([(t - v["capture_ts"]) * 1000 for t, v in plc.verdicts])
    elapsed = max(t for t, _ in plc.verdicts) - started if plc.verdicts else float("nan")
    judged = [v for v in verdicts if not v.get("commissioning")]
    return {"judged": judged, "verdicts": len({v["seq"] for v in verdicts}), "frames_per_s": len(verdicts) / elapsed,
            "paced_fps": fps,
            "commissioned": len(verdicts) - len(judged), "after": after_commissioning(judged, load_bundle(bundle)),
            "latency_p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
            "latency_p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
            "rejects": sum(v["verdict"] == "reject" for v in verdicts),
            "true_rejects": sum(v["verdict"] == "reject" and "-defect-" in v["part_id"] for v in verdicts)}


def after_commissioning(verdicts: list[dict], bundle) -> dict:
    """False-reject and escape of the cells judged after commissioning, at the bundle's threshold and at theirs."""
    labels = np.array([int("-good-" not in (v["part_id"] or "")) for v in verdicts])
    scores = np.array([v["score"] if v["score"] is not None else np.inf for v in verdicts])
    used = np.array([v["threshold"] for v in verdicts])
    return {"cells": len(verdicts), "threshold_before": bundle.threshold,
            "threshold_after": float(used[-1]) if len(used) else bundle.threshold,
            "before": rates_at(labels, scores, bundle.threshold), "after": rates_at(labels, scores, used)}


def learn_from_line(bundle: Path, line: Path, work: Path, judged: list[dict]) -> dict:
    """The loop closed: the bank grown from the commissioning cells (coft learn), with one operator mark (the first
    good cell the line rejected, sorted into good/), then the cells judged after commissioning scored again by the
    learned revision: escape at 1% false-reject and the line's rates, before and after (the marked cell left out)."""
    from coft.runtime.engines import open_engine
    from coft.runtime.line.learning import learn
    from coft.runtime.model.bundle import commissioned_revision, load_bundle
    from coft.runtime.model.images import read_image, resize_to_input
    from coft.train.metrics import detection_metrics

    model_id = load_bundle(bundle).model_id
    commissioned = commissioned_revision(bundle, model_id, ["cam1"])
    frames = work / f"commissioning-{model_id}"
    marked = next((v for v in judged if v["verdict"] == "reject" and "-good-" in v["part_id"]), None)
    if marked:
        _link(line / f"{marked['part_id']}.png", frames / "good" / f"{marked['part_id']}.png")
    learned = load_bundle(learn(commissioned, frames))
    judged = [v for v in judged if v is not marked and v["score"] is not None]
    labels = np.array([int("-good-" not in v["part_id"]) for v in judged])
    engine = open_engine(learned, "onnxruntime")
    cells = [resize_to_input(read_image(line / f"{v['part_id']}.png"), learned.input_size) for v in judged]
    after = engine.infer(np.stack(cells)).scores  # the engine batches by its graph's max_batch
    before = np.array([v["score"] for v in judged])
    sides = {"before": (before, np.array([v["threshold"] for v in judged])), "after": (after, learned.threshold)}
    return {"revision": str(learned.path), "marked": marked and marked["part_id"], "cells": len(judged),
            "learning": learned.manifest["learning"], "promise": learned.manifest["threshold"]["promise"],
            **{side: {**{k: round(float(v), 4) for k, v in detection_metrics(labels, scores).items()
                         if k in ("auroc", "escape_at_1pct_frr")}, **rates_at(labels, scores, threshold)}
               for side, (scores, threshold) in sides.items()}}


def run_demo(work: str | Path, options: TrainOptions, test_limit: int | None = None, stream: int = 600,
             broker: str | None = None, commission: int = 300, force: bool = False,
             defect_share: float | None = 0.05) -> dict:
    """Train, evaluate, export, then run the line: held-out cells through the runtime to a PLC over MQTT."""
    from coft.export.onnx import export_onnx

    work = Path(work)
    if work.exists():
        if not force:
            raise CoftError(f"{work}: already exists; pass --force to replace it, or --out with a new folder")
        if not (work / "data").is_dir() and not (work / "bundle").is_dir() and any(work.iterdir()):
            raise CoftError(f"{work}: --force replaces only an earlier demo's folder, and this one holds something "
                            "else; pass --out with a new folder")
        shutil.rmtree(work)
    shots = options.shots or 10
    steps = bar(total=4, desc="demo", unit="stage", show=options.progress)
    train_dir, test_dir = prepare_folders(work, shots, options.seed, test_limit)
    log.info("demo: %d good cells to train on, held-out cells in %s", shots, test_dir)
    options.shots = None  # the training folder already holds exactly the chosen cells
    bundle = train_bundle(train_dir, work / "bundle", options)
    steps.update()
    report = evaluate(bundle, test_dir, work / "report", progress=options.progress)
    steps.update()
    export_onnx(bundle)
    steps.update()
    if test_limit and commission:
        log.warning("demo: --test-limit balances the held-out cells 50/50, and commissioning assumes a line of mostly "
                    "good parts; commissioning is off (run without --test-limit to see it)")
        commission = 0
    line = line_folder(work, test_dir, stream, options.seed, None if test_limit else defect_share)
    count = len(list(line.iterdir()))
    if commission and count < commission + 50:
        raise CoftError(f"commissioning on {commission} cells needs at least {commission + 50} streamed: "
                        f"{count} are available; lower --commission (0: none) or raise --stream")
    tqdm.write(f"streaming {count} held-out cells through the runtime"
               + (f" ({defect_share:.0%} defective, as a line runs)" if defect_share is not None and not test_limit else "")
               + (f", the first {commission} to commission the threshold (rejects fire at the bundle's meanwhile)"
                  if commission else "")
               + "; rejects as the PLC sees them:")
    run = stream_through_runtime(bundle, line, work, broker, count, commission)
    judged = run.pop("judged")
    if run["commissioned"] and report["scorer"] == "knn":
        tqdm.write("learning: the bank grown from the commissioning cells, one false reject marked good")
        run["learned"] = learn_from_line(bundle, line, work, judged)
    steps.update()
    steps.close()
    report["line"] = run
    (work / "report" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    m, r = report["metrics"], report["at_threshold"]
    print(f"\nELPV solar cells, {shots} good cells for training, {options.backbone} {options.method} {report['scorer']}, "
          f"{report['counts']['good']} good + {report['counts']['defect']} defective held out")
    print(f"  image AUROC {m['auroc']:.4f}  AP {m['ap']:.4f}  F1-max {m['f1_max']:.4f}")
    print(f"  at the good-only threshold ({report['threshold']['method']}): "
          f"false-reject {r['false_reject_rate']:.2%}, escape {r['escape_rate']:.2%}")
    print(f"  line: {run['verdicts']} cells through the runtime at {run['frames_per_s']:.1f} frames/s "
          f"(parts paced at {run['paced_fps']}/s, 70% of this machine's inference rate), "
          f"capture-to-verdict at the PLC p50 {run['latency_p50_ms']:.0f} ms, p99 {run['latency_p99_ms']:.0f} ms; "
          f"{run['rejects']} rejects ({run['true_rejects']} truly defective)")
    if run["commissioned"]:
        a = run["after"]
        print(f"  commissioning on {run['commissioned']} streamed cells: threshold {a['threshold_before']:.4g} -> "
              f"{a['threshold_after']:.4g}; on the {a['cells']} cells after it: false-reject "
              f"{a['before']['false_reject_rate']:.2%} -> {a['after']['false_reject_rate']:.2%}, escape "
              f"{a['before']['escape_rate']:.2%} -> {a['after']['escape_rate']:.2%}")
    if "learned" in run:
        g, b, a = run["learned"], run["learned"]["before"], run["learned"]["after"]
        print(f"  learned from the line ({g['learning']['frames_in_bank']} of {g['learning']['frames']} commissioning "
              f"cells in the bank, {g['learning']['suspects']} suspects left out, marked good: {g['marked']}): on the "
              f"{g['cells']} cells after commissioning, AUROC {b['auroc']:.3f} -> {a['auroc']:.3f}, escape at 1% "
              f"false-reject {b['escape_at_1pct_frr']:.1%} -> {a['escape_at_1pct_frr']:.1%}; at the line's threshold "
              f"false-reject {b['false_reject_rate']:.2%} -> {a['false_reject_rate']:.2%}, escape "
              f"{b['escape_rate']:.2%} -> {a['escape_rate']:.2%}; {g['revision']}")
    print(f"  bundle: {bundle}\n  report: {work / 'report' / 'report.md'}")
    return report
