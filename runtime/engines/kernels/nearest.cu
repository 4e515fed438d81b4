// Fused nearest-neighbour (memory-bank) scoring: one launch per batch.
//
//   patch_score[r] = 1 - max_j <f_r, b_j>          f_r: unit patch feature, b_j: unit bank row
//   image_score[n] = mean of the TOPK largest patch scores of image n
//
// With BLOCKS > 1 a row holds BLOCKS ViT blocks' tokens side by side (each 1/sqrt(BLOCKS) of the
// unit row): each block finds its own nearest bank row, and a patch's score is the blocks'
// distances 1 - BLOCKS * max_j <f_r,z, b_j,z> weighted by block_weight (runtime.scoring.MemoryBank).
//
// reads the patch features the TensorRT engine wrote ([N * PATCHES, DIM], fp32) against
// the bank uploaded once when the runtime starts ([M, DIM], fp32 or fp16), and writes
// every patch's cosine distance to its nearest bank row and each image's pooled score.
//
// Work split: grid = (tiles of ROWS = 64 feature rows, slices of the bank, BLOCKS). A block of
// 16 x 16 threads walks its bank slice in tiles of 64 rows; both tiles pass through
// shared memory KCHUNK dimensions at a time and each thread accumulates a 4 x 4 block of
// dot products (feature rows ty + 16 i, bank rows tx + 16 j: a half-warp reads 16
// consecutive bank columns, conflict-free, and one broadcast feature value). Each thread
// keeps the running maximum of its 4 rows; the 16 threads of a row group reduce it with
// shuffles and one atomicMax (floats mapped to order-preserving unsigned ints) merges the
// slices. The last block to finish (grid ticket) turns maxima into distances, pools each
// image with one warp (TOPK passes of a warp-wide arg-max over the untaken patches), and
// leaves its scratch zeroed for the next launch.
//
// Compile-time parameters: DIM (feature size, required), PATCHES (patches per image,
// required, at most 2048), TOPK (patches pooled per image: 1 = worst patch), BANK_HALF
// (bank stored in fp16, halving the bytes read; accumulation stays fp32), BLOCKS (ViT
// blocks side by side in a row, default 1; their weights are set in block_weight at load).

#include <cuda_fp16.h>

#ifndef DIM
#error "compile with -DDIM=<feature size>"
#endif
#ifndef PATCHES
#error "compile with -DPATCHES=<patches per image>"
#endif
#ifndef TOPK
#define TOPK 1
#endif
#if PATCHES > 2048 || TOPK < 1 || TOPK > PATCHES
#error "need 1 <= TOPK <= PATCHES <= 2048"
#endif
#ifndef BLOCKS
#define BLOCKS 1
#endif
#if BLOCKS < 1 || DIM % BLOCKS
#error "DIM must be a multiple of BLOCKS"
#endif
#define WIDTH (DIM / BLOCKS)

__constant__ float block_weight[BLOCKS];  // summing to 1; the launcher writes them once

#define ROWS 64
#define BANK_ROWS 64
#define KCHUNK 32
#define THREADS 256
#define PER_LANE ((PATCHES + 31) / 32)

#ifdef BANK_HALF
typedef __half bank_t;
__device__ __forceinline__ float load_bank(const bank_t v) { return __half2float(v); }
#else
typedef float bank_t;
__device__ __forceinline__ float load_bank(const bank_t v) { return v; }
#endif

// Order-preserving map from float to unsigned int, so atomicMax orders similarities; 0 is below every float.
__device__ __forceinline__ unsigned int ordered(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float unordered(unsigned int u) {
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

extern "C" __global__ void __launch_bounds__(THREADS)
nearest_fused(const float* __restrict__ features, const bank_t* __restrict__ bank, int bank_rows,
              unsigned int* __restrict__ best, unsigned int* __restrict__ ticket,
              float* __restrict__ patch_score, float* __restrict__ image_score, int rows)
{
    __shared__ float f_tile[KCHUNK][ROWS + 1];
    __shared__ float b_tile[KCHUNK][BANK_ROWS + 1];
    __shared__ bool last_block;
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const int row0 = blockIdx.x * ROWS, column0 = blockIdx.z * WIDTH;
    const int slice = (bank_rows + gridDim.y - 1) / gridDim.y;
    const int b_begin = blockIdx.y * slice, b_end = min(bank_rows, b_begin + slice);

    float row_max[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int b0 = b_begin; b0 < b_end; b0 += BANK_ROWS) {
        float acc[4][4] = {};
        for (int k0 = 0; k0 < WIDTH; k0 += KCHUNK) {
            for (int i = tid; i < ROWS * KCHUNK; i += THREADS) {
                const int r = i / KCHUNK, k = i % KCHUNK, gr = row0 + r, gk = k0 + k;
                f_tile[k][r] = (gr < rows && gk < WIDTH) ? features[(size_t)gr * DIM + column0 + gk] : 0.f;
            }
            for (int i = tid; i < BANK_ROWS * KCHUNK; i += THREADS) {
                const int r = i / KCHUNK, k = i % KCHUNK, gb = b0 + r, gk = k0 + k;
                b_tile[k][r] = (gb < b_end && gk < WIDTH) ? load_bank(bank[(size_t)gb * DIM + column0 + gk]) : 0.f;
            }
            __syncthreads();
#pragma unroll 8
            for (int k = 0; k < KCHUNK; ++k) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) { a[i] = f_tile[k][ty + 16 * i]; b[i] = b_tile[k][tx + 16 * i]; }
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (b0 + tx + 16 * j < b_end)
#pragma unroll
                for (int i = 0; i < 4; ++i) row_max[i] = fmaxf(row_max[i], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        for (int offset = 8; offset; offset >>= 1)
            row_max[i] = fmaxf(row_max[i], __shfl_xor_sync(0xffffffffu, row_max[i], offset, 16));
        const int r = row0 + ty + 16 * i;
        if (tx == 0 && r < rows && b_begin < b_end) atomicMax(&best[r * BLOCKS + blockIdx.z], ordered(row_max[i]));
    }

    __threadfence();
    __syncthreads();
    if (tid == 0) last_block = atomicAdd(ticket, 1u) == gridDim.x * gridDim.y * gridDim.z - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();

    for (int r = tid; r < rows; r += THREADS) {
        float score = 0.f;
        for (int z = 0; z < BLOCKS; ++z)
            score += (BLOCKS == 1 ? 1.f : block_weight[z])
                     * (1.f - BLOCKS * unordered(atomicExch(&best[r * BLOCKS + z], 0u)));
        patch_score[r] = score;
    }
    __syncthreads();

    const int lane = tid % 32, warp = tid / 32, images = rows / PATCHES;
    for (int n = warp; n < images; n += THREADS / 32) {
        const float* scores = patch_score + (size_t)n * PATCHES;
        unsigned long long taken = 0ull;  // bit t: patch lane + 32 t is already pooled
        float sum = 0.f;
        for (int pass = 0; pass < TOPK; ++pass) {
            float value = -INFINITY;
            int index = PATCHES;
            for (int t = 0; t < PER_LANE; ++t) {
                const int p = lane + 32 * t;
                if (p < PATCHES && !(taken >> t & 1ull) && scores[p] > value) { value = scores[p]; index = p; }
            }
            for (int offset = 16; offset; offset >>= 1) {
                const float v = __shfl_xor_sync(0xffffffffu, value, offset);
                const int ix = __shfl_xor_sync(0xffffffffu, index, offset);
                if (v > value || (v == value && ix < index)) { value = v; index = ix; }
            }
            sum += value;
            if (index % 32 == lane) taken |= 1ull << (index / 32);
        }
        if (lane == 0) image_score[n] = sum / TOPK;
    }
    if (tid == 0) *ticket = 0u;
}
