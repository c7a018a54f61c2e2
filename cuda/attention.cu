// attention.cu — everything that touches the KV cache: RoPE + cache write, flash-attention
// prefill, flash-decoding.
//
// Layouts: q (M, Hq, D) fp16 after RoPE; the KV cache of one layer is (B, cap, Hkv, D),
// fp16 or (kv8) int8 with one float32 scale per (b, position, kv head) in (B, cap, Hkv).
// Attention outputs are (M, Hq·D) fp16. Hq is a multiple of Hkv (grouped-query: q head h
// reads kv head h / (Hq / Hkv)). D ∈ {64, 128}.
//
// kv8 (per-token INT8 cache): k8 = clamp(rint(k / s), ±127) with s = max|k| / 127 over the
// D values of one (token, kv head) — 1 for an all-zero row — the rule of
// engine/formats.quantize_act_ref; the same for v. Kernels are templated on the cache
// element type KV (__half or signed char); for __half the scale arguments are not read.
// Prefill dequantizes int8 tiles to fp16 (x8·s, rounded once) in shared memory; decode
// applies the scales in fp32 (scale_k · (q · k8), p · scale_v) and never rounds to fp16.
//
// Positions and sequence lengths of decode are read from device memory so a decode step
// can be captured once as a CUDA graph and replayed.
#include "common.cuh"
#include "rows.cuh"

// ----------------------------------------------------------------- the cache element types
// Two consecutive elements of a cache row, raw (KvPair), and as floats (x8 values for int8:
// the caller scales).
template <typename KV> struct KvPair;
template <> struct KvPair<__half> { typedef __half2 T; };
template <> struct KvPair<i8> { typedef char2 T; };
__device__ __forceinline__ float2 to_f2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_f2(char2 v) { return make_float2((float)v.x, (float)v.y); }
// Elements 2·i2 and 2·i2 + 1 of an fp16 row as floats.
__device__ __forceinline__ float2 load2(const __half* row, int i2) {
    return to_f2(reinterpret_cast<const __half2*>(row)[i2]);
}
template <typename KV> __device__ __forceinline__ float kv_scale(const float* s, size_t i);
template <> __device__ __forceinline__ float kv_scale<__half>(const float*, size_t) { return 1.f; }
template <> __device__ __forceinline__ float kv_scale<i8>(const float* s, size_t i) { return s[i]; }

// ================================================================= flash-attention prefill
// FlashAttention-2 forward for the t new queries of one sequence (positions start..start+t-1)
// against its first n = start + t cached keys, causal, grouped-query.
//
// grid (ceil(t / 64), Hq), block 128 (4 warps). Block (x, h) owns 64 query rows of head h;
// warp w owns rows 16w..16w+15 and keeps its Q fragments (16 × D) and the O accumulator
// (16 × D, fp32) in registers. Key/value tiles of 64 rows stream through shared memory
// with cp.async double buffering: tile j+1 loads while tile j computes. Per tile,
// S = Q·Kᵀ and O += P·V run on tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate;
// operands through ldmatrix, V with .trans), and the softmax is online in fp32 (exp2 with
// the scale folded in). The S accumulator fragment is P's A fragment (as fp16 hi + lo, two
// mmas), so P never leaves registers. Tiles wholly above the diagonal are never loaded (causal: the block stops at
// its last query's position), and a warp skips a tile its 16 rows cannot see.
// Blocks are issued last tile first: the longest rows start first, the short ones fill in.
// Shared rows are padded by 8 halves (D + 8): the 8 rows an ldmatrix reads then start 16 bytes
// apart modulo 128 and hit distinct banks.
// kv8: int8 tiles land in a staging ring by cp.async and are dequantized into the fp16 tile
// (one conversion per element per block) before the tensor-core pass.
#define FA_BM 64            // query rows per block
#define FA_BN 64            // keys per tile
#define FA_THREADS 128

__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&h);
}
// (x, y) as an fp16 pair hi plus the fp16 pair of what rounding left out: hi + lo ≈ (x, y) to ~2⁻²².
__device__ __forceinline__ void split_h2(float x, float y, u32& hi, u32& lo) {
    __half2 h = __floats2half2_rn(x, y);
    float2 f = __half22float2(h);
    hi = *reinterpret_cast<u32*>(&h);
    lo = pack_h2(x - f.x, y - f.y);
}

// Bytes of dynamic shared memory the prefill kernel needs (the launcher mirrors this).
template <int D, typename KV>
struct FaSmem {
    static constexpr int LD = D + 8;                                   // padded row, halves
    static constexpr int TILE = FA_BN * LD * 2;                        // one fp16 tile, bytes
    static constexpr int STAGE = sizeof(KV) == 1 ? FA_BN * D : 0;      // one int8 tile, bytes
    static constexpr int BYTES = 4 * TILE + 4 * STAGE;                 // K, V × 2 buffers (+ staging)
};

// Issue the cp.async copies of rows [r0, r0 + 64) of a (rows, row_stride) matrix into shared
// rows of ld bytes; rows ≥ nrows are zero-filled (their addresses are clamped to row 0).
template <int ROW_BYTES>
__device__ __forceinline__ void load_tile(u32 dst, int ld, const char* base, size_t row_stride,
                                          int r0, int nrows) {
    constexpr int CH = ROW_BYTES / 16;
#pragma unroll
    for (int i = threadIdx.x; i < FA_BN * CH; i += FA_THREADS) {
        int r = i / CH, c = i % CH;
        bool ok = r0 + r < nrows;
        const char* src = base + (size_t)(ok ? r0 + r : 0) * row_stride + c * 16;
        cp_async16(dst + r * ld + c * 16, src, ok);
    }
}

// kv8: staged int8 rows [r0, r0 + 64) → fp16 tile, x8 · scale (scale 0 past nrows).
template <int D>
__device__ __forceinline__ void dequant_tile(__half* dst, const i8* stage, const float* scale,
                                             size_t scale_stride, int r0, int nrows) {
    constexpr int CH = D / 16, LD = D + 8;
    for (int i = threadIdx.x; i < FA_BN * CH; i += FA_THREADS) {
        int r = i / CH, c = i % CH;
        float s = r0 + r < nrows ? scale[(size_t)(r0 + r) * scale_stride] : 0.f;
        uint4 w = *reinterpret_cast<const uint4*>(stage + r * D + c * 16);
        const i8* b = reinterpret_cast<const i8*>(&w);
        u32 h[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) h[e] = pack_h2((float)b[2 * e] * s, (float)b[2 * e + 1] * s);
        uint4* o = reinterpret_cast<uint4*>(dst + r * LD + c * 16);
        o[0] = make_uint4(h[0], h[1], h[2], h[3]);
        o[1] = make_uint4(h[4], h[5], h[6], h[7]);
    }
}

// WIN (attn_prefill_sw: sliding-window layers, Mistral, Gemma 3's local layers): query i sees only
// keys j > start + i − window (itself included, as engine/model/ops_ref.py attention). The block
// starts at the tile of its first row's first key, a warp skips a tile none of its rows sees,
// and a row may meet tiles that hold none of its keys: its running max then stays −inf, and
// the softmax step takes 0 in its place (exp2(−inf) = 0 instead of NaN from −inf − −inf).
template <int D, typename KV, bool WIN>
__device__ __forceinline__ void attn_prefill_body(
        const __half* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,
        const float* __restrict__ ks, const float* __restrict__ vs, __half* __restrict__ out,
        int t, int start, int Hq, int Hkv, int cap, int seq, float scale_log2, int window) {
    pdl_enter();
    constexpr bool KV8 = sizeof(KV) == 1;
    constexpr int LD = FaSmem<D, KV>::LD, TILE = FaSmem<D, KV>::TILE, STAGE = FaSmem<D, KV>::STAGE;
    constexpr int KD = D / 16;                       // k16 steps over D
    extern __shared__ __align__(16) unsigned char smem[];
    __half* sK = reinterpret_cast<__half*>(smem);                 // [2][FA_BN][LD]
    __half* sV = reinterpret_cast<__half*>(smem + 2 * TILE);      // [2][FA_BN][LD]
    i8* stK = reinterpret_cast<i8*>(smem + 4 * TILE);             // kv8: [2][FA_BN][D]
    i8* stV = stK + 2 * STAGE;
    const u32 sK_a = smem_u32(sK), sV_a = smem_u32(sV), stK_a = smem_u32(stK), stV_a = smem_u32(stV);

    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, kvh = h / (Hq / Hkv);
    const int m0 = qt * FA_BM, n = start + t;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
    const int ntiles = (min(n, start + m0 + FA_BM) + FA_BN - 1) / FA_BN;
    const int jlo = WIN ? max(0, start + m0 - window + 1) / FA_BN : 0;     // the first tile a row sees
    const size_t kv_stride = (size_t)Hkv * D;        // elements between consecutive positions
    const KV* kbase = kc + (size_t)seq * cap * kv_stride + (size_t)kvh * D;
    const KV* vbase = vc + (size_t)seq * cap * kv_stride + (size_t)kvh * D;
    const float* ksb = ks + (size_t)seq * cap * Hkv + kvh;
    const float* vsb = vs + (size_t)seq * cap * Hkv + kvh;

    auto issue = [&](int j, int buf) {               // cp.async of key/value tile j
        if constexpr (KV8) {
            load_tile<D>(stK_a + buf * STAGE, D, (const char*)kbase, kv_stride, j * FA_BN, n);
            load_tile<D>(stV_a + buf * STAGE, D, (const char*)vbase, kv_stride, j * FA_BN, n);
        } else {
            load_tile<2 * D>(sK_a + buf * TILE, 2 * LD, (const char*)kbase, 2 * kv_stride, j * FA_BN, n);
            load_tile<2 * D>(sV_a + buf * TILE, 2 * LD, (const char*)vbase, 2 * kv_stride, j * FA_BN, n);
        }
    };
    // Q rows [m0, m0 + 64) of head h are staged in K buffer 1 (free until tile 1 is issued).
    load_tile<2 * D>(sK_a + TILE, 2 * LD, (const char*)(q + (size_t)m0 * Hq * D + (size_t)h * D),
                     (size_t)Hq * D * 2, 0, t - m0);
    issue(jlo, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qa[KD][4];
    {
        const u32 base = sK_a + TILE + ((warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8) * 2;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) ldmatrix_x4(base + kk * 32, qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3]);
    }
    __syncthreads();

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};   // rows g and g + 8 (l: partial per lane)
    const int qpos0 = start + m0 + warp * 16 + g;                // position of row g
    // ldmatrix lane offsets: K as B (non-trans): keys +(lane>>4)*8 + (lane&7), d +((lane>>3)&1)*8;
    // V as B (trans): keys +((lane>>3)&1)*8 + (lane&7), d +(lane>>4)*8.
    const u32 k_off = (((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8) * 2;
    const u32 v_off = ((((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8) * 2;

    for (int j = jlo; j < ntiles; ++j) {
        const int buf = (j - jlo) & 1;
        if (j + 1 < ntiles) issue(j + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if constexpr (KV8) {
            dequant_tile<D>(sK + buf * (TILE / 2), stK + buf * STAGE, ksb, Hkv, j * FA_BN, n);
            dequant_tile<D>(sV + buf * (TILE / 2), stV + buf * STAGE, vsb, Hkv, j * FA_BN, n);
            __syncthreads();
        }
        const int j0 = j * FA_BN;
        // some row of this warp sees a key of the tile (WIN: and the tile reaches its first row's window)
        if (j0 <= qpos0 - g + 15 && (!WIN || j0 + FA_BN - 1 > qpos0 - g - window)) {
            float s[FA_BN / 8][4];
#pragma unroll
            for (int i = 0; i < FA_BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            const u32 kb = sK_a + buf * TILE + k_off;
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
                for (int np = 0; np < FA_BN / 16; ++np) {
                    u32 b0, b1, b2, b3;
                    ldmatrix_x4(kb + (np * 16 * LD + kk * 16) * 2, b0, b1, b2, b3);
                    mma_f16(s[2 * np], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
                    mma_f16(s[2 * np + 1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b2, b3);
                }
            }
            // the diagonal (or the end; WIN: or the window's start of the warp's last row): mask
            if (j0 + FA_BN - 1 > qpos0 - g || j0 + FA_BN > n || (WIN && j0 <= qpos0 - g + 15 - window)) {
#pragma unroll
                for (int i = 0; i < FA_BN / 8; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int key = j0 + i * 8 + 2 * tq + (e & 1);
                        int lim = min(qpos0 + (e >> 1) * 8, n - 1);
                        if (key > lim || (WIN && key <= qpos0 + (e >> 1) * 8 - window)) s[i][e] = NEG_INF;
                    }
            }
            // online softmax; every row sees key 0 in tile 0, so mrow is finite from then on (WIN:
            // a row's first tiles may hold none of its keys, mref below)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = NEG_INF;
#pragma unroll
                for (int i = 0; i < FA_BN / 8; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float mnew = fmaxf(mrow[r], mx);
                const float mref = WIN && mnew == NEG_INF ? 0.f : mnew;      // WIN: no key of the row yet
                float alpha = exp2f((mrow[r] - mref) * scale_log2);
                mrow[r] = mnew;
                float off = mref * scale_log2, sum = 0.f;
#pragma unroll
                for (int i = 0; i < FA_BN / 8; ++i) {
                    s[i][2 * r] = exp2f(fmaf(s[i][2 * r], scale_log2, -off));
                    s[i][2 * r + 1] = exp2f(fmaf(s[i][2 * r + 1], scale_log2, -off));
                    sum += s[i][2 * r] + s[i][2 * r + 1];
                }
                lrow[r] = lrow[r] * alpha + sum;
#pragma unroll
                for (int i = 0; i < D / 8; ++i) { o[i][2 * r] *= alpha; o[i][2 * r + 1] *= alpha; }
            }
            // O += P·V: the S fragments of key tiles 2ks, 2ks+1 are the A fragment of k-step ks.
            // P enters as fp16 hi + lo (P − hi), two mmas: P·V is as exact as fp32 P (a plain fp16 P,
            // 2⁻¹¹ relative, moved a quantized SmolLM2's wiki perplexity 0.9 % off the NumPy path;
            // the second mma costs about a fifth of the kernel's time).
            const u32 vb = sV_a + buf * TILE + v_off;
#pragma unroll
            for (int ks2 = 0; ks2 < FA_BN / 16; ++ks2) {
                u32 a[4], al[4];
                split_h2(s[2 * ks2][0], s[2 * ks2][1], a[0], al[0]);
                split_h2(s[2 * ks2][2], s[2 * ks2][3], a[1], al[1]);
                split_h2(s[2 * ks2 + 1][0], s[2 * ks2 + 1][1], a[2], al[2]);
                split_h2(s[2 * ks2 + 1][2], s[2 * ks2 + 1][3], a[3], al[3]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    u32 b0, b1, b2, b3;
                    ldmatrix_x4_trans(vb + (ks2 * 16 * LD + dp * 16) * 2, b0, b1, b2, b3);
                    mma_f16(o[2 * dp], a[0], a[1], a[2], a[3], b0, b1);
                    mma_f16(o[2 * dp + 1], a[0], a[1], a[2], a[3], b2, b3);
                    mma_f16(o[2 * dp], al[0], al[1], al[2], al[3], b0, b1);
                    mma_f16(o[2 * dp + 1], al[0], al[1], al[2], al[3], b2, b3);
                }
            }
        }
        __syncthreads();                             // buffer buf is reloaded two tiles on
    }
    cp_async_wait<0>();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        int row = m0 + warp * 16 + g + r * 8;
        if (row < t) {
            float inv = 1.f / l;
            __half* dst = out + ((size_t)row * Hq + h) * D + 2 * tq;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                *reinterpret_cast<__half2*>(dst + i * 8) = __floats2half2_rn(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
        }
    }
}

template <int D, typename KV>
__global__ void __launch_bounds__(FA_THREADS)
attn_prefill(const __half* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,
             const float* __restrict__ ks, const float* __restrict__ vs, __half* __restrict__ out,
             int t, int start, int Hq, int Hkv, int cap, int seq, float scale_log2) {
    attn_prefill_body<D, KV, false>(q, kc, vc, ks, vs, out, t, start, Hq, Hkv, cap, seq, scale_log2, 0);
}

// attn_prefill for a sliding-window layer: query i sees keys start + i − window < j ≤ start + i.
template <int D, typename KV>
__global__ void __launch_bounds__(FA_THREADS)
attn_prefill_sw(const __half* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,
                const float* __restrict__ ks, const float* __restrict__ vs, __half* __restrict__ out,
                int t, int start, int Hq, int Hkv, int cap, int seq, float scale_log2, int window) {
    attn_prefill_body<D, KV, true>(q, kc, vc, ks, vs, out, t, start, Hq, Hkv, cap, seq, scale_log2, window);
}

// ================================================================= flash-decoding
// One kernel a decode step and layer: RoPE of the new token's q and k, its k and v into the
// cache, flash-decoding over the cache, and the merge of the splits.
// grid (B, Hq, nsplit), block 128 (4 warps), D ∈ {64, 128}. The new token of sequence b sits
// at position p = lens[b] − 1 (the decode step advances lens after sampling); qkv is the fused
// q|k|v GEMM output (B, (Hq + 2 Hkv) D) fp16.
// Block (b, h, sp) scores keys [sp·DEC_CHUNK, min(len_b, (sp+1)·DEC_CHUNK)) against its one
// query and writes the unnormalised partial (max m, sum l, acc[D]). Warp w owns 16
// consecutive keys; a lane holds D/64 pairs of each key's row, and the key loop is unrolled,
// so all 16 K and V rows of a warp are loaded before the first is used: one memory round trip
// a block. The softmax max and sum over the block's 64 scores are recomputed by every warp from
// shared memory, which costs one barrier instead of four.
// RoPE: each block rotates its q itself (rounded to fp16, as rope_qkv_cache stores q), and the
// blocks of the last split (which holds p) rotate k and take the new key and value from
// registers, not from the cache; the first q head of each kv group writes them to the cache
// (kv8: quantized from the rotated float k and the fp16 v, scale from the head's absmax, the
// rule of rope_qkv_cache). No block uses the cache's row p: the clamped loads below may read
// it while it is being written, and those values are always replaced.
// CL > 0 (sm_90, nsplit ≤ CL ≤ 8): the splits of a head form a cluster and merge through
// distributed shared memory instead (grid z = CL, the splits past nsplit are empty).
// The cache rows of positions before p and lens are read before the PDL wait: no kernel of
// the step writes them (cuda/pdl.cuh).
// Merge: the last of a head's nsplit blocks to finish (an atomic counter, which it resets for
// the next step) combines the partials into the head's D outputs, fp16 into out (B, Hq·D).
// Three launches (rope, split, combine) became one: in a graphed decode step every launch
// is a link of a dependent chain (docs/KERNELS.md).
// kv8: a key's score is scale_k · (q · k8); a value row enters the sum with weight p · scale_v.
#define DEC_WARPS 4
#define DEC_CHUNK 64                        // keys per block (engine/gpu/tuning.py ATTENTION)
#define DEC_KPW (DEC_CHUNK / DEC_WARPS)     // keys per warp
#define DEC_MAX_D2 64                       // D/2 pairs, D ≤ 128
#define DEC_MERGE_REGS 8                    // the most splits the last block merges from registers

// A rotate-half pair of RoPE: x·c − y·s (sub) or x·c + y·s, the second product rounded, then one
// fused multiply-add. Spelled out so that every kernel rotates alike: left to the compiler, the
// contraction of a·b ± c·d varies with the code around it (session 43: the decode kernel's q and
// the same kernel built a little differently differed in the last bit).
__device__ __forceinline__ float2 rot_sub(float2 x, float2 c, float2 y, float2 s) {
    return make_float2(__fmaf_rn(x.x, c.x, -__fmul_rn(y.x, s.x)), __fmaf_rn(x.y, c.y, -__fmul_rn(y.y, s.y)));
}
__device__ __forceinline__ float2 rot_add(float2 x, float2 c, float2 y, float2 s) {
    return make_float2(__fmaf_rn(x.x, c.x, __fmul_rn(y.x, s.x)), __fmaf_rn(x.y, c.y, __fmul_rn(y.y, s.y)));
}

// RoPE (rotate-half pairs j, j + D/2) of one head row at position p, as a lane of a warp holds
// it: elements (2·lane, 2·lane + 1) in a and, for D = 128, (2·lane + 64, 2·lane + 65) in b —
// each other's partners. For D = 64 the partner pair sits in lane ^ 16.
// In three parts, so that a kernel can issue every load before the first use (one memory round
// trip for q, k and v of the new token instead of one each): rope_row loads a lane's pairs of a
// head row, rope_tab its pairs' cos and sin at p (the same for every head: the tables are no
// kernel's output, so they may be read before the PDL wait), rope_apply rotates.
struct RopeRow { float2 x, y; };                 // pairs lane and, for D = 128, lane + 32
struct RopeTab { float2 c, s; };
__device__ __forceinline__ RopeRow rope_row(const __half* src, int D, int lane) {
    return {load2(src, lane), D > 64 ? load2(src, lane + 32) : make_float2(0.f, 0.f)};
}
__device__ __forceinline__ RopeTab rope_tab(int p, int D, const float* cos_t, const float* sin_t, int lane) {
    const int hd = D >> 1, j2 = D > 64 ? lane : lane & 15;         // D = 64: pair index j / 2 within the half
    return {reinterpret_cast<const float2*>(cos_t + (size_t)p * hd)[j2],
            reinterpret_cast<const float2*>(sin_t + (size_t)p * hd)[j2]};
}
__device__ __forceinline__ void rope_apply(const RopeRow& r, const RopeTab& t, int D, int lane, float2& a,
                                           float2& b) {
    const float2 x = r.x, c = t.c, s = t.s;
    if (D > 64) {
        const float2 y = r.y;
        a = rot_sub(x, c, y, s);
        b = rot_add(y, c, x, s);
    } else {
        const float2 y = make_float2(__shfl_xor_sync(0xffffffffu, x.x, 16), __shfl_xor_sync(0xffffffffu, x.y, 16));
        a = lane < 16 ? rot_sub(x, c, y, s) : rot_add(x, c, y, s);
        b = make_float2(0.f, 0.f);
    }
}
__device__ __forceinline__ void rope_lane(const __half* src, int p, int D, const float* cos_t,
                                          const float* sin_t, int lane, float2& a, float2& b) {
    rope_apply(rope_row(src, D, lane), rope_tab(p, D, cos_t, sin_t, lane), D, lane, a, b);
}

__device__ __forceinline__ float2 round_h2(float2 v) { return __half22float2(__floats2half2_rn(v.x, v.y)); }

// The new token's k (or v) row into the cache as new_kv made it (a, b: fp16 values, or int8 codes
// as floats, and s their scale): exact conversions. One warp per kv head.
__device__ __forceinline__ void store_kv(const float2& a, const float2& b, float s, bool two, int lane, __half* row,
                                         float* srow) {
    reinterpret_cast<__half2*>(row)[lane] = __floats2half2_rn(a.x, a.y);
    if (two) reinterpret_cast<__half2*>(row)[lane + 32] = __floats2half2_rn(b.x, b.y);
}
__device__ __forceinline__ void store_kv(const float2& a, const float2& b, float s, bool two, int lane, i8* row,
                                         float* srow) {
    reinterpret_cast<char2*>(row)[lane] = make_char2((signed char)a.x, (signed char)a.y);
    if (two) reinterpret_cast<char2*>(row)[lane + 32] = make_char2((signed char)b.x, (signed char)b.y);
    if (lane == 0) *srow = s;
}

// The new token's k (or v) row as the cache will hold it: fp16-rounded, or int8 codes (as
// floats) with the scale s from the head's absmax. Stores it when `store` (store_kv).
__device__ __forceinline__ void new_kv(float2& a, float2& b, float& s, bool two, int lane, bool store,
                                       __half* row, float* srow) {
    a = round_h2(a);
    b = round_h2(b);
    s = 1.f;
    if (store) store_kv(a, b, s, two, lane, row, srow);
}
__device__ __forceinline__ void new_kv(float2& a, float2& b, float& s, bool two, int lane, bool store,
                                       i8* row, float* srow) {
    s = row_scale(MODE_DYNAMIC, warp_max(nan_max(nan_max(fabsf(a.x), fabsf(a.y)), nan_max(fabsf(b.x), fabsf(b.y)))),
                  nullptr);                                           // b is 0 for D = 64
    a = make_float2(quant1(a.x, s), quant1(a.y, s));
    b = make_float2(quant1(b.x, s), quant1(b.y, s));
    if (store) store_kv(a, b, s, two, lane, row, srow);
}

// One output of a head from n ≤ N splits' partials (flash-decoding's merge): the splits' maxima m,
// sums l and partial outputs x, weighted exp(m − max) / Σ exp(m − max)·l, summed in split order in
// fp32; entries past n are skipped. attn_decode's cluster merge and its global merge from registers.
template <int N>
__device__ __forceinline__ float merge_splits(const float (&m)[N], const float (&l)[N], const float (&x)[N], int n) {
    float mx = NEG_INF, lc = 0.f, v = 0.f, w[N];
#pragma unroll
    for (int i = 0; i < N; ++i)
        if (i < n) mx = fmaxf(mx, m[i]);
#pragma unroll
    for (int i = 0; i < N; ++i)
        if (i < n) {
            w[i] = __expf(m[i] - mx);
            lc += w[i] * l[i];
        }
#pragma unroll
    for (int i = 0; i < N; ++i)
        if (i < n) v += (w[i] / lc) * x[i];
    return v;
}

// Wide heads (D = WIDE_D, Gemma 3's 256): a lane holds the WIDE_NP pairs lane + 32·i of a head
// row; pair i's rotate-half partner is pair i + WIDE_NP/2 (elements j and j + 128), the table row
// holds the frequency of pair i < WIDE_NP/2 at lane + 32·i. rope_lane's arithmetic per pair.
#define WIDE_D 256
#define WIDE_NP (WIDE_D / 64)
__device__ __forceinline__ void rope_lane_wide(const __half* src, int p, const float* cos_t, const float* sin_t,
                                               int lane, float2 (&x)[WIDE_NP]) {
    float2 v[WIDE_NP];
#pragma unroll
    for (int i = 0; i < WIDE_NP; ++i) v[i] = load2(src, lane + 32 * i);
    const float2* c2 = reinterpret_cast<const float2*>(cos_t + (size_t)p * (WIDE_D / 2));
    const float2* s2 = reinterpret_cast<const float2*>(sin_t + (size_t)p * (WIDE_D / 2));
#pragma unroll
    for (int i = 0; i < WIDE_NP / 2; ++i) {
        const float2 c = c2[lane + 32 * i], sn = s2[lane + 32 * i], a = v[i], b = v[i + WIDE_NP / 2];
        x[i] = rot_sub(a, c, b, sn);
        x[i + WIDE_NP / 2] = rot_add(b, c, a, sn);
    }
}
// new_kv for a wide head: the row as the cache holds it (fp16-rounded, or int8 codes as floats
// with the scale from the head's absmax), stored when `store`.
__device__ __forceinline__ void new_kv_wide(float2 (&x)[WIDE_NP], float& s, int lane, bool store, __half* row,
                                            float* srow) {
    s = 1.f;
#pragma unroll
    for (int i = 0; i < WIDE_NP; ++i) {
        x[i] = round_h2(x[i]);
        if (store) reinterpret_cast<__half2*>(row)[lane + 32 * i] = __floats2half2_rn(x[i].x, x[i].y);
    }
}
__device__ __forceinline__ void new_kv_wide(float2 (&x)[WIDE_NP], float& s, int lane, bool store, i8* row,
                                            float* srow) {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < WIDE_NP; ++i) m = nan_max(m, nan_max(fabsf(x[i].x), fabsf(x[i].y)));
    s = row_scale(MODE_DYNAMIC, warp_max(m), nullptr);
#pragma unroll
    for (int i = 0; i < WIDE_NP; ++i) {
        const signed char q0 = quant1(x[i].x, s), q1 = quant1(x[i].y, s);
        x[i] = make_float2(q0, q1);
        if (store) reinterpret_cast<char2*>(row)[lane + 32 * i] = make_char2(q0, q1);
    }
    if (store && lane == 0) *srow = s;
}

// grid (M, ⌈(Hq + Hkv) / 4⌉), block 128: warp w of block (m, y) takes head 4y + w of token m.
// RoPE (HF rotate-half pairs j, j + D/2) on q and k of the fused qkv output (M, (Hq + 2 Hkv) D);
// q goes to q_out (M, Hq, D), k and v to the cache at [seq[m], pos[m]] (kv8: quantized from the
// float32 rotated k and the fp16 v, scale from the head's absmax). A lane holds D/32 values of
// its head as pairs (rope_lane, new_kv: the same arithmetic as attn_decode's new token).
// cos/sin tables are (max_pos, D/2) float32, built on the host in float64. (v1 ran a block of
// D/2 threads per head and token with 2-byte accesses: 161 µs a layer for 2048 tokens of the
// 7B shape on the H100, 8 % of the prefill.) DW = WIDE_D: a wide head (D = DW; rope_lane_wide,
// new_kv_wide); DW = 0: D ≤ 128, read at run time.
template <typename KV, int DW = 0>
__global__ void __launch_bounds__(128) rope_qkv_cache(
        const __half* __restrict__ qkv, int Hq, int Hkv, int D, const int* __restrict__ pos,
        const int* __restrict__ seq, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
        __half* __restrict__ q_out, KV* __restrict__ kc, KV* __restrict__ vc, float* __restrict__ ks,
        float* __restrict__ vs, int cap) {
    pdl_enter();
    const int m = blockIdx.x, lane = threadIdx.x & 31, head = blockIdx.y * 4 + (threadIdx.x >> 5);
    if (head >= Hq + Hkv) return;                           // warp-uniform
    const int p = pos[m];
    if constexpr (DW != 0) {
        static_assert(DW == WIDE_D, "rope_qkv_cache: the wide path is D = WIDE_D");
        const __half* row = qkv + (size_t)m * (Hq + 2 * Hkv) * DW;
        float2 x[WIDE_NP];
        rope_lane_wide(row + (size_t)head * DW, p, cos_t, sin_t, lane, x);
        if (head < Hq) {
            __half2* dst = reinterpret_cast<__half2*>(q_out + ((size_t)m * Hq + head) * DW);
#pragma unroll
            for (int i = 0; i < WIDE_NP; ++i) dst[lane + 32 * i] = __floats2half2_rn(x[i].x, x[i].y);
        } else {
            const int kh = head - Hq;
            const size_t r = ((size_t)seq[m] * cap + p) * Hkv + kh;   // (b, position, kv head)
            float s;
            new_kv_wide(x, s, lane, true, kc + r * DW, ks + r);
            const __half* v = row + (size_t)(Hq + Hkv + kh) * DW;
            float2 y[WIDE_NP];
#pragma unroll
            for (int i = 0; i < WIDE_NP; ++i) y[i] = load2(v, lane + 32 * i);
            new_kv_wide(y, s, lane, true, vc + r * DW, vs + r);
        }
    } else {
        const bool two = D > 64;
        const __half* row = qkv + (size_t)m * (Hq + 2 * Hkv) * D;
        float2 a, b;
        rope_lane(row + (size_t)head * D, p, D, cos_t, sin_t, lane, a, b);
        if (head < Hq) {
            __half2* dst = reinterpret_cast<__half2*>(q_out + ((size_t)m * Hq + head) * D);
            dst[lane] = __floats2half2_rn(a.x, a.y);
            if (two) dst[lane + 32] = __floats2half2_rn(b.x, b.y);
        } else {
            const int kh = head - Hq;
            const size_t r = ((size_t)seq[m] * cap + p) * Hkv + kh;   // (b, position, kv head)
            float s;
            new_kv(a, b, s, two, lane, true, kc + r * D, ks + r);
            const __half* v = row + (size_t)(Hq + Hkv + kh) * D;
            float2 va = load2(v, lane), vb = two ? load2(v, lane + 32) : make_float2(0.f, 0.f);
            new_kv(va, vb, s, two, lane, true, vc + r * D, vs + r);
        }
    }
}

// grid (M, ⌈(Hq + 2 Hkv) / 4⌉), block 128: warp w of block (m, y) takes head 4y + w of token m of the
// fused qkv output (M, (Hq + 2 Hkv) D) fp16 and rewrites it in place before RoPE reads it (rope_qkv_cache,
// attn_decode): + bias (nullable: Qwen2's q, k, v biases, ((Hq + 2 Hkv)·D,) float32), then on the q
// and k heads RMSNorm over the head's D values times qw or kw ((D,) float32; nullable: no norm —
// the per-head q/k norms of Qwen3 and Gemma 3), in float32, rounded to fp16 once. The NumPy
// model adds the bias and norms the float32 q, k (engine/model/llama.py layer_forward); here q, k
// are the GEMM's fp16 output. A lane holds the D/64 pairs lane + 32·i of its head.
template <int D>
__global__ void __launch_bounds__(128) qk_norm_bias(__half* __restrict__ qkv, int Hq, int Hkv,
                                                    const float* __restrict__ bias, const float* __restrict__ qw,
                                                    const float* __restrict__ kw, float eps) {
    constexpr int NP = D / 64;
    const int m = blockIdx.x, lane = threadIdx.x & 31, head = blockIdx.y * 4 + (threadIdx.x >> 5);
    const int heads = Hq + 2 * Hkv;
    const float* w = head < Hq ? qw : head < Hq + Hkv ? kw : nullptr;
    pdl_enter();
    if (head >= heads || (w == nullptr && bias == nullptr)) return;         // warp-uniform
    __half2* row = reinterpret_cast<__half2*>(qkv + ((size_t)m * heads + head) * D);
    float2 x[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) x[i] = __half22float2(row[lane + 32 * i]);
    if (bias != nullptr) {
        const float2* b2 = reinterpret_cast<const float2*>(bias + (size_t)head * D);
#pragma unroll
        for (int i = 0; i < NP; ++i) {
            const float2 bv = b2[lane + 32 * i];
            x[i].x += bv.x;
            x[i].y += bv.y;
        }
    }
    if (w != nullptr) {
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < NP; ++i) ss += x[i].x * x[i].x + x[i].y * x[i].y;
        const float rstd = 1.f / sqrtf(warp_sum(ss) / D + eps);
        const float2* w2 = reinterpret_cast<const float2*>(w);
#pragma unroll
        for (int i = 0; i < NP; ++i) {
            const float2 wv = w2[lane + 32 * i];
            x[i] = make_float2((x[i].x * rstd) * wv.x, (x[i].y * rstd) * wv.y);
        }
    }
#pragma unroll
    for (int i = 0; i < NP; ++i) row[lane + 32 * i] = __floats2half2_rn(x[i].x, x[i].y);
}

// amax_out (nullable): amax_out[b] = max(itself, max |out| of the warp), as float bits (the row
// of sequence b is ≥ 0, zeroed by the norm before qkv): the o GEMV quantizes the row with it.
// A NaN (positive: a max of fabsf values) has larger bits than any finite value or Inf, so the
// unsigned atomicMax keeps it.
__device__ __forceinline__ void out_amax(float am, unsigned* amax_out, int b) {
    am = warp_max(am);
    if (amax_out && (threadIdx.x & 31) == 0 && !(am <= 0.f)) atomicMax(amax_out + b, __float_as_uint(am));
}

// window > 0 (attn_decode_sw, a sliding-window layer): the query at p sees keys lo = p − window + 1
// .. p only; a split's keys start at lo, the splits wholly before lo are empty and the merge
// starts at lo's split. window = 0 (attn_decode): every key, and the code of before.
template <typename KV, int CL>
__device__ __forceinline__ void attn_decode_body(
        const __half* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
        KV* __restrict__ kc, KV* __restrict__ vc, float* __restrict__ ks, float* __restrict__ vs,
        const int* __restrict__ lens, int Hq, int Hkv, int D, int cap, float scale,
        float* __restrict__ part_ml, float* __restrict__ part_acc, int* __restrict__ counters,
        __half* __restrict__ out, unsigned* __restrict__ amax_out, int window) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    if (CL > 0) __trap();                       // clusters are sm_90: the launcher never asks here
#endif
    __shared__ float ps[DEC_CHUNK];
    __shared__ float2 red[DEC_WARPS][DEC_MAX_D2];
    __shared__ int last;
    __shared__ float2 sacc[DEC_MAX_D2];          // CL > 0: this block's partial, read by its cluster
    __shared__ float sml[2];
    const int b = blockIdx.x, h = blockIdx.y, sp = blockIdx.z, nsplit = gridDim.z;
    const int rep = Hq / Hkv, kvh = h / rep;
    const int len = lens[b], p = len - 1;
    const int lo = window > 0 ? max(0, p - window + 1) : 0;          // the first key the query sees
    const int s0 = sp * DEC_CHUNK, k0 = window > 0 ? max(s0, lo) : s0, k1 = min(len, s0 + DEC_CHUNK);
    const bool two = D > 64;                    // a lane holds pairs lane and lane + 32 (D = 128)
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const size_t pidx = ((size_t)b * Hq + h) * nsplit + sp;
    const size_t row_stride = (size_t)Hkv * D;              // elements between consecutive keys
    const size_t sbase = (size_t)b * cap * Hkv + kvh;       // scale of key k: [sbase + k·Hkv]
    const int kw = k0 + wid * DEC_KPW;                      // this warp's first key

    // The cache rows before the PDL wait: lens and the rows of earlier positions stay fixed for
    // a whole decode step (cuda/pdl.cuh), so their round trip overlaps the kernels before this
    // one. Rows past k1 are loaded from row k1 − 1 instead (always in bounds) and masked after:
    // no branch stands between the loads, so a lane issues all of them before the first use.
    // Row p is written by this kernel: its values are replaced by the new token's registers.
    typename KvPair<KV>::T kra[DEC_KPW], krb[DEC_KPW], vra[DEC_KPW], vrb[DEC_KPW];
    float ksc[DEC_KPW], vsc[DEC_KPW];
    RopeTab tab;                                            // the new token's cos and sin (rope_tab)
    if (k0 < k1) {
        tab = rope_tab(p, D, cos_t, sin_t, lane);
        const KV* kbase = kc + sbase * D;
        const KV* vbase = vc + sbase * D;
#pragma unroll
        for (int i = 0; i < DEC_KPW; ++i) {
            const int k = min(kw + i, k1 - 1);
            const size_t off = (size_t)k * row_stride;
            const typename KvPair<KV>::T* kr = reinterpret_cast<const typename KvPair<KV>::T*>(kbase + off);
            const typename KvPair<KV>::T* vr = reinterpret_cast<const typename KvPair<KV>::T*>(vbase + off);
            kra[i] = kr[lane];
            vra[i] = vr[lane];
            if (two) { krb[i] = kr[lane + 32]; vrb[i] = vr[lane + 32]; }
            ksc[i] = kv_scale<KV>(ks, sbase + (size_t)k * Hkv);
            vsc[i] = kv_scale<KV>(vs, sbase + (size_t)k * Hkv);
        }
    }
    // the new token's k and v as the cache holds them (the split that holds p), and whether this
    // warp writes them to the cache (row rnew)
    float2 kna = make_float2(0.f, 0.f), knb = kna, vna = kna, vnb = kna;
    float skn = 1.f, svn = 1.f;
    bool store_new = false;
    const size_t rnew = sbase + (size_t)p * Hkv;
    pdl_enter();
    if (k0 < k1) {
        const __half* row = qkv + (size_t)b * (Hq + 2 * Hkv) * D;
        // the new token's key and value go to the blocks of the split that holds p. Its q, k and
        // v rows are all loaded before the first is used: one round trip after the wait, not two
        const bool has_new = k1 == len;                     // block-uniform
        const RopeRow qr = rope_row(row + (size_t)h * D, D, lane);
        RopeRow kr{}, vr{};
        if (has_new) {
            kr = rope_row(row + (size_t)(Hq + kvh) * D, D, lane);
            vr = rope_row(row + (size_t)(Hq + Hkv + kvh) * D, D, lane);    // y: (0, 0) at D = 64
        }
        float2 qa, qb;
        rope_apply(qr, tab, D, lane, qa, qb);
        qa = round_h2(qa);
        qb = round_h2(qb);
        if (has_new) {
            store_new = h % rep == 0 && p >= kw && p < kw + DEC_KPW;          // one warp per kv head
            rope_apply(kr, tab, D, lane, kna, knb);
            vna = vr.x;
            vnb = vr.y;
            // a cluster stores them after its barriers (below): their release would otherwise
            // wait for these stores to reach L2
            new_kv(kna, knb, skn, two, lane, store_new && CL == 0, kc + rnew * D, ks + rnew);
            new_kv(vna, vnb, svn, two, lane, store_new && CL == 0, vc + rnew * D, vs + rnew);
        }

        float dot[DEC_KPW];
        float2 va[DEC_KPW], vb[DEC_KPW];
#pragma unroll
        for (int i = 0; i < DEC_KPW; ++i) {
            float2 ka = to_f2(kra[i]), kb = two ? to_f2(krb[i]) : make_float2(0.f, 0.f);
            va[i] = to_f2(vra[i]);
            vb[i] = two ? to_f2(vrb[i]) : make_float2(0.f, 0.f);
            if (min(kw + i, k1 - 1) == p) { ka = kna; kb = knb; va[i] = vna; vb[i] = vnb; ksc[i] = skn; vsc[i] = svn; }
            dot[i] = qa.x * ka.x + qa.y * ka.y + qb.x * kb.x + qb.y * kb.y;
        }
#pragma unroll
        for (int i = 0; i < DEC_KPW; ++i) {
            float d = warp_sum(dot[i]);
            if (lane == i) ps[wid * DEC_KPW + i] = kw + i < k1 ? d * ksc[i] * scale : NEG_INF;
        }
        __syncthreads();
        float s0 = ps[lane], s1 = ps[lane + 32];
        float mx = warp_max(fmaxf(s0, s1));                 // ≥ one real score: k0 < k1
        float l = warp_sum(__expf(s0 - mx) + __expf(s1 - mx));

        float2 acc0 = make_float2(0.f, 0.f), acc1 = acc0;
#pragma unroll
        for (int i = 0; i < DEC_KPW; ++i) {
            float pw = __expf(ps[wid * DEC_KPW + i] - mx) * vsc[i];     // 0 past k1
            acc0.x += pw * va[i].x; acc0.y += pw * va[i].y;
            acc1.x += pw * vb[i].x; acc1.y += pw * vb[i].y;
        }
        red[wid][lane] = acc0;
        red[wid][lane + 32] = acc1;
        __syncthreads();
        float* pa = part_acc + pidx * D;
        for (int i = threadIdx.x; i < (D >> 1); i += blockDim.x) {
            float2 t = red[0][i];
#pragma unroll
            for (int w = 1; w < DEC_WARPS; ++w) { t.x += red[w][i].x; t.y += red[w][i].y; }
            if (CL > 0) sacc[i] = t;
            else reinterpret_cast<float2*>(pa)[i] = t;
        }
        if (threadIdx.x == 0) {
            if (CL > 0) { sml[0] = mx; sml[1] = l; }
            else { part_ml[2 * pidx] = mx; part_ml[2 * pidx + 1] = l; }
        }
    } else if (CL > 0) {                         // an empty split: weight 0 in the merge
        for (int i = threadIdx.x; i < (D >> 1); i += blockDim.x) sacc[i] = make_float2(0.f, 0.f);
        if (threadIdx.x == 0) { sml[0] = NEG_INF; sml[1] = 0.f; }
    }

    if constexpr (CL > 0) {
        // The head's CL splits are one thread block cluster (sm_90): after one cluster barrier
        // each block merges D / CL outputs from the partials in its peers' shared memory, then a
        // second barrier keeps every block's shared memory alive until all have read it. (The
        // global-memory merge below costs a fence, an atomic and an L2 round trip: about 3 µs a
        // layer more in the 7B step on the H100.) Both barriers release (on sm_90 that is a
        // MEMBAR.ALL.GPU, which waits for the thread's outstanding stores), so every global store
        // of the block comes after the second: the output, its absmax and the new k and v.
        cluster_sync();
        // the threads with an output load every peer value they need before using any (one round
        // trip of distributed shared memory, not three); the others load none
        const int rank = cluster_rank(), per = D / CL, e = rank * per + threadIdx.x;
        const bool mine = threadIdx.x < per;           // per <= D <= 128 = blockDim: one output a thread
        float v = 0.f;
        if (mine) {
            const float* src = reinterpret_cast<const float*>(sacc) + e;
            float ms[CL], ls[CL], xs[CL];
#pragma unroll
            for (int c = 0; c < CL; ++c) {
                ms[c] = ld_cluster(&sml[0], c);
                ls[c] = ld_cluster(&sml[1], c);
                xs[c] = ld_cluster(src, c);
            }
            v = merge_splits(ms, ls, xs, CL);
        }
        cluster_sync();                                // every peer's reads of this block are done
        float am = 0.f;
        if (mine) {
            const __half o = __float2half_rn(v);
            out[((size_t)b * Hq + h) * D + e] = o;
            am = fabsf(__half2float(o));
        }
        out_amax(am, amax_out, b);
        if (store_new) {
            store_kv(kna, knb, skn, two, lane, kc + rnew * D, ks + rnew);
            store_kv(vna, vnb, svn, two, lane, vc + rnew * D, vs + rnew);
        }
        return;
    }

    // The last block of head (b, h) merges the ⌈len / DEC_CHUNK⌉ partials (threadfence pattern:
    // every block publishes its partial before its count; the last reads them through L2).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* cnt = counters + (size_t)b * Hq + h;
        last = atomicAdd(cnt, 1) == nsplit - 1;
        if (last) *cnt = 0;                     // ready for the next step (graph replays)
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int used = min(nsplit, (len + DEC_CHUNK - 1) / DEC_CHUNK);
    const int slo = lo / DEC_CHUNK;             // splits slo..used-1 hold keys (window: earlier ones are empty)
    const float* ml = part_ml + 2 * ((size_t)b * Hq + h) * nsplit;
    const float* acc = part_acc + ((size_t)b * Hq + h) * nsplit * D;
    if (used - slo <= DEC_MERGE_REGS) {
        // every partial this thread needs (each split's max and sum, and its output e's value) is
        // loaded before the first is used: one L2 round trip, not three; the sums in the loop's order
        const int e = threadIdx.x;                    // D <= 128 = blockDim: one output a thread
        float m[DEC_MERGE_REGS], ls[DEC_MERGE_REGS], xs[DEC_MERGE_REGS];
#pragma unroll
        for (int i = 0; i < DEC_MERGE_REGS; ++i) {
            const int sp_i = slo + i;
            const bool in = sp_i < used;
            m[i] = in ? __ldcg(ml + 2 * sp_i) : NEG_INF;
            ls[i] = in ? __ldcg(ml + 2 * sp_i + 1) : 0.f;
            xs[i] = in && e < D ? __ldcg(acc + (size_t)sp_i * D + e) : 0.f;
        }
        const float v = merge_splits(m, ls, xs, used - slo);
        float am = 0.f;
        if (e < D) {
            const __half o = __float2half_rn(v);
            out[((size_t)b * Hq + h) * D + e] = o;
            am = fabsf(__half2float(o));
        }
        out_amax(am, amax_out, b);
        return;
    }
    float mx = NEG_INF, l = 0.f;
    for (int s = slo; s < used; ++s) mx = fmaxf(mx, __ldcg(ml + 2 * s));
    for (int s = slo; s < used; ++s) l += __expf(__ldcg(ml + 2 * s) - mx) * __ldcg(ml + 2 * s + 1);
    float am = 0.f;
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        float v = 0.f;
#pragma unroll 4
        for (int s = slo; s < used; ++s) v += (__expf(__ldcg(ml + 2 * s) - mx) / l) * __ldcg(acc + (size_t)s * D + e);
        const __half o = __float2half_rn(v);
        out[((size_t)b * Hq + h) * D + e] = o;
        am = nan_max(am, fabsf(__half2float(o)));
    }
    out_amax(am, amax_out, b);
}

template <typename KV, int CL>
__global__ void ROW_CLUSTER_DIMS_Z(CL) __launch_bounds__(128, sizeof(KV) == 1 ? 3 : 4) attn_decode(
        const __half* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
        KV* __restrict__ kc, KV* __restrict__ vc, float* __restrict__ ks, float* __restrict__ vs,
        const int* __restrict__ lens, int Hq, int Hkv, int D, int cap, float scale,
        float* __restrict__ part_ml, float* __restrict__ part_acc, int* __restrict__ counters,
        __half* __restrict__ out, unsigned* __restrict__ amax_out) {
    attn_decode_body<KV, CL>(qkv, cos_t, sin_t, kc, vc, ks, vs, lens, Hq, Hkv, D, cap, scale, part_ml, part_acc,
                             counters, out, amax_out, 0);
}

// attn_decode for a sliding-window layer: the query at position p sees keys p − window < j ≤ p.
template <typename KV, int CL>
__global__ void ROW_CLUSTER_DIMS_Z(CL) __launch_bounds__(128, sizeof(KV) == 1 ? 3 : 4) attn_decode_sw(
        const __half* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
        KV* __restrict__ kc, KV* __restrict__ vc, float* __restrict__ ks, float* __restrict__ vs,
        const int* __restrict__ lens, int Hq, int Hkv, int D, int cap, float scale,
        float* __restrict__ part_ml, float* __restrict__ part_acc, int* __restrict__ counters,
        __half* __restrict__ out, unsigned* __restrict__ amax_out, int window) {
    attn_decode_body<KV, CL>(qkv, cos_t, sin_t, kc, vc, ks, vs, lens, Hq, Hkv, D, cap, scale, part_ml, part_acc,
                             counters, out, amax_out, window);
}

// ================================================================= flash-decoding, GQA-shared
// attn_decode_gqa<KV, DT>: the same step as attn_decode (the same parameters: RoPE of the new
// q and k, the cache write, attention over the cache, the merge of the splits, the output's
// absmax), built to stream K/V at the bandwidth limit (engine/gpu/flags.py DGQ_ATTN_DECODE
// picks it). attn_decode gives every query head its own blocks, so under GQA each K/V byte is
// loaded rep times, and a block does one 64-key round trip; here:
// - block (split sp, kv head × group of ≤ GQ_HEADS query heads, sequence b): the query heads
//   of a kv group are the rows of one tensor-core tile, so each K/V row is loaded once for all
//   of them (SmolLM2 3, Llama-3 4, Llama-2 1 per kv head; rep > 8 runs ⌈rep / 8⌉ groups);
// - S = Q·Kᵀ and O += P·V on mma.sync m16n8k16 (fp16 in, fp32 accumulate). Q (the group's
//   heads, rows 8..15 zero) is the A operand and K the B operand, 8 keys a mma; P stays in
//   registers as the A operand of P·V (the C fragment of S is P's A fragment, as in
//   attn_prefill), split into fp16 hi + lo (two mmas) so that P·V is as exact as fp32 P;
// - each lane copies exactly the bytes of its own B fragments with cp.async into a
//   GqLayout::STAGES-deep ring of its warp (no barrier in the key loop at fp16: a lane reads
//   back only what it copied itself; kv8: two __syncwarp a step, for the scales). The k index of a mma is free to permute (the same permutation on
//   Q), and so is the n index of P·V (the output columns): a lane's bytes of a key are whole
//   16-byte pieces and each copy instruction of the warp reads 64 (K) or 128 (V) contiguous
//   bytes of a cache row; K/V go through L1 (cp.async.ca: fp16 1.33× the rate of .cg at 8192
//   keys, int8 1.18-1.59× from batch 1 to 32, docs/KERNELS.md). A key past the split's end copies the split's first row (finite,
//   and its score is −inf, so its P is 0; zero-filling measured the same). int8 (kv8) codes
//   become fp16 exactly in registers (the 0x6400 magic bias, i8x4_h2); the scales multiply the
//   scores (k) and P (v) in fp32, as in attn_decode;
// - split over the sequence (flash-decoding): the launcher sizes the grid from the capacity,
//   the batch and the SMs (the graph of the decode step is captured once); the kernel divides
//   the keys it finds in lens among the splits (chunks of ⌈n / NS⌉ keys rounded up to a step,
//   at least GQ_WARPS steps), so every length fills the grid alike and splits past the last
//   key are empty. Keys [0, p) stream from the cache; the new token p joins split 0's partial
//   from registers (its row is written by this launch: no block reads it);
// - warps merge in shared memory, blocks through global memory: the last block of a head
//   group (an atomic counter, reset by it for the next replay) combines the partials
//   (part_ml: max and sum in log2 units, part_acc: D unnormalised outputs) into out. With one
//   split (the batched step at long context) a block normalises its shared-memory merge and
//   writes out itself: no partials, fences or counter (tok/s +4.4 % INT8 K/V, +3.2 % fp16, batch 32, 1024 positions).
// Scratch: part_ml (B·Hq·NS·2), part_acc (B·Hq·NS·D), counters (B·Hkv·⌈rep/8⌉): within
// attn_decode's (NS ≤ its nsplit), so the decode step's buffers serve both kernels.
// The cache rows before p, lens and the scales are read (cp.async) before the PDL wait.
// Tests: tests/test_decode_attention_gpu.py (both kernels against float64, graph replay);
// the index maps and the split/merge arithmetic are emulated on the CPU in
// tests/test_decode_attention.py.
#define GQ_WARPS 4                          // warps a block (tuning.ATTENTION.threads / 32)
#define GQ_HEADS 8                          // query heads a block: the used rows of the m16 tile
#define GQ_STEP 16                          // keys a warp takes per step (the k16 of P·V)
#define GQ_MAX_SPLITS 64                    // grid x at most (tuning.ATTENTION.gqa_max_splits)
#define GQ_MERGE_REGS 8                     // the most splits the last block merges from registers

// A lane's record of one step (bytes, in order): the K of keys g and 8 + g (KB each: its
// B fragments of D/16 k-steps), the V of keys 2t, 2t+1, 2t+8, 2t+9 (VB each: its B fragments
// of D/8 n-tiles). Record byte x lives at ((x / 16)·32 + lane)·16 + x % 16 of the warp's
// stage: the 16-byte reads of a warp are consecutive, conflict-free. kv8: after the 32 records,
// the step's 16 k then 16 v scales (SCB bytes), one 4-byte copy a lane (a single instruction;
// 8 a lane when each lane copied the scales of its own keys), read by the lanes that need them
// after a __syncwarp.
template <int D, typename KV>
struct GqLayout {
    static constexpr int ES = sizeof(KV);
    static constexpr int KB = D * ES / 4;
    static constexpr int VB = D * ES / 8;
    static constexpr int VCH = VB < 16 ? VB : 16;      // bytes a value copy moves (8: kv8, D = 64)
    static constexpr int REC = 2 * KB + 4 * VB;
    static constexpr int SCB = ES == 1 ? 2 * GQ_STEP * 4 : 0;   // kv8: the step's k and v scales
    static constexpr int STAGE = 32 * REC + SCB;       // one warp, one step
    // the ring's depth: 3 at fp16, D = 128 (2 blocks an SM), else 4; depths 2 (3 blocks an SM) and
    // 6 measured slower (docs/KERNELS.md)
    static constexpr int STAGES = GQ_WARPS * STAGE * 4 > 100 * 1024 ? 3 : 4;
    static constexpr int RING = GQ_WARPS * STAGES * STAGE;
    static constexpr int MERGE = GQ_WARPS * GQ_HEADS * (D + 2) * 4;             // the warps' partials, after the loop
    static constexpr int BYTES = RING > MERGE ? RING : MERGE;
};

__device__ __forceinline__ float2 lds64f(u32 addr) {
    float2 r;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(r.x), "=f"(r.y) : "r"(addr));
    return r;
}

__device__ __forceinline__ uint4 lds128(u32 addr) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr));
    return r;
}

// Four int8 (bytes 0..3 of w) as two fp16 pairs, exactly: x + 128 as the low byte of 0x64xx
// (1024 + x + 128), minus 1152. K's and V's codes both (a bias 1152 carried into the mma
// measured 0-0.9 % faster for K, its score then carrying the rounding of 1152·Σq, and drifted
// for V, O off by 11 % at one split of 32768 keys: docs/KERNELS.md).
__device__ __forceinline__ void i8x4_h2(u32 w, u32& lo, u32& hi) {
    const u32 u = w ^ 0x80808080u;
    lo = __byte_perm(u, 0x64646464u, 0x4140);
    hi = __byte_perm(u, 0x64646464u, 0x4342);
    const __half bh = __ushort_as_half((unsigned short)0x6480);     // 1152
    const __half2 bias = __halves2half2(bh, bh);
    const __half2 ha = __hsub2(*reinterpret_cast<const __half2*>(&lo), bias);
    const __half2 hb = __hsub2(*reinterpret_cast<const __half2*>(&hi), bias);
    lo = *reinterpret_cast<const u32*>(&ha);
    hi = *reinterpret_cast<const u32*>(&hb);
}

// D += A·B on whole fragments: rows 8..15 of A and D are carried along and never read, so the
// operand quads stay where they are from one mma to the next (no register moves a mma).
__device__ __forceinline__ void mma_f16_quad(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D(rows 0..7) += A·B with A's rows 8..15 zero (a1 = a3 = 0): only c0, c1 (row g) are kept;
// rows 8..15 of C and D live in registers local to the asm.
__device__ __forceinline__ void mma_f16_top(float& d0, float& d1, u32 a0, u32 a2, u32 b0, u32 b1) {
    asm("{\n\t.reg .f32 z2, z3;\n\t.reg .b32 za;\n\t"
        "mov.f32 z2, 0f00000000;\n\tmov.f32 z3, 0f00000000;\n\tmov.b32 za, 0;\n\t"
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, z2, z3}, {%2, za, %3, za}, {%4, %5}, {%0, %1, z2, z3};\n\t}"
        : "+f"(d0), "+f"(d1) : "r"(a0), "r"(a2), "r"(b0), "r"(b1));
}

// Row g's mma of the decode kernel: whole quads (mma_f16_quad, LEAN) or rows 0..7 alone
// (mma_f16_top). d[2], d[3], a[1], a[3]: rows 8..15.
template <bool QUAD>
__device__ __forceinline__ void mma_row(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (QUAD) mma_f16_quad(d, a, b0, b1);
    else mma_f16_top(d[0], d[1], a[0], a[2], b0, b1);
}

// window > 0 (attn_decode_gqa_sw): keys [lo, p) stream from the cache, lo = max(0, p − window + 1),
// divided among the splits as [0, p) is without a window; window = 0: the code of before.
template <typename KV, int DT>
__device__ __forceinline__ void attn_decode_gqa_body(
        const __half* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
        KV* __restrict__ kc, KV* __restrict__ vc, float* __restrict__ ks, float* __restrict__ vs,
        const int* __restrict__ lens, int Hq, int Hkv, int D, int cap, float scale,
        float* __restrict__ part_ml, float* __restrict__ part_acc, int* __restrict__ counters,
        __half* __restrict__ out, unsigned* __restrict__ amax_out, int window) {
    typedef GqLayout<DT, KV> L;
    constexpr bool KV8 = sizeof(KV) == 1;
    constexpr int ES = sizeof(KV);
    constexpr int CHK = 16 / ES;                // elements of a 16-byte K piece
    constexpr int CHV = L::VCH / ES;            // elements of a V piece
    constexpr int KS = DT / 16;                 // k-steps of Q·Kᵀ
    constexpr int NT = DT / 8;                  // n-tiles of P·V
    constexpr int VU = L::VB / 4;               // words of one key's V a lane holds
    // LEAN (D ≤ 128): whole mma quads and a step's copy addresses as two adds; at D = 256, where
    // each measured slower (fp16 quads 4-6 %, INT8 addresses 2-3 %, docs/KERNELS.md), the kernel
    // of 2026-12-04
    constexpr bool LEAN = DT <= 128;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ __align__(16) __half sq[GQ_HEADS][DT];     // the group's rotated q (fp16), rows ≥ nh zero
    __shared__ float snk[DT], snv[DT];                    // the new token's k, v (fp16 values or int8 codes)
    __shared__ float snew[GQ_HEADS + 2];                  // its scores (log2 units), then its k, v scales
    __shared__ float wts[GQ_HEADS][GQ_MAX_SPLITS];        // the final merge's split weights
    __shared__ int last;
    if (D != DT || gridDim.x > GQ_MAX_SPLITS) __trap();   // the launcher instantiates by D, caps the splits

    pdl_trigger();
    const int sp = blockIdx.x, NS = gridDim.x, b = blockIdx.z;
    const int rep = Hq / Hkv, ngrp = (rep + GQ_HEADS - 1) / GQ_HEADS;
    const int kvh = blockIdx.y / ngrp, grp = blockIdx.y % ngrp;
    const int h0 = kvh * rep + grp * GQ_HEADS, nh = min(GQ_HEADS, rep - grp * GQ_HEADS);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // lens is fixed for a whole step (cuda/pdl.cuh): keys [0, n) stream from the cache, n = p
    const int len = lens[b], p = len - 1, n = p;
    const int lo = window > 0 ? max(0, p - window + 1) : 0;          // keys [lo, n) stream (window: p's)
    const int per = (n - lo + NS - 1) / NS;
    const int chunk = max(GQ_WARPS * GQ_STEP, (per + GQ_STEP - 1) / GQ_STEP * GQ_STEP);
    const int active = n > lo ? (n - lo + chunk - 1) / chunk : 1;    // splits holding keys (split 0: p too)
    const int c0 = lo + sp * chunk, c1 = min(n, c0 + chunk);
    const int nsteps = c0 < c1 ? (c1 - c0 + GQ_STEP - 1) / GQ_STEP : 0;
    const int mine = nsteps > warp ? (nsteps - warp + GQ_WARPS - 1) / GQ_WARPS : 0;   // steps warp, warp + W, ...
    const size_t row0 = (size_t)b * cap * Hkv + kvh;     // row of key k: row0 + k·Hkv (scales: the same index)
    const char* kbytes = reinterpret_cast<const char*>(kc);
    const char* vbytes = reinterpret_cast<const char*>(vc);
    const u32 ring = smem_u32(smem) + warp * L::STAGES * L::STAGE + lane * 16;
    const float sl2 = scale * 1.4426950408889634f;       // scores in log2 units: exp2

    auto rec = [&](int slot, int x) -> u32 { return ring + slot * L::STAGE + (x >> 4) * 512 + (x & 15); };
    auto scales = [&](int slot) -> u32 { return ring - lane * 16 + slot * L::STAGE + 32 * L::REC; };   // kv8
    // K/V through L1 (cp.async.ca): fp16 at 8192 keys 1.33× the rate of .cg; int8 1.32-1.59× at
    // batch 8 and 32, 1.18-1.33× at batch 1 from 1024 and 8192 keys; with an L2 prefetch of the
    // 128-byte line, fp16 +1.4-2.6 % at batch 8 and 32 (docs/KERNELS.md)
    auto copy16 = [&](u32 dst, const char* src) { cp_async_ca16_l2line(dst, src); };
    // A step's copies: the bytes of key kb + d's K and V rows lie kv(d) past kbytes and vbytes, its
    // scales at index sc(d). LEAN, where the whole step lies before c1 (every step but a split's
    // last), kv(d) is kb's row offset plus d·Hkv·D·ES, a lane constant, so a copy's address is two
    // adds, not a clamp and a multiply a key; else a key at or past c1 copies c0's row.
    // (Whole mma quads and these addresses: INT8 attention 124.5 against 129.1 µs for the kernel
    // of 2026-12-04 at batch 32 and 1024 positions, 7B heads, one H100 run; fp16 -0.2 to -0.9 %,
    // docs/KERNELS.md.)
    auto copies = [&](int slot, auto kv, auto sc) {
#pragma unroll
        for (int kg = 0; kg < 2; ++kg) {
            const char* src = kbytes + kv(kg * 8 + g);
#pragma unroll
            for (int j = 0; j < L::KB / 16; ++j) copy16(rec(slot, kg * L::KB + 16 * j), src + (4 * j + t) * 16);
        }
#pragma unroll
        for (int jv = 0; jv < 4; ++jv) {
            const char* src = vbytes + kv(2 * t + (jv & 1) + (jv >> 1) * 8);
#pragma unroll
            for (int a = 0; a < L::VB / L::VCH; ++a) {
                const u32 dst = rec(slot, 2 * L::KB + jv * L::VB + a * L::VCH);
                if constexpr (L::VCH == 16) copy16(dst, src + (8 * a + g) * 16);
                else cp_async_ca<L::VCH>(dst, src + (8 * a + g) * L::VCH);
            }
        }
        if constexpr (KV8)                               // lane r < 16: key kb + r's k scale, 16 + r: its v scale
            cp_async_ca<4>(scales(slot) + 4 * lane, (lane < 16 ? ks : vs) + sc(lane & 15));
    };
    const int rowb = Hkv * DT * ES;                      // bytes from one key's row to the next
    auto issue = [&](int i) {                            // cp.async of this warp's step i into its slot
        const int slot = i % L::STAGES, kb = c0 + (warp + i * GQ_WARPS) * GQ_STEP;
        const size_t rb = row0 + (size_t)kb * Hkv;       // key kb's row
        if (LEAN && kb + GQ_STEP <= c1) {
            const size_t kvb = rb * (DT * ES);
            copies(slot, [&](int d) { return kvb + (size_t)(d * rowb); }, [&](int d) { return rb + (size_t)(d * Hkv); });
        } else {
            auto row = [&](int d) { return row0 + (size_t)(kb + d < c1 ? kb + d : c0) * Hkv; };
            copies(slot, [&](int d) { return row(d) * (DT * ES); }, row);
        }
    };
#pragma unroll
    for (int i = 0; i < L::STAGES - 1; ++i) {
        if (i < mine) issue(i);
        cp_async_commit();
    }
    // D <= 128: the new token's cos and sin (the wide path reads its own in rope_lane_wide)
    const RopeTab tab = DT <= 128 ? rope_tab(p, DT, cos_t, sin_t, lane) : RopeTab{};
    pdl_wait();

    // warp 0 of split 0 takes the new token's k and v (below, D <= 128): their rows are loaded
    // now, so that they arrive with its q's (one round trip after the wait, not two)
    const __half* row = qkv + (size_t)b * (Hq + 2 * Hkv) * DT;
    const bool kv_new = DT <= 128 && sp == 0 && warp == 0;        // warp-uniform
    RopeRow kr{}, vr{};
    if (kv_new) {
        kr = rope_row(row + (size_t)(Hq + kvh) * DT, DT, lane);
        vr = rope_row(row + (size_t)(Hq + Hkv + kvh) * DT, DT, lane);    // y: (0, 0) at D = 64
    }
    // the group's q, rotated and rounded to fp16 (as rope_qkv_cache stores q); rows ≥ nh zero
    for (int h = warp; h < GQ_HEADS; h += GQ_WARPS) {     // warp-uniform: rope_lane shuffles at D = 64
        __half2* dst = reinterpret_cast<__half2*>(sq[h]);
        if constexpr (DT > 128) {                         // a wide head (rope_lane_wide)
            float2 x[WIDE_NP];
#pragma unroll
            for (int i = 0; i < WIDE_NP; ++i) x[i] = make_float2(0.f, 0.f);
            if (h < nh) rope_lane_wide(row + (size_t)(h0 + h) * DT, p, cos_t, sin_t, lane, x);
#pragma unroll
            for (int i = 0; i < WIDE_NP; ++i) dst[lane + 32 * i] = __floats2half2_rn(x[i].x, x[i].y);
            continue;
        }
        float2 qa = make_float2(0.f, 0.f), qb = qa;
        if (h < nh) rope_apply(rope_row(row + (size_t)(h0 + h) * DT, DT, lane), tab, DT, lane, qa, qb);
        dst[lane] = __floats2half2_rn(qa.x, qa.y);
        if (DT > 64) dst[lane + 32] = __floats2half2_rn(qb.x, qb.y);
    }
    // the new token's k and v (split 0): as the cache will hold them; group 0 writes them there
    if constexpr (DT > 128) {
        if (sp == 0 && warp == 0) {
            float2 kx[WIDE_NP], vx[WIDE_NP];
            float skn, svn;
            rope_lane_wide(row + (size_t)(Hq + kvh) * DT, p, cos_t, sin_t, lane, kx);
            const __half* v = row + (size_t)(Hq + Hkv + kvh) * DT;
#pragma unroll
            for (int i = 0; i < WIDE_NP; ++i) vx[i] = load2(v, lane + 32 * i);
            const size_t r = row0 + (size_t)p * Hkv;
            new_kv_wide(kx, skn, lane, grp == 0, kc + r * DT, ks + r);
            new_kv_wide(vx, svn, lane, grp == 0, vc + r * DT, vs + r);
#pragma unroll
            for (int i = 0; i < WIDE_NP; ++i) {
                const int e = 2 * (lane + 32 * i);
                snk[e] = kx[i].x; snk[e + 1] = kx[i].y;
                snv[e] = vx[i].x; snv[e + 1] = vx[i].y;
            }
            if (lane == 0) { snew[GQ_HEADS] = skn; snew[GQ_HEADS + 1] = svn; }
        }
    } else if (kv_new) {
        float2 ka, kb, va = vr.x, vb = vr.y;
        float skn, svn;
        rope_apply(kr, tab, DT, lane, ka, kb);
        const size_t r = row0 + (size_t)p * Hkv;
        new_kv(ka, kb, skn, DT > 64, lane, grp == 0, kc + r * DT, ks + r);
        new_kv(va, vb, svn, DT > 64, lane, grp == 0, vc + r * DT, vs + r);
        snk[2 * lane] = ka.x; snk[2 * lane + 1] = ka.y;
        snv[2 * lane] = va.x; snv[2 * lane + 1] = va.y;
        if (DT > 64) {
            snk[64 + 2 * lane] = kb.x; snk[65 + 2 * lane] = kb.y;
            snv[64 + 2 * lane] = vb.x; snv[65 + 2 * lane] = vb.y;
        }
        if (lane == 0) { snew[GQ_HEADS] = skn; snew[GQ_HEADS + 1] = svn; }
    }
    __syncthreads();
    // Q as the A operand, k-step s: the lane's k slots (2t, 2t+1, 2t+8, 2t+9) are its K record
    // elements 4s..4s+3, i.e. d = CHK·(4·⌊4s / CHK⌋ + t) + 4s mod CHK + 0..3 (rows 8..15: zero)
    u32 qa[KS][4];                                     // [1], [3]: rows 8..15, zero
#pragma unroll
    for (int s = 0; s < KS; ++s) {
        const int d0 = CHK * (4 * (4 * s / CHK) + t) + (4 * s) % CHK;
        qa[s][0] = *reinterpret_cast<const u32*>(&sq[g][d0]);
        qa[s][2] = *reinterpret_cast<const u32*>(&sq[g][d0 + 2]);
        qa[s][1] = qa[s][3] = 0u;
    }
    // O of row (head) g: n-tile i, column c ↔ d = CHV·(8·⌊i / CHV⌋ + 2t + c) + i mod CHV
    float o[NT][4];                                    // [2], [3]: rows 8..15, never read
#pragma unroll
    for (int i = 0; i < NT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    u32 pah[4] = {0u, 0u, 0u, 0u}, pal[4] = {0u, 0u, 0u, 0u};   // P's A quads (hi, lo), rows 8..15 zero
    float m = NEG_INF, l = 0.f;                          // row g's running max (log2 units), this lane's sum
    for (int i = 0; i < mine; ++i) {
        if constexpr (KV8) __syncwarp();                 // the warp has read the scales of the slot refilled here
        if (i + L::STAGES - 1 < mine) issue(i + L::STAGES - 1);
        cp_async_commit();
        cp_async_wait<L::STAGES - 1>();                  // this lane's copies of step i have landed
        if constexpr (KV8) __syncwarp();                 // and every lane's (the scales)
        const int slot = i % L::STAGES, kb = c0 + (warp + i * GQ_WARPS) * GQ_STEP;
        float ksc[4] = {1.f, 1.f, 1.f, 1.f}, vsc[4] = {1.f, 1.f, 1.f, 1.f};
        if constexpr (KV8) {                             // keys 2t, 2t + 1, 8 + 2t, 9 + 2t of the step
            const u32 sa = scales(slot) + 8 * t;
            const float2 k0 = lds64f(sa), k1 = lds64f(sa + 32), v0 = lds64f(sa + 64), v1 = lds64f(sa + 96);
            ksc[0] = k0.x; ksc[1] = k0.y; ksc[2] = k1.x; ksc[3] = k1.y;
            vsc[0] = v0.x; vsc[1] = v0.y; vsc[2] = v1.x; vsc[3] = v1.y;
        }
        // S = Q·Kᵀ: key group kg, column j ↔ key kb + 8·kg + j; this lane: row g, keys 2t, 2t + 1
        float x[2][2];
#pragma unroll
        for (int kg = 0; kg < 2; ++kg) {
            u32 kw[L::KB / 4];
#pragma unroll
            for (int u = 0; u < L::KB / 16; ++u) {
                const uint4 w = lds128(rec(slot, kg * L::KB + 16 * u));
                kw[4 * u] = w.x; kw[4 * u + 1] = w.y; kw[4 * u + 2] = w.z; kw[4 * u + 3] = w.w;
            }
            float sacc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int s = 0; s < KS; ++s) {
                u32 b0, b1;
                if constexpr (KV8) i8x4_h2(kw[s], b0, b1);
                else { b0 = kw[2 * s]; b1 = kw[2 * s + 1]; }
                mma_row<LEAN>(sacc, qa[s], b0, b1);
            }
            const float s0 = sacc[0], s1 = sacc[1];
            const int key = kb + 8 * kg + 2 * t;
            x[kg][0] = key < c1 ? s0 * ksc[2 * kg] * sl2 : NEG_INF;
            x[kg][1] = key + 1 < c1 ? s1 * ksc[2 * kg + 1] * sl2 : NEG_INF;
        }
        // online softmax of row g over the four lanes t that hold it; key kb is real, so mx is finite
        float mx = fmaxf(fmaxf(x[0][0], x[0][1]), fmaxf(x[1][0], x[1][1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mnew = fmaxf(m, mx);
        const float alpha = exp2f(m - mnew);             // 0 at the first step (m = −inf)
        m = mnew;
        float pr[2][2];
#pragma unroll
        for (int kg = 0; kg < 2; ++kg) {
            pr[kg][0] = exp2f(x[kg][0] - mnew);
            pr[kg][1] = exp2f(x[kg][1] - mnew);
        }
        l = l * alpha + (pr[0][0] + pr[0][1]) + (pr[1][0] + pr[1][1]);
#pragma unroll
        for (int i2 = 0; i2 < NT; ++i2) { o[i2][0] *= alpha; o[i2][1] *= alpha; }
        // P·V: P (· the v scales) is the A operand (k slots 2t, 2t+1 ↔ keys 2t, 2t+1, slots
        // 2t+8, 2t+9 ↔ keys 8 + 2t, 9 + 2t), as fp16 hi + lo
        split_h2(pr[0][0] * vsc[0], pr[0][1] * vsc[1], pah[0], pal[0]);
        split_h2(pr[1][0] * vsc[2], pr[1][1] * vsc[3], pah[2], pal[2]);
        u32 vw[4][VU];
#pragma unroll
        for (int u = 0; u < VU; ++u) {                  // the 4·VB bytes of V: VU 16-byte pieces
            const uint4 w = lds128(rec(slot, 2 * L::KB + 16 * u));
            const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) vw[(4 * u + e) / VU][(4 * u + e) % VU] = ws[e];
        }
        // V as the B operand: n-tile i, column g ↔ record element i of the lane's keys; the k
        // pairs (2t, 2t+1) and (2t+8, 2t+9) come from two keys: byte permutes pair them
        constexpr int TPW = KV8 ? 4 : 2;                // n-tiles a word of V feeds
#pragma unroll
        for (int w = 0; w < NT / TPW; ++w) {
            u32 b0[TPW], b1[TPW];
            if constexpr (KV8) {
                i8x4_h2(__byte_perm(vw[0][w], vw[1][w], 0x5140), b0[0], b0[1]);
                i8x4_h2(__byte_perm(vw[0][w], vw[1][w], 0x7362), b0[2], b0[3]);
                i8x4_h2(__byte_perm(vw[2][w], vw[3][w], 0x5140), b1[0], b1[1]);
                i8x4_h2(__byte_perm(vw[2][w], vw[3][w], 0x7362), b1[2], b1[3]);
            } else {
                b0[0] = __byte_perm(vw[0][w], vw[1][w], 0x5410);
                b0[1] = __byte_perm(vw[0][w], vw[1][w], 0x7632);
                b1[0] = __byte_perm(vw[2][w], vw[3][w], 0x5410);
                b1[1] = __byte_perm(vw[2][w], vw[3][w], 0x7632);
            }
#pragma unroll
            for (int e = 0; e < TPW; ++e) {
                mma_row<LEAN>(o[TPW * w + e], pah, b0[e], b1[e]);
                mma_row<LEAN>(o[TPW * w + e], pal, b0[e], b1[e]);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();                                    // the ring becomes the warps' partials
    float* mo = reinterpret_cast<float*>(smem);         // [GQ_WARPS][GQ_HEADS][DT]
    float* mml = mo + GQ_WARPS * GQ_HEADS * DT;         // [GQ_WARPS][GQ_HEADS][2]: max, sum
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (t == 0) { mml[(warp * GQ_HEADS + g) * 2] = m; mml[(warp * GQ_HEADS + g) * 2 + 1] = l; }
    {
        float* ro = mo + (warp * GQ_HEADS + g) * DT;
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) ro[CHV * (8 * (i / CHV) + 2 * t + c) + i % CHV] = o[i][c];
    }
    if (sp == 0) {                                      // the new token's score for each head
        for (int h = warp; h < nh; h += GQ_WARPS) {
            float dot = 0.f;
            for (int d = lane; d < DT; d += 32) dot += __half2float(sq[h][d]) * snk[d];
            dot = warp_sum(dot);
            if (lane == 0) snew[h] = dot * snew[GQ_HEADS] * sl2;
        }
    }
    __syncthreads();
    if (NS == 1) {          // one split (the batched step): normalise here, no partials, fences or merge
        float am = 0.f;
        for (int idx = threadIdx.x; idx < nh * DT; idx += blockDim.x) {
            const int h = idx / DT, d = idx % DT;
            float M = snew[h];
#pragma unroll
            for (int w = 0; w < GQ_WARPS; ++w) M = fmaxf(M, mml[(w * GQ_HEADS + h) * 2]);
            float lsum = 0.f, acc = 0.f;
#pragma unroll
            for (int w = 0; w < GQ_WARPS; ++w) {
                const float e = exp2f(mml[(w * GQ_HEADS + h) * 2] - M);
                lsum += e * mml[(w * GQ_HEADS + h) * 2 + 1];
                acc += e * mo[(w * GQ_HEADS + h) * DT + d];
            }
            const float e = exp2f(snew[h] - M);
            lsum += e;
            acc += e * (snv[d] * snew[GQ_HEADS + 1]);
            const __half o16 = __float2half_rn((1.f / lsum) * acc);   // the merge's weight of its one split
            out[((size_t)b * Hq + h0 + h) * DT + d] = o16;
            am = nan_max(am, fabsf(__half2float(o16)));
        }
        out_amax(am, amax_out, b);
        return;
    }
    const size_t pbase = ((size_t)b * Hq + h0) * NS;    // partial of head h0 + h, split s: pbase + h·NS + s
    if (sp < active) {
        for (int idx = threadIdx.x; idx < nh * DT; idx += blockDim.x) {
            const int h = idx / DT, d = idx % DT;
            float M = sp == 0 ? snew[h] : NEG_INF;
#pragma unroll
            for (int w = 0; w < GQ_WARPS; ++w) M = fmaxf(M, mml[(w * GQ_HEADS + h) * 2]);
            float lsum = 0.f, acc = 0.f;
#pragma unroll
            for (int w = 0; w < GQ_WARPS; ++w) {
                const float e = exp2f(mml[(w * GQ_HEADS + h) * 2] - M);     // 0 for a warp without keys
                lsum += e * mml[(w * GQ_HEADS + h) * 2 + 1];
                acc += e * mo[(w * GQ_HEADS + h) * DT + d];
            }
            if (sp == 0) {
                const float e = exp2f(snew[h] - M);
                lsum += e;
                acc += e * (snv[d] * snew[GQ_HEADS + 1]);
            }
            const size_t pi = pbase + (size_t)h * NS + sp;
            part_acc[pi * DT + d] = acc;
            if (d == 0) { part_ml[2 * pi] = M; part_ml[2 * pi + 1] = lsum; }
        }
    }

    // The last block of the head group merges the `active` partials (threadfence pattern, as in
    // attn_decode).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* cnt = counters + (size_t)b * gridDim.y + blockIdx.y;
        last = atomicAdd(cnt, 1) == NS - 1;
        if (last) *cnt = 0;                             // ready for the next step (graph replays)
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Every partial the merge reads is loaded before the first is used (one L2 round trip, not
    // four): a thread's first output's partials of up to GQ_MERGE_REGS splits, and in warp h the
    // max and sum of splits lane and lane + 32. The arithmetic and its order are the loops' of before.
    static_assert(GQ_MAX_SPLITS <= 64, "two splits a lane");
    const bool pre = LEAN && active <= GQ_MERGE_REGS && (int)threadIdx.x < nh * DT;   // not at D = 256 (spills)
    float xs[GQ_MERGE_REGS];
    if (pre) {
        const float* acc = part_acc + (pbase + (size_t)(threadIdx.x / DT) * NS) * DT + threadIdx.x % DT;
#pragma unroll
        for (int i = 0; i < GQ_MERGE_REGS; ++i) xs[i] = i < active ? __ldcg(acc + (size_t)i * DT) : 0.f;
    }
    for (int h = warp; h < nh; h += GQ_WARPS) {
        const float* ml = part_ml + 2 * (pbase + (size_t)h * NS);
        // (the form below in their place makes nvcc 13.0 spill 28/60 bytes (st/ld), not 4/4, at D = 256
        // with fp16 K/V: bench/sass_scan.py, session 44)
        if constexpr (!LEAN) {                        // D = 256: the loops of before (registers)
            float M = NEG_INF, lsum = 0.f;
            for (int s = lane; s < active; s += 32) M = fmaxf(M, __ldcg(ml + 2 * s));
            M = warp_max(M);
            for (int s = lane; s < active; s += 32) lsum += exp2f(__ldcg(ml + 2 * s) - M) * __ldcg(ml + 2 * s + 1);
            lsum = warp_sum(lsum);
            for (int s = lane; s < active; s += 32) wts[h][s] = exp2f(__ldcg(ml + 2 * s) - M) / lsum;
            continue;
        }
        const bool h0s = lane < active, h1s = lane + 32 < active;
        const float m0 = h0s ? __ldcg(ml + 2 * lane) : 0.f, l0 = h0s ? __ldcg(ml + 2 * lane + 1) : 0.f;
        const float m1 = h1s ? __ldcg(ml + 2 * (lane + 32)) : 0.f, l1 = h1s ? __ldcg(ml + 2 * (lane + 32) + 1) : 0.f;
        float M = NEG_INF, lsum = 0.f;
        if (h0s) M = fmaxf(M, m0);
        if (h1s) M = fmaxf(M, m1);
        M = warp_max(M);
        if (h0s) lsum += exp2f(m0 - M) * l0;
        if (h1s) lsum += exp2f(m1 - M) * l1;
        lsum = warp_sum(lsum);
        if (h0s) wts[h][lane] = exp2f(m0 - M) / lsum;
        if (h1s) wts[h][lane + 32] = exp2f(m1 - M) / lsum;
    }
    __syncthreads();
    float am = 0.f;
    for (int idx = threadIdx.x; idx < nh * DT; idx += blockDim.x) {
        const int h = idx / DT, d = idx % DT;
        const float* acc = part_acc + (pbase + (size_t)h * NS) * DT + d;
        float v = 0.f;
        if (pre && idx == (int)threadIdx.x) {          // the partials loaded above
#pragma unroll
            for (int i = 0; i < GQ_MERGE_REGS; ++i)
                if (i < active) v += wts[h][i] * xs[i];
        } else {
#pragma unroll 8
            for (int s = 0; s < active; ++s) v += wts[h][s] * __ldcg(acc + (size_t)s * DT);
        }
        const __half o16 = __float2half_rn(v);
        out[((size_t)b * Hq + h0 + h) * DT + d] = o16;
        am = nan_max(am, fabsf(__half2float(o16)));
    }
    out_amax(am, amax_out, b);
}

template <typename KV, int DT>
__global__ void __launch_bounds__(GQ_WARPS * 32, 2) attn_decode_gqa(
        const __half* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
        KV* __restrict__ kc, KV* __restrict__ vc, float* __restrict__ ks, float* __restrict__ vs,
        const int* __restrict__ lens, int Hq, int Hkv, int D, int cap, float scale,
        float* __restrict__ part_ml, float* __restrict__ part_acc, int* __restrict__ counters,
        __half* __restrict__ out, unsigned* __restrict__ amax_out) {
    attn_decode_gqa_body<KV, DT>(qkv, cos_t, sin_t, kc, vc, ks, vs, lens, Hq, Hkv, D, cap, scale, part_ml, part_acc,
                             counters, out, amax_out, 0);
}

// attn_decode_gqa for a sliding-window layer (the keys of attn_decode_sw).
template <typename KV, int DT>
__global__ void __launch_bounds__(GQ_WARPS * 32, 2) attn_decode_gqa_sw(
        const __half* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
        KV* __restrict__ kc, KV* __restrict__ vc, float* __restrict__ ks, float* __restrict__ vs,
        const int* __restrict__ lens, int Hq, int Hkv, int D, int cap, float scale,
        float* __restrict__ part_ml, float* __restrict__ part_acc, int* __restrict__ counters,
        __half* __restrict__ out, unsigned* __restrict__ amax_out, int window) {
    attn_decode_gqa_body<KV, DT>(qkv, cos_t, sin_t, kc, vc, ks, vs, lens, Hq, Hkv, D, cap, scale, part_ml, part_acc,
                             counters, out, amax_out, window);
}
