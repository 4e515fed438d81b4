"""`coft demo`: the whole flow on real solar cells, with nothing to set up.

The `elpv-dataset` package ships 2,624 electroluminescence images of solar cells, each
with a defect probability from experts. Cells rated 0 are good, 1.0 defective; the
uncertain 0.33 and 0.67 ratings are left out. The demo trains on K good cells (chosen
with the seed, as the few-shot protocol does) and evaluates on the held-out ones.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from runtime.errors import CoftError
from train.evaluate import evaluate
from train.pipeline import TrainOptions, train_bundle

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
        os.symlink(source, target)
    except OSError:
        shutil.copyfile(source, target)


def prepare_folders(work: Path, shots: int, seed: int, test_limit: int | None) -> tuple[Path, Path]:
    """Lay the cells out as a user would: train/good, and test/good + test/defect/<cell type>."""
    paths, probability, cell_type = elpv_cells()
    good = sorted((p for p, q in zip(paths, probability) if q == 0.0))
    defect = [(p, t) for p, q, t in zip(paths, probability, cell_type) if q == 1.0]
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
    for p, t in defect:
        _link(p, test_dir / "defect" / t / p.name)
    return train_dir, test_dir


def run_demo(work: str | Path, options: TrainOptions, test_limit: int | None = None) -> dict:
    work = Path(work)
    if work.exists():
        raise CoftError(f"{work}: already exists; remove it or pass --out with a new folder")
    shots = options.shots or 10
    train_dir, test_dir = prepare_folders(work, shots, options.seed, test_limit)
    log.info("demo: %d good cells to train on, held-out cells in %s", shots, test_dir)
    options.shots = None  # the training folder already holds exactly the chosen cells
    bundle = train_bundle(train_dir, work / "bundle", options)
    report = evaluate(bundle, test_dir, work / "report", progress=options.progress)
    m, r = report["metrics"], report["at_threshold"]
    print(f"\nELPV solar cells, {shots} good cells for training, method {options.method}, "
          f"{report['counts']['good']} good + {report['counts']['defect']} defective held out")
    print(f"  image AUROC {m['auroc']:.4f}  AP {m['ap']:.4f}  F1-max {m['f1_max']:.4f}")
    print(f"  at the good-only threshold ({report['threshold']['method']}): "
          f"false-reject {r['false_reject_rate']:.2%}, escape {r['escape_rate']:.2%}")
    print(f"  bundle: {bundle}\n  report: {work / 'report' / 'report.md'}")
    return report
