// rows.cuh — block reductions and the INT8 row quantization shared by the row kernels
// (cuda/fused.cu) and the attention combine (cuda/attention.cu). Inlined by engine/kernels.py.
//
// Quantization rule (engine/formats.py): x8 = clamp(rint(x / s), -127, 127) with IEEE
// division, s = max|row| / 127 (1 for an all-zero row) in dynamic mode.
// mode: 0 = static scale static_scale[0]; 1 = dynamic per row; 2 = fp16 output only.
#pragma once
#include <cuda_fp16.h>
#include "pdl.cuh"

#define QMAX 127
#define MODE_STATIC 0
#define MODE_DYNAMIC 1
#define MODE_FP16 2
#define NEG_INF __int_as_float(0xff800000)   // NVRTC has no math.h INFINITY

__device__ __forceinline__ signed char quant1(float x, float s) {
    int q = __float2int_rn(__fdiv_rn(x, s));
    return (signed char)max(-QMAX, min(QMAX, q));
}

// Block-wide reductions for blockDim.x a multiple of 32, at most 1024.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide sum (MAX false) or max (MAX true); every thread gets the result.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();                 // sh may still be read by a previous call
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? sh[threadIdx.x] : (MAX ? NEG_INF : 0.f);
    if (wid == 0) v = MAX ? warp_max(v) : warp_sum(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// Scale for one row from its absmax (dynamic) or the static scale.
__device__ __forceinline__ float row_scale(int mode, float amax, const float* static_scale) {
    if (mode == MODE_DYNAMIC) return amax > 0.f ? amax / 127.f : 1.f;
    return static_scale[0];
}

// Int8 rows are written with leading dimension ld ≥ width: the GEMM's K is padded to a
// multiple of the group (cuda/common.cuh), and the pad columns must be zero.
__device__ __forceinline__ void zero_pad(signed char* row, int width, int ld) {
    for (int j = width + threadIdx.x; j < ld; j += blockDim.x) row[j] = 0;
}

// A row held in registers: thread t keeps elements t + i·blockDim (i < PER), all loaded
// before any is used, so a row costs one memory round trip instead of one per loop trip
// (v1 looped over 256 threads: 5–16 µs a launch in the 7B decode graph). PER is a template
// argument and the launcher (engine/model_cuda.row_launch) picks the smallest power of two
// with PER · 1024 ≥ width and ⌈width / PER⌉ threads: a one-row launch runs on one SM, so it
// wants every warp it can get (1024 threads) and no empty slots, whose predicated-off
// instructions still take issue cycles (both were measured: 5–11 µs a launch otherwise).
// __launch_bounds__(1024) caps a thread at 64 registers: add_rmsnorm_quant<32> and
// attn_decode_combine<32> (rows over 16384 values) and silu_mul_quant<8> spill a little to
// local memory (ptxas -v, 12–96 bytes; L1-cached); the others stay in registers.
// Store a row held as v[PER] (thread-strided) quantized per mode, with its scale.
template <int PER>
__device__ __forceinline__ void store_row(const float (&v)[PER], int W, int mode, const float* static_scale,
                                          signed char* x8, int ld, float* sx, __half* xh) {
    const int row = blockIdx.x;
    if (mode == MODE_FP16) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            int j = threadIdx.x + i * blockDim.x;
            if (j < W) xh[(size_t)row * W + j] = __float2half_rn(v[i]);
        }
        return;
    }
    float amax = 0.f;
    if (mode == MODE_DYNAMIC) {
#pragma unroll
        for (int i = 0; i < PER; ++i) amax = fmaxf(amax, fabsf(v[i]));   // slots past W hold 0
        amax = block_max(amax);
    }
    float s = row_scale(mode, amax, static_scale);
    if (threadIdx.x == 0) sx[row] = s;
    signed char* out = x8 + (size_t)row * ld;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        int j = threadIdx.x + i * blockDim.x;
        if (j < W) out[j] = quant1(v[i], s);
    }
    zero_pad(out, W, ld);
}

