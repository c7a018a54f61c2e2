// fused.cu — the per-token steps of the GPU engine around the A8W4 GEMMs.
//
// What: RMSNorm + INT8 activation quantization (with the residual add, or the first
// layer's embedding gather, fused in), SiLU·mul + quantization, row quantization (with
// or without a known absmax) and the fp16 / INT8 GEMV of the lm_head. Each is one
// launch that reads its input once.
// Sampling lives in cuda/sample.cu.
// RoPE with the KV-cache write and the attention kernels live in cuda/attention.cu.
//
// Layouts: activations are row-major (M tokens, features). The residual stream h
// is float32 (M, H).
// Positions and sequence lengths are read from device memory, never passed by
// value, so a decode step can be captured once as a CUDA graph and replayed.
// Quantization rule and modes: cuda/rows.cuh.
#include "rows.cuh"

// grid (M·CL), clusters of CL (cuda/rows.cuh RowTeam), block ≤ 1024. First the residual add
// h += y when y is given (the o_proj or down_proj output of the step before; nullptr skips
// it), then x = (h * rstd) * w, quantized (modes 0/1) or stored fp16 (mode 2). One launch
// instead of an add and a norm. zero (nullable): zero[row] = 0, the amax slot a later kernel
// of the sublayer max-reduces into (attn_decode's output, the SiLU GEMV's; engine/gpu/model.py _fold_quant).
// emb (nullable, the first layer): h[row] = emb[tok[row]] first, the embedding gather of the
// token (fp16 table), instead of reading h; y must then be null.
template <int PER, int CL, int VEC>
__global__ void ROW_CLUSTER_DIMS(CL) __launch_bounds__(1024)
add_rmsnorm_quant(float* __restrict__ h, const __half* __restrict__ y, const float* __restrict__ w, int H,
                  float eps, int mode, const float* __restrict__ static_scale, signed char* __restrict__ x8,
                  int ld, float* __restrict__ sx, __half* __restrict__ xh, unsigned* __restrict__ zero,
                  const __half* __restrict__ emb, const int* __restrict__ tok) {
    RowTeam<CL> team;
    constexpr int NC = PER / VEC;   // chunks a thread holds (cuda/rows.cuh Pack)
    float wv[PER];                  // the norm weight is no kernel's output: read before the PDL wait
    load_row<PER, VEC>(w, H, wv, team);
    pdl_enter();
    if (zero && team.tid == 0) zero[team.row] = 0u;
    float* row = h + (size_t)team.row * H;
    const __half* yr = y ? y + (size_t)team.row * H : nullptr;
    // max(., 0): a SAMPLE_NONFINITE (-1) token of a damaged step reads row 0, never out of
    // bounds (the host refuses that step: engine/gpu/decode.py)
    const __half* er = emb ? emb + (size_t)max(tok[team.row], 0) * H : nullptr;
    float v[PER];
    if constexpr (VEC == 1) {
        // element-strided (decode): this form compiles to the schedule measured for the decode
        // step; the chunk loop below at VEC = 1 compiled to another one, and the H100 7B step
        // took 2.05 ms against 1.99 (same machine)
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int j = team.tid + i * team.T;
            v[i] = j < H ? (er ? __half2float(er[j]) : row[j]) : 0.f;
            if (yr && j < H) v[i] += __half2float(yr[j]);
        }
    } else {
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int j = chunk_col<VEC>(team, c);
            float* vc = &v[c * VEC];
            if (j < H) {
                if (er) load_vec<VEC>(er + j, vc);
                else load_vec<VEC>(row + j, vc);
            } else {
                zero_vec<VEC>(vc);
            }
            if (yr && j < H) {
                float t[VEC];
                load_vec<VEC>(yr + j, t);
#pragma unroll
                for (int e = 0; e < VEC; ++e) vc[e] += t[e];
            }
        }
    }
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int j = chunk_col<VEC>(team, c);
        if ((yr || er) && j < H) store_vec<VEC>(row + j, &v[c * VEC]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ss += v[c * VEC + e] * v[c * VEC + e];
    }
    // Σx² past float32's range would give rstd = 0 and a row of zeros, a finite wrong answer:
    // NaN instead, which the logits check reports (cuda/rows.cuh: the CPU path's norm refuses it)
    const float ms = team.template reduce<false>(ss, 0) / H;
    const float rstd = ms <= FLT_MAX_F ? 1.f / sqrtf(ms + eps) : QNAN;
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = (v[i] * rstd) * wv[i];     // 0 past H
    store_row<PER, CL, VEC>(v, H, mode, static_scale, x8, ld, sx, xh, team);
    team.finish();
}

// grid (M·CL), clusters of CL, block ≤ 1024. gu is the fused gate|up GEMM output (M, 2I):
// m = silu(gate) * up (gelu_mul_quant: gelu_tanh(gate) * up, Gemma's GeGLU). il: gate and up
// interleaved per 16 columns (8 gate channels, then the same 8 up channels: ops_cuda.interleave_rows),
// else gate is columns 0..I-1 and up I..2I-1. A chunk (VEC ≤ 8 elements, 8 % VEC == 0) lies within
// one run of 8 channels. The two kernels share this body (ACT: rows.cuh act_mul).
template <int ACT, int PER, int CL, int VEC>
__device__ __forceinline__ void act_mul_row(const __half* __restrict__ gu, int I, int mode,
                                            const float* __restrict__ static_scale, signed char* __restrict__ x8,
                                            int ld, float* __restrict__ sx, __half* __restrict__ mh, int il) {
    RowTeam<CL> team;
    pdl_enter();
    const __half* g = gu + (size_t)team.row * 2 * I;
    float v[PER];
    if constexpr (VEC == 1) {       // element-strided (decode): the schedule measured there, as in add_rmsnorm_quant
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int j = team.tid + i * team.T;
            const int jg = il ? ((j >> 3) << 4) + (j & 7) : j, ju = il ? jg + 8 : j + I;
            v[i] = j < I ? act_mul<ACT>(__half2float(g[jg]), __half2float(g[ju])) : 0.f;
        }
    } else {
#pragma unroll
        for (int c = 0; c < PER / VEC; ++c) {
            const int j = chunk_col<VEC>(team, c);
            const int jg = il ? ((j >> 3) << 4) + (j & 7) : j, ju = il ? jg + 8 : j + I;
            float gv[VEC], uv[VEC];
            if (j < I) {
                load_vec<VEC>(g + jg, gv);
                load_vec<VEC>(g + ju, uv);
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[c * VEC + e] = j < I ? act_mul<ACT>(gv[e], uv[e]) : 0.f;
        }
    }
    store_row<PER, CL, VEC>(v, I, mode, static_scale, x8, ld, sx, mh, team);
    team.finish();
}

template <int PER, int CL, int VEC>
__global__ void ROW_CLUSTER_DIMS(CL) __launch_bounds__(1024)
silu_mul_quant(const __half* __restrict__ gu, int I, int mode, const float* __restrict__ static_scale,
               signed char* __restrict__ x8, int ld, float* __restrict__ sx, __half* __restrict__ mh, int il) {
    act_mul_row<ACT_SILU, PER, CL, VEC>(gu, I, mode, static_scale, x8, ld, sx, mh, il);
}

template <int PER, int CL, int VEC>
__global__ void ROW_CLUSTER_DIMS(CL) __launch_bounds__(1024)
gelu_mul_quant(const __half* __restrict__ gu, int I, int mode, const float* __restrict__ static_scale,
               signed char* __restrict__ x8, int ld, float* __restrict__ sx, __half* __restrict__ mh, int il) {
    act_mul_row<ACT_GELU_TANH, PER, CL, VEC>(gu, I, mode, static_scale, x8, ld, sx, mh, il);
}

// grid (M·CL), clusters of CL, block ≤ 1024. h += RMSNorm(y)·w: a sublayer's output y (the o or
// down GEMM's, (M, H) fp16) normed before the residual add (Gemma 3's post-attention and
// post-feedforward norms, config.sandwich_norm); add_rmsnorm_quant (y null) then norms h for the
// next sublayer. The norm of y in float32 as add_rmsnorm_quant's of h.
// acc (nullable; y is then not read): the A8W4 GEMM's int32 accumulators (M, H) instead of its fp16
// output, y = dg_epilogue(acc, sx[row], s8[col]) kept in float32 as the NumPy reference keeps a
// linear's output: the sublayer outputs reach the float32 residual stream unrounded (Gemma 3's
// GPU/CPU perplexity gap, docs/QUALITY.md).
template <int PER, int CL, int VEC>
__global__ void ROW_CLUSTER_DIMS(CL) __launch_bounds__(1024)
norm_add_rows(float* __restrict__ h, const __half* __restrict__ y, const int* __restrict__ acc,
              const float* __restrict__ sx, const float* __restrict__ s8, const float* __restrict__ w, int H,
              float eps) {
    RowTeam<CL> team;
    constexpr int NC = PER / VEC;
    float wv[PER], sv[PER];         // the norm weight and s8 are no kernel's output: read before the PDL wait
    load_row<PER, VEC>(w, H, wv, team);
    if (acc) load_row<PER, VEC>(s8, H, sv, team);
    pdl_enter();
    float* row = h + (size_t)team.row * H;
    float v[PER];
    if (acc) {
        load_row<PER, VEC>(acc + (size_t)team.row * H, H, v, team);
        const float s = sx[team.row];
#pragma unroll
        for (int i = 0; i < PER; ++i) v[i] = __fmul_rn(__fmul_rn(v[i], s), sv[i]);   // dg_epilogue, 0 past H
    } else {
        load_row<PER, VEC>(y + (size_t)team.row * H, H, v, team);
    }
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) ss += v[i] * v[i];
    const float ms = team.template reduce<false>(ss, 0) / H;
    const float rstd = ms <= FLT_MAX_F ? 1.f / sqrtf(ms + eps) : QNAN;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int j = chunk_col<VEC>(team, c);
        if (j < H) {
            float hv[VEC];
            load_vec<VEC>(row + j, hv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) hv[e] += (v[c * VEC + e] * rstd) * wv[c * VEC + e];
            store_vec<VEC>(row + j, hv);
        }
    }
    team.finish();
}

// grid (M, ⌈N / 256⌉), block 256: y[m, n] += bias[n] for y (M, N) row-major (fp16: rounded once):
// the biases of the o, gate|up and down linears where a config has them (Llama's attention_bias,
// mlp_bias); q|k|v's go through qk_norm_bias (cuda/attention.cu).
template <typename T>
__global__ void __launch_bounds__(256) add_bias(T* __restrict__ y, const float* __restrict__ bias, int N) {
    const int n = blockIdx.y * blockDim.x + threadIdx.x;
    const float b = n < N ? bias[n] : 0.f;       // a weight: read before the PDL wait
    pdl_enter();
    if (n >= N) return;
    T* p = y + (size_t)blockIdx.x * N + n;
    from_float(*p, to_float(*p) + b);
}

// grid (M, ⌈H / 256⌉), block 256: h[m] = emb[tok[m]]·scale, the scaled embedding (Gemma: √H, in
// float32 from the fp16 table). add_rmsnorm_quant gathers an unscaled embedding itself.
// max(., 0): a SAMPLE_NONFINITE (-1) token reads row 0 (see add_rmsnorm_quant).
template <typename T>
__global__ void __launch_bounds__(256) embed_rows(float* __restrict__ h, const T* __restrict__ emb,
                                                  const int* __restrict__ tok, int H, float scale) {
    pdl_enter();
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= H) return;
    const size_t t = (size_t)max(tok[blockIdx.x], 0);
    h[(size_t)blockIdx.x * H + j] = to_float(emb[t * H + j]) * scale;
}

// grid (M·CL), clusters of CL, block ≤ 1024. Quantize fp16 rows (the attention output
// feeding o_proj in prefill).
template <int PER, int CL, int VEC>
__global__ void ROW_CLUSTER_DIMS(CL) __launch_bounds__(1024)
quant_rows(const __half* __restrict__ x, int K, int mode, const float* __restrict__ static_scale,
           signed char* __restrict__ x8, int ld, float* __restrict__ sx) {
    RowTeam<CL> team;
    pdl_enter();
    const __half* row = x + (size_t)team.row * K;
    float v[PER] = {};
#pragma unroll
    for (int c = 0; c < PER / VEC; ++c) {
        const int j = chunk_col<VEC>(team, c);
        if (j < K) load_vec<VEC>(row + j, &v[c * VEC]);
    }
    store_row<PER, CL, VEC>(v, K, mode, static_scale, x8, ld, sx, nullptr, team);
    team.finish();
}

// grid (⌈ld / 1024⌉, M), block 256. Quantize rows whose absmax is already known (the batch-1
// decode step: attn_decode and the SiLU GEMV max-reduce their outputs, engine/gpu/model.py _fold_quant):
// x8[m, j] = quant1(x[m, j], s) for j < K, 0 for K ≤ j < ld, sx[m] = s, with s from
// amax[m] = max|x[m]| as float bits (mode 1), or the static scale[0] (mode 0; NaN when amax[m]
// is not finite, cuda/rows.cuh row_scale). No reduction, so a row spreads over many blocks and
// costs one memory round trip. ld % 4 == 0.
template <typename T>
__global__ void __launch_bounds__(256) quant_amax(const T* __restrict__ x, int K, int mode,
                                                  const float* __restrict__ static_scale,
                                                  const unsigned* __restrict__ amax, signed char* __restrict__ x8,
                                                  int ld, float* __restrict__ sx) {
    // a static scale is no kernel's output: read before the PDL wait (null in dynamic mode)
    const float st = mode == MODE_DYNAMIC ? 1.f : static_scale[0];
    pdl_enter();
    const int m = blockIdx.y;
    const int j = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    // the absmax and the row's values load before either is used: one round trip, not two
    const unsigned a = amax[m];
    const T* row = x + (size_t)m * K;
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = j + i < K ? (float)row[j + i] : 0.f;   // 0 past K (and ld)
    const float s = row_scale(mode, __uint_as_float(a), &st);
    if (blockIdx.x == 0 && threadIdx.x == 0) sx[m] = s;
    if (j >= ld) return;
    unsigned w = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) w |= (unsigned)(unsigned char)quant1(v[i], s) << (8 * i);
    *reinterpret_cast<unsigned*>(x8 + (size_t)m * ld + j) = w;
}

// grid (ceil(N / 8)), block 256: warp w of block b computes out[:, 8b + w] = x · w[8b + w]ᵀ
// (· scale[8b + w] for INT8 weights). x (M, K) fp16 row-major, w (N, K) fp16 or int8 row-major,
// out (M, N) fp16; M ≤ MT, K % 8 == 0 (fp16) or K % 16 == 0 (int8).
// The lm_head of a graphed decode step (fp16, or INT8 with one scale per row:
// ModelWeights.with_int8_lm_head): cuBLAS cannot be called while CuPy captures a graph.
// The product streams w once: each lane issues U 16-byte loads before it uses any, x rows
// come from L1/L2, fp32 accumulation. MT is a template argument so that M = 1 carries one
// accumulator, not 32 predicated ones (v1, runtime M ≤ 32 and one load in flight per lane,
// read the 7B lm_head at 18 % of copy bandwidth). Up to M = 8 only: every row of x is
// re-read from L2 for each 16-byte weight vector, so at M = 32 with K = 4096 (256 KB of x,
// past L1) the FP16 7B decode step took 56 ms; larger M goes to cuBLAS (fp16) or to
// 8-row slices (int8).
// Σ of the 8 fp16 values of xv times f[0..7] in fp32, summed left to right.
__device__ __forceinline__ float dot8(uint4 xv, const float* f) {
    const __half2* x2 = reinterpret_cast<const __half2*>(&xv);
    float2 a = __half22float2(x2[0]), b = __half22float2(x2[1]);
    float2 c = __half22float2(x2[2]), d = __half22float2(x2[3]);
    return a.x * f[0] + a.y * f[1] + b.x * f[2] + b.y * f[3] + c.x * f[4] + c.y * f[5] + d.x * f[6] + d.y * f[7];
}

template <int MT, int U, typename W>
__device__ __forceinline__ void gemv_tile(const __half* __restrict__ x, const W* __restrict__ w,
                                          const float* __restrict__ scale, __half* __restrict__ out,
                                          int M, int N, int K) {
    constexpr int E = 16 / sizeof(W);                    // weights per 16-byte vector
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool live = n < N;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)(live ? n : 0) * K);
    int kvn = live ? K / E : 0;
    uint4 wv[U];
    auto load = [&](int k0) {                             // all loads first: U in flight per lane
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int kv = k0 + 32 * u;
            wv[u] = kv < kvn ? __ldcs(wr + kv) : make_uint4(0u, 0u, 0u, 0u);   // streamed once
        }
    };
    load(lane);                   // weights are no kernel's output: read before the PDL wait
    const float sc = live && scale ? scale[n] : 1.f;
    pdl_enter();
    if (!live) return;
    for (int k0 = lane; k0 < kvn; k0 += 32 * U) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int kv = k0 + 32 * u;
            if (kv >= kvn) break;
            float wf[E];                                  // the vector's weights as floats
            if constexpr (E == 8) {
                const __half2* w2 = reinterpret_cast<const __half2*>(&wv[u]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 f = __half22float2(w2[i]);
                    wf[2 * i] = f.x;
                    wf[2 * i + 1] = f.y;
                }
            } else {                                      // 16 int8 weights: two x vectors
                const unsigned q[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
                for (int i = 0; i < 16; ++i) wf[i] = (float)(signed char)(q[i >> 2] >> (8 * (i & 3)));
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m < M) {
                    const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)m * K);
#pragma unroll
                    for (int h = 0; h < E / 8; ++h) acc[m] += dot8(xr[(E / 8) * kv + h], wf + 8 * h);
                }
            }
        }
        load(k0 + 32 * U);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m < M) {
            float v = warp_sum(acc[m]);
            if (lane == 0) out[(size_t)m * N + n] = __float2half_rn(v * sc);
        }
    }
}

// One entry point per M bucket and weight type (the launchers, engine/gpu/fused.py matmul_f16 and
// matmul_w8, pick the smallest MT ≥ M).
#define GEMV_F16_ENTRY(MT, U)                                                                      \
    extern "C" __global__ void __launch_bounds__(256) gemv_f16_m##MT(                             \
        const __half* __restrict__ x, const __half* __restrict__ w, __half* __restrict__ out,      \
        int M, int N, int K) { gemv_tile<MT, U, __half>(x, w, nullptr, out, M, N, K); }
#define GEMV_W8_ENTRY(MT, U)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) gemv_w8_m##MT(                              \
        const __half* __restrict__ x, const signed char* __restrict__ w, const float* __restrict__ scale, \
        __half* __restrict__ out, int M, int N, int K) { gemv_tile<MT, U, signed char>(x, w, scale, out, M, N, K); }
GEMV_F16_ENTRY(1, 8)
GEMV_F16_ENTRY(4, 4)
GEMV_F16_ENTRY(8, 4)
GEMV_W8_ENTRY(1, 8)
GEMV_W8_ENTRY(4, 4)
GEMV_W8_ENTRY(8, 4)
