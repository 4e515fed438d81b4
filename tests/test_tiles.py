"""Tiles: a frame larger than the model input scored in overlapping windows, the same in torch, in the exported
graph and in the numpy stitching the TensorRT path uses."""

import json
import shutil

import cv2
import numpy as np
import pytest

from coft.export.onnx import export_onnx
from coft.runtime.engines import open_engine
from coft.runtime.engines.base import patch_inference
from coft.runtime.model.bundle import load_bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.images import resize_to_input
from coft.runtime.model.tiles import Tiling, tiled_size
from coft.train.evaluate import frame_scorer
from coft.train.pipeline import TrainOptions, train_bundle
from tests.support.parts import STAIN

WINDOW = (56, 56)  # 4 x 4 patches a window: small, the real weights still load


@pytest.fixture(scope="module")
def tiled_bundle(masked_set, tmp_path_factory):  # noqa: F811
    """Blocks 6 and 9 (a bank per block), not 6 9 12: in a 56 px window (4 x 4 patches) block 12's tokens carry the whole
    window and its map cannot place the stain (tests/test_knn.py's bundle says the same at 112 px)."""
    out = tmp_path_factory.mktemp("tiles") / "t.bundle"
    train_bundle(masked_set / "train/good", out, TrainOptions(size=WINDOW, tiles=1.0, coreset=512, layers=(6, 9),
                                                              progress=False))
    export_onnx(out, max_batch=4)
    return out


def test_windows_lie_on_the_patch_grid_cover_the_frame_and_stitch_by_averaging():
    tiling = Tiling.over(tiled_size((460, 1130), 1.0, 14), (224, 224), 14)  # a BSData frame at its own pixels
    assert tiling.frame == (462, 1134) and len(tiling) == 18 and tiling.grid == (33, 81)
    assert all(y % 14 == 0 and x % 14 == 0 for y, x in tiling.origins) and tiling.coverage.min() >= 1
    overlaps = np.diff(sorted({x for _, x in tiling.origins}))
    assert (224 - overlaps >= 0.125 * 224).all()  # neighbours share at least an eighth of a window
    ones = np.ones((2, len(tiling), 16 * 16))
    np.testing.assert_allclose(tiling.stitch(ones), 1.0)  # averaged where windows overlap, not summed
    marked = np.zeros((1, len(tiling), 16, 16))
    marked[0, 0, 5, 7] = 3.0  # a patch only the first window sees
    assert tiling.stitch(marked)[0, 5, 7] == 3.0 and tiling.stitch(marked).sum() == 3.0
    assert len(Tiling.over((154, 308), (224, 224), 14)) == 2  # a side shorter than the window is not cut
    with pytest.raises(CoftError, match="multiples of the 14-pixel patch"):
        Tiling.over((100, 300), (224, 224), 14)


def test_a_tiled_bundle_scores_alike_in_torch_the_exported_graph_and_the_tensorrt_stitching(tiled_bundle, masked_set):
    bundle = load_bundle(tiled_bundle)
    tiles = bundle.manifest["patch"]["tiles"]
    assert bundle.input_size == (126, 126) and tiles["count"] == len(bundle.tiling) == 9 and tiles["scale"] == 1.0
    assert bundle.manifest["patch"]["grid"] == [9, 9] and bundle.manifest["training"]["backbone_ms_per_frame"] > 0
    paths = sorted((masked_set / "test/good").glob("*.png"))[:3] + sorted((masked_set / "test/defect/stain").glob("*.png"))[:3]
    images = [cv2.imread(str(p)) for p in paths]
    torch_scores, torch_maps = frame_scorer(bundle)(images)
    frames = np.stack([resize_to_input(i, bundle.input_size) for i in images])
    graph = open_engine(bundle, "onnxruntime").infer(frames)
    np.testing.assert_allclose(graph.scores, torch_scores, rtol=1e-3, atol=1e-4)
    assert graph.embeddings.shape == (6, 9 * 16, 2 * 384) and graph.maps.shape == (6, 126, 126)  # blocks 6 and 9
    stitched = patch_inference(bundle, bundle.bank.score(graph.embeddings), graph.embeddings)  # the TensorRT path
    np.testing.assert_allclose(stitched.scores, graph.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stitched.maps, graph.maps, rtol=1e-3, atol=1e-4)
    assert graph.scores[3:].min() > graph.scores[:3].max()  # the stains stand out
    x, y, _ = STAIN
    hot = np.unravel_index(np.argmax(graph.maps[3]), graph.maps[3].shape)
    assert abs(hot[0] - y * 126 / 128) < 20 and abs(hot[1] - x * 126 / 128) < 20  # where the stain is, stitched
    assert torch_maps.shape == (6, 9, 9)
    try:
        import openvino  # noqa: F401
    except ImportError:
        return  # the openvino extra is not installed: ONNX Runtime is the box's engine
    vino = open_engine(bundle, "openvino").infer(frames)  # the same graph, OpenVINO's own reading of it
    np.testing.assert_allclose(vino.scores, graph.scores, rtol=1e-4, atol=1e-5)


def test_a_tiled_manifest_that_does_not_tile_its_input_is_refused(tiled_bundle, tmp_path):
    from coft.runtime.model.bundle import update_manifest
    broken = shutil.copytree(tiled_bundle, tmp_path / "b")
    manifest = json.loads((broken / "manifest.json").read_text())
    tiles = manifest["patch"]["tiles"]
    update_manifest(broken, {"patch": {**manifest["patch"], "tiles": {**tiles, "origins": tiles["origins"][:-1],
                                                                       "count": tiles["count"] - 1}}})
    with pytest.raises(CoftError, match="do not tile the 126x126 input"):
        load_bundle(broken)


def test_tiles_are_refused_where_they_cannot_help(masked_set, tmp_path):
    with pytest.raises(CoftError, match="1:1 at most"):
        train_bundle(masked_set / "train/good", tmp_path / "a", TrainOptions(tiles=2.0, progress=False))
    with pytest.raises(CoftError, match="use it with --scorer knn"):
        train_bundle(masked_set / "train/good", tmp_path / "b", TrainOptions(tiles=1.0, scorer="patch", progress=False))


def test_a_tiled_bundle_learns_on_the_box_and_its_graph_scores_the_grown_bank_as_numpy_does(tiled_bundle, tmp_path):
    from coft.runtime.line.learning import learn
    from coft.runtime.model.scoring import pool
    from tests.support.parts import good_part, stained

    rng = np.random.default_rng(7)
    line = tmp_path / "line"
    line.mkdir()
    for i in range(110):
        cv2.imwrite(str(line / f"{i:04d}.png"), stained(rng) if i % 37 == 5 else good_part(rng))
    grown = load_bundle(learn(tiled_bundle, line, tmp_path / "grown"))
    assert grown.tiling == load_bundle(tiled_bundle).tiling and grown.manifest["learning"]["rows_added"] > 0
    parts = [cv2.cvtColor(part, cv2.COLOR_GRAY2BGR) if part.ndim == 2 else part for part in (stained(rng), good_part(rng))]
    frames = np.stack([resize_to_input(part, grown.input_size) for part in parts])
    inference = open_engine(grown, "onnxruntime").infer(frames)
    expected = pool(grown.bank.score(inference.embeddings), "top1pct", grown.tiling)
    np.testing.assert_allclose(inference.scores, expected, rtol=1e-4, atol=1e-5)
    assert inference.scores[0] > inference.scores[1]
