"""The fused nearest-neighbour kernel (runtime/engines/kernels/nearest.cu), compiled and launched with pycuda.

The knn scorer's TensorRT path: the engine writes every patch's features, and one launch
scores all N x P patches against the memory bank (uploaded once) and pools each image.
Compiled on the box for its GPU, with the feature size, patches per image, pooling and the
bank's ViT blocks fixed at compile time; the reference it must match is
runtime.scoring.MemoryBank + pool.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import MemoryBank, pooled_patches

KERNEL_FILE = "nearest.cu"
KERNEL_NAME = "nearest_fused"
ROWS = BANK_ROWS = 64  # feature rows and bank rows per block tile (the kernel's ROWS, BANK_ROWS)
BLOCK = (16, 16, 1)


def kernel_source() -> str:
    return resources.files("coft.runtime.engines.kernels").joinpath(KERNEL_FILE).read_text()


def kernel_options(dim: int, patches: int, topk: int, half_bank: bool, blocks: int = 1) -> list[str]:
    options = [f"-DDIM={dim}", f"-DPATCHES={patches}", f"-DTOPK={topk}", f"-DBLOCKS={blocks}"]
    return options + ["-DBANK_HALF"] if half_bank else options


def launch_grid(rows: int, bank_rows: int, multiprocessors: int, blocks: int = 1) -> tuple[int, int, int]:
    """Row tiles x bank slices x the bank's ViT blocks: enough slices that every multiprocessor gets about two
    thread blocks, each at least one bank tile."""
    row_tiles = -(-rows // ROWS)
    slices = max(1, min(-(-bank_rows // BANK_ROWS), -(-2 * multiprocessors // (row_tiles * blocks))))
    return (row_tiles, slices, blocks)


class FusedNearest:
    """Scores device-resident patch features [n * patches, D] into patch scores and image scores."""

    def __init__(self, bank: MemoryBank, max_batch: int, patches: int, pooling: str, half_bank: bool = False):
        try:
            import pycuda.driver as cuda
            from pycuda.compiler import SourceModule
        except ImportError as exc:
            raise CoftError(f"the fused nearest-neighbour kernel needs pycuda ({exc}); pip install pycuda on the box") from exc
        self.dim, self.patches, self.bank_rows, self.blocks = bank.dim, patches, len(bank), bank.blocks
        self.max_rows = max_batch * patches
        options = kernel_options(bank.dim, patches, pooled_patches(patches, pooling), half_bank, bank.blocks)
        module = SourceModule(kernel_source(), options=options, no_extern_c=True)
        self.kernel = module.get_function(KERNEL_NAME)
        if bank.block_weights is not None:
            cuda.memcpy_htod(module.get_global("block_weight")[0], np.ascontiguousarray(bank.block_weights, np.float32))
        self.bank = cuda.to_device(np.ascontiguousarray(bank.features, dtype=np.float16 if half_bank else np.float32))
        self.best = cuda.to_device(np.zeros(self.max_rows * bank.blocks, np.uint32))  # scratch the kernel leaves zeroed
        self.ticket = cuda.to_device(np.zeros(1, np.uint32))
        self.multiprocessors = cuda.Context.get_device().get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        self.kernel.prepare("PPiPPPPi")  # argument types parsed once

    def launch(self, features, scores, n: int, stream=None, image_scores=None) -> None:
        """Queue one launch for `n` images on `stream`: `scores` gets n * patches distances, `image_scores` n pooled scores."""
        rows = n * self.patches
        if not 0 < rows <= self.max_rows:
            raise CoftError(f"batch of {n} frames; the scorer was set up for 1..{self.max_rows // self.patches}")
        if image_scores is None:
            raise CoftError("the nearest-neighbour kernel needs an image-score buffer")
        grid = launch_grid(rows, self.bank_rows, self.multiprocessors, self.blocks)
        self.kernel.prepared_async_call(grid, BLOCK, stream, int(features), int(self.bank), self.bank_rows,
                                        int(self.best), int(self.ticket), int(scores), int(image_scores), rows)
