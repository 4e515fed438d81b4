// Fused Gaussian anomaly scoring: one launch per batch.
//
//   score[n] = || (e_n / |e_n| - mean) L ||      L lower-triangular, precision = L L^T
//
// reads the raw embedding e_n written by the TensorRT engine, L2-normalises it, centres
// it, multiplies by the Cholesky factor and reduces to one score per image. The mean and
// factor are uploaded once when the runtime starts, never per frame.
//
// Work split: grid = (chunks of COLS = 32 columns of d = c L, tiles of TILE rows). A block
// keeps its tile's centred rows in shared memory, interleaved (element i of all TILE rows
// side by side) so one 16-byte broadcast read feeds four rows; its SPLIT row groups
// (threadIdx.y) each walk every SPLIT-th row of L for the chunk's 32 columns, so a warp
// reads 128 contiguous bytes of one row and many rows are in flight at once (at small
// batches the launch waits on those loads, not on arithmetic). Rows above the chunk's
// first column are skipped since L is zero there. Warp t then adds the row groups' parts
// of row t, squares and sums the chunk's columns and adds that into accum[row]; the last
// block of a tile (tile ticket) takes the square roots and clears its accum and ticket
// for the next launch.
//
// Compile-time parameters: DIM (embedding size, required), TILE (rows per block: 4, 8 or
// 16), SPLIT (row groups per block; threads = 32 * SPLIT), FACTOR_HALF (store L in fp16,
// halving the bytes read; accumulation stays fp32), PATCHES (patch scorer: each image is
// PATCHES consecutive rows of raw, un-normalised patch features; every row gets its score
// and the last tile to finish writes each image's worst patch to image_score).

#ifndef DIM
#error "compile with -DDIM=<embedding size>"
#endif
#ifndef TILE
#define TILE 8
#endif
#if TILE % 4
#error "TILE must be a multiple of 4"
#endif
#ifndef SPLIT
#define SPLIT 1
#endif
#ifndef PATCHES
#define PATCHES 0
#endif
#define COLS 32
#define THREADS (COLS * SPLIT)
#define TILE_FLOATS (TILE * (DIM > THREADS ? DIM : THREADS))  // the centred rows, later the row groups' parts

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
    __shared__ __align__(16) float tile[TILE_FLOATS];
#if !PATCHES
    __shared__ float norms[THREADS / 32 * TILE];  // per warp, the partial squared norm of each row
#endif
    __shared__ bool last;
    const int tid = threadIdx.y * COLS + threadIdx.x;
    const int first_row = blockIdx.y * TILE;
    const int col = blockIdx.x * COLS + threadIdx.x;

    // 1. Centre the tile's rows into tile[i * TILE + t] (global embeddings are L2-normalised
    //    first; patch features are not). Each thread keeps to one row t, so consecutive
    //    threads write consecutive words; rows past n are zeros.
    const int t_own = tid % TILE, row_own = first_row + t_own;
    float sq = 0.f;
    for (int k = tid; k < TILE * DIM; k += THREADS) {
        const float e = row_own < n ? embedding[(size_t)row_own * DIM + k / TILE] : 0.f;
        tile[k] = e;
        sq += e * e;
    }
#if PATCHES
    const float scale = 1.f;
#else
    for (int offset = 16; offset >= TILE; offset >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
    if ((tid & 31) < TILE) norms[(tid >> 5) * TILE + (tid & 31)] = sq;  // lanes 0..TILE-1 hold rows 0..TILE-1
    __syncthreads();
    sq = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) sq += norms[w * TILE + t_own];
    const float scale = rsqrtf(fmaxf(sq, 1e-24f));
#endif
    for (int k = tid; k < TILE * DIM; k += THREADS) tile[k] = row_own < n ? tile[k] * scale - mean[k / TILE] : 0.f;
    __syncthreads();

    // 2. This row group's part of d[t][col] = sum_{i >= col} centred[t][i] * L[i][col].
    float d[TILE];
#pragma unroll
    for (int t = 0; t < TILE; ++t) d[t] = 0.f;
    if (col < DIM) {
#pragma unroll 8
        for (int i = blockIdx.x * COLS + threadIdx.y; i < DIM; i += SPLIT) {
            const float l = load_factor(factor + (size_t)i * DIM + col);
            const float4* centred = reinterpret_cast<const float4*>(tile + i * TILE);
#pragma unroll
            for (int q = 0; q < TILE / 4; ++q) {
                const float4 c = centred[q];
                d[4 * q] = fmaf(c.x, l, d[4 * q]);
                d[4 * q + 1] = fmaf(c.y, l, d[4 * q + 1]);
                d[4 * q + 2] = fmaf(c.z, l, d[4 * q + 2]);
                d[4 * q + 3] = fmaf(c.w, l, d[4 * q + 3]);
            }
        }
    }
    __syncthreads();  // the centred rows are no longer needed: their memory takes the row groups' parts
#pragma unroll
    for (int t = 0; t < TILE; ++t) tile[t * THREADS + tid] = d[t];
    __syncthreads();

    // 3. Warp t completes d of row t for the chunk's columns and adds its sum(d^2) into accum.
    for (int t = threadIdx.y; t < TILE; t += SPLIT) {
        float part[4] = {0.f, 0.f, 0.f, 0.f};  // four independent sums: the adds do not wait on each other
#pragma unroll
        for (int g = 0; g < SPLIT; ++g) part[g % 4] += tile[t * THREADS + g * COLS + threadIdx.x];
        const float d_col = part[0] + part[1] + part[2] + part[3];
        const float v = warp_sum(d_col * d_col);
        if (threadIdx.x == 0 && first_row + t < n) atomicAdd(&accum[first_row + t], v);
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
