// common.cuh — shared device helpers for the DGQ kernels.
//
// engine/gpu/kernels.py inlines this file textually before compiling (NVRTC through
// cupy.RawModule), so the compile-cache key covers it. No system headers: the
// kernels build the same under NVRTC and under a plain `nvcc -c` compile check.
//
// THE GPU WEIGHT LAYOUT (built once in engine/gpu/ops.py: pack_host)
// -------------------------------------------------------------------
// A "dg" layer W8[n,k] = (q[n,k] - z[n,g]) * S[n,g] (formats.py) is stored as
//   qw   : uint32[R][C][32][4]    R = Np/16 row tiles, C = Kp/64 chunks,
//                                 one 16-byte vector per lane of a warp
//   meta : uint32[R][Gp][8]       lane-group g's (S, z) for rows g and g+8
// Lane l = 4*g + t (g = l/4 "groupID", t = l%4, as in the PTX mma fragments)
// of row tile r and chunk c holds four words
//   .x = word(row 16r+g,   kstep 0)   .y = word(row 16r+g+8, kstep 0)
//   .z = word(row 16r+g,   kstep 1)   .w = word(row 16r+g+8, kstep 1)
// where word(n, s) packs the 8 codes of W[n][64c + 32s + {4t+i, 16+4t+i}],
// i = 0..3: byte i = code(4t+i) | code(16+4t+i) << 4.
// Those are exactly the k positions a lane owns in an m16n8k32 int8 fragment
// (A operand: a0/a2 for row g, a1/a3 for row g+8; B operand: b0/b1 for
// column g), so ONE layout feeds every kernel: the decode GEMV and wgmma use
// W as the A operand (rows = output channels), the mma.sync GEMM as the B
// operand. A warp loading one chunk of one row tile reads 512 contiguous bytes.
// meta word = S[g] | z[g] << 8 | S[g+8] << 16 | z[g+8] << 24.
// Padding: K -> Kp (multiple of 128 and of the group) with codes equal to the
// zero point (padded groups: z = 0, S = 1, code 0); N -> Np (multiple of 16)
// with z = 0, S = 1, code 0. Every padded weight dequantizes to exactly 0.
#pragma once
#include "pdl.cuh"
#include "cluster.cuh"

#define DGQ_QMAX_U4 15        // formats.QMAX_U4
#define DGQ_QMAX_I8 127       // formats.QMAX_I8
#define DGQ_TILE_N 16         // rows per packed row tile
#define DGQ_CHUNK_K 64        // k per packed 16-byte lane vector (two k32 steps)
#define DGQ_K_ALIGN 128       // Kp is a multiple of this (one pipeline stage)

static_assert(DGQ_QMAX_U4 * DGQ_QMAX_I8 < 2048, "q*S must fit the 16-bit lanes below");
static_assert(DGQ_CHUNK_K == 2 * 32, "a chunk is two m16n8k32 k-steps");

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
typedef signed char i8;

struct alignas(16) u32x4 { u32 x, y, z, w; };

// ----------------------------------------------------------------- dequantization
// Per (row, group) constants for dq_word. C = 256 - z*S may be negative; it is
// kept modulo 2^32 and replicated into two 16-bit lanes (c02) or the same lanes
// shifted by one byte (c13).
struct DqConst { u32 s, c02, c13; };

__device__ __forceinline__ DqConst dq_const(u32 s, u32 z) {
    DqConst d;
    d.s = s;
    const u32 c = 256u - z * s;
    d.c02 = c * 0x00010001u;
    d.c13 = d.c02 << 8;
    return d;
}

// meta word -> constants for row g (lo) and row g+8 (hi)
__device__ __forceinline__ void dq_meta(u32 m, DqConst& lo, DqConst& hi) {
    lo = dq_const(m & 0xFFu, (m >> 8) & 0xFFu);
    hi = dq_const((m >> 16) & 0xFFu, m >> 24);
}

// 8 UINT4 codes -> two registers of 4 int8 each: a = W8 at k 4t..4t+3,
// b = W8 at k 16+4t..16+4t+3 (the a0/a2 or b0/b1 fragment pair).
// Why it is exact: two codes sit in separate 16-bit lanes, one IMAD gives
// q*S + C = (q - z)*S + 256 per lane, which lies in [129, 383] because the
// format guarantees |(q - z)*S| <= 127 (overflow guard). No lane borrows or
// carries into the next, and the low byte of each lane is (q - z)*S mod 256,
// i.e. the int8 value. byte_perm then gathers the four useful bytes. 11
// integer instructions per 8 weights, no conversions.
__device__ __forceinline__ void dq_word(u32 w, const DqConst& d, u32& a, u32& b) {
    const u32 u = w >> 4;
    const u32 r0 = (w & 0x000F000Fu) * d.s + d.c02;   // codes k0, k2 -> bytes 0, 2
    const u32 r2 = (w & 0x0F000F00u) * d.s + d.c13;   // codes k1, k3 -> bytes 1, 3
    const u32 r1 = (u & 0x000F000Fu) * d.s + d.c02;   // codes k16, k18
    const u32 r3 = (u & 0x0F000F00u) * d.s + d.c13;   // codes k17, k19
    a = __byte_perm(r0, r2, 0x7250);
    b = __byte_perm(r1, r3, 0x7250);
}

// ----------------------------------------------------------------- one token: dp4a
// Σ_i a.byte[i]·b.byte[i], a's bytes signed, b's unsigned, plus c (one instruction).
__device__ __forceinline__ int dp4a_su(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Σ of the token's 16 int8 at a lane's k positions of a chunk (x as dp_chunk takes it).
__device__ __forceinline__ int dp_xsum(const u32* x) {
    int xs = dp4a_su(x[0], 0x01010101u, 0);
    xs = dp4a_su(x[1], 0x01010101u, xs);
    xs = dp4a_su(x[2], 0x01010101u, xs);
    return dp4a_su(x[3], 0x01010101u, xs);
}

// One chunk of one row tile against ONE token, no widening and no mma. Per (row, group),
// Σ x·(q - z)·S = S·(Σ x·q - z·Σ x), exact in int32, so the 4-bit codes go straight into dp4a:
// the low nibbles as they are, the high ones masked in place (16·q: that sum is shifted down by
// 4, exactly). w, m: the lane's weight vector and meta word (layout above); x: the token's int8
// at the lane's k positions, as the mma B fragment holds them (b0, b1 of k-step 0, then of
// k-step 1: k = 4t.., 16+4t.., 32+4t.., 48+4t..); xs = dp_xsum(x). Adds rows g and g+8 over those
// k positions into acc_lo and acc_hi. 34 instructions (8 masks, 12 dp4a, the meta bytes and
// the combination) against the 4 dq_word, dq_meta and 2 mma of the mma path.
__device__ __forceinline__ void dp_chunk(const u32x4& w, u32 m, const u32* x, int xs, int& acc_lo, int& acc_hi) {
    // row g: words x (k-step 0), z (k-step 1); row g+8: y, w. Low nibbles: k = 4t+i (x[0], x[2]);
    // high ones: k = 16+4t+i (x[1], x[3])
    const int la = dp4a_su(x[2], w.z & 0x0F0F0F0Fu, dp4a_su(x[0], w.x & 0x0F0F0F0Fu, 0));
    const int lb = dp4a_su(x[3], w.z & 0xF0F0F0F0u, dp4a_su(x[1], w.x & 0xF0F0F0F0u, 0));
    const int ha = dp4a_su(x[2], w.w & 0x0F0F0F0Fu, dp4a_su(x[0], w.y & 0x0F0F0F0Fu, 0));
    const int hb = dp4a_su(x[3], w.w & 0xF0F0F0F0u, dp4a_su(x[1], w.y & 0xF0F0F0F0u, 0));
    const int sl = m & 0xFF, zl = (m >> 8) & 0xFF, sh = (m >> 16) & 0xFF, zh = m >> 24;
    acc_lo += sl * (la + (lb >> 4) - zl * xs);
    acc_hi += sh * (ha + (hb >> 4) - zh * xs);
}

// After dp_chunk: sum the 4 lanes t of each row, so every lane holds the token-0 elements of the
// mma D fragment (e = 0: row g, e = 2: row g+8); the tokens 2t + (e & 1) > 0 are never live.
__device__ __forceinline__ void dp_lanes_sum(int* d) {
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
        d[e] += __shfl_xor_sync(0xffffffffu, d[e], 1);
        d[e] += __shfl_xor_sync(0xffffffffu, d[e], 2);
    }
}

// ----------------------------------------------------------------- memory helpers
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// Weights are read exactly once: bypass L1, ask L2 for 256-byte sectors.
__device__ __forceinline__ u32x4 ldg_stream(const u32x4* p) {
    u32x4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ u32 ldg_u32(const void* p) {
    u32 r;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// L2-coherent load (skips L1, which is not coherent across blocks).
__device__ __forceinline__ int ldcg_s32(const int* p) {
    int r;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(r) : "l"(p) : "memory");
    return r;
}

// 16-byte async copy global -> shared; pred false writes zeros (src-size 0).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(n) : "memory");
}
// The same from an always valid src: no src-size operand, no zero fill.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
// N = 4, 8 or 16 bytes global -> shared through L1 (cp.async.cg moves only 16); pred false writes zeros.
template <int N>
__device__ __forceinline__ void cp_async_ca(u32 dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" :: "r"(dst), "l"(src), "n"(N), "r"(pred ? N : 0)
                 : "memory");
}
// The same from an always valid src, without the zero-filling src-size (as cp_async16).
template <int N>
__device__ __forceinline__ void cp_async_ca(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" :: "r"(dst), "l"(src), "n"(N) : "memory");
}

// 16 bytes through L1 with an L2 prefetch of the whole 128-byte line (.L2::128B): the
// streaming K/V copies of decode attention (+1.4-2.6 % tok/s fp16 K/V, docs/KERNELS.md).
__device__ __forceinline__ void cp_async_ca16_l2line(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global.L2::128B [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// ----------------------------------------------------------------- tensor cores
// D += A(16x32, row) * B(32x8, col), int8 in, int32 accumulate (sm_80+); d[0..3] in/out.
__device__ __forceinline__ void mma_s8(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// D += A(16x16, row) * B(16x8, col), fp16 in, fp32 accumulate (the attention kernels).
__device__ __forceinline__ void mma_f16(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// ----------------------------------------------------------------- epilogue
// formats.epilogue_ref: y = (float32(acc) * sx[m]) * s8[n], then round to fp16.
// Two separate round-to-nearest multiplies (no FMA can form: nothing is added).
__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float dg_epilogue(int acc, float sx, float s8) {
    return __fmul_rn(__fmul_rn(__int2float_rn(acc), sx), s8);
}

// Split-K bookkeeping shared by the tiled kernels. Each split writes its int32
// partial tile in fragment order (coalesced: element r of thread tid lands at
// [r][tid]); the last split to arrive at a tile (counter) adds the others into
// its registers and runs the epilogue, then re-arms the counter for the next
// launch. Integer sums are exact, so the order of arrival does not matter.
// `tile` indexes the workspace and the counters among `ntiles` split tiles (the
// wgmma kernel's split tail numbers its tiles from 0 within the tail).
// Returns true in the block that must finish the tile.
template <int NREG, int NTHREADS>
__device__ __forceinline__ bool splitk_reduce(int (&acc)[NREG], int* ws, int* counters,
                                              int tile, int split, int splits, int ntiles) {
    if (splits == 1) return true;
    __shared__ int s_last;
    const int tid = threadIdx.x;
    int* mine = ws + ((size_t)split * ntiles + tile) * (NREG * NTHREADS);
#pragma unroll
    for (int r = 0; r < NREG; ++r) mine[r * NTHREADS + tid] = acc[r];
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const int prev = atomicAdd(counters + tile, 1);
        s_last = (prev == splits - 1);
    }
    __syncthreads();
    if (!s_last) return false;
    __threadfence();
    for (int s = 0; s < splits; ++s) {
        if (s == split) continue;
        const int* other = ws + ((size_t)s * ntiles + tile) * (NREG * NTHREADS);
#pragma unroll
        for (int r = 0; r < NREG; ++r) acc[r] += ldcg_s32(other + r * NTHREADS + tid);
    }
    if (tid == 0) counters[tile] = 0;
    return true;
}

// Split K over a thread block cluster (sm_90; the host launches a tile's splits as one cluster):
// every CTA stores its partial accumulators to its own shared memory and, after one cluster
// barrier, CTA `rank` sums every CTA's partials of its share of the registers, groups of four
// [lo, hi) = [rank, rank + 1) · (NREG/4) / size, through distributed shared memory: no
// workspace, fence or counter, and every CTA finishes a part of the tile. Integer sums are
// exact, so the order does not matter. On return acc holds the tile's sums in [lo, hi) (the
// other registers are stale). smem: NREG · NTHREADS · 4 bytes that the caller no longer uses
// (its __syncthreads); free again on return.
template <int NREG, int NTHREADS>
__device__ __forceinline__ void cluster_split_reduce(int (&acc)[NREG], unsigned char* smem, int& lo, int& hi) {
    static_assert(NREG % 4 == 0, "partials travel as int4");
    constexpr int NV = NREG / 4;
    const int tid = threadIdx.x, n = cluster_size(), rank = cluster_rank();
    int4* part = reinterpret_cast<int4*>(smem) + tid;       // group v at part[v * NTHREADS]
#pragma unroll
    for (int v = 0; v < NV; ++v)
        part[v * NTHREADS] = make_int4(acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3]);
    cluster_sync();
    lo = rank * NV / n;
    hi = (rank + 1) * NV / n;
    for (int v = lo; v < hi; ++v) {         // this CTA's share: its own slots, which no other CTA reads
        int4 sum = part[v * NTHREADS];
#pragma unroll
        for (int c = 1; c < 8; ++c) {       // portable clusters: at most 8 CTAs; all loads in flight
            if (c < n) {
                const int4 p = ld_cluster_s32x4(part + v * NTHREADS, rank + c < n ? rank + c : rank + c - n);
                sum.x += p.x; sum.y += p.y; sum.z += p.z; sum.w += p.w;
            }
        }
        part[v * NTHREADS] = sum;
    }
#pragma unroll
    for (int v = 0; v < NV; ++v) {          // back to registers (this thread's own stores)
        if (v < lo || v >= hi) continue;
        const int4 sum = part[v * NTHREADS];
        acc[4 * v] = sum.x; acc[4 * v + 1] = sum.y; acc[4 * v + 2] = sum.z; acc[4 * v + 3] = sum.w;
    }
    cluster_sync();                         // every CTA has read its shares: shared memory is free
}

// Grouped rasterization (tiles of GROUP_M consecutive M-tiles sweep N together)
// so blocks running at the same time share both operands in L2.
__device__ __forceinline__ void raster(int pid, int num_m, int num_n, int group_m, int& tm, int& tn) {
    const int width = group_m * num_n;
    const int gid = pid / width;
    const int first_m = gid * group_m;
    const int gsize = (num_m - first_m < group_m) ? num_m - first_m : group_m;
    tm = first_m + (pid % width) % gsize;
    tn = (pid % width) / gsize;
}
