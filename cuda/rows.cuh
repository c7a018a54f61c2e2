// rows.cuh — block reductions and the INT8 row quantization shared by the row kernels
// (cuda/fused.cu) and the attention combine (cuda/attention.cu). Inlined by engine/gpu/kernels.py.
//
// Quantization rule (engine/formats/common.py): x8 = clamp(rint(x / s), -127, 127) with IEEE
// division, s = max|row| / 127 (1 for an all-zero row) in dynamic mode.
// mode: 0 = static scale static_scale[0]; 1 = dynamic per row; 2 = fp16 output only.
// Non-finite values: every max below propagates NaN (fmaxf would drop it), and a row holding a
// NaN or an Inf gets a NaN scale in both modes, so the GEMM's output and then the logits are
// NaN, which the engine reports (engine/gpu/model.py, cuda/sample.cu SAMPLE_NONFINITE): the
// rounding below maps NaN to code 0, which would otherwise hide it.
#pragma once
#include <cuda_fp16.h>
#include "pdl.cuh"
#include "cluster.cuh"

#define QMAX 127
#define MODE_STATIC 0
#define MODE_DYNAMIC 1
#define MODE_FP16 2
#define NEG_INF __int_as_float(0xff800000)   // NVRTC has no math.h INFINITY
#define QNAN __int_as_float(0x7fffffff)
#define FLT_MAX_F 3.402823466e38f

// max(a, b), NaN when either is NaN (fmaxf returns the other operand): one instruction on sm_80+
__device__ __forceinline__ float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return (a > b || a != a) ? a : b;
#endif
}

__device__ __forceinline__ signed char quant1(float x, float s) {
    int q = __float2int_rn(__fdiv_rn(x, s));
    return (signed char)max(-QMAX, min(QMAX, q));
}

// quant1 for the many values of one row: the same codes from one reciprocal a row. __fdiv_rn
// compiles to div.rn's fast path, MUFU.RCP refined by a Newton step (y), the quotient x·y and
// its FMA correction, behind an FCHK that sends extreme operands to a slow path: ~12
// instructions an element with its branch. Here y is computed once and each element runs the
// quotient and the correction only (3 FMAs), so it gets __fdiv_rn's bits wherever FCHK would
// have passed it. For finite x only (a row holding a NaN or an Inf has a NaN scale, which
// RowQuant::ok refuses, as it refuses scales past 2^±100: the caller runs quant1 there). x is
// clamped to ±128·s first, which moves only quotients past 128 (code 127 either way), so nothing
// overflows; where |x / s| ≥ 0.5, x ≥ 2^-101 and the FMA remainder is exact, div.rn's own
// arithmetic; below 0.5 both give code 0 (±0 and subnormal x included).
// tests/test_rows_gpu.py compares the codes with quant1's on quotients at and beside every
// half-integer over scales 2^-126..2^127.
struct RowQuant {
    float s, y, lim;
    __device__ __forceinline__ static bool ok(float s) { return s >= 0x1p-100f && s <= 0x1p100f; }
    __device__ __forceinline__ explicit RowQuant(float s_) : s(s_), lim(128.f * s_) {
        float y0;
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y0) : "f"(s_));
        y = __fmaf_rn(y0, __fmaf_rn(-s_, y0, 1.f), y0);
    }
    __device__ __forceinline__ signed char operator()(float x) const {
        x = fminf(fmaxf(x, -lim), lim);
        const float q0 = __fmaf_rn(x, y, 0.f);
        const int q = __float2int_rn(__fmaf_rn(y, __fmaf_rn(-s, q0, x), q0));
        return (signed char)max(-QMAX, min(QMAX, q));
    }
};
__device__ __forceinline__ signed char quant_with(float x, float s) { return quant1(x, s); }
__device__ __forceinline__ signed char quant_with(float x, const RowQuant& q) { return q(x); }

// Block-wide reductions for blockDim.x a multiple of 32, at most 1024.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
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
// The same with one barrier instead of three, for a caller that owns `sh` (32 floats) and
// uses it once per kernel (RowTeam's slots): no barrier guards a reuse, and every warp
// reduces the 32 warp results itself (the same butterfly, so every thread gets the same bits).
template <bool MAX>
__device__ __forceinline__ float block_reduce_once(float v, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sh[lane] : (MAX ? NEG_INF : 0.f);
    return MAX ? warp_max(v) : warp_sum(v);
}
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// SiLU(g)·u of the MLP, one definition for silu_mul_quant and the SiLU GEMV epilogue (bit-equal):
// g · rcp(1 + 2^(−g·log2 e)) · u with the approximate ex2 and rcp (MUFU, flushing subnormals). The
// ex2 is __expf's: where __expf's result is subnormal, 1 + it rounds to 1 either way. The rcp
// replaces an IEEE division (its Newton steps, FCHK and slow-path branch, ~12 instructions an
// element) and is within an ulp of it; ±inf and NaN come out as the division gives them (g = −inf
// is NaN in both; a large finite negative g gives d = inf, rcp 0, −0 · u). Below g ≈ −87.3 the rcp
// flushes to 0 where the division gave at most |g|·2^-126 (~1e-36): 0 once rounded to fp16 or
// int8. H200, 7B prefill of 2048 tokens: docs/KERNELS.md.
__device__ __forceinline__ float silu_mul(float g, float u) {
    float e, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(g * -1.4426950408889634f));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
    return g * r * u;
}
// GELU(g)·u of Gemma's GeGLU MLP, GELU's tanh approximation (transformers' gelu_pytorch_tanh,
// engine/model/ops_ref.py gelu_tanh): 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))), tanhf (not a
// fast approximation: its error would be ~1e-3 where the fp16 inputs hold 5e-4).
__device__ __forceinline__ float gelu_tanh_mul(float g, float u) {
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
}
#define ACT_SILU 0
#define ACT_GELU_TANH 1
template <int ACT>
__device__ __forceinline__ float act_mul(float g, float u) {
    return ACT == ACT_GELU_TANH ? gelu_tanh_mul(g, u) : silu_mul(g, u);
}

// Scale for one row from its absmax (dynamic) or the static scale; NaN when the absmax is not
// finite (a NaN or Inf in the row), in both modes.
__device__ __forceinline__ float row_scale(int mode, float amax, const float* static_scale) {
    if (!(amax <= FLT_MAX_F)) return QNAN;
    if (mode == MODE_DYNAMIC) return amax > 0.f ? amax / 127.f : 1.f;
    return static_scale[0];
}

// The CTAs that share one row: a thread block cluster of CL CTAs (sm_90; CL = 1 is one
// CTA, and the only choice elsewhere). A one-row kernel on one SM is bound by its
// instructions and latency chain (docs/KERNELS.md); CL SMs split the row's work. Thread
// tid = rank · blockDim + threadIdx of T = CL · blockDim threads handles elements
// tid + i·T. Reductions go block-wide, then across the cluster through distributed shared
// memory: every CTA publishes its value in a slot (one slot per reduction of a kernel, so
// no slot is rewritten; each slot also has its own block-reduction buffer), one cluster
// barrier, every thread reads the CL values in rank order (the same float sum everywhere).
// finish() keeps each CTA alive until no other can still read its slots.
// Clusters exist from sm_90 on; below, the attribute is left out (nvcc rejects it) and a
// RowTeam of more than one CTA traps: the launcher (engine/gpu/fused.py _row) never asks for
// one there, and a kernel that silently reduced over one CTA would write wrong rows.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ROW_CLUSTER_DIMS(CL)
#define ROW_CLUSTER_DIMS_Z(CL)
#else
#define ROW_CLUSTER_DIMS(CL) __cluster_dims__(CL, 1, 1)
#define ROW_CLUSTER_DIMS_Z(CL) __cluster_dims__(1, 1, (CL) > 0 ? (CL) : 1)   // CL = 0: clusters of one CTA
#endif

template <int CL>
struct RowTeam {
    int row, tid, T;
    __device__ __forceinline__ RowTeam() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
        if (CL > 1) __trap();
#endif
        row = blockIdx.x / CL;
        tid = (CL > 1 ? cluster_rank() : 0) * (int)blockDim.x + threadIdx.x;
        T = CL * blockDim.x;
    }
    template <bool MAX>
    __device__ __forceinline__ float reduce(float v, int slot) {
        __shared__ float warps[2][32];
        v = block_reduce_once<MAX>(v, warps[slot]);
        if (CL == 1) return v;
        __shared__ float part[2];
        if (threadIdx.x == 0) part[slot] = v;
        cluster_sync();
        float r = MAX ? NEG_INF : 0.f;
#pragma unroll
        for (int c = 0; c < CL; ++c) {
            const float x = ld_cluster(&part[slot], c);
            r = MAX ? nan_max(r, x) : r + x;
        }
        return r;
    }
    // After the kernel's last reduction: each CTA's slots stay alive until its peers have read
    // them. store_row calls it before its stores (the barrier's release, a MEMBAR.ALL.GPU on
    // sm_90, then has no store to wait for); the kernel's own call at its end is then a no-op, so
    // a reduction added after store_row would need a barrier of its own.
    bool done = false;
    __device__ __forceinline__ void finish() {
        if (CL > 1 && !done) cluster_sync();
        done = true;
    }
};

// VEC consecutive elements moved in one access (Pack): the row kernels' element j of a
// thread is chunk (tid + c·T) of VEC elements, c < PER / VEC. VEC = 1 is the element-strided
// layout of the decode launches; the prefill launches (thousands of rows, one CTA each) take
// VEC = 8 (16-byte fp16 loads, 8-byte int8 stores) where the row width and every row's base
// allow it (engine/gpu/fused.py row_launch). Loads and stores of a Pack are aligned to its size.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack { T e[N]; };
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(int x) { return __int2float_rn(x); }   // dg_epilogue's conversion
__device__ __forceinline__ void from_float(float& d, float x) { d = x; }
__device__ __forceinline__ void from_float(__half& d, float x) { d = __float2half_rn(x); }

template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, float* v) {
    if constexpr (VEC == 1) {
        v[0] = to_float(*p);
    } else {
        const Pack<T, VEC> q = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = to_float(q.e[e]);
    }
}
template <int VEC>
__device__ __forceinline__ void zero_vec(float* v) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = 0.f;
}
template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const float* v) {
    if constexpr (VEC == 1) {
        from_float(*p, v[0]);
    } else {
        Pack<T, VEC> q;
#pragma unroll
        for (int e = 0; e < VEC; ++e) from_float(q.e[e], v[e]);
        *reinterpret_cast<Pack<T, VEC>*>(p) = q;
    }
}
// Q: a float scale (quant1 each element) or a RowQuant.
template <int VEC, class Q>
__device__ __forceinline__ void store_quant(signed char* out, int j, const float* v, const Q& s) {
    if constexpr (VEC == 1) {
        out[j] = quant_with(v[0], s);
    } else {
        Pack<signed char, VEC> q;
#pragma unroll
        for (int e = 0; e < VEC; ++e) q.e[e] = quant_with(v[e], s);
        *reinterpret_cast<Pack<signed char, VEC>*>(out + j) = q;
    }
}
// First element of a thread's chunk c.
template <int VEC, int CL>
__device__ __forceinline__ int chunk_col(const RowTeam<CL>& team, int c) { return (team.tid + c * team.T) * VEC; }

// Int8 rows are written with leading dimension ld ≥ width: the GEMM's K is padded to a
// multiple of the group (cuda/common.cuh), and the pad columns must be zero.
template <int CL>
__device__ __forceinline__ void zero_pad(signed char* row, int width, int ld, const RowTeam<CL>& team) {
    for (int j = width + team.tid; j < ld; j += team.T) row[j] = 0;
}

// A row held in registers: thread t keeps PER elements, the VEC-element chunks t + c·T
// (c < PER / VEC; VEC = 1: elements t + i·T), all loaded before any is used, so a row costs one memory round trip instead of one per loop trip
// (v1 looped over 256 threads: 5–16 µs a launch in the 7B decode graph). PER and CL are
// template arguments and the launcher (engine/gpu/fused.py row_launch) picks the cluster size
// for the row's width, then the smallest power of two with PER · 1024 ≥ width / CL and
// ⌈width / (CL · PER)⌉ threads: a one-row launch wants every warp it can get and no empty
// slots, whose predicated-off instructions still take issue cycles (both were measured:
// 5–11 µs a launch otherwise).
// __launch_bounds__(1024) caps a thread at 64 registers: the PER = 32 instantiations (rows
// over 16384 values on one CTA) spill to local memory (ptxas -v: add_rmsnorm_quant<32, 1>
// about 300 bytes, attn_decode_combine<32> about 100; L1-cached); the rows of the models we
// run (4096 values or fewer a CTA) stay in registers.
// Store a row held as v[PER] (VEC-chunk team-strided) quantized per mode, with its scale.
// A thread's chunks of a row p[0..W) as float (store_row's order), zero past W.
template <int PER, int VEC, int CL, class T>
__device__ __forceinline__ void load_row(const T* p, int W, float (&v)[PER], const RowTeam<CL>& team) {
#pragma unroll
    for (int c = 0; c < PER / VEC; ++c) {
        const int j = chunk_col<VEC>(team, c);
        if (j < W) load_vec<VEC>(p + j, &v[c * VEC]);
        else zero_vec<VEC>(&v[c * VEC]);
    }
}

// W % VEC == 0; the x8 rows (ld) and xh rows (W) start VEC-element aligned.
template <int PER, int CL, int VEC>
__device__ __forceinline__ void store_row(const float (&v)[PER], int W, int mode, const float* static_scale,
                                          signed char* x8, int ld, float* sx, __half* xh,
                                          RowTeam<CL>& team) {
    const int row = team.row;
    if (mode == MODE_FP16) {
#pragma unroll
        for (int c = 0; c < PER / VEC; ++c) {
            const int j = chunk_col<VEC>(team, c);
            if (j < W) store_vec<VEC>(xh + (size_t)row * W + j, &v[c * VEC]);
        }
        return;
    }
    // the absmax in both modes: static rows need it too, to tell a NaN or Inf (row_scale)
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) amax = nan_max(amax, fabsf(v[i]));   // slots past W hold 0
    amax = team.template reduce<true>(amax, 1);
    team.finish();                  // the last reduction: the cluster's exit barrier before the stores
    float s = row_scale(mode, amax, static_scale);
    if (team.tid == 0) sx[row] = s;
    signed char* out = x8 + (size_t)row * ld;
    auto store = [&](const auto& q) {
#pragma unroll
        for (int c = 0; c < PER / VEC; ++c) {
            const int j = chunk_col<VEC>(team, c);
            if (j < W) store_quant<VEC>(out, j, &v[c * VEC], q);
        }
    };
    if (RowQuant::ok(s)) store(RowQuant(s));   // one reciprocal for the row, quant1's codes
    else store(s);                             // a non-finite row's NaN scale, or one past 2^±100
    zero_pad(out, W, ld, team);
}
