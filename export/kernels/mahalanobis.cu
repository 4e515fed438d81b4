// Fused Gaussian anomaly scoring: one launch per batch.
//
//   score[n] = || (e_n / |e_n| - mean) L ||      L lower-triangular, precision = L L^T
//
// reads the raw embedding e_n written by the TensorRT engine, L2-normalises it, centres
// it, multiplies by the Cholesky factor and reduces to one score per image. The mean and
// factor are uploaded once when the runtime starts, never per frame.
//
// Work split: grid = (chunks of COLS = 32 columns of d = c L, tiles of TILE rows). A block
// keeps its tile's centred rows in shared memory; its SPLIT row groups (threadIdx.y) each
// walk every SPLIT-th row of L for the chunk's 32 columns, so a warp reads 128 contiguous
// bytes of one row and many rows are in flight at once (at batch 1 the launch is bound by
// how fast L streams in, not by arithmetic). Rows above the chunk's first column are
// skipped since L is zero there. Warp 0 adds the row groups' parts, squares and sums the
// chunk's columns and adds that into accum[row]; the last block of a tile (tile ticket)
// takes the square roots and clears its accum and ticket for the next launch.
//
// Compile-time parameters: DIM (embedding size, required), TILE (rows per block), SPLIT
// (row groups per block; threads = 32 * SPLIT), FACTOR_HALF (store L in fp16, halving
// the bytes read; accumulation stays fp32), PATCHES (patch scorer: each image is PATCHES
// consecutive rows of raw, un-normalised patch features; every row gets its score and the
// last tile to finish writes each image's worst patch to image_score).

#ifndef DIM
#error "compile with -DDIM=<embedding size>"
#endif
#ifndef TILE
#define TILE 8
#endif
#ifndef SPLIT
#define SPLIT 1
#endif
#ifndef PATCHES
#define PATCHES 0
#endif
#define COLS 32
#define THREADS (COLS * SPLIT)
#define TILE_STRIDE (DIM > THREADS ? DIM : THREADS)  // room for a centred row, or for the row groups' parts

#ifdef FACTOR_HALF
#include <cuda_fp16.h>
typedef __half factor_t;
__device__ __forceinline__ float load_factor(const factor_t* p) { return __half2float(__ldg(p)); }
#else
typedef float factor_t;
__device__ __forceinline__ float load_factor(const factor_t* p) { return __ldg(p); }
#endif

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of v over the block; every thread gets the result.
__device__ float block_sum(float v, float* scratch, int tid) {
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read from a previous call
    if ((tid & 31) == 0) scratch[tid >> 5] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
    return total;
}

extern "C" __global__ void __launch_bounds__(THREADS) mahalanobis_fused(
    const float* __restrict__ embedding,   // [n, DIM] raw, as the backbone writes it
    const float* __restrict__ mean,        // [DIM], of the L2-normalised embeddings (raw patch features)
    const factor_t* __restrict__ factor,   // [DIM, DIM] row-major, lower-triangular
    float* __restrict__ accum,             // [>= n], zero on entry and on exit
    unsigned int* __restrict__ tile_ticket, // [>= tiles], zero on entry and on exit
    unsigned int* __restrict__ image_max,  // [>= n / PATCHES], zero on entry and on exit (PATCHES > 0 only)
    unsigned int* __restrict__ ticket,     // [1], zero on entry and on exit (PATCHES > 0 only)
    float* __restrict__ score,             // [n]: one score per row (per image, or per patch)
    float* __restrict__ image_score,       // [n / PATCHES]: worst patch per image (PATCHES > 0 only)
    const int n)
{
    __shared__ float tile[TILE * TILE_STRIDE];
    __shared__ float scratch[THREADS / 32];
    __shared__ bool last;
    const int tid = threadIdx.y * COLS + threadIdx.x;
    const int first_row = blockIdx.y * TILE;
    const int col = blockIdx.x * COLS + threadIdx.x;

    // 1. Centre the tile's rows (global embeddings are L2-normalised first; patch features are not).
    for (int t = 0; t < TILE; ++t) {
        const int row = first_row + t;
        float sq = 0.f;
        if (row < n) {
            for (int i = tid; i < DIM; i += THREADS) {
                const float e = embedding[(size_t)row * DIM + i];
                tile[t * TILE_STRIDE + i] = e;
                sq += e * e;
            }
        }
        const float scale = PATCHES ? 1.f : rsqrtf(fmaxf(block_sum(sq, scratch, tid), 1e-24f));
        for (int i = tid; i < DIM; i += THREADS)
            tile[t * TILE_STRIDE + i] = row < n ? tile[t * TILE_STRIDE + i] * scale - mean[i] : 0.f;
    }
    __syncthreads();

    // 2. This row group's part of d[t][col] = sum_{i >= col} centred[t][i] * L[i][col].
    float d[TILE];
#pragma unroll
    for (int t = 0; t < TILE; ++t) d[t] = 0.f;
    if (col < DIM) {
#pragma unroll 4
        for (int i = blockIdx.x * COLS + threadIdx.y; i < DIM; i += SPLIT) {
            const float l = load_factor(factor + (size_t)i * DIM + col);
#pragma unroll
            for (int t = 0; t < TILE; ++t) d[t] = fmaf(tile[t * TILE_STRIDE + i], l, d[t]);
        }
    }
    __syncthreads();  // the tile's rows are no longer needed: its memory takes the row groups' parts
#pragma unroll
    for (int t = 0; t < TILE; ++t) tile[t * TILE_STRIDE + tid] = d[t];
    __syncthreads();

    // 3. Warp 0 completes d for the chunk's columns and adds sum(d^2) of each row into accum.
    if (threadIdx.y == 0) {
        for (int t = 0; t < TILE; ++t) {
            float v = 0.f;
            for (int g = 0; g < SPLIT; ++g) v += tile[t * TILE_STRIDE + g * COLS + threadIdx.x];
            v = warp_sum(v * v);
            if (threadIdx.x == 0 && first_row + t < n) atomicAdd(&accum[first_row + t], v);
        }
    }

    // 4. The last block of the tile turns its rows' sums into scores and clears the scratch state.
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&tile_ticket[blockIdx.y], 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    if (tid < TILE && first_row + tid < n) {
        const int row = first_row + tid;
        const float s = sqrtf(__ldcg(&accum[row]));
        accum[row] = 0.f;
        score[row] = s;
#if PATCHES
        atomicMax(&image_max[row / PATCHES], __float_as_uint(s));  // non-negative floats order as their bits
#endif
    }
    if (tid == 0) tile_ticket[blockIdx.y] = 0u;
#if PATCHES
    // 5. The last tile to finish writes each image's worst patch.
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(ticket, 1u) == gridDim.y - 1;
    __syncthreads();
    if (last) {
        for (int image = tid; image < n / PATCHES; image += THREADS)
            image_score[image] = __uint_as_float(atomicExch(&image_max[image], 0u));
        if (tid == 0) *ticket = 0u;
    }
#endif
}
