// gemm_a8w4.cu — dual-grained A8W4 GEMM on INT8 tensor cores (mma.sync, sm_80+).
//
// Computes, bit-exactly as formats.gemm_a8w4_ref + epilogue_ref,
//   acc[m,n] = sum_k x8[m,k] * W8[n,k]            (int32, exact over the whole K)
//   y[m,n]   = fp16((float(acc) * sx[m]) * s8[n])  (or acc itself when OUT_I32)
// x8: (M, ldx) int8 row-major with ldx = Kp and zeros in columns K..Kp-1.
// W8: the packed layout described in common.cuh (qw, meta), dequantized in
// registers: (q - z) * S lands in int8 with one IMAD per two weights.
// Output: (M, N) row-major, fp16 (as raw bits) or int32.
//
// gemm_a8w4_gemv<MT, RW, U, OUT_I32> — decode, M <= 8*MT (MT n8 token tiles).
//   Memory-bound: every packed weight byte is read once with 16-byte
//   no-L1-allocate loads, 512 contiguous bytes per warp instruction. The
//   weights are the mma A operand (16 output channels x 32 k), the tokens the
//   B operand (n8), so M = 1..8 costs one mma per 512 weights. Block = 8 warps
//   on RW row tiles (16*RW output channels); the 8 warps split K (chunk c goes
//   to warp c % 8; NW = 16: c % 16) and reduce through shared memory at the end, so N alone
//   (N/16/RW blocks) fills the GPU and K is still streamed by 8 warps per
//   block. Each warp keeps two batches of U chunks in registers: one being
//   computed, the next one's loads in flight (v1 without the second batch
//   waited one full memory round trip per batch: 64 % of copy bandwidth).
//   RW > 1 reuses each token fragment for RW row tiles (fewer L1 loads at M=16).
//   With resid, y is added to the float32 residual stream instead of stored,
//   resid[m,n] += float(fp16(y[m,n])) (the add of add_rmsnorm_quant, which the
//   decode step folds in here up to 16 rows: the norm after it skips the add).
//   SILU (batch-1 decode, engine/gpu/model.py _fold_quant; MT = RW = 1): the
//   layer's rows are gate|up interleaved per 16-row tile (rows 0-7 gate channels
//   8r..8r+7, rows 8-15 the same up channels, ops_cuda.interleave_rows), so one
//   thread holds both halves of a channel: out (M, N/2) float32 receives
//   silu(gate)·up, from the fp16-rounded gate and up as silu_mul_quant reads them,
//   and amax_out[m] the atomic max of |out| (zeroed by the norm before this GEMV),
//   which quant_amax (cuda/fused.cu) then quantizes with: no row reduction, no
//   silu_mul_quant launch.
//   DP (M = 1, MT = 1): dp_chunk (common.cuh) multiplies the packed codes with dp4a instead
//   of widening them for mma: fewer instructions a chunk (Nsight Compute, the 7B gate|up GEMV:
//   108 executed a 512-byte chunk against 126, prologue and epilogue included), and the GEMV
//   was bound by issue (7B decode step on the H200 1.915 -> 1.586 ms). Same reduction and
//   epilogues.
//
// gemm_a8w4_mma<BM, STAGES, OUT_I32> — prefill, M > 16, any sm_80+ GPU.
//   Block tile BM tokens x 128 output channels x 128 k, 8 warps as 2 (M) x 4
//   (N), warp tile BM/2 x 32. STAGES-deep cp.async pipeline carries x8 (16-byte
//   chunks XOR-swizzled by row so ldmatrix is bank-conflict free), the packed
//   weights (8 KB per stage, half of what int8 weights would cost) and their
//   meta words. Each warp widens its 32 x 128 weights to int8 in registers
//   right before the mma (no int8 copy in shared memory). Optional split-K
//   across blocks (grid.y) when M x N has too few tiles to fill the GPU.
#include <cuda_fp16.h>
#include "common.cuh"
#include "rows.cuh"

// ============================================================================ decode
template <int MT, int RW, int U>
struct GemvBatch {           // one batch of U chunks per warp, held in registers
    u32x4 wv[U][RW];
    u32 mv[U][RW];
    u32 xb[U][MT][4];
};

// One chunk of one row tile against MT token tiles, the GEMV's step: DP (one token) feeds the
// codes to dp4a (dp_chunk; xs = dp_xsum of the token's x, shared by a warp's row tiles), else the
// weights are widened to int8 and multiplied on the tensor cores; acc[j]: token tile j's fragment.
template <int MT, bool DP>
__device__ __forceinline__ void gemv_chunk(const u32x4& w, u32 m, const u32 (&x)[MT][4], int xs, int (&acc)[MT][4]) {
    if constexpr (DP) {
        dp_chunk(w, m, x[0], xs, acc[0][0], acc[0][2]);
    } else {
        DqConst lo, hi;
        dq_meta(m, lo, hi);
        u32 a0, a1, a2, a3;
        dq_word(w.x, lo, a0, a2);   // rows g,   k-step 0
        dq_word(w.y, hi, a1, a3);   // rows g+8, k-step 0
#pragma unroll
        for (int j = 0; j < MT; ++j) mma_s8(acc[j], a0, a1, a2, a3, x[j][0], x[j][1]);
        dq_word(w.z, lo, a0, a2);   // k-step 1
        dq_word(w.w, hi, a1, a3);
#pragma unroll
        for (int j = 0; j < MT; ++j) mma_s8(acc[j], a0, a1, a2, a3, x[j][2], x[j][3]);
    }
}

// The SiLU GEMV's epilogue, for a thread of warps 0 and 1 (the caller's branch must keep them whole:
// shuffles): silu(gate)·up of its channel from the fp16-rounded gate and up into *dst where live, and
// the max over the row tile's 8 channels of each token's |·| atomically into *amax (lanes 0..3, where
// amax_live), NaN-propagating (cuda/attention.cu out_amax: NaN bits win the unsigned max).
__device__ __forceinline__ void silu_epilogue(int vg, int vu, float sxp, float s8g, float s8u, bool live, float* dst,
                                              unsigned* amax, bool amax_live, int lane) {
    float a = 0.f;
    if (live) {
        const float gf = __half2float(__ushort_as_half(f32_to_f16_bits(dg_epilogue(vg, sxp, s8g))));
        const float uf = __half2float(__ushort_as_half(f32_to_f16_bits(dg_epilogue(vu, sxp, s8u))));
        const float v = silu_mul(gf, uf);
        *dst = v;
        a = fabsf(v);
    }
    a = nan_max(a, __shfl_xor_sync(0xffffffffu, a, 4));
    a = nan_max(a, __shfl_xor_sync(0xffffffffu, a, 8));
    a = nan_max(a, __shfl_xor_sync(0xffffffffu, a, 16));
    if (lane < 4 && amax_live && !(a <= 0.f)) atomicMax(amax, __float_as_uint(a));
}

// NW warps a block split K (8, or 16 for shapes with few row tiles: 2 blocks of 16 warps an
// SM hold twice the loads in flight of 2 blocks of 8, within 64 registers). The SiLU
// epilogue's extra registers would drop gate|up (U = 2, 64 registers, 4 blocks an SM) to 3
// blocks an SM: its bound keeps 4. Any NW other than 8 is bound to 32 warps an SM (64
// registers); an NW = 4 instantiation with RW = 2 would spill under that bound.
// DP (M = 1, MT = 1): dp_chunk (common.cuh) instead of widening to int8 and mma. A lane keeps
// its rows g and g+8 of each row tile over its k positions; the shuffles over t at the end leave
// the mma fragment's token-0 elements (e = 0, 2), so the reduction and the epilogues are the mma
// path's.
template <int MT, int RW, int U, bool OUT_I32, bool SILU = false, int NW = 8, bool DP = false>
__global__ void __launch_bounds__(32 * NW, (SILU && U == 2) || NW != 8 ? 32 / NW : 0) gemm_a8w4_gemv(
    const u32x4* __restrict__ qw, const u32* __restrict__ meta, const i8* __restrict__ x8,
    const float* __restrict__ sx, const float* __restrict__ s8, void* __restrict__ out,
    int M, int N, int R, int C, int Gp, int gshift, int ldx, float* __restrict__ resid,
    unsigned* __restrict__ amax_out) {
    static_assert(NW * RW * MT <= 64, "reduction buffer must stay within 32 KB of static shared memory");
    static_assert(!SILU || (MT == 1 && RW == 1 && !OUT_I32), "the SiLU variant runs M <= 8, one row tile a block");
    static_assert(!DP || MT == 1, "the dp4a variant runs M = 1");
    __shared__ int red[NW][RW * MT * 4][32];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int rt0 = blockIdx.x * RW;

    int acc[RW][MT][4];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][j][e] = 0;

    // Per-warp base addresses, computed once; a chunk c adds c*512 B (weights), c*64 B (x).
    const u32x4* wbase[RW];
    const u32* mbase[RW];
    bool rok[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) {
        rok[r] = rt0 + r < R;
        wbase[r] = qw + (size_t)(rok[r] ? rt0 + r : 0) * C * 32 + lane;
        mbase[r] = meta + (size_t)(rok[r] ? rt0 + r : 0) * Gp * 8 + g;
    }
    const i8* xbase[MT];
    bool mok[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
        mok[j] = DP || 8 * j + g < M;        // DP: every lane reads token 0 at its k positions
        // b0/b1 of k-step 0 and 1: k = 4t, 16+4t, 32+4t, 48+4t (natural order)
        xbase[j] = x8 + (size_t)(!DP && mok[j] ? 8 * j + g : 0) * ldx + 4 * t;
    }

    // Issue every load of a batch (chunks c0, c0+8, ..., c0+8(U-1)); past C: zeros, no access.
    // Weights and their meta (no kernel writes them) apart from the activations, so the
    // first batch's weights can stream before the PDL wait (cuda/pdl.cuh).
    auto load_w = [&](int c0, GemvBatch<MT, RW, U>& b) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + NW * u;
            const bool ok = c < C;
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                if (ok && rok[r]) {
                    b.wv[u][r] = ldg_stream(wbase[r] + c * 32);
                    b.mv[u][r] = ldg_u32(mbase[r] + (c >> gshift) * 8);
                } else {
                    b.wv[u][r].x = b.wv[u][r].y = b.wv[u][r].z = b.wv[u][r].w = 0u;
                    b.mv[u][r] = 0u;
                }
            }
        }
    };
    // x is written by the kernel before this one, which may still run while this one is resident
    // (PDL): ld.global.nc (read-only for the kernel's lifetime) is outside its contract here. In
    // nvcc 13.0's SASS the loads stay after the wait; a coherent load is still to be measured
    // (bench/patches/loads.json; docs/KERNELS.md, "Leaner loads").
    auto load_x = [&](int c0, GemvBatch<MT, RW, U>& b) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + NW * u;
            const bool ok = c < C;
#pragma unroll
            for (int j = 0; j < MT; ++j) {
                if (ok && mok[j]) {
                    const i8* xp = xbase[j] + c * DGQ_CHUNK_K;
                    b.xb[u][j][0] = ldg_u32(xp);
                    b.xb[u][j][1] = ldg_u32(xp + 16);
                    b.xb[u][j][2] = ldg_u32(xp + 32);
                    b.xb[u][j][3] = ldg_u32(xp + 48);
                } else {
                    b.xb[u][j][0] = b.xb[u][j][1] = b.xb[u][j][2] = b.xb[u][j][3] = 0u;
                }
            }
        }
    };
    auto compute = [&](int c0, const GemvBatch<MT, RW, U>& b) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c0 + NW * u >= C) break;  // warp-uniform
            const int xs = DP ? dp_xsum(b.xb[u][0]) : 0;
#pragma unroll
            for (int r = 0; r < RW; ++r) gemv_chunk<MT, DP>(b.wv[u][r], b.mv[u][r], b.xb[u], xs, acc[r]);
        }
    };

    // Register double buffer: the next batch's loads are in flight while this one computes,
    // so a warp never waits a full memory round trip per batch. Both batches' weights are
    // requested before the PDL wait (with K = 4096 and U = 2, half of a block's slice).
    auto load = [&](int c0, GemvBatch<MT, RW, U>& b) { load_w(c0, b); load_x(c0, b); };
    GemvBatch<MT, RW, U> b0, b1;
    load_w(warp, b0);
    load_w(warp + NW * U, b1);
    // The epilogue's element of thread idx: output channel n, token m (D fragment of
    // mma(A = weights, B = tokens): row = channel, col = token). With at most one element a
    // thread (EPI1), its operands are fetched early: s8 (a weight) before the PDL wait, sx and
    // the residual right after it, so the epilogue waits for no memory round trip (a step
    // 2.26 → 2.20 ms with attention's early reads, H100, 7B).
    auto epi_mn = [&](int idx, int& m, int& n) {
        const int el = idx >> 5, ln = idx & 31;
        const int r = el / (MT * 4), j = (el >> 2) % MT, e = el & 3;
        n = DGQ_TILE_N * (rt0 + r) + (ln >> 2) + 8 * (e >> 1);
        m = 8 * j + 2 * (ln & 3) + (e & 1);
    };
    constexpr int EPI = RW * MT * 4 * 32;
    constexpr bool EPI1 = EPI <= 32 * NW && !OUT_I32;
    float s8p = 0.f, sxp = 0.f, hp = 0.f, s8u = 0.f;
    int em = 0, en = 0;
    if (SILU) {                          // threads 0..63: channel (gate row en, up row en + 8), token em
        em = 2 * (lane & 3) + (threadIdx.x >> 5);
        en = DGQ_TILE_N * rt0 + (lane >> 2);
    } else if (EPI1) {
        epi_mn(threadIdx.x, em, en);
    }
    const bool elive = EPI1 && threadIdx.x < (SILU ? 64 : EPI) && em < M && en < N;
    if (elive) {
        s8p = s8[en];
        if (SILU) s8u = s8[en + 8];
    }
    pdl_enter();
    if (elive) {
        sxp = sx[em];
        if (resid) hp = resid[(size_t)em * N + en];
    }
    load_x(warp, b0);
    load_x(warp + NW * U, b1);
    for (int c0 = warp; c0 < C; c0 += 2 * NW * U) {
        compute(c0, b0);
        load(c0 + 2 * NW * U, b0);
        compute(c0 + NW * U, b1);
        load(c0 + 3 * NW * U, b1);
    }

    if (DP)
#pragma unroll
        for (int r = 0; r < RW; ++r) dp_lanes_sum(acc[r][0]);
    // reduce the NW warps' partial sums (each covers a different part of K)
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) red[warp][(r * MT + j) * 4 + e][lane] = acc[r][j][e];
    __syncthreads();
    if constexpr (SILU) {
        if (threadIdx.x < 64) {          // warp-uniform: warps 0 and 1, gate elements e = 0, 1
            const int e = threadIdx.x >> 5;
            int vg = 0, vu = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) { vg += red[w][e][lane]; vu += red[w][e + 2][lane]; }
            // lanes 0..3 of the max hold tokens 2·lane + e
            silu_epilogue(vg, vu, sxp, s8p, s8u, elive, static_cast<float*>(out) + (size_t)em * (N >> 1) + 8 * rt0 + (lane >> 2),
                          amax_out + em, em < M, lane);
        }
    } else {
        for (int idx = threadIdx.x; idx < EPI; idx += blockDim.x) {
            const int el = idx >> 5, ln = idx & 31;
            int v = 0;
#pragma unroll
            for (int w = 0; w < NW; ++w) v += red[w][el][ln];
            int m, n;
            epi_mn(idx, m, n);
            if (m < M && n < N) {
                if (OUT_I32) {
                    static_cast<int*>(out)[(size_t)m * N + n] = v;
                } else {
                    const u16 y = f32_to_f16_bits(dg_epilogue(v, EPI1 ? sxp : sx[m], EPI1 ? s8p : s8[n]));
                    const size_t o = (size_t)m * N + n;
                    if (resid) resid[o] = (EPI1 ? hp : resid[o]) + __half2float(__ushort_as_half(y));
                    else static_cast<u16*>(out)[o] = y;
                }
            }
        }
    }
}

// ============================================================================ prefill (mma.sync)
template <int BM, int STAGES, bool OUT_I32>
__global__ void __launch_bounds__(256) gemm_a8w4_mma(
    const u32x4* __restrict__ qw, const u32* __restrict__ meta, const i8* __restrict__ x8,
    const float* __restrict__ sx, const float* __restrict__ s8, void* __restrict__ out,
    int* __restrict__ ws, int* __restrict__ counters,
    int M, int N, int R, int C, int Gp, int gshift, int ldx, int splits) {
    pdl_enter();
    constexpr int BK = 128;
    constexpr int WM = BM / 2, MTW = WM / 16;                // warps: 2 along M x 4 along N
    constexpr int X_BYTES = BM * BK;                         // swizzled rows of 128 B
    constexpr int W_BYTES = 8 * 2 * 512;                     // 8 row tiles x 2 chunks x 32 lanes x 16 B
    constexpr int M_BYTES = 8 * 2 * 32;                      // 8 row tiles x 2 chunks x 8 meta words
    constexpr int STAGE = X_BYTES + W_BYTES + M_BYTES;
    constexpr int NREG = MTW * 4 * 4;
    static_assert(BM % 32 == 0 && (BM * 8) % 256 == 0, "BM must be a multiple of 32");
    extern __shared__ __attribute__((aligned(128))) unsigned char smem[];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const int num_m = (M + BM - 1) / BM, num_n = (R + 7) / 8;
    int tm, tn;
    raster(blockIdx.x, num_m, num_n, 8, tm, tn);
    const int m0 = tm * BM, rt0 = tn * 8;
    const int split = blockIdx.y;
    const int KT = C / 2;
    const int kt0 = (int)((long long)KT * split / splits);
    const int nkt = (int)((long long)KT * (split + 1) / splits) - kt0;
    const u32 sbase = smem_u32(smem);

    auto load_stage = [&](int kt, int buf) {
        const u32 xs = sbase + buf * STAGE;
        const u32 wsm = xs + X_BYTES;
        const u32 msm = wsm + W_BYTES;
#pragma unroll
        for (int i = 0; i < (BM * 8) / 256; ++i) {
            const int idx = tid + i * 256;
            const int row = idx >> 3, ch = idx & 7;
            const int m = m0 + row;
            const bool ok = m < M;
            const i8* src = x8 + (size_t)(ok ? m : 0) * ldx + (size_t)kt * BK + ch * 16;
            cp_async16(xs + row * 128 + ((ch ^ (row & 7)) << 4), src, ok);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int idx = tid + i * 256;
            const int rt = rt0 + (idx >> 6);
            const bool ok = rt < R;
            const u32x4* src = qw + ((size_t)(ok ? rt : 0) * C + 2 * kt) * 32 + (idx & 63);
            cp_async16(wsm + idx * 16, src, ok);
        }
        if (tid < 32) {
            const int rt = rt0 + (tid >> 2), cl = (tid >> 1) & 1, h = tid & 1;
            const bool ok = rt < R;
            const u32* src = meta + ((size_t)(ok ? rt : 0) * Gp + ((2 * kt + cl) >> gshift)) * 8 + 4 * h;
            cp_async16(msm + tid * 16, src, ok);
        }
    };

    int acc[NREG];
#pragma unroll
    for (int i = 0; i < NREG; ++i) acc[i] = 0;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nkt) load_stage(kt0 + s, s);
        cp_async_commit();
    }

    for (int i = 0; i < nkt; ++i) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();   // stage i visible to all; every warp is done with stage i-1's buffer
        {
            const int nx = i + STAGES - 1;
            if (nx < nkt) load_stage(kt0 + nx, nx % STAGES);
            cp_async_commit();
        }
        const int buf = i % STAGES;
        const u32 xs = sbase + buf * STAGE;
        const u32x4* wsp = reinterpret_cast<const u32x4*>(smem + buf * STAGE + X_BYTES);
        const u32* msp = reinterpret_cast<const u32*>(smem + buf * STAGE + X_BYTES + W_BYTES);
#pragma unroll
        for (int cl = 0; cl < 2; ++cl) {
            u32x4 wv[2];
            DqConst lo[2], hi[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int rtl = wn * 2 + q;
                wv[q] = wsp[(rtl * 2 + cl) * 32 + lane];
                dq_meta(msp[(rtl * 2 + cl) * 8 + g], lo[q], hi[q]);
            }
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                u32 b[4][2];
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    dq_word(ks ? wv[q].z : wv[q].x, lo[q], b[2 * q][0], b[2 * q][1]);       // channels g
                    dq_word(ks ? wv[q].w : wv[q].y, hi[q], b[2 * q + 1][0], b[2 * q + 1][1]); // channels g+8
                }
#pragma unroll
                for (int mi = 0; mi < MTW; ++mi) {
                    const int row = wm * WM + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int ch = cl * 4 + ks * 2 + (lane >> 4);
                    u32 a0, a1, a2, a3;
                    ldmatrix_x4(xs + row * 128 + ((ch ^ (row & 7)) << 4), a0, a1, a2, a3);
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) {
                        mma_s8(acc + (mi * 4 + nt) * 4, a0, a1, a2, a3, b[nt][0], b[nt][1]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    if (!splitk_reduce<NREG, 256>(acc, ws, counters, blockIdx.x, split, splits, gridDim.x)) return;

#pragma unroll
    for (int mi = 0; mi < MTW; ++mi)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // D fragment of mma(A = tokens, B = weights): row = token, col = channel
                const int m = m0 + wm * WM + mi * 16 + g + 8 * h;
                const int n = DGQ_TILE_N * (rt0 + wn * 2 + (nt >> 1)) + 8 * (nt & 1) + 2 * t;
                const int v0 = acc[(mi * 4 + nt) * 4 + 2 * h], v1 = acc[(mi * 4 + nt) * 4 + 2 * h + 1];
                if (m >= M || n >= N) continue;
                if (OUT_I32) {
                    int* o = static_cast<int*>(out) + (size_t)m * N + n;
                    o[0] = v0;
                    if (n + 1 < N) o[1] = v1;
                } else {
                    const float sm = sx[m];
                    const u16 h0 = f32_to_f16_bits(dg_epilogue(v0, sm, s8[n]));
                    u16* o = static_cast<u16*>(out) + (size_t)m * N + n;
                    if (n + 1 < N) {
                        const u16 h1 = f32_to_f16_bits(dg_epilogue(v1, sm, s8[n + 1]));
                        if ((N & 1) == 0) *reinterpret_cast<u32*>(o) = (u32)h0 | ((u32)h1 << 16);
                        else { o[0] = h0; o[1] = h1; }
                    } else {
                        o[0] = h0;
                    }
                }
            }
}
