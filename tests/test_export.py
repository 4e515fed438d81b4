"""The exported ONNX graph scores frames exactly as training does, and fits its bundle."""

import json
import shutil
import subprocess

import cv2
import numpy as np
import onnx
import pytest
import torch

from coft.export.onnx import check_matches_manifest, inspection_model
from coft.export.tensorrt import build_engine, calibration_batches, load_calibration_frames
from coft.runtime.engines import fitted_precision, installed_cpu_engines, open_engine, tensorrt_unavailable
from coft.runtime.engines.fused_scoring import kernel_options, kernel_source, launch_grid
from coft.runtime.engines.tensorrt import TRT_MISSING, check_engine_matches, engine_precision, io_shapes
from coft.runtime.model.bundle import load_bundle
from coft.runtime.model.errors import CoftError
from coft.runtime.model.images import load_folder, resize_to_input
from coft.runtime.model.manifest import EngineSpec, LineRecord, ManifestSchema, digest
from tests.support.gpu import CUDA_MISSING


@pytest.fixture
def exported(exported_bundle):
    return exported_bundle


def _frames(parts, bundle):
    _, images = load_folder(parts / "test/defect/scratch")
    _, good = load_folder(parts / "test/good")
    return np.stack([resize_to_input(i, bundle.input_size) for i in images[:3] + good[:3]])


def test_graph_is_valid_and_described_in_the_manifest(exported):
    model = onnx.load(exported / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    bundle = load_bundle(exported)
    assert bundle.manifest["onnx"]["outputs"] == {"score": ["batch"], "embedding": ["batch", 1280]}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert "model.onnx" in bundle.manifest["files"]


def test_onnx_runtime_matches_pytorch_and_the_numpy_reference(exported, parts):
    bundle = load_bundle(exported)
    frames = _frames(parts, bundle)
    result = open_engine(bundle, "onnxruntime").infer(frames)
    scores, embeddings = result.scores, result.embeddings
    with torch.no_grad():
        torch_scores, torch_embeddings = inspection_model(bundle)(torch.from_numpy(frames))
    np.testing.assert_allclose(scores, torch_scores.numpy(), rtol=1e-4)
    np.testing.assert_allclose(embeddings, torch_embeddings.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, bundle.gaussian.score(embeddings), rtol=1e-4)
    assert scores[:3].min() > scores[3:].max()  # scratched parts score above good ones


def test_dynamic_batch_and_batches_larger_than_the_graph(exported, parts):
    bundle = load_bundle(exported)
    engine = open_engine(bundle)  # auto: no TensorRT engine here, so the fastest installed CPU engine
    assert engine.name in installed_cpu_engines()
    frames = _frames(parts, bundle)
    one = engine.infer(frames[:1]).scores
    many = engine.infer(np.concatenate([frames] * 3)).scores  # 18 frames, graph max batch 8
    np.testing.assert_allclose(one, many[:1], rtol=1e-5)
    assert many.shape == (18,)


def test_frames_that_do_not_fit_are_refused(exported):
    engine = open_engine(load_bundle(exported), "onnxruntime")
    with pytest.raises(CoftError, match="expected uint8"):
        engine.infer(np.zeros((1, 50, 50, 3), np.uint8))
    with pytest.raises(CoftError, match="expected uint8"):
        engine.infer(np.zeros((1, 96, 96, 3), np.float32))


def test_bundle_without_onnx_says_to_export(frozen_bundle):
    bundle = load_bundle(frozen_bundle)
    with pytest.raises(CoftError, match="coft export"):
        open_engine(bundle, "onnxruntime")
    with pytest.raises(CoftError, match="coft export"):
        build_engine(frozen_bundle)


def test_onnx_that_does_not_match_its_manifest_is_refused(exported):
    model = onnx.load(exported / "model.onnx")
    manifest = dict(load_bundle(exported).manifest)
    manifest["input"] = {**manifest["input"], "height": 128}
    with pytest.raises(CoftError, match="manifest says"):
        check_matches_manifest(model, manifest)
    manifest = {**load_bundle(exported).manifest, "embedding_dim": 512}
    with pytest.raises(CoftError, match="embedding of size 1280"):
        check_matches_manifest(model, manifest)


def test_calibration_frames_are_the_good_images_as_the_camera_sends_them(frozen_bundle, parts):
    bundle = load_bundle(frozen_bundle)
    frames = load_calibration_frames(frozen_bundle, (96, 96, 3))
    assert frames.shape == (64, 96, 96, 3) and frames.dtype == np.uint8
    _, images = load_folder(parts / "train/good")
    np.testing.assert_array_equal(frames[0], resize_to_input(images[0], bundle.input_size))
    batches = calibration_batches(frames, 8)
    assert len(batches) == 8 and all(b.shape == (8, 96, 96, 3) for b in batches)
    with pytest.raises(CoftError, match="lower --calib-batch"):
        calibration_batches(frames[:3], 8)


def test_int8_without_calibration_frames_is_a_clear_error(exported, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    (copy / "calibration.npz").unlink()  # as in a bundle from before calibration frames were kept
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["calibration.npz"]
    manifest["digest"] = digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CoftError, match="no calibration.npz"):
        build_engine(copy, int8=True)


def test_engine_from_another_box_is_refused():
    built = EngineSpec(file="model.engine", max_batch=8, tensorrt_version="10.3.0", gpu="Orin", onnx_sha256="abc")
    check_engine_matches(built, "10.3.0", "Orin", "abc")
    with pytest.raises(CoftError, match="TensorRT 10.3.0, this box has 10.7.0; rebuild"):
        check_engine_matches(built, "10.7.0", "Orin", "abc")
    with pytest.raises(CoftError, match="GPU 'Orin', this box has 'NVIDIA H100'"):
        check_engine_matches(built, "10.3.0", "NVIDIA H100", "abc")
    with pytest.raises(CoftError, match="another model.onnx"):
        check_engine_matches(built, "10.3.0", "Orin", "def")


def test_a_line_threshold_is_known_by_the_precision_of_the_scores_it_was_fitted_on():
    def line(**records) -> ManifestSchema:  # what the line recorded; the rest of the manifest does not matter here
        return ManifestSchema.model_construct(**{step: LineRecord(**r) for step, r in records.items()})
    assert fitted_precision(line()) is None  # the shots' threshold: the line fitted none
    assert fitted_precision(line(commissioning={"engine": "openvino-bf16"})) == "bf16"  # a record from before precision
    assert fitted_precision(line(commissioning={"engine": "openvino-bf16", "precision": "f32"})) == "f32"  # no native bf16
    assert fitted_precision(line(commissioning={"engine": "tensorrt", "precision": "fp16"},
                                 learning={"engine": "onnxruntime", "precision": "f32"})) == "f32"  # learning refitted it
    built = [{"precision": "fp32"}, {"precision": "fp32", "half_factor": True}, {"precision": "int8+fp16"}]
    assert [engine_precision(EngineSpec(file="model.engine", max_batch=8, **meta)) for meta in built] == [
        "f32", "fp16", "int8+fp16"]  # TensorRT's name says none of it


def test_auto_keeps_the_precision_the_threshold_was_fitted_on(exported, monkeypatch, caplog):
    import logging

    from coft.runtime import engines
    bundle = load_bundle(exported)
    monkeypatch.setattr(engines, "installed_cpu_engines", lambda: ["onnxruntime", "openvino", "openvino-bf16"])
    assert engines.auto_candidates(bundle, None) == ["onnxruntime", "openvino", "openvino-bf16"]  # nothing fitted yet
    assert engines.auto_candidates(bundle, "f32") == ["onnxruntime", "openvino"]  # bf16 was timed fastest on a Zen 5
    assert engines.auto_candidates(bundle, "bf16") == ["openvino-bf16"]
    monkeypatch.setattr(engines, "installed_cpu_engines", lambda: ["onnxruntime", "openvino-bf16"])
    engine, choice = engines.provisional_engine(bundle, "auto", 1, "f32")
    assert (engine.name, engine.precision, choice) == ("onnxruntime", "f32", None)  # one candidate: nothing to time
    monkeypatch.setattr(engines, "installed_cpu_engines", lambda: ["onnxruntime", "openvino"])  # a CPU without bf16
    with caplog.at_level(logging.INFO, logger="coft.runtime.engines"):
        assert engines.auto_candidates(bundle, "bf16") == ["onnxruntime", "openvino"]
    assert "no installed CPU engine computes in bf16" in caplog.text  # the start then says to commission again


def test_engine_io_shapes_follow_the_bundle(exported):
    bundle = load_bundle(exported)
    assert io_shapes(bundle, 4) == {"frame": (4, 96, 96, 3), "embedding": (4, 1280)}
    assert tensorrt_unavailable(bundle).startswith("the bundle has no TensorRT engine")


def test_fused_kernel_launch_geometry():
    assert launch_grid(1280, 1) == (40, 1, 1)  # 32 columns of the factor per block
    assert launch_grid(1280, 256) == (40, 32, 1)  # 8 images per block
    assert launch_grid(152, 784) == (5, 49, 1)  # 16 patches per block
    assert "-DTILE=4" in kernel_options(2048, False) and "-DFACTOR_HALF" in kernel_options(1280, True)
    assert "-DSPLIT=32" in kernel_options(1280, False) and "-DSPLIT=3" in kernel_options(152, False, 784)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: the CUDA kernel is compiled on the box")
@pytest.mark.parametrize("dim,half,patches", [(1280, False, 0), (1280, True, 0), (512, False, 0), (2048, False, 0),
                                              (152, False, 784), (152, True, 784)])
def test_fused_kernel_compiles_for_jetson_orin_and_hopper(tmp_path, dim, half, patches):
    source = tmp_path / "mahalanobis.cu"
    source.write_text(kernel_source())
    for arch in ("sm_87", "sm_90"):
        result = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", *kernel_options(dim, half, patches), "-o",
                                 str(tmp_path / f"{arch}.cubin"), str(source)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_MISSING is not None, reason=f"needs a CUDA GPU and pycuda: {CUDA_MISSING}")
@pytest.mark.parametrize("half,rtol", [(False, 1e-4), (True, 2e-3)])
def test_fused_kernel_matches_the_numpy_reference(exported, half, rtol):
    import pycuda.driver as cuda

    from coft.runtime.engines.fused_scoring import FusedScorer

    bundle = load_bundle(exported)
    scorer = FusedScorer(bundle.gaussian, max_batch=256, half_factor=half)
    rng = np.random.default_rng(0)
    for n in (1, 8, 64, 256):
        embeddings = rng.normal(size=(n, 1280)).astype(np.float32) + 1
        scores = np.zeros(n, np.float32)
        device_scores = cuda.mem_alloc(scores.nbytes)
        scorer.launch(cuda.to_device(embeddings), device_scores, n)
        cuda.memcpy_dtoh(scores, device_scores)
        np.testing.assert_allclose(scores, bundle.gaussian.score(embeddings), rtol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_MISSING is not None, reason=f"needs a CUDA GPU and pycuda: {CUDA_MISSING}")
def test_fused_patch_kernel_matches_the_numpy_reference():
    import pycuda.driver as cuda

    from coft.runtime.engines.fused_scoring import FusedScorer
    from coft.train.scorers.patch import fit_patch_gaussian

    rng = np.random.default_rng(0)
    gaussian = fit_patch_gaussian(rng.normal(size=(4000, 152)).astype(np.float32) + 2)
    scorer = FusedScorer(gaussian, max_batch=8, patches=784)
    features = (rng.normal(size=(8, 784, 152)) + 2).astype(np.float32)
    patch_scores, image_scores = np.zeros(8 * 784, np.float32), np.zeros(8, np.float32)
    d_patch, d_image = cuda.mem_alloc(patch_scores.nbytes), cuda.mem_alloc(image_scores.nbytes)
    scorer.launch(cuda.to_device(features), d_patch, 8, image_scores=d_image)
    cuda.memcpy_dtoh(patch_scores, d_patch)
    cuda.memcpy_dtoh(image_scores, d_image)
    reference = gaussian.score(features)
    np.testing.assert_allclose(patch_scores.reshape(8, 784), reference, rtol=1e-4)
    np.testing.assert_allclose(image_scores, reference.max(axis=1), rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(TRT_MISSING is not None, reason=f"{TRT_MISSING}: engines are built and tested on the Jetson")
def test_tensorrt_engine_matches_onnx_runtime(exported, parts, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    build_engine(copy, fp16=False, max_batch=8)
    bundle = load_bundle(copy)
    frames = _frames(parts, bundle)
    trt_scores = open_engine(bundle, "tensorrt").infer(frames).scores
    ort_scores = open_engine(bundle, "onnxruntime").infer(frames).scores
    np.testing.assert_allclose(trt_scores, ort_scores, rtol=1e-3)


def test_an_elongated_part_trains_in_its_own_shape_and_scores_so_on_onnx_runtime(tmp_path):
    """The default input size follows the shots (train/shape.py): tall parts train at 518x224 with the default
    DINOv2 and knn, and the exported graph takes frames of that shape; a dent scores above the good parts."""
    from coft.cli import main
    from coft.runtime.model.images import read_image, resize_to_input

    good, test = _elongated_parts(tmp_path)
    assert main(["-q", "train", str(good), "--out", str(tmp_path / "b")]) == 0
    assert main(["-q", "export", str(tmp_path / "b")]) == 0
    bundle = load_bundle(tmp_path / "b")
    assert (bundle.manifest["input"]["height"], bundle.manifest["input"]["width"]) == (518, 224)
    assert "height/width 2.30" in bundle.manifest["input"]["size_from"]
    names = sorted(test.iterdir())
    frames = np.stack([resize_to_input(read_image(p), (518, 224)) for p in names])
    scores = dict(zip((p.stem for p in names), open_engine(bundle, "onnxruntime").infer(frames).scores))
    assert min(scores["dent6"], scores["dent7"]) > max(scores["good6"], scores["good7"]), scores


def test_an_elongated_part_on_the_fast_backbone_trains_at_a_multiple_of_its_stride_and_exports(tmp_path):
    """Lite0's stride-8 and stride-16 patch maps line up only on sides that are multiples of 32: at BSData's shape
    (224x546) torch.export could not trace the patch graph for a dynamic batch ("Eq(69*s71, 68*...) is
    inconsistent"). The size from the shots' shape now rounds to the stride, and so does a --size given."""
    from coft.cli import main

    good, _ = _elongated_parts(tmp_path)
    fast = ["--backbone", "efficientnet_lite0", "--scorer", "patch"]
    assert main(["-q", "train", str(good), "--out", str(tmp_path / "b"), *fast]) == 0
    assert main(["-q", "export", str(tmp_path / "b")]) == 0
    bundle = load_bundle(tmp_path / "b")
    assert bundle.input_size == (512, 224)
    frames = np.zeros((3, 512, 224, 3), np.uint8)
    assert open_engine(bundle, "onnxruntime").infer(frames).scores.shape == (3,)
    assert main(["-q", "train", str(good), "--out", str(tmp_path / "c"), "--size", "546x224", *fast]) == 0
    assert main(["-q", "export", str(tmp_path / "c")]) == 0
    assert load_bundle(tmp_path / "c").input_size == (544, 224)


def _elongated_parts(tmp_path):
    """Six tall good parts (230x100) to train on; two more and two dented ones to test."""
    rng = np.random.default_rng(3)
    good, test = tmp_path / "good", tmp_path / "test"
    good.mkdir(), test.mkdir()
    for i in range(8):
        x = np.mgrid[0:230, 0:100][1].astype(np.float32)
        part = (128 + 12 * np.sin(x / 3.0 + rng.uniform(0, 6)) + rng.normal(0, 4, (230, 100))).clip(0, 255)
        cv2.imwrite(str((good if i < 6 else test) / f"good{i}.png"), part.astype(np.uint8))
        if i >= 6:
            dented = part.astype(np.uint8)
            cv2.circle(dented, (50, 60 + 40 * i - 240), 7, 250, -1)
            cv2.imwrite(str(test / f"dent{i}.png"), dented)
    return good, test
