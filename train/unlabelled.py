"""`coft train --unlabelled FOLDER`: a folder dumped from the line, some parts in it defective.

FUN-AD ranks the images by how anomalous they look; the suspects are listed (CSV), shown
(a contact sheet of the top suspects) and left out, and the bundle is trained on the
rest, its manifest saying how the training set was chosen. The report folder sits
beside the bundle: `<bundle>.funad/`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from coft.runtime.model.errors import CoftError
from coft.runtime.model.images import load_folder
from coft.train.backbones import load_backbone
from coft.train.embed import to_pixels
from coft.train.evaluate import short_name
from coft.train.funad import FunadConfig, FunadResult, find_suspects
from coft.train.patches import patch_features
from coft.train.pipeline import TrainOptions, chosen_size, resolve_device, train_on

log = logging.getLogger(__name__)

SHEET_IMAGES = 24


def _contact_sheet(paths: list[Path], images: list[np.ndarray], result: FunadResult, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-result.scores)[:SHEET_IMAGES]
    cols = 6
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        ax.imshow(images[i][..., ::-1])
        flag = "SUSPECT" if result.suspects[i] else "kept"
        ax.set_title(f"{short_name(paths[i].name)}\n{result.scores[i]:.2f} {flag}", fontsize=7,
                     color="red" if result.suspects[i] else "black")
    fig.suptitle(f"Most anomalous of {len(paths)} images (cut-off {result.cutoff:.2f}; "
                 f"{int(result.suspects.sum())} suspects left out of training)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def train_unlabelled(folder: str | Path, out: str | Path, options: TrainOptions,
                     config: FunadConfig | None = None) -> tuple[Path, FunadResult]:
    out = Path(out)
    report = out.with_name(out.name + ".funad")
    for path in (out, report):
        if path.exists():
            raise CoftError(f"{path}: already exists; choose another --out or remove it first")
    config = config or FunadConfig()
    paths, images = load_folder(folder)
    asked = chosen_size(options, images)[0]
    backbone = load_backbone(options.backbone, options.weights, asked, options.layers)
    size = getattr(backbone, "size", asked)  # a ViT rounds it to its patch size
    features = patch_features(backbone.to(resolve_device(options.device)), to_pixels(images, size), coarse=True)
    result = find_suspects(features, config, options.seed, options.progress)
    kept = np.flatnonzero(~result.suspects)
    if len(kept) < 3:
        raise CoftError(f"{folder}: only {len(kept)} of {len(paths)} images look normal; nothing safe to train on")
    log.info("FUN-AD: %d of %d images are suspects; training on the other %d", int(result.suspects.sum()),
             len(paths), len(kept))

    report.mkdir(parents=True)
    ranked = np.argsort(-result.scores)
    with open(report / "suspects.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "file", "score", "suspect"])
        for rank, i in enumerate(ranked, 1):
            writer.writerow([rank, paths[i].name, f"{result.scores[i]:.4f}", int(result.suspects[i])])
    _contact_sheet(paths, images, result, report / "contact_sheet.png")
    selection = {"method": "fun-ad", "pool": len(paths), "suspects": int(result.suspects.sum()),
                 "excluded": [paths[i].name for i in np.flatnonzero(result.suspects)], "cutoff": result.cutoff,
                 "config": config.as_dict(), "rounds": result.history}
    (report / "funad.json").write_text(json.dumps(selection, indent=2) + "\n")
    bundle = train_on([paths[i] for i in kept], [images[i] for i in kept], out, options, selection)
    return bundle, result
