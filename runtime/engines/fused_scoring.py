"""The fused Gaussian scoring kernel (runtime/engines/kernels/mahalanobis.cu), compiled and launched with pycuda.

Compiled on the box itself for its GPU, with the embedding size fixed at compile time.
The mean and Cholesky factor are uploaded once; each batch is one launch that reads the
engine's raw embeddings on the device and writes one score per image.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from coft.runtime.model.errors import CoftError
from coft.runtime.model.scoring import Gaussian

KERNEL_FILE = "mahalanobis.cu"
KERNEL_NAME = "mahalanobis_fused"
COLS = 32  # columns of d per block: one warp reads 128 contiguous bytes of a row of L
SHARED_BYTES = 46 * 1024  # stay under the 48 KiB of static shared memory


def kernel_source() -> str:
    return resources.files("coft.runtime.engines.kernels").joinpath(KERNEL_FILE).read_text()


def row_groups(dim: int) -> int:
    """Row groups per block (SPLIT): about 40 rows of L each, at most 32 (1024 threads)."""
    return max(1, min(32, dim // 40))


def images_per_block(dim: int) -> int:
    """Rows per block (TILE): 16, 8 or 4, as many centred rows as shared memory holds.

    Each factor element read is used once per row of the tile, so larger tiles read the
    factor fewer times; the kernel reads the rows four at a time."""
    fits = SHARED_BYTES // (4 * max(dim, COLS * row_groups(dim)))
    return next(tile for tile in (16, 8, 4) if tile <= fits or tile == 4)


def kernel_options(dim: int, half_factor: bool, patches: int = 0) -> list[str]:
    options = [f"-DDIM={dim}", f"-DTILE={images_per_block(dim)}", f"-DSPLIT={row_groups(dim)}", f"-DPATCHES={patches}"]
    return options + ["-DFACTOR_HALF"] if half_factor else options


def launch_grid(dim: int, rows: int) -> tuple[int, int, int]:
    return (-(-dim // COLS), -(-rows // images_per_block(dim)), 1)


class FusedScorer:
    """Scores device-resident embeddings [n, D] into device-resident scores [n].

    With `patches` = P (patch scorer), a batch of N images is N * P rows of raw patch
    features; the launch writes every patch's score and each image's worst patch.
    """

    def __init__(self, gaussian: Gaussian, max_batch: int, half_factor: bool = False, patches: int = 0):
        try:
            import pycuda.driver as cuda
            from pycuda.compiler import SourceModule
        except ImportError as exc:
            raise CoftError(f"the fused scoring kernel needs pycuda ({exc}); pip install pycuda on the box") from exc
        if bool(patches) == gaussian.normalised:
            raise CoftError("a patch scorer needs a Gaussian of raw patch features, a global one of normalised embeddings")
        self.dim, self.patches = gaussian.dim, patches
        self.max_rows = max_batch * max(1, patches)
        module = SourceModule(kernel_source(), options=kernel_options(self.dim, half_factor, patches), no_extern_c=True)
        self.kernel = module.get_function(KERNEL_NAME)
        factor = gaussian.cholesky.astype(np.float16 if half_factor else np.float32)
        self.mean = cuda.to_device(np.ascontiguousarray(gaussian.mean, dtype=np.float32))
        self.factor = cuda.to_device(np.ascontiguousarray(factor))
        # scratch state the kernel leaves zeroed for the next launch
        self.accum = cuda.to_device(np.zeros(self.max_rows, np.float32))
        self.tile_tickets = cuda.to_device(np.zeros(launch_grid(self.dim, self.max_rows)[1], np.uint32))
        self.image_max = cuda.to_device(np.zeros(max_batch, np.uint32))
        self.ticket = cuda.to_device(np.zeros(1, np.uint32))
        self.block = (COLS, row_groups(self.dim), 1)
        self.kernel.prepare("PPPPPPPPPi")  # argument types parsed once: each launch costs microseconds, not tens

    def launch(self, embeddings, scores, n: int, stream=None, image_scores=None) -> None:
        """Queue one launch for `n` images on `stream` (None: the default stream); arrays are device allocations or pointers.

        `scores` receives one score per row (n, or n * patches); `image_scores` (patch scorer)
        each image's worst patch."""
        rows = n * max(1, self.patches)
        if not 0 < rows <= self.max_rows:
            raise CoftError(f"batch of {n} frames; the scorer was set up for 1..{self.max_rows // max(1, self.patches)}")
        pointers = (embeddings, self.mean, self.factor, self.accum, self.tile_tickets, self.image_max, self.ticket,
                    scores, image_scores if image_scores is not None else scores)
        self.kernel.prepared_async_call(launch_grid(self.dim, rows), self.block, stream, *map(int, pointers), rows)
