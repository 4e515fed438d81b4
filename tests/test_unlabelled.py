"""FUN-AD finds the defective parts hidden in an unlabelled folder and trains on the rest."""

import csv

import cv2
import numpy as np
import pytest
import torch

from coft.runtime.model.bundle import load_bundle
from coft.runtime.model.errors import CoftError
from coft.train.funad import FunadConfig, find_suspects, mutual_pairs
from coft.train.pipeline import TrainOptions
from coft.train.unlabelled import train_unlabelled
from tests.support.parts import SIZE, defective_part, good_part


@pytest.fixture(scope="module")
def line_dump(tmp_path_factory):
    """30 good parts and 4 scratched or stained ones, mixed sizes, as a folder from the line."""
    folder = tmp_path_factory.mktemp("dump")
    rng = np.random.default_rng(7)
    for i in range(30):
        cv2.imwrite(str(folder / f"part{i:03d}.png"), good_part(rng, side=128 + (i % 3) * 16))
    for i, kind in enumerate(["scratch", "stain", "scratch", "stain"]):
        cv2.imwrite(str(folder / f"part{100 + i:03d}.png"), defective_part(rng, kind))
    return folder


def test_unlabelled_folder_gives_suspects_report_and_a_clean_bundle(line_dump, tmp_path):
    out = tmp_path / "line.bundle"
    options = TrainOptions(backbone="efficientnet_lite0", size=SIZE, scorer="patch", views=4, progress=False)
    bundle_dir, result = train_unlabelled(line_dump, out, options, FunadConfig(head_steps=50))
    rows = list(csv.DictReader(open(tmp_path / "line.bundle.funad" / "suspects.csv")))
    top4 = {r["file"] for r in rows[:4]}
    assert len(top4 & {"part100.png", "part101.png", "part102.png", "part103.png"}) >= 3
    assert (tmp_path / "line.bundle.funad" / "contact_sheet.png").stat().st_size > 0
    selection = load_bundle(bundle_dir).manifest["training"]["selection"]
    assert selection["method"] == "fun-ad" and selection["pool"] == 34
    assert len(load_bundle(bundle_dir).manifest["training"]["images"]) == 34 - selection["suspects"]
    assert set(selection["excluded"]) == {r["file"] for r in rows if r["suspect"] == "1"}


def test_too_small_a_folder_names_the_minimum(tmp_path):
    with pytest.raises(CoftError, match="at least 20 images"):
        find_suspects(torch.rand(10, 4, 8), FunadConfig())


def test_mostly_defects_warns_that_the_assumption_fails(caplog):
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 0.1, (8, 16, 8))  # a tight minority
    scattered = rng.normal(0, 3.0, (22, 16, 8))  # a scattered majority
    find_suspects(torch.from_numpy(np.concatenate([normal, scattered])).float(),
                  FunadConfig(rounds=1, head_steps=20, suspect_mad=0.5), progress=False)
    assert "assumes normal parts are the tight majority" in caplog.text


def test_mutual_pairs_are_mutual_and_cross_image():
    flat = torch.tensor([[0.0], [0.1], [5.0], [5.2], [9.0]])
    owner = torch.tensor([0, 1, 0, 1, 1])
    pairs = mutual_pairs(flat, owner).tolist()
    assert sorted(map(tuple, pairs)) == [(0, 1), (2, 3)]
