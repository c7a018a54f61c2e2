// fused.cu — the per-token steps of the GPU engine around the A8W4 GEMMs.
//
// What: RMSNorm + INT8 activation quantization, SiLU·mul + quantization, plain
// row quantization, RoPE on q/k with the KV-cache write, residual add, embedding
// gather, flash-decoding attention (split over the sequence, then a combine),
// and a greedy argmax. Each is one launch that reads its input once.
//
// Layouts: activations are row-major (M tokens, features). The residual stream h
// is float32 (M, H). The KV cache of one layer is (B, cap, Hkv, D) float16.
// Positions and sequence lengths are read from device memory, never passed by
// value, so a decode step can be captured once as a CUDA graph and replayed.
//
// Quantization rule (engine/formats.py): x8 = clamp(rint(x / s), -127, 127) with
// IEEE division, s = max|row| / 127 (1 for an all-zero row) in dynamic mode.
// mode: 0 = static scale static_scale[0]; 1 = dynamic per row; 2 = fp16 output only.
#include <cuda_fp16.h>

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
__device__ float block_sum(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();                 // sh may still be read by a previous call
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? sh[threadIdx.x] : 0.f;
    if (wid == 0) v = warp_sum(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}
__device__ float block_max(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? sh[threadIdx.x] : 0.f;
    if (wid == 0) v = warp_max(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}

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

// grid (M), block 256. y = (h * rstd) * w, then quantized (modes 0/1) or stored fp16 (mode 2).
extern "C" __global__ void rmsnorm_quant(const float* __restrict__ h, const float* __restrict__ w,
                                         int H, float eps, int mode, const float* __restrict__ static_scale,
                                         signed char* __restrict__ x8, int ld, float* __restrict__ sx,
                                         __half* __restrict__ xh) {
    const float* row = h + (size_t)blockIdx.x * H;
    float ss = 0.f;
    for (int j = threadIdx.x; j < H; j += blockDim.x) ss += row[j] * row[j];
    float rstd = 1.f / sqrtf(block_sum(ss) / H + eps);
    if (mode == MODE_FP16) {
        for (int j = threadIdx.x; j < H; j += blockDim.x)
            xh[(size_t)blockIdx.x * H + j] = __float2half_rn((row[j] * rstd) * w[j]);
        return;
    }
    float amax = 0.f;
    if (mode == MODE_DYNAMIC) {
        for (int j = threadIdx.x; j < H; j += blockDim.x) amax = fmaxf(amax, fabsf((row[j] * rstd) * w[j]));
        amax = block_max(amax);
    }
    float s = row_scale(mode, amax, static_scale);
    if (threadIdx.x == 0) sx[blockIdx.x] = s;
    signed char* out = x8 + (size_t)blockIdx.x * ld;
    for (int j = threadIdx.x; j < H; j += blockDim.x) out[j] = quant1((row[j] * rstd) * w[j], s);
    zero_pad(out, H, ld);
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + __expf(-g)) * u; }

// grid (M), block 256. gu is the fused gate|up GEMM output (M, 2I): m = silu(gate) * up.
extern "C" __global__ void silu_mul_quant(const __half* __restrict__ gu, int I, int mode,
                                          const float* __restrict__ static_scale,
                                          signed char* __restrict__ x8, int ld, float* __restrict__ sx,
                                          __half* __restrict__ mh) {
    const __half* g = gu + (size_t)blockIdx.x * 2 * I;
    const __half* u = g + I;
    if (mode == MODE_FP16) {
        for (int j = threadIdx.x; j < I; j += blockDim.x)
            mh[(size_t)blockIdx.x * I + j] = __float2half_rn(silu_mul(__half2float(g[j]), __half2float(u[j])));
        return;
    }
    float amax = 0.f;
    if (mode == MODE_DYNAMIC) {
        for (int j = threadIdx.x; j < I; j += blockDim.x)
            amax = fmaxf(amax, fabsf(silu_mul(__half2float(g[j]), __half2float(u[j]))));
        amax = block_max(amax);
    }
    float s = row_scale(mode, amax, static_scale);
    if (threadIdx.x == 0) sx[blockIdx.x] = s;
    signed char* out = x8 + (size_t)blockIdx.x * ld;
    for (int j = threadIdx.x; j < I; j += blockDim.x) out[j] = quant1(silu_mul(__half2float(g[j]), __half2float(u[j])), s);
    zero_pad(out, I, ld);
}

// grid (M), block 256. Quantize fp16 rows (the attention output feeding o_proj).
extern "C" __global__ void quant_rows(const __half* __restrict__ x, int K, int mode,
                                      const float* __restrict__ static_scale,
                                      signed char* __restrict__ x8, int ld, float* __restrict__ sx) {
    const __half* row = x + (size_t)blockIdx.x * K;
    float amax = 0.f;
    if (mode == MODE_DYNAMIC) {
        for (int j = threadIdx.x; j < K; j += blockDim.x) amax = fmaxf(amax, fabsf(__half2float(row[j])));
        amax = block_max(amax);
    }
    float s = row_scale(mode, amax, static_scale);
    if (threadIdx.x == 0) sx[blockIdx.x] = s;
    signed char* out = x8 + (size_t)blockIdx.x * ld;
    for (int j = threadIdx.x; j < K; j += blockDim.x) out[j] = quant1(__half2float(row[j]), s);
    zero_pad(out, K, ld);
}

// grid (M, Hq + Hkv), block D/2. RoPE (HF rotate-half pairs j, j + D/2) on q and k of the
// fused qkv output (M, (Hq + 2 Hkv) D); q goes to q_out (M, Hq, D), k and v to the cache
// at [seq[m], pos[m]]. cos/sin tables are (max_pos, D/2) float32, built on the host in float64.
extern "C" __global__ void rope_qkv_cache(const __half* __restrict__ qkv, int Hq, int Hkv, int D,
                                          const int* __restrict__ pos, const int* __restrict__ seq,
                                          const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                          __half* __restrict__ q_out, __half* __restrict__ kc,
                                          __half* __restrict__ vc, int cap) {
    int m = blockIdx.x, head = blockIdx.y, j = threadIdx.x, half_d = D >> 1;
    int p = pos[m];
    const __half* row = qkv + (size_t)m * (Hq + 2 * Hkv) * D;
    float c = cos_t[(size_t)p * half_d + j], s = sin_t[(size_t)p * half_d + j];
    const __half* src = row + (size_t)head * D;          // q heads, then k heads
    float x1 = __half2float(src[j]), x2 = __half2float(src[j + half_d]);
    __half o1 = __float2half_rn(x1 * c - x2 * s), o2 = __float2half_rn(x2 * c + x1 * s);
    if (head < Hq) {
        __half* dst = q_out + ((size_t)m * Hq + head) * D;
        dst[j] = o1;
        dst[j + half_d] = o2;
    } else {
        int kh = head - Hq;
        size_t off = (((size_t)seq[m] * cap + p) * Hkv + kh) * D;
        kc[off + j] = o1;
        kc[off + j + half_d] = o2;
        const __half* v = row + (size_t)(Hq + Hkv + kh) * D;
        vc[off + j] = v[j];
        vc[off + j + half_d] = v[j + half_d];
    }
}

// Flash-decoding, pass 1. grid (B, Hq, nsplit), block 128 (4 warps), D ∈ {64, 128}.
// Block (b, h, sp) scores keys [sp·chunk, min(len_b, (sp+1)·chunk)) of sequence b against its
// one query and writes the unnormalised partial (max m, sum l, acc[D]) for the combine pass.
// Warps take keys round-robin; a lane reads half2 pairs of each K and V row, so every load
// is a coalesced 128/256-byte row and the V pass keeps 4 warps' loads in flight (a thread
// looping over keys alone was latency-bound: 3 ms of a 5.4 ms 7B decode step).
#define DEC_THREADS 128
#define DEC_WARPS 4
#define DEC_MAX_CHUNK 256
#define DEC_MAX_D2 64                       // D/2 half2 pairs, D ≤ 128
extern "C" __global__ void attn_decode_split(const __half* __restrict__ q, const __half* __restrict__ kc,
                                             const __half* __restrict__ vc, const int* __restrict__ lens,
                                             int Hq, int Hkv, int D, int cap, int chunk, float scale,
                                             float* __restrict__ part_ml, float* __restrict__ part_acc) {
    __shared__ float2 qs[DEC_MAX_D2];
    __shared__ float ps[DEC_MAX_CHUNK];
    __shared__ float2 red[DEC_WARPS][DEC_MAX_D2];
    int b = blockIdx.x, h = blockIdx.y, sp = blockIdx.z, nsplit = gridDim.z;
    int kvh = h / (Hq / Hkv);
    int len = lens[b];
    int k0 = sp * chunk, k1 = min(len, k0 + chunk);
    int d2n = D >> 1;
    size_t pidx = ((size_t)b * Hq + h) * nsplit + sp;
    if (k0 >= k1) {                         // nothing to score: an empty partial
        if (threadIdx.x == 0) { part_ml[2 * pidx] = NEG_INF; part_ml[2 * pidx + 1] = 0.f; }
        for (int d = threadIdx.x; d < D; d += blockDim.x) part_acc[pidx * D + d] = 0.f;
        return;
    }
    const __half2* q2 = reinterpret_cast<const __half2*>(q + ((size_t)b * Hq + h) * D);
    for (int i = threadIdx.x; i < d2n; i += blockDim.x) qs[i] = __half22float2(q2[i]);
    __syncthreads();
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    size_t row_stride = (size_t)Hkv * D;                // elements between consecutive keys
    const __half* kbase = kc + ((size_t)b * cap * Hkv + kvh) * D;
    const __half* vbase = vc + ((size_t)b * cap * Hkv + kvh) * D;
    for (int k = k0 + wid; k < k1; k += DEC_WARPS) {
        const __half2* kr = reinterpret_cast<const __half2*>(kbase + k * row_stride);
        float dot = 0.f;
        for (int i = lane; i < d2n; i += 32) {
            float2 kv = __half22float2(kr[i]), qv = qs[i];
            dot += qv.x * kv.x + qv.y * kv.y;
        }
        dot = warp_sum(dot);
        if (lane == 0) ps[k - k0] = dot * scale;
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < k1 - k0; i += blockDim.x) mx = fmaxf(mx, ps[i]);
    mx = block_max(mx);
    float l = 0.f;
    for (int i = threadIdx.x; i < k1 - k0; i += blockDim.x) { float e = __expf(ps[i] - mx); ps[i] = e; l += e; }
    l = block_sum(l);                       // also orders the ps writes before the reads below
    float2 acc0 = make_float2(0.f, 0.f), acc1 = make_float2(0.f, 0.f);   // pairs lane, lane + 32
    for (int k = k0 + wid; k < k1; k += DEC_WARPS) {
        const __half2* vr = reinterpret_cast<const __half2*>(vbase + k * row_stride);
        float p = ps[k - k0];
        float2 v0 = __half22float2(vr[lane]);
        acc0.x += p * v0.x; acc0.y += p * v0.y;
        if (lane + 32 < d2n) {
            float2 v1 = __half22float2(vr[lane + 32]);
            acc1.x += p * v1.x; acc1.y += p * v1.y;
        }
    }
    red[wid][lane] = acc0;
    if (lane + 32 < DEC_MAX_D2) red[wid][lane + 32] = acc1;
    __syncthreads();
    for (int i = threadIdx.x; i < d2n; i += blockDim.x) {
        float2 t = red[0][i];
        for (int w = 1; w < DEC_WARPS; ++w) { t.x += red[w][i].x; t.y += red[w][i].y; }
        part_acc[pidx * D + 2 * i] = t.x;
        part_acc[pidx * D + 2 * i + 1] = t.y;
    }
    if (threadIdx.x == 0) { part_ml[2 * pidx] = mx; part_ml[2 * pidx + 1] = l; }
}

// Flash-decoding, pass 2. grid (B, Hq), block D. out (B, Hq·D) fp16.
extern "C" __global__ void attn_decode_combine(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                               int Hq, int D, int nsplit, __half* __restrict__ out) {
    int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    size_t base = ((size_t)b * Hq + h) * nsplit;
    float mx = NEG_INF;
    for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, part_ml[2 * (base + s)]);
    float l = 0.f, acc = 0.f;
    for (int s = 0; s < nsplit; ++s) {
        float ms = part_ml[2 * (base + s)];
        if (ms == NEG_INF) continue;
        float w = __expf(ms - mx);
        l += w * part_ml[2 * (base + s) + 1];
        acc += w * part_acc[(base + s) * D + d];
    }
    if (d < D) out[((size_t)b * Hq + h) * D + d] = __float2half_rn(acc / l);
}

// grid (ceil(n / 256)), block 256. h += y (the residual add after o_proj and down_proj).
extern "C" __global__ void residual_add(float* __restrict__ h, const __half* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) h[i] += __half2float(y[i]);
}

// grid (M), block 256. h[m] = embed[tok[m]] (fp16 table, fp32 residual stream).
extern "C" __global__ void embed_gather(const __half* __restrict__ emb, const int* __restrict__ tok, int H,
                                        float* __restrict__ h) {
    const __half* row = emb + (size_t)tok[blockIdx.x] * H;
    for (int j = threadIdx.x; j < H; j += blockDim.x) h[(size_t)blockIdx.x * H + j] = __half2float(row[j]);
}

// grid (B), block 1024. Greedy sampling: out[b] = argmax_v logits[b, v], the lowest index on ties;
// then advances the sequence: tok[b] = out, pos[b] += 1, lens[b] += 1 (so a replayed graph
// step needs no host copy). Pass advance = 0 to only write out.
extern "C" __global__ void argmax_rows(const __half* __restrict__ logits, int V, int* __restrict__ out,
                                       int advance, int* __restrict__ pos, int* __restrict__ lens) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    const __half* row = logits + (size_t)blockIdx.x * V;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = __half2float(row[v]);
        if (x > best) { best = x; idx = v; }   // v grows per thread: first max kept
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
    }
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) { bv[wid] = best; bi[wid] = idx; }
    __syncthreads();
    if (wid == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? bv[lane] : NEG_INF;
        idx = lane < nw ? bi[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
        }
        if (lane == 0) {
            if (idx == 0x7fffffff) idx = 0;      // all logits NaN: still a valid token id
            out[blockIdx.x] = idx;
            if (advance) { pos[blockIdx.x] += 1; lens[blockIdx.x] += 1; }
        }
    }
}

// grid (ceil(N / 8)), block 256: warp w of block b computes out[:, 8b + w] = x · w[8b + w]ᵀ.
// x (M, K) fp16 row-major, w (N, K) fp16 row-major, out (M, N) fp16; M ≤ GEMV_F16_MAXM, K % 8 == 0.
// The lm_head of a graphed decode step: cuBLAS cannot be called while CuPy captures a graph.
// At M ≤ 32 the product streams w once: 16-byte loads, x rows from L1/L2, fp32 accumulation.
// Measured on H100 (2026-11-25): about 16-29 % of copy bandwidth — far slower than cuBLAS,
// so the FP16 path's linears use cuBLAS eagerly instead; a faster GEMV is open work.
#define GEMV_F16_MAXM 32
extern "C" __global__ void gemv_f16(const __half* __restrict__ x, const __half* __restrict__ w,
                                    __half* __restrict__ out, int M, int N, int K) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return;
    float acc[GEMV_F16_MAXM];
#pragma unroll
    for (int m = 0; m < GEMV_F16_MAXM; ++m) acc[m] = 0.f;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)n * K);
    int k8n = K >> 3;
    for (int k8 = lane; k8 < k8n; k8 += 32) {
        uint4 wv = __ldcs(wr + k8);                   // streamed once: evict-first
        const __half2* w2 = reinterpret_cast<const __half2*>(&wv);
        float2 wf0 = __half22float2(w2[0]), wf1 = __half22float2(w2[1]);
        float2 wf2 = __half22float2(w2[2]), wf3 = __half22float2(w2[3]);
#pragma unroll
        for (int m = 0; m < GEMV_F16_MAXM; ++m) {
            if (m < M) {
                uint4 xv = reinterpret_cast<const uint4*>(x + (size_t)m * K)[k8];
                const __half2* x2 = reinterpret_cast<const __half2*>(&xv);
                float2 a = __half22float2(x2[0]), b = __half22float2(x2[1]);
                float2 c = __half22float2(x2[2]), d = __half22float2(x2[3]);
                acc[m] += a.x * wf0.x + a.y * wf0.y + b.x * wf1.x + b.y * wf1.y
                        + c.x * wf2.x + c.y * wf2.y + d.x * wf3.x + d.y * wf3.y;
            }
        }
    }
#pragma unroll
    for (int m = 0; m < GEMV_F16_MAXM; ++m) {
        if (m < M) {
            float v = warp_sum(acc[m]);
            if (lane == 0) out[(size_t)m * N + n] = __float2half_rn(v);
        }
    }
}
