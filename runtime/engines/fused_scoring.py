"""The fused Gaussian scoring kernel (export/kernels/mahalanobis.cu), compiled and launched with pycuda.

Compiled on the box itself for its GPU, with the embedding size fixed at compile time.
The mean and Cholesky factor are uploaded once; each batch is one launch that reads the
engine's raw embeddings on the device and writes one score per image.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from runtime.errors import CoftError
from runtime.scoring import Gaussian

KERNEL_FILE = "mahalanobis.cu"
KERNEL_NAME = "mahalanobis_fused"
COLS = 64  # threads per block = columns of d per block
SHARED_BYTES = 46 * 1024  # stay under the 48 KiB of static shared memory


def kernel_source() -> str:
    return resources.files("export.kernels").joinpath(KERNEL_FILE).read_text()


def images_per_block(dim: int) -> int:
    """Images per block (TILE): as many centred embeddings as shared memory holds, at most 8."""
    return max(1, min(8, SHARED_BYTES // (4 * dim)))


def kernel_options(dim: int, half_factor: bool) -> list[str]:
    options = [f"-DDIM={dim}", f"-DTILE={images_per_block(dim)}", f"-DCOLS={COLS}"]
    return options + ["-DFACTOR_HALF"] if half_factor else options


def launch_grid(dim: int, batch: int) -> tuple[int, int, int]:
    return (-(-dim // COLS), -(-batch // images_per_block(dim)), 1)


class FusedScorer:
    """Scores device-resident embeddings [n, D] into device-resident scores [n]."""

    def __init__(self, gaussian: Gaussian, max_batch: int, half_factor: bool = False):
        try:
            import pycuda.driver as cuda
            from pycuda.compiler import SourceModule
        except ImportError as exc:
            raise CoftError(f"the fused scoring kernel needs pycuda ({exc}); pip install pycuda on the box") from exc
        self.dim, self.max_batch = gaussian.dim, max_batch
        module = SourceModule(kernel_source(), options=kernel_options(self.dim, half_factor), no_extern_c=True)
        self.kernel = module.get_function(KERNEL_NAME)
        factor = gaussian.cholesky.astype(np.float16 if half_factor else np.float32)
        self.mean = cuda.to_device(np.ascontiguousarray(gaussian.mean, dtype=np.float32))
        self.factor = cuda.to_device(np.ascontiguousarray(factor))
        self.accum = cuda.to_device(np.zeros(max_batch, np.float32))
        self.ticket = cuda.to_device(np.zeros(1, np.uint32))

    def launch(self, embeddings, scores, n: int, stream=None) -> None:
        """Queue one launch on `stream`; `embeddings` and `scores` are device pointers or allocations."""
        if not 0 < n <= self.max_batch:
            raise CoftError(f"batch of {n} frames; the scorer was set up for 1..{self.max_batch}")
        self.kernel(embeddings, self.mean, self.factor, self.accum, self.ticket, scores, np.int32(n),
                    block=(COLS, 1, 1), grid=launch_grid(self.dim, n), stream=stream)
