// gemv_wb.cu — weight-only b-bit GEMV and GEMM on tensor cores (b = 2, 3, 4): power-of-two
// ("pot") and uniform ("int") codes in the tile layout of engine/formats/tiles.py, fp16 x.
//
// What: out (M, N) fp16 = x (M, K) fp16 · Ŵ (N, K)ᵀ. gemv_*<BITS, NT, XS> takes M ≤ 8·NT
// (decode): a block takes every gridDim-th row tile (16 output rows; engine/gpu/wb.py launches no
// more blocks than are resident), its WB_WARPS warps split each row tile's k tiles and meet in
// shared memory once a row tile; XS = 1 stages x in shared memory, 0 prefetches it into registers.
// gemm_*<BITS> takes any M (prefill): a block owns WB_GEMM_WARPS row tiles (one a warp) and 64
// rows of x, staged in shared memory a k tile at a time.
//
// Layout (tiles.py): a tile is 16 rows × 128 channels, 64·BITS words; lane l = 4g + t reads
// its 2·BITS words (rows g and g + 8) with one or two coalesced vector loads. Of each row the
// lane holds channels 16s + 4t + e (step s, e = 0..3), the A-fragment elements of
// mma.sync.m16n8k16 in step s with the k order permuted (A and B alike), so that x's four
// channels are one 8-byte load. The four codes of a step sit in the four nibbles of one 16-bit
// half of a word (b = 3: steps 6 and 7 are gathered from the words' spare bit 3 first).
//
// Dequantization, to exact "unit" weights (the group scale multiplies fp32 partial sums):
//   pot: one byte permute (PRMT) looks the four codes up in an 8-entry table of fp16 high
//        bytes (0, ±2^0, ±2^-1, ..., the spare +2 of pot2/3; b = 4 looks up the magnitude and ORs in the sign with a
//        second, sign-replicating PRMT), two more PRMTs spread them into two half2 registers.
//        About 1.2 (b = 2, 3) to 1.8 (b = 4) instructions a weight; no conversion, no multiply.
//   int: a PRMT puts a code pair's byte twice into a word, one AND/OR (LOP3) makes the fp16
//        pair (1024 + c0, 64 + c1) and HSUB2 subtracts (1024 + z, 64 + z): about 1.5 a weight.
// The products are exact and the mma sums in fp32, so out is the float64 reference rounded to
// fp16 within fp32 summation error (tests/test_wb_gpu.py). Launched with programmatic dependent
// launch like every kernel of cuda/ (pdl.cuh): the GEMV loads its first weights before the wait.
#include <cuda_fp16.h>
#include "pdl.cuh"

#define WB_TILE_K 128
#define WB_ROWS 16                          // output rows a tile (the mma's M)
#define WB_STEPS 8                          // k16 steps a tile
#define WB_WARPS 8                          // GEMV: warps a block, splitting one row tile's k tiles
#define WB_THREADS (32 * WB_WARPS)
#define WB_U 4                              // GEMV: tiles a warp has in flight
#define WB_GEMM_WARPS 4                     // GEMM: warps a block, one row tile each
#define WB_GEMM_NT 8                        // GEMM: 8-row tiles of x a block (64 rows)
#define WB_XS (WB_TILE_K + 16)              // GEMM: x row stride in shared memory, halves (B loads conflict-free)
#define WB_KIND_POT 0
#define WB_KIND_INT 1

__device__ __forceinline__ unsigned wb_prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned r;                                        // the generic mode (bit 3 of a selector nibble: sign-replicate)
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// fp16 high bytes of the units: pot<b> code = sign (bit b-1) | m, unit 0 (m = 0) or ±2^-(m-1);
// the spare code of pot2 and pot3 (sign set, m = 0) is +2 (engine/formats/pot.py; the scale's sign mirrors a group)
template <int BITS> struct WbLut;
template <> struct WbLut<2> { static constexpr unsigned a = 0xBC403C00u, b = 0u; };          // 0 +1 +2 -1
template <> struct WbLut<3> { static constexpr unsigned a = 0x34383C00u, b = 0xB4B8BC40u; };  // 0 +1 +½ +¼ +2 -1 -½ -¼
template <> struct WbLut<4> { static constexpr unsigned a = 0x34383C00u, b = 0x24282C30u; };  // m = 0..7 (sign apart)

// The spare word of b = 3 (steps 6, 7): nibble i = bit 3 of nibble i of w0, w1, w2.
__device__ __forceinline__ unsigned wb_spare(unsigned w0, unsigned w1, unsigned w2) {
    return ((w0 >> 3) & 0x11111111u) | ((w1 >> 2) & 0x22222222u) | ((w2 >> 1) & 0x44444444u);
}

// The four codes of step s (a constant after unrolling) of one row as two A registers: lo holds
// channels e = 0, 1, hi e = 2, 3. rw: the row's words; zc: "int" (1024 + z, 64 + z) and, for the
// upper code pair of a b = 2 nibble, (256 + z, 16 + z).
template <int KIND, int BITS>
__device__ __forceinline__ void wb_step(const unsigned (&rw)[BITS], unsigned spare, int s, unsigned zc0, unsigned zc1,
                                        unsigned& lo, unsigned& hi) {
    const unsigned w = BITS == 2 ? rw[s / 4] : (BITS == 3 && s >= 6) ? spare : rw[s / 2];
    const int half = BITS == 2 ? (s % 4) / 2 : s % 2;   // which 16 bits hold the step
    const int sub = BITS == 2 ? s % 2 : 0;              // b = 2: bits 0-1 or 2-3 of each nibble
    if constexpr (KIND == WB_KIND_POT) {
        const unsigned sel = (w >> (16 * half + 2 * sub)) & (BITS == 2 ? 0x3333u : 0x7777u);
        unsigned r = wb_prmt(WbLut<BITS>::a, WbLut<BITS>::b, sel);          // 4 high bytes
        if constexpr (BITS == 4)                                            // 0xFF where bit 3 (the sign) is set
            r |= wb_prmt(w << 4, w, half ? 0xFBEAu : 0xD9C8u) & 0x80808080u;
        lo = wb_prmt(r, 0u, 0x1404u);                                      // (0, r0, 0, r1)
        hi = wb_prmt(r, 0u, 0x3424u);
    } else {
        const unsigned mask = BITS == 4 ? 0x00F0000Fu : BITS == 3 ? 0x00700007u : sub ? 0x00C0000Cu : 0x00300003u;
        const unsigned magic = sub ? 0x4C005C00u : 0x54006400u;            // (256 | 1024) + c0, (16 | 64) + c1
        const unsigned zc = sub ? zc1 : zc0;
        const unsigned byte = 2 * half;
        const unsigned p0 = (wb_prmt(w, 0u, 0x4040u + 0x0101u * byte) & mask) | magic;
        const unsigned p1 = (wb_prmt(w, 0u, 0x4040u + 0x0101u * (byte + 1)) & mask) | magic;
        const __half2 d0 = __hsub2(*reinterpret_cast<const __half2*>(&p0), *reinterpret_cast<const __half2*>(&zc));
        const __half2 d1 = __hsub2(*reinterpret_cast<const __half2*>(&p1), *reinterpret_cast<const __half2*>(&zc));
        lo = *reinterpret_cast<const unsigned*>(&d0);
        hi = *reinterpret_cast<const unsigned*>(&d1);
    }
}

__device__ __forceinline__ void wb_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A lane's 2·BITS words of one tile.
template <int BITS>
__device__ __forceinline__ void wb_load(const unsigned* __restrict__ tile, int lane, bool live, unsigned (&w)[2 * BITS]) {
    if (!live) {
#pragma unroll
        for (int i = 0; i < 2 * BITS; ++i) w[i] = 0u;
        return;
    }
    const uint4 a = __ldcs(reinterpret_cast<const uint4*>(tile) + lane);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    if constexpr (BITS == 4) {
        const uint4 b = __ldcs(reinterpret_cast<const uint4*>(tile + 128) + lane);
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if constexpr (BITS == 3) {
        const uint2 b = __ldcs(reinterpret_cast<const uint2*>(tile + 128) + lane);
        w[4] = b.x; w[5] = b.y;
    }
}

// 8 bytes of x into shared memory, asynchronously (cp.async; both addresses 8-byte aligned).
__device__ __forceinline__ void wb_cp8(__half* dst, const __half* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" :: "r"(d), "l"(src) : "memory");
}

// x[m, k .. k+3] as two half2 words, zeros outside (M, K); vec: rows 8-byte aligned (K % 4 == 0).
__device__ __forceinline__ uint2 wb_x4(const __half* __restrict__ x, int m, int k, int M, int K, bool vec) {
    uint2 v = make_uint2(0u, 0u);
    if (m < M) {
        const __half* p = x + (size_t)m * K + k;
        if (vec && k + 4 <= K) {
            v = __ldg(reinterpret_cast<const uint2*>(p));
        } else {
            unsigned e[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) e[i] = k + i < K ? (unsigned)__half_as_ushort(p[i]) : 0u;
            v = make_uint2(e[0] | (e[1] << 16), e[2] | (e[3] << 16));
        }
    }
    return v;
}

// B of every step of the tile starting at channel k0 (k0 = K: none, zeros), rows 8j + g of x.
template <int NT>
__device__ __forceinline__ void wb_load_x(const __half* __restrict__ x, int k0, int g, int t, int M, int K, bool vec,
                                          uint2 (&xb)[WB_STEPS][NT]) {
#pragma unroll
    for (int s = 0; s < WB_STEPS; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j) xb[s][j] = wb_x4(x, 8 * j + g, k0 + 16 * s + 4 * t, M, K, vec);
}

// The per-group pair (rows g, g + 8) of a tile: scale as half2 bits, zero points as two bytes.
// The tile's first group is loaded with its words; further ones (groups of 64 or 32) when used,
// from the 32-bit offset `at` (not two pointers: a ring slot's registers are few).
struct WbGroups {
    unsigned s0, z0, at;
};

template <int KIND>
__device__ __forceinline__ void wb_load_groups_at(const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
                                                  unsigned at, bool live, WbGroups& q) {
    q.at = at;
    q.s0 = live ? __ldg(scale + at) : 0u;
    q.z0 = (KIND == WB_KIND_INT && live) ? (unsigned)__ldg(zero + at) : 0u;
}

template <int KIND>
__device__ __forceinline__ void wb_load_groups(const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
                                               size_t tile, int gpt, int g, bool live, WbGroups& q) {
    wb_load_groups_at<KIND>(scale, zero, (unsigned)(tile * gpt * 8 + g), live, q);
}

template <int KIND>
__device__ __forceinline__ void wb_group(const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
                                         const WbGroups& q, int gi, unsigned& sv, unsigned& zz) {
    sv = gi == 0 ? q.s0 : __ldg(scale + q.at + 8 * gi);
    zz = KIND != WB_KIND_INT ? 0u : gi == 0 ? q.z0 : (unsigned)__ldg(zero + q.at + 8 * gi);
}

// The (1024 + z, 64 + z) and (256 + z, 16 + z) half2 constants of one zero point.
__device__ __forceinline__ void wb_zc(unsigned z, unsigned& zc0, unsigned& zc1) {
    const float zf = (float)z;
    const __half2 a = __floats2half2_rn(1024.f + zf, 64.f + zf), b = __floats2half2_rn(256.f + zf, 16.f + zf);
    zc0 = *reinterpret_cast<const unsigned*>(&a);
    zc1 = *reinterpret_cast<const unsigned*>(&b);
}

// One tile of one lane: acc[j] += Σ_groups s · (A_tile · B_j); xb(s, j): B of step s (registers or shared memory).
// LG: log2 of the steps a group (3, 2, 1: groups of 128, 64, 32), a constant, so that the group boundaries
// cost no branch or predicate in the unrolled steps (wb_tile_g picks it).
template <int KIND, int BITS, int NT, int LG, typename XB>
__device__ __forceinline__ void wb_tile(const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
                                        const unsigned (&w)[2 * BITS], const WbGroups& q, XB xb,
                                        float (&acc)[NT][4]) {
    unsigned wg[BITS], wh[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) { wg[i] = w[i]; wh[i] = w[BITS + i]; }
    unsigned sg = 0u, sh = 0u;
    if constexpr (BITS == 3) { sg = wb_spare(wg[0], wg[1], wg[2]); sh = wb_spare(wh[0], wh[1], wh[2]); }
    constexpr int last = (1 << LG) - 1;
    float d[NT][4];
    unsigned zg0 = 0u, zg1 = 0u, zh0 = 0u, zh1 = 0u, sv = 0u, zz = 0u;
#pragma unroll
    for (int s = 0; s < WB_STEPS; ++s) {
        const int gi = s >> LG;
        if ((s & last) == 0) {
#pragma unroll
            for (int j = 0; j < NT; ++j) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.f;
            wb_group<KIND>(scale, zero, q, gi, sv, zz);
            if constexpr (KIND == WB_KIND_INT) {
                wb_zc(zz & 0xFFu, zg0, zg1);
                wb_zc(zz >> 8, zh0, zh1);
            }
        }
        unsigned a[4];
        wb_step<KIND, BITS>(wg, sg, s, zg0, zg1, a[0], a[2]);              // row g
        wb_step<KIND, BITS>(wh, sh, s, zh0, zh1, a[1], a[3]);              // row g + 8
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const uint2 b = xb(s, j);
            wb_mma(d[j], a, b.x, b.y);
        }
        if ((s & last) == last) {
            const float s0 = __half2float(__ushort_as_half((unsigned short)(sv & 0xFFFFu)));
            const float s1 = __half2float(__ushort_as_half((unsigned short)(sv >> 16)));
#pragma unroll
            for (int j = 0; j < NT; ++j) {                                 // D rows g (d0, d1), g + 8 (d2, d3)
                acc[j][0] = fmaf(s0, d[j][0], acc[j][0]);
                acc[j][1] = fmaf(s0, d[j][1], acc[j][1]);
                acc[j][2] = fmaf(s1, d[j][2], acc[j][2]);
                acc[j][3] = fmaf(s1, d[j][3], acc[j][3]);
            }
        }
    }
}

template <int KIND, int BITS, int NT, typename XB>
__device__ __forceinline__ void wb_tile_g(const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
                                          const unsigned (&w)[2 * BITS], const WbGroups& q, int gpt, XB xb,
                                          float (&acc)[NT][4]) {
    if (gpt == 1) wb_tile<KIND, BITS, NT, 3>(scale, zero, w, q, xb, acc);
    else if (gpt == 2) wb_tile<KIND, BITS, NT, 2>(scale, zero, w, q, xb, acc);
    else wb_tile<KIND, BITS, NT, 1>(scale, zero, w, q, xb, acc);
}

// The GEMV. A block takes row tiles blockIdx.x, blockIdx.x + gridDim.x, ... (a grid of R blocks:
// one each; the launcher's smaller grid keeps every block resident, so the ring of weights in
// flight runs on from one row tile into the next instead of a second wave starting cold). Its
// warps split each row tile's k tiles alike (warp w: tiles k_lo .. k_hi - 1 of every row tile), so
// a warp stages only its own slice of x (shared memory, __syncwarp, no block barrier before the
// first tile) and a block meets once a row tile, in a double-buffered reduction buffer.
template <int KIND, int BITS, int NT, int XS>
__device__ __forceinline__ void gemv_wb_body(const __half* __restrict__ x, const unsigned* __restrict__ tiles,
                                             const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
                                             __half* __restrict__ out, int M, int N, int K, int KT, int gpt, int vec) {
    __shared__ float red[2][WB_WARPS][WB_ROWS][8 * NT];
    extern __shared__ __align__(16) __half xsh[];                         // XS: x (M, KT·128), zero past K
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int R = (N + WB_ROWS - 1) / WB_ROWS;
    const int per = (KT + WB_WARPS - 1) / WB_WARPS;                      // k tiles a warp a row tile
    const int k_lo = min(KT, warp * per), k_hi = min(KT, k_lo + per);
    const int nr = (R - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;   // this block's row tiles
    const int items = nr * per;                                           // the same for every warp of the block
    // Item i: row tile blockIdx.x + r·gridDim.x, k tile kt, (r, kt) = (i / per, k_lo + i % per), dead past k_hi.
    // Two cursors walk the items, the one being computed and the one a ring slot loads next: no division
    // in the loop (the quotient and remainder cost ~90 of ~250 instructions an item; Nsight Compute, H200).
    auto advance = [&](int& r, int& kt) { if (++kt == k_lo + per) { kt = k_lo; ++r; } };
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    unsigned w[WB_U][2 * BITS];                                           // a ring: item i sits in slot i % WB_U
    WbGroups q[WB_U];
    // The load cursor: item fi, k tile fk, the tile's first word fw and its first scale pair fs (32-bit
    // offsets that advance: the ring's address arithmetic had been ~40 instructions an item of 64-bit
    // multiplies, a fifth of the GEMV's; SASS, nvcc 13). Past a row tile's last k tile both jump to the
    // next row tile's first, gridDim.x row tiles on.
    int fi = 0, fk = k_lo;
    const unsigned ft0 = (unsigned)blockIdx.x * (unsigned)KT + (unsigned)k_lo;
    const unsigned jump = (unsigned)gridDim.x * (unsigned)KT - (unsigned)per + 1u;   // tiles
    unsigned fw = ft0 * (64u * BITS), fs = ft0 * (unsigned)gpt * 8u + (unsigned)g;
    auto load_next = [&](unsigned (&wu)[2 * BITS], WbGroups& qu) {
        const bool live = fi < items && fk < k_hi;
        wb_load<BITS>(tiles + fw, lane, live, wu);
        wb_load_groups_at<KIND>(scale, zero, fs, live, qu);
        ++fi;
        const bool wrap = ++fk == k_lo + per;                             // (jump may be 1 too: grid 1, KT 1)
        if (wrap) fk = k_lo;
        const unsigned step = wrap ? jump : 1u;
        fw += step * (64u * BITS);
        fs += step * (unsigned)gpt * 8u;
    };
#pragma unroll
    for (int u = 0; u < WB_U; ++u) load_next(w[u], q[u]);   // weights are no kernel's output: before the wait (pdl.cuh)
    pdl_enter();
    const int kp = KT * WB_TILE_K;
    if constexpr (XS) {       // this warp's slice of x into shared memory, once for all the block's row tiles
        // Asynchronous copies, all in flight at once (a load and a store a lane and step waited for
        // each load in turn: 14 % of the stall samples, Nsight Compute, H200); the ragged end through registers.
        const int c0 = k_lo * WB_TILE_K, q4 = (k_hi - k_lo) * (WB_TILE_K / 4);
        for (int m = 0; m < M; ++m)           // q4 is a multiple of 32: the flat loop's lanes, no division
            for (int c = c0 + 4 * lane; c < c0 + 4 * q4; c += 128) {
                __half* dst = &xsh[(size_t)m * kp + c];
                if (vec && c + 4 <= K) wb_cp8(dst, x + (size_t)m * K + c);
                else *reinterpret_cast<uint2*>(dst) = wb_x4(x, m, c, M, K, vec);
            }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        __syncwarp();
    }
    // B column n = 8j + g of the mma is token n. Past M a lane reads token M - 1 instead of zeros (no
    // predicate, no zeroing a step): a column's products never reach another column, and the
    // reduction stores only tokens below M.
    int xrow[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) xrow[j] = min(8 * j + g, M - 1) * kp;
    uint2 xc[WB_STEPS][NT];
    if constexpr (!XS) wb_load_x<NT>(x, k_lo < k_hi ? k_lo * WB_TILE_K : K, g, t, M, K, vec, xc);
    int r = 0, kt = k_lo;                                                 // the item computed now
    // XS: the item's x in shared memory starts at xo (halves; advanced with kt, so it is not recomputed
    // from the thread index every item)
    const int xo0 = xrow[0] + k_lo * WB_TILE_K + 4 * t;
    int xo = xo0;
    for (int i0 = 0; i0 < items; i0 += WB_U) {
#pragma unroll
        for (int u = 0; u < WB_U; ++u) {
            const int i = i0 + u;
            if (i >= items) break;                                        // block-uniform
            if (kt < k_hi) {
                if constexpr (XS) {
                    wb_tile_g<KIND, BITS, NT>(scale, zero, w[u], q[u], gpt, [&](int s, int j) {
                        return *reinterpret_cast<const uint2*>(&xsh[xo + (xrow[j] - xrow[0]) + 16 * s]);
                    }, acc);
                } else {
                    uint2 xn[WB_STEPS][NT];                               // the next item's x, in flight meanwhile
                    const int kn = kt + 1 < k_hi ? kt + 1 : k_lo;         // the next row tile starts at k_lo again
                    wb_load_x<NT>(x, i + 1 < items && k_lo < k_hi ? kn * WB_TILE_K : K, g, t, M, K, vec, xn);
                    wb_tile_g<KIND, BITS, NT>(scale, zero, w[u], q[u], gpt, [&](int s, int j) { return xc[s][j]; }, acc);
#pragma unroll
                    for (int s = 0; s < WB_STEPS; ++s)
#pragma unroll
                        for (int j = 0; j < NT; ++j) xc[s][j] = xn[s][j];
                }
            }
            load_next(w[u], q[u]);                                        // the slot takes item i + WB_U
            if (kt == k_lo + per - 1) {                                   // row tile r done by every warp
                float (*rb)[8 * NT] = red[r & 1][warp];
#pragma unroll
                for (int j = 0; j < NT; ++j) {                            // D[row][col]: col = 2t + e
                    rb[g][8 * j + 2 * t] = acc[j][0];
                    rb[g][8 * j + 2 * t + 1] = acc[j][1];
                    rb[g + 8][8 * j + 2 * t] = acc[j][2];
                    rb[g + 8][8 * j + 2 * t + 1] = acc[j][3];
                    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
                }
                __syncthreads();              // red[r & 1] is next written at row tile r + 2, after the next barrier
                const int n0 = ((int)blockIdx.x + r * (int)gridDim.x) * WB_ROWS;
                static_assert(WB_ROWS * 8 * NT <= WB_THREADS, "a thread an output of the row tile");
                if (const int e = threadIdx.x; e < WB_ROWS * 8 * NT) {
                    const int m = e / WB_ROWS, rr = e % WB_ROWS;          // consecutive threads: consecutive n
                    if (n0 + rr < N && m < M) {
                        float v = 0.f;
#pragma unroll
                        for (int wv = 0; wv < WB_WARPS; ++wv) v += red[r & 1][wv][rr][m];
                        out[(size_t)m * N + n0 + rr] = __float2half_rn(v);
                    }
                }
            }
            xo = kt == k_lo + per - 1 ? xo0 : xo + WB_TILE_K;
            advance(r, kt);
        }
    }
}

template <int KIND, int BITS>
__device__ __forceinline__ void gemm_wb_body(const __half* __restrict__ x, const unsigned* __restrict__ tiles,
                                             const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
                                             __half* __restrict__ out, int M, int N, int K, int KT, int gpt, int vec) {
    __shared__ __align__(16) __half xs[8 * WB_GEMM_NT][WB_XS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int NTL = (N + WB_ROWS - 1) / WB_ROWS;
    const int rt = blockIdx.x * WB_GEMM_WARPS + warp;                     // this warp's row tile
    const bool rlive = rt < NTL;
    const int m0 = blockIdx.y * 8 * WB_GEMM_NT;
    const size_t tile0 = (size_t)rt * KT;
    float acc[WB_GEMM_NT][4];
#pragma unroll
    for (int j = 0; j < WB_GEMM_NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    unsigned w[2 * BITS];
    WbGroups q;
    wb_load<BITS>(tiles + tile0 * (64 * BITS), lane, rlive && KT > 0, w);
    wb_load_groups<KIND>(scale, zero, tile0, gpt, g, rlive && KT > 0, q);
    pdl_enter();
    for (int kt = 0; kt < KT; ++kt) {
        __syncthreads();                                                  // the last tile's readers are done
        for (int i = threadIdx.x; i < 8 * WB_GEMM_NT * (WB_TILE_K / 4); i += 32 * WB_GEMM_WARPS) {
            const int r = i / (WB_TILE_K / 4), c = 4 * (i % (WB_TILE_K / 4));
            *reinterpret_cast<uint2*>(&xs[r][c]) = wb_x4(x, m0 + r, kt * WB_TILE_K + c, M, K, vec);
        }
        __syncthreads();
        unsigned wn[2 * BITS];
        WbGroups qn;
        const bool nlive = rlive && kt + 1 < KT;
        wb_load<BITS>(tiles + (tile0 + kt + 1) * (64 * BITS), lane, nlive, wn);
        wb_load_groups<KIND>(scale, zero, tile0 + kt + 1, gpt, g, nlive, qn);
        if (rlive)
            wb_tile_g<KIND, BITS, WB_GEMM_NT>(scale, zero, w, q, gpt, [&](int s, int j) {
                return *reinterpret_cast<const uint2*>(&xs[8 * j + g][16 * s + 4 * t]);
            }, acc);
#pragma unroll
        for (int i = 0; i < 2 * BITS; ++i) w[i] = wn[i];
        q = qn;
    }
    if (!rlive) return;
#pragma unroll
    for (int j = 0; j < WB_GEMM_NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int m = m0 + 8 * j + 2 * t + (e & 1), n = rt * WB_ROWS + g + 8 * (e >> 1);
            if (m < M && n < N) out[(size_t)m * N + n] = __float2half_rn(acc[j][e]);
        }
}

// Ŵ (N, K) fp16 = unit · s, one tile a warp: the weights of a large-M product, which cuBLAS then
// multiplies (engine/gpu/wb.py). unit · s is exact for pot (a power of two times a normal fp16
// scale), rounded once for int.
template <int KIND, int BITS>
__device__ __forceinline__ void wb_dequant_body(const unsigned* __restrict__ tiles, const unsigned* __restrict__ scale,
                                                const unsigned short* __restrict__ zero, __half* __restrict__ w16,
                                                int N, int K, int KT, int gpt) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int rt = blockIdx.x, kt = blockIdx.y * WB_WARPS + (threadIdx.x >> 5);
    const bool live = kt < KT;
    const size_t tile = (size_t)rt * KT + kt;
    unsigned w[2 * BITS];
    WbGroups q;
    wb_load<BITS>(tiles + tile * (64 * BITS), lane, live, w);
    wb_load_groups<KIND>(scale, zero, tile, gpt, g, live, q);
    pdl_enter();                                  // w16 may still be read by the kernel before (cuBLAS)
    if (!live) return;
    unsigned wg[BITS], wh[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) { wg[i] = w[i]; wh[i] = w[BITS + i]; }
    unsigned sg = 0u, sh = 0u;
    if constexpr (BITS == 3) { sg = wb_spare(wg[0], wg[1], wg[2]); sh = wb_spare(wh[0], wh[1], wh[2]); }
    const int lg = gpt == 1 ? 3 : gpt == 2 ? 2 : 1;
#pragma unroll
    for (int s = 0; s < WB_STEPS; ++s) {
        const int gi = s >> lg;
        unsigned zg0 = 0u, zg1 = 0u, zh0 = 0u, zh1 = 0u, sv, zz;
        wb_group<KIND>(scale, zero, q, gi, sv, zz);
        if constexpr (KIND == WB_KIND_INT) {
            wb_zc(zz & 0xFFu, zg0, zg1);
            wb_zc(zz >> 8, zh0, zh1);
        }
        const __half2 s0 = __half2half2(__ushort_as_half((unsigned short)(sv & 0xFFFFu)));
        const __half2 s1 = __half2half2(__ushort_as_half((unsigned short)(sv >> 16)));
        unsigned a[4];
        wb_step<KIND, BITS>(wg, sg, s, zg0, zg1, a[0], a[2]);
        wb_step<KIND, BITS>(wh, sh, s, zh0, zh1, a[1], a[3]);
        const int k = kt * WB_TILE_K + 16 * s + 4 * t;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = rt * WB_ROWS + g + 8 * h;
            if (n >= N) continue;
            const __half2 lo = __hmul2(*reinterpret_cast<const __half2*>(&a[h]), h ? s1 : s0);
            const __half2 hi = __hmul2(*reinterpret_cast<const __half2*>(&a[2 + h]), h ? s1 : s0);
            __half* p = w16 + (size_t)n * K + k;
            if ((K & 3) == 0 && k + 4 <= K) {
                uint2 v;
                v.x = *reinterpret_cast<const unsigned*>(&lo);
                v.y = *reinterpret_cast<const unsigned*>(&hi);
                *reinterpret_cast<uint2*>(p) = v;
            } else {
                const __half e[4] = {__low2half(lo), __high2half(lo), __low2half(hi), __high2half(hi)};
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    if (k + i < K) p[i] = e[i];
            }
        }
    }
}

template <int BITS>
__global__ void __launch_bounds__(WB_THREADS)
dequant_pot(const unsigned* __restrict__ tiles, const unsigned* __restrict__ scale, __half* __restrict__ w16,
            int N, int K, int KT, int gpt) {
    wb_dequant_body<WB_KIND_POT, BITS>(tiles, scale, nullptr, w16, N, K, KT, gpt);
}

template <int BITS>
__global__ void __launch_bounds__(WB_THREADS)
dequant_int(const unsigned* __restrict__ tiles, const unsigned* __restrict__ scale, const unsigned short* __restrict__ zero,
            __half* __restrict__ w16, int N, int K, int KT, int gpt) {
    wb_dequant_body<WB_KIND_INT, BITS>(tiles, scale, zero, w16, N, K, KT, gpt);
}

template <int BITS, int NT, int XS>
__global__ void __launch_bounds__(WB_THREADS, NT == 1 ? 2 : 1)   // NT = 2 needs more than 128 registers
gemv_pot(const __half* __restrict__ x, const unsigned* __restrict__ tiles, const unsigned* __restrict__ scale,
         __half* __restrict__ out, int M, int N, int K, int KT, int gpt, int vec) {
    gemv_wb_body<WB_KIND_POT, BITS, NT, XS>(x, tiles, scale, nullptr, out, M, N, K, KT, gpt, vec);
}

template <int BITS, int NT, int XS>
__global__ void __launch_bounds__(WB_THREADS, NT == 1 ? 2 : 1)   // NT = 2 needs more than 128 registers
gemv_int(const __half* __restrict__ x, const unsigned* __restrict__ tiles, const unsigned* __restrict__ scale,
         const unsigned short* __restrict__ zero, __half* __restrict__ out, int M, int N, int K, int KT, int gpt, int vec) {
    gemv_wb_body<WB_KIND_INT, BITS, NT, XS>(x, tiles, scale, zero, out, M, N, K, KT, gpt, vec);
}

template <int BITS>
__global__ void __launch_bounds__(32 * WB_GEMM_WARPS)
gemm_pot(const __half* __restrict__ x, const unsigned* __restrict__ tiles, const unsigned* __restrict__ scale,
         __half* __restrict__ out, int M, int N, int K, int KT, int gpt, int vec) {
    gemm_wb_body<WB_KIND_POT, BITS>(x, tiles, scale, nullptr, out, M, N, K, KT, gpt, vec);
}

template <int BITS>
__global__ void __launch_bounds__(32 * WB_GEMM_WARPS)
gemm_int(const __half* __restrict__ x, const unsigned* __restrict__ tiles, const unsigned* __restrict__ scale,
         const unsigned short* __restrict__ zero, __half* __restrict__ out, int M, int N, int K, int KT, int gpt, int vec) {
    gemm_wb_body<WB_KIND_INT, BITS>(x, tiles, scale, zero, out, M, N, K, KT, gpt, vec);
}
