// Fused Gaussian anomaly scoring: one launch per batch.
//
//   score[n] = || (e_n / |e_n| - mean) L ||      L lower-triangular, precision = L L^T
//
// reads the raw embedding e_n written by the TensorRT engine, L2-normalises it, centres
// it, multiplies by the Cholesky factor and reduces to one score per image. The mean and
// factor are uploaded once when the runtime starts, never per frame.
//
// Work split: grid = (column chunks of d = c L, tiles of TILE images). A block keeps its
// tile's centred embeddings in shared memory and computes COLS columns of d for each of
// them; reading row i of L across the block's threads is coalesced, and the rows above
// the block's first column are skipped since L is zero there. The partial sums of d^2
// are added into accum[n]; the last block to finish (ticket counter) takes the square
// roots, writes the scores and clears accum and the ticket for the next launch.
//
// Compile-time parameters: DIM (embedding size, required), TILE (rows per block),
// COLS (columns per block = threads per block, a multiple of 32), FACTOR_HALF (store L
// in fp16, halving the bytes read; accumulation stays fp32), PATCHES (patch scorer: each
// image is PATCHES consecutive rows of raw, un-normalised patch features; the last block
// also writes each image's worst patch to image_score).

#ifndef DIM
#error "compile with -DDIM=<embedding size>"
#endif
#ifndef TILE
#define TILE 8
#endif
#ifndef COLS
#define COLS 64
#endif
#ifndef PATCHES
#define PATCHES 0
#endif

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
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < COLS / 32; ++w) total += scratch[w];
    return total;
}

extern "C" __global__ void __launch_bounds__(COLS) mahalanobis_fused(
    const float* __restrict__ embedding,   // [n, DIM] raw, as the backbone writes it
    const float* __restrict__ mean,        // [DIM], of the L2-normalised embeddings
    const factor_t* __restrict__ factor,   // [DIM, DIM] row-major, lower-triangular
    float* __restrict__ accum,             // [>= n], zero on entry and on exit
    unsigned int* __restrict__ ticket,     // [1], zero on entry and on exit
    float* __restrict__ score,             // [n]: one score per row (per image, or per patch)
    float* __restrict__ image_score,       // [n / PATCHES]: worst patch per image (PATCHES > 0 only)
    const int n)
{
    __shared__ float centred[TILE][DIM];
    __shared__ float scratch[COLS / 32];
    __shared__ bool last_block;
    const int first_image = blockIdx.y * TILE;
    const int col = blockIdx.x * COLS + threadIdx.x;

    // 1. Centre the tile's rows (global embeddings are L2-normalised first; patch features are not).
    for (int t = 0; t < TILE; ++t) {
        const int image = first_image + t;
        float sq = 0.f;
        if (image < n) {
            for (int i = threadIdx.x; i < DIM; i += COLS) {
                const float e = embedding[(size_t)image * DIM + i];
                centred[t][i] = e;
                sq += e * e;
            }
        }
        const float scale = PATCHES ? 1.f : rsqrtf(fmaxf(block_sum(sq, scratch), 1e-24f));
        for (int i = threadIdx.x; i < DIM; i += COLS)
            centred[t][i] = image < n ? centred[t][i] * scale - mean[i] : 0.f;
    }
    __syncthreads();

    // 2. d[t][col] = sum_{i >= col} centred[t][i] * L[i][col]
    float d[TILE];
#pragma unroll
    for (int t = 0; t < TILE; ++t) d[t] = 0.f;
    if (col < DIM) {
        for (int i = blockIdx.x * COLS; i < DIM; ++i) {
            const float l = load_factor(factor + (size_t)i * DIM + col);
#pragma unroll
            for (int t = 0; t < TILE; ++t) d[t] = fmaf(centred[t][i], l, d[t]);
        }
    }

    // 3. Add this block's share of sum(d^2) for every image of the tile.
    for (int t = 0; t < TILE; ++t) {
        const float part = block_sum(d[t] * d[t], scratch);
        if (threadIdx.x == 0 && first_image + t < n) atomicAdd(&accum[first_image + t], part);
    }

    // 4. The last block to finish turns the sums into scores and clears the scratch state.
    __threadfence();
    if (threadIdx.x == 0) {
        const unsigned int done = atomicAdd(ticket, 1u);
        last_block = done == gridDim.x * gridDim.y - 1;
    }
    __syncthreads();
    if (last_block) {
        for (int image = threadIdx.x; image < n; image += COLS)
            score[image] = sqrtf(atomicExch(&accum[image], 0.f));
        if (threadIdx.x == 0) *ticket = 0u;
#if PATCHES
        __syncthreads();  // this block wrote every row's score; now each image's worst patch
        for (int image = threadIdx.x; image < n / PATCHES; image += COLS) {
            float worst = score[image * PATCHES];
            for (int p = 1; p < PATCHES; ++p) worst = fmaxf(worst, score[image * PATCHES + p]);
            image_score[image] = worst;
        }
#endif
    }
}
