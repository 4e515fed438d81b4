"""Patch-level scoring: where the defect is, from training through export to the verdict on MQTT."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml

from coft.export.onnx import export_onnx, inspection_model
from coft.runtime.config import load_config
from coft.runtime.engines import open_engine, tensorrt_unavailable
from coft.runtime.engines.base import patch_inference
from coft.runtime.engines.tensorrt import io_shapes
from coft.runtime.model.bundle import load_bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.heatmap import defect_box
from coft.runtime.model.manifest import digest
from coft.runtime.pipeline import Runtime
from coft.train.evaluate import evaluate, pro_score
from coft.train.pipeline import TrainOptions, train_bundle
from tests.support.broker import Subscriber
from tests.support.gpu import CUDA_MISSING
from tests.support.parts import SIZE, STAIN


@pytest.fixture(scope="module")
def patch_bundle(masked_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "p.bundle"
    train_bundle(masked_set / "train/good", out, TrainOptions(backbone="efficientnet_lite0", size=SIZE, scorer="patch", views=4,
                                                                  progress=False))
    export_onnx(out, max_batch=8)
    return out


def test_patch_bundle_describes_its_scorer(patch_bundle):
    m = load_bundle(patch_bundle).manifest
    assert m["scorer"] == "patch" and m["embedding_dim"] == 152
    assert m["patch"] == {**m["patch"], "stride": 8, "grid": [12, 12], "pooling": "max"}
    assert m["onnx"]["outputs"]["anomaly_map"] == ["batch", 96, 96]


def test_eval_reports_pixel_auroc_and_a_gallery(patch_bundle, masked_set, tmp_path):
    report = evaluate(patch_bundle, masked_set / "test", tmp_path / "r", progress=False)
    assert report["metrics"]["auroc"] > 0.9
    assert report["pixel"]["pixel_auroc"] > 0.9  # the map lights up where the stain really is
    assert 0.5 < report["pixel"]["pro"] <= 1.0
    assert (tmp_path / "r" / "gallery.png").stat().st_size > 0


def test_pro_counts_every_region_equally():
    truth = [np.zeros((20, 20), bool), np.zeros((20, 20), bool)]
    truth[1][2:4, 2:4] = True  # a small defect
    truth[1][10:20, 10:20] = True  # a large one
    found_both = [np.zeros((20, 20)), np.where(truth[1], 1.0, 0.0)]
    assert pro_score(truth, found_both) == pytest.approx(1.0, abs=0.02)
    only_large = [np.zeros((20, 20)), np.zeros((20, 20))]
    only_large[1][10:20, 10:20] = 1.0
    assert pro_score(truth, only_large) < 0.6  # the small miss costs half the regions; pixel AUROC would forgive it


def _stained_frames(masked_set, n=3):
    return np.stack([cv2.resize(cv2.imread(str(masked_set / f"test/defect/stain/s{i}.png")), (96, 96),
                                interpolation=cv2.INTER_AREA) for i in range(n)])


def test_onnx_patch_graph_matches_pytorch_and_numpy(patch_bundle, masked_set):
    bundle = load_bundle(patch_bundle)
    frames = _stained_frames(masked_set)
    result = open_engine(bundle, "onnxruntime").infer(frames)
    with torch.no_grad():
        score, full_map, features = inspection_model(bundle)(torch.from_numpy(frames))
    np.testing.assert_allclose(result.scores, score.numpy(), rtol=1e-4)
    np.testing.assert_allclose(result.maps, full_map.numpy(), rtol=1e-4, atol=1e-5)
    peak = float(result.maps[0].max())  # the verdict's rule (line/inspector.py): above the threshold and half the peak
    x, y, w, h = defect_box(result.maps[0], max(bundle.threshold, 0.5 * peak))  # around the stain, not the part
    cx, cy = (STAIN[0] * 96 / 128, STAIN[1] * 96 / 128)
    assert x <= cx <= x + w and y <= cy <= y + h and w * h < 0.5 * 96 * 96  # 96 px: receptive fields spread it


def test_patch_scores_alone_give_the_graphs_scores_and_maps(patch_bundle, masked_set):
    """What the TensorRT path does after its engine: score the patch features, pool and upsample on the CPU."""
    bundle = load_bundle(patch_bundle)
    result = open_engine(bundle, "onnxruntime").infer(_stained_frames(masked_set))
    assert io_shapes(bundle, 3)["embedding"] == result.embeddings.shape == (3, 144, 152)
    readout = patch_inference(bundle, bundle.gaussian.score(result.embeddings), result.embeddings)
    np.testing.assert_allclose(readout.scores, result.scores, rtol=1e-4)
    np.testing.assert_allclose(readout.maps, result.maps, rtol=1e-3, atol=1e-3 * result.maps.max())
    assert tensorrt_unavailable(bundle).startswith("the bundle has no TensorRT engine")  # patch bundles are welcome


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_MISSING is not None, reason=f"needs a CUDA GPU and pycuda: {CUDA_MISSING}")
@pytest.mark.parametrize("half,rtol", [(False, 1e-4), (True, 2e-3)])
def test_fused_patch_kernel_gives_the_graphs_scores_and_maps(patch_bundle, masked_set, half, rtol):
    """The TensorRT path without TensorRT: ONNX Runtime's patch features through the kernel and the CPU readout."""
    import pycuda.driver as cuda

    from coft.runtime.engines.fused_scoring import FusedScorer

    bundle = load_bundle(patch_bundle)
    result = open_engine(bundle, "onnxruntime").infer(_stained_frames(masked_set))
    n, patches = result.embeddings.shape[:2]
    scorer = FusedScorer(bundle.gaussian, max_batch=8, half_factor=half, patches=patches)
    patch_scores, image_scores = np.zeros((n, patches), np.float32), np.zeros(n, np.float32)
    d_patch, d_image = cuda.mem_alloc(patch_scores.nbytes), cuda.mem_alloc(image_scores.nbytes)
    scorer.launch(cuda.to_device(np.ascontiguousarray(result.embeddings)), d_patch, n, image_scores=d_image)
    cuda.memcpy_dtoh(patch_scores, d_patch)
    cuda.memcpy_dtoh(image_scores, d_image)
    readout = patch_inference(bundle, patch_scores, result.embeddings, image_scores)
    np.testing.assert_allclose(readout.scores, result.scores, rtol=rtol)
    np.testing.assert_allclose(readout.maps, result.maps, rtol=rtol, atol=rtol * result.maps.max())


def test_verdict_carries_the_defect_box_in_frame_pixels(patch_bundle, masked_set, mosquitto, tmp_path):
    (tmp_path / "line").mkdir()
    shutil.copy(masked_set / "test/defect/stain/s0.png", tmp_path / "line/s0.png")
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({
        "bundle": str(patch_bundle), "cameras": [{"name": "cam1", "source": str(tmp_path / "line")}],
        "broker": {"port": mosquitto.port, "line": "l1"}, "outbox": {"path": str(tmp_path / "o.db")},
        "evidence": {"dir": str(tmp_path / "evidence")}}))
    plc = Subscriber(mosquitto.port)
    Runtime(load_config(config)).run(until_sources_end=True)
    verdict = plc.wait_for("verdict", 1)[0]
    plc.close()
    assert verdict["verdict"] == "reject"
    x, y, w, h = verdict["defect"]["box"]  # in the 128 px frame, not the 96 px model input
    assert x <= STAIN[0] <= x + w and y <= STAIN[1] <= y + h
    assert w < 100 and h < 100 and verdict["defect"]["peak"] > verdict["threshold"]
    annotated, raw = sorted((tmp_path / "evidence/cam1").glob("*.jpg"))  # as the camera gave it, and annotated
    assert annotated.name.endswith("-reject-annotated.jpg") and raw.name == annotated.name.replace("-annotated", "")
    assert cv2.imread(str(raw)).shape == cv2.imread(str(annotated)).shape == (128, 128, 3)


def test_defect_box_bounds_the_hottest_region_only():
    score_map = np.zeros((100, 100), np.float32)
    score_map[10:20, 10:20] = 5.0  # the defect
    score_map[70:90, 60:95] = 2.0  # a weaker blob above the threshold elsewhere
    assert defect_box(score_map, 1.0) == [10, 10, 10, 10]  # not [10, 10, 85, 80] around both
    assert defect_box(score_map, 6.0) is None


def test_unknown_scorer_and_wrong_map_size_are_refused(patch_bundle, tmp_path, mosquitto):
    copy = tmp_path / "b"
    shutil.copytree(patch_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["scorer"] = "hologram"
    manifest["digest"] = digest(manifest)  # a newer coft's bundle, sealed properly
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CoftError, match="scorer 'hologram' is unknown to this runtime"):
        load_bundle(copy)
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({"bundle": str(patch_bundle), "cameras": [{"name": "cam1", "source": "0"}],
                                      "broker": {"port": mosquitto.port}, "outbox": {"path": str(tmp_path / "o.db")}}))
    runtime = Runtime(load_config(config))
    from coft.runtime.cameras.sources import Frame
    frame = Frame("cam1", 1, 0.0, np.zeros((128, 128, 3), np.uint8))
    with pytest.raises(CoftError, match="does not match the model input"):
        runtime.inspector.defect(frame, np.zeros((40, 40), np.float32), 1.0, True)
    runtime.outbox.close()
