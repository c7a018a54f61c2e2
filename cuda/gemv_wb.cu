// gemv_wb.cu — weight-only b-bit GEMVs (b = 2, 3, 4): power-of-two ("pot") and uniform ("int")
// codes in the bit-plane layout of engine/formats/planes.py, fp16 activations.
//
// What: out (M, N) fp16 = x (M, K) fp16 · Ŵ (N, K)ᵀ for M ≤ MT (the launcher, engine/gpu/wb.py,
// runs larger M in slices). Ŵ is never materialised: each lane dequantizes a chunk of 32
// weights of one row into registers and uses it for every row of x.
//
// Layout (engine/formats/planes.py): qw (N, ceil(K/32), BITS) uint32; word j of a chunk holds
// bit j of the chunk's 32 codes (code i at bit i). scale (N, G) fp16 per group of `group`
// channels (32, 64 or 128: a chunk never straddles two groups); zero (N, G) uint8 ("int" only).
//
// Dequantization, two weights (i, i+16) of a chunk per 32-bit register (a half2), so one
// shift of a plane word moves both weights' bits into place:
//   pot: code = sign (bit BITS-1) | m; ŵ = 0 for m = 0, else s·2^-(m-1), built on the fp16
//        bits as  bits(s) + (1 << 10) - (m << 10), the sign XOR-ed in, masked to 0 where m = 0.
//        Exact because the file format guarantees the exponent field of s ≥ 2^(BITS-1) - 1
//        (engine/formats/pot.py), so no half borrows from its neighbour or goes subnormal.
//   int: q in the low BITS bits of each half, OR-ed into 0x6400 (the fp16 1024 + q), then
//        ŵ = (1024 + q)·s - (1024 + z)·s in one fp32 FMA: exact, as both products fit fp32.
// The products and the sum are fp32 (ŵ and x convert exactly), so out is the float64
// reference rounded to fp16, within fp32 summation error: tests/test_wb_gpu.py checks ≤ 1 ulp.
//
// Grid: ceil(N / WB_WARPS) blocks of WB_WARPS warps, one output row a warp; the lanes of a
// warp take the row's chunks in turn (consecutive lanes read consecutive chunks: coalesced),
// WB_U chunks in flight per lane. Weights are streamed once (__ldcs).
#include <cuda_fp16.h>

#define WB_CHUNK 32
#define WB_WARPS 8
#define WB_THREADS (32 * WB_WARPS)
#define WB_U 2
#define WB_KIND_POT 0
#define WB_KIND_INT 1

__device__ __forceinline__ unsigned wb_shift(unsigned v, int d) {   // d is a constant after unrolling
    return d >= 0 ? v >> d : v << -d;
}

template <int BITS>
__device__ __forceinline__ void wb_load(const unsigned* __restrict__ p, unsigned (&w)[BITS]) {
    if constexpr (BITS == 4) {
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (BITS == 2) {
        const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
        w[0] = v.x; w[1] = v.y;
    } else {
#pragma unroll
        for (int j = 0; j < BITS; ++j) w[j] = __ldcs(p + j);
    }
}

// The 32 weights of a chunk as floats, wf[i] for code i.
template <int KIND, int BITS>
__device__ __forceinline__ void wb_dequant(const unsigned (&w)[BITS], unsigned s1, float s, float c,
                                           float (&wf)[WB_CHUNK]) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        unsigned h2;
        if constexpr (KIND == WB_KIND_POT) {
            unsigned m2 = 0;                                          // m << 10 in each half
#pragma unroll
            for (int j = 0; j < BITS - 1; ++j) m2 |= wb_shift(w[j], i - 10 - j) & (0x04000400u << j);
            const unsigned sg = wb_shift(w[BITS - 1], i - 15) & 0x80008000u;
            h2 = ((s1 - m2) ^ sg) & __vcmpne2(m2, 0u);
        } else {
            unsigned q2 = 0x64006400u;                                // 1024 + q in each half
#pragma unroll
            for (int j = 0; j < BITS; ++j) q2 |= wb_shift(w[j], i - j) & (0x00010001u << j);
            h2 = q2;
        }
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
        if constexpr (KIND == WB_KIND_POT) {
            wf[i] = f.x;
            wf[i + 16] = f.y;
        } else {
            wf[i] = fmaf(f.x, s, c);
            wf[i + 16] = fmaf(f.y, s, c);
        }
    }
}

// acc += x[m, 32·chunk : 32·chunk + 32] · wf (channels past K read as 0).
__device__ __forceinline__ float wb_dot(const __half* __restrict__ xr, int k0, int K, const float (&wf)[WB_CHUNK]) {
    float acc = 0.f;
    if (k0 + WB_CHUNK <= K && (K & 7) == 0) {                        // 16-byte loads
        const uint4* xv = reinterpret_cast<const uint4*>(xr + k0);
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const uint4 u = __ldg(xv + v);
            const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float2 f = __half22float2(h[t]);
                acc = fmaf(f.x, wf[8 * v + 2 * t], acc);
                acc = fmaf(f.y, wf[8 * v + 2 * t + 1], acc);
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < WB_CHUNK; ++i)
            if (k0 + i < K) acc = fmaf(__half2float(xr[k0 + i]), wf[i], acc);
    }
    return acc;
}

template <int KIND, int BITS, int MT>
__device__ __forceinline__ void gemv_wb_tile(const __half* __restrict__ x, const unsigned* __restrict__ qw,
                                             const __half* __restrict__ scale, const unsigned char* __restrict__ zero,
                                             __half* __restrict__ out, int M, int N, int K, int group) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WB_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const int kc = (K + WB_CHUNK - 1) / WB_CHUNK;
    const int G = (K + group - 1) / group;
    const int cpg = group / WB_CHUNK;                                 // chunks a group
    const unsigned* wr = qw + (size_t)n * kc * BITS;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
    for (int c0 = lane; c0 < kc; c0 += 32 * WB_U) {
        unsigned w[WB_U][BITS];
#pragma unroll
        for (int u = 0; u < WB_U; ++u)                                // all loads first
            if (c0 + 32 * u < kc) wb_load<BITS>(wr + (size_t)(c0 + 32 * u) * BITS, w[u]);
#pragma unroll
        for (int u = 0; u < WB_U; ++u) {
            const int c = c0 + 32 * u;
            if (c >= kc) break;
            const int g = c / cpg;
            const unsigned short sb = __half_as_ushort(scale[(size_t)n * G + g]);
            const unsigned s1 = ((unsigned)sb | ((unsigned)sb << 16)) + 0x04000400u;
            const float s = __half2float(scale[(size_t)n * G + g]);
            const float cz = KIND == WB_KIND_INT ? -(1024.f + (float)zero[(size_t)n * G + g]) * s : 0.f;
            float wf[WB_CHUNK];
            wb_dequant<KIND, BITS>(w[u], s1, s, cz, wf);
#pragma unroll
            for (int m = 0; m < MT; ++m)
                if (m < M) acc[m] += wb_dot(x + (size_t)m * K, c * WB_CHUNK, K, wf);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m < M) {
            float v = acc[m];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) out[(size_t)m * N + n] = __float2half_rn(v);
        }
    }
}

template <int BITS, int MT>
__global__ void __launch_bounds__(WB_THREADS)
gemv_pot(const __half* __restrict__ x, const unsigned* __restrict__ qw, const __half* __restrict__ scale,
         __half* __restrict__ out, int M, int N, int K, int group) {
    gemv_wb_tile<WB_KIND_POT, BITS, MT>(x, qw, scale, nullptr, out, M, N, K, group);
}

template <int BITS, int MT>
__global__ void __launch_bounds__(WB_THREADS)
gemv_int(const __half* __restrict__ x, const unsigned* __restrict__ qw, const __half* __restrict__ scale,
         const unsigned char* __restrict__ zero, __half* __restrict__ out, int M, int N, int K, int group) {
    gemv_wb_tile<WB_KIND_INT, BITS, MT>(x, qw, scale, zero, out, M, N, K, group);
}
