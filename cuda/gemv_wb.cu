// gemv_wb.cu — weight-only b-bit GEMV on tensor cores (b = 2, 3, 4): power-of-two ("pot") and
// uniform ("int") codes in the bit-plane layout of engine/formats/planes.py, fp16 activations.
//
// What: out (M, N) fp16 = x (M, K) fp16 · Ŵ (N, K)ᵀ for M ≤ 8·NT (the launcher, engine/gpu/wb.py,
// runs larger M in slices). A block owns 16 output rows; its WB_WARPS warps split K into
// contiguous ranges of 32-channel chunks and their fp32 partial sums meet in shared memory at
// the end. A warp loads the plane words of WB_U chunks before it computes on them.
//
// Layout (engine/formats/planes.py): qw (N, ceil(K/32), BITS) uint32; word j of a chunk holds
// bit j of the chunk's 32 codes (code i at bit i). scale (N, G) fp16 per group of `group`
// channels (32, 64 or 128: a chunk never straddles two groups); zero (N, G) uint8 ("int" only).
//
// One chunk = two mma.sync.m16n8k16 steps per 8 columns of x. The k order inside a chunk is
// ours to choose (A and B are permuted alike): MMA k = 2t + e of step s is channel p + 16e of
// pair p = 8s + t, and k = 2t + 8 + e is pair p + 4 (t = lane % 4). So an A register holds
// the pair (p, p + 16) of one row, the two halves of a 32-bit word whose bits sit 16 apart in
// a plane: after one shift of each plane word by t (once a chunk), every pair is taken with
// compile-time shifts.
//
// A holds exact "unit" weights; the group scale multiplies each chunk's fp32 partial sum:
//   pot: code = sign (bit BITS-1) | m; unit = 0 for m = 0, else ±2^-(m-1), built on the fp16
//        bits as (0x4000 - (m << 10)) ^ sign (0x4000 is 2.0), masked to 0 where m = 0;
//   int: unit = q - z, from (0x6400 | q) - (1024 + z) in fp16: exact small integers.
// The products are exact and the mma sums in fp32, so out is the float64 reference rounded to
// fp16 within fp32 summation error (tests/test_wb_gpu.py: ≤ 1 ulp). Inside a captured decode step
// it is launched with programmatic dependent launch like every kernel of cuda/ (pdl.cuh).
#include <cuda_fp16.h>
#include "pdl.cuh"

#define WB_CHUNK 32
#define WB_WARPS 8
#define WB_ROWS 16                         // output rows a block (the mma's M)
#define WB_THREADS (32 * WB_WARPS)
#define WB_U 4                             // chunks a warp loads ahead (bytes in flight)
#define WB_KIND_POT 0
#define WB_KIND_INT 1

__device__ __forceinline__ unsigned wb_shift(unsigned v, int d) {   // d is a constant after unrolling
    return d >= 0 ? v >> d : v << -d;
}

// The BITS plane words of one row's chunk (zeros past N).
template <int BITS>
__device__ __forceinline__ void wb_load(const unsigned* __restrict__ p, bool live, unsigned (&w)[BITS]) {
    if (!live) {
#pragma unroll
        for (int j = 0; j < BITS; ++j) w[j] = 0u;
    } else if constexpr (BITS == 4) {
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

// The unit weights of pair p = t + 4q (channels p, p + 16) of one row as a half2, from the
// plane words already shifted right by t (ws), q a compile-time constant. zh2: the fp16 pair
// (1024 + z, 1024 + z) of the row's group ("int").
template <int KIND, int BITS, int Q>
__device__ __forceinline__ unsigned wb_unit(const unsigned (&ws)[BITS], unsigned any, unsigned zh2) {
    if constexpr (KIND == WB_KIND_POT) {
        unsigned m2 = 0;                                                  // m << 10 in each half
#pragma unroll
        for (int j = 0; j < BITS - 1; ++j) m2 |= wb_shift(ws[j], 4 * Q - 10 - j) & (0x04000400u << j);
        const unsigned sg = wb_shift(ws[BITS - 1], 4 * Q - 15) & 0x80008000u;
        const unsigned nz = (wb_shift(any, 4 * Q) & 0x00010001u) * 0xFFFFu;  // 0xFFFF where m != 0
        return ((0x40004000u - m2) ^ sg) & nz;
    } else {
        unsigned q2 = 0x64006400u;                                        // 1024 + q in each half
#pragma unroll
        for (int j = 0; j < BITS; ++j) q2 |= wb_shift(ws[j], 4 * Q - j) & (0x00010001u << j);
        const __half2 d = __hsub2(*reinterpret_cast<const __half2*>(&q2), *reinterpret_cast<const __half2*>(&zh2));
        return *reinterpret_cast<const unsigned*>(&d);
    }
}

__device__ __forceinline__ void wb_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x[m, k] as fp16 bits, 0 outside (M, K).
__device__ __forceinline__ unsigned wb_x(const __half* __restrict__ x, int m, int k, int M, int K) {
    return (m < M && k < K) ? (unsigned)__half_as_ushort(x[(size_t)m * K + k]) : 0u;
}

template <int KIND, int BITS, int NT>
__device__ __forceinline__ void gemv_wb_tile(const __half* __restrict__ x, const unsigned* __restrict__ qw,
                                             const __half* __restrict__ scale, const unsigned char* __restrict__ zero,
                                             __half* __restrict__ out, int M, int N, int K, int group) {
    __shared__ float red[WB_WARPS][WB_ROWS][8 * NT];
    pdl_enter();              // x is the kernel before's output, out may still be read by it (cuda/pdl.cuh)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * WB_ROWS;
    const int rows[2] = {n0 + g, n0 + g + 8};
    const int kc = (K + WB_CHUNK - 1) / WB_CHUNK;
    const int G = (K + group - 1) / group;
    const int cpg = group / WB_CHUNK;                                     // chunks a group
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

    // warp w takes the contiguous chunks [c_lo, c_hi): a row's WB_U chunks are one contiguous read
    const int per = (kc + WB_WARPS - 1) / WB_WARPS;
    const int c_lo = warp * per, c_hi = min(kc, c_lo + per);
    for (int c0 = c_lo; c0 < c_hi; c0 += WB_U) {
        unsigned wu[WB_U][2][BITS];                                       // all loads first: WB_U chunks in flight
#pragma unroll
        for (int u = 0; u < WB_U; ++u) {
            const int c = c0 + u;
#pragma unroll
            for (int r = 0; r < 2; ++r)
                wb_load<BITS>(qw + ((size_t)rows[r] * kc + c) * BITS, rows[r] < N && c < c_hi, wu[u][r]);
        }
#pragma unroll
        for (int u = 0; u < WB_U; ++u) {
            const int c = c0 + u;
            if (c >= c_hi) break;
            const unsigned (&w)[2][BITS] = wu[u];
            const int gi = c / cpg;
            float s[2];
            unsigned zh2[2] = {0u, 0u};
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const bool live = rows[r] < N;
                s[r] = live ? __half2float(scale[(size_t)rows[r] * G + gi]) : 0.f;
                if constexpr (KIND == WB_KIND_INT) {
                    const __half zh = __float2half_rn(1024.f + (live ? (float)zero[(size_t)rows[r] * G + gi] : 0.f));
                    const __half2 z2 = __halves2half2(zh, zh);
                    zh2[r] = *reinterpret_cast<const unsigned*>(&z2);
                }
            }
            // A for both k-steps: a[s] = {row g pair 8s+t, row g+8 pair 8s+t, row g pair 8s+4+t, row g+8 pair 8s+4+t}
            unsigned a[2][4];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                unsigned ws[BITS], any = 0u;
#pragma unroll
                for (int j = 0; j < BITS; ++j) {
                    ws[j] = w[r][j] >> t;
                    if (j < BITS - 1) any |= ws[j];
                }
                a[0][r] = wb_unit<KIND, BITS, 0>(ws, any, zh2[r]);
                a[0][2 + r] = wb_unit<KIND, BITS, 1>(ws, any, zh2[r]);
                a[1][r] = wb_unit<KIND, BITS, 2>(ws, any, zh2[r]);
                a[1][2 + r] = wb_unit<KIND, BITS, 3>(ws, any, zh2[r]);
            }
            const int k0 = c * WB_CHUNK;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int m = 8 * j + g;                                      // B's column: a row of x
                float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int st = 0; st < 2; ++st) {
                    const int p0 = 8 * st + t, p1 = p0 + 4;
                    const unsigned b0 = wb_x(x, m, k0 + p0, M, K) | (wb_x(x, m, k0 + p0 + 16, M, K) << 16);
                    const unsigned b1 = wb_x(x, m, k0 + p1, M, K) | (wb_x(x, m, k0 + p1 + 16, M, K) << 16);
                    wb_mma(d, a[st], b0, b1);
                }
                acc[j][0] = fmaf(s[0], d[0], acc[j][0]);                      // D rows g (c0, c1), g + 8 (c2, c3)
                acc[j][1] = fmaf(s[0], d[1], acc[j][1]);
                acc[j][2] = fmaf(s[1], d[2], acc[j][2]);
                acc[j][3] = fmaf(s[1], d[3], acc[j][3]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {                                       // D[row][col]: col = 2t + e
        red[warp][g][8 * j + 2 * t] = acc[j][0];
        red[warp][g][8 * j + 2 * t + 1] = acc[j][1];
        red[warp][g + 8][8 * j + 2 * t] = acc[j][2];
        red[warp][g + 8][8 * j + 2 * t + 1] = acc[j][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < WB_ROWS * 8 * NT; i += WB_THREADS) {
        const int r = i / (8 * NT), m = i % (8 * NT);
        if (n0 + r < N && m < M) {
            float v = 0.f;
#pragma unroll
            for (int wv = 0; wv < WB_WARPS; ++wv) v += red[wv][r][m];
            out[(size_t)m * N + n0 + r] = __float2half_rn(v);
        }
    }
}

template <int BITS, int NT>
__global__ void __launch_bounds__(WB_THREADS)
gemv_pot(const __half* __restrict__ x, const unsigned* __restrict__ qw, const __half* __restrict__ scale,
         __half* __restrict__ out, int M, int N, int K, int group) {
    gemv_wb_tile<WB_KIND_POT, BITS, NT>(x, qw, scale, nullptr, out, M, N, K, group);
}

template <int BITS, int NT>
__global__ void __launch_bounds__(WB_THREADS)
gemv_int(const __half* __restrict__ x, const unsigned* __restrict__ qw, const __half* __restrict__ scale,
         const unsigned char* __restrict__ zero, __half* __restrict__ out, int M, int N, int K, int group) {
    gemv_wb_tile<WB_KIND_INT, BITS, NT>(x, qw, scale, zero, out, M, N, K, group);
}
