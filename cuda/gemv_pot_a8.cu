// gemv_pot_a8.cu — W3-PoT weights × INT8 tokens with dp4a, made for one token a step; the model
// runs pot3 g128 layers of act "dynamic" with it (docs/KERNELS.md, "A route to the 1.25× bar";
// bench: python -m engine.bench gemv-wb --kinds pot3,pot3a8 --ms 1).
//
// What: out (N) fp16 = sx · Σ_g (s[n,g] / 4) · Σ_{k∈g} VALUES[code[n,k]] · x8[k], bit-exactly as
// engine/formats/pot_a8.py gemv_pot_a8_ref. pot3 units ×4 are the integers VALUES = {0, +4, +2,
// +1, +8 (the spare), −4, −2, −1} for codes 0..7 (the spare's side is the sign of s), so each
// chunk's dot is exact in int32 and s multiplies it in fp32.
//
// Layout (formats/pot_a8.py): tiles of 8 rows, words[t][st][j][r][l] = word j (0..2) of chunk
// 32·st + l of row 8t + r for the S = KC / 32 full warp steps (zero past the last row); channel
// 8j + q (q < 8) of a chunk has its code in bits 0-2 of nibble q of word j, channel 24 + q has bit
// b of its code in bit 3 of nibble q of word b. A lane takes one chunk of each of the block's rows
// a step: three 4-byte loads a row, each warp-wide a 128-byte line, all at fixed offsets from one
// pointer, and the token's x8[32c .. 32c+31] as two 16-byte loads in natural order. Scales: groups
// of 128, scales[t][st][r][q] = s[8t + r][8·st + q] fp16; lane l's is q = l / 4. The last
// L = KC % 32 chunks (the tail, a partial step) are stored compactly, not padded to a step:
// tail[t][j][r][l] = word j of chunk 32·S + l of row 8t + r (l < L), stail[n][q] = s[n][8·S + q]
// (q < ceil(L / 4)), so a layer stores its K padded to 32, not to 1024.
//
// Dot of a chunk (pa8_weights, pa8_dot; nvcc 13.0 sm_90a: 8 PRMT, 8 IDP.4A, 7 SHF, 6 LOP3): prmt looks four codes (the low 16 bits of its
// selector, one nibble each) up in the 8-byte table VALUES held in two registers; a nibble's
// bit 3 would switch prmt to sign replication, so the selectors are masked: w & 0x77777777 for
// the 24 codes of a word's nibbles (the high half shifted down for the second prmt), and the
// other 8 gathered from the bit 3s. 8 prmt make 32 int8 weights, 8 dp4a their products with x8.
//
// Block: NW warps on RB consecutive rows. A warp step is 32 chunks (1024 channels) of the RB
// rows; warp w takes steps w, w + NW, ...; two steps' loads are in registers (one computing,
// the next in flight), both weight batches issued before the PDL wait (cuda/pdl.cuh: no kernel
// writes the weights), x after it; rows past N are the tile's zero rows. The tail is the last step
// of warp S % NW, where a padded full step would be, so the order of sums is unchanged: lanes
// < L load it (runtime stride L, so ~1 address instruction a load, outside the loop) into b1,
// before the PDL wait where it is the warp's first or second step (b1 is free then: S < 2·NW,
// K < 2048·NW), else after the loop (its latency then not hidden); lanes ≥ L add nothing (with
// the padding they added fma(s, 0, acc) = acc, the same bits). Per (row,
// chunk): acc = fmaf(s, float(dot), acc); then a butterfly over the lanes, the warps' sums in
// order through shared memory, and out = fp16(acc · (0.25 · sx)). The order of those sums is
// the reference's. About 38 instructions a (row, chunk) of 32 weights in the loop (the dot, 3
// weight and 1 scale loads, I2FP, HADD2, FFMA), against ~75 for A8W4's dp4a GEMV's 32.
#include <cuda_fp16.h>
#include "common.cuh"
#include "rows.cuh"

#define PA8_CHUNK 32                 // channels a (row, chunk) (formats/pot_a8.py CHUNK)
#define PA8_WORDS 3                  // words a chunk
#define PA8_STEP 32                  // chunks a warp step, one a lane (formats/pot_a8.py STEP)
#define PA8_GROUP 128                // channels a scale (GROUP)
#define PA8_TILE_ROWS 8              // rows a tile of the layout (TILE_ROWS)
#define PA8_LUT_LO 0x01020400        // int8 4·unit of codes 0..3: 0, +4, +2, +1
#define PA8_LUT_HI 0xFFFEFC08        // codes 4..7: +8 (spare), -4, -2, -1
#define PA8_LOW3 0x77777777          // bits 0-2 of every nibble
#define PA8_UNIT_LO 0x34383C00u      // the high bytes of the fp16 units VALUES / 4 of codes 0..3: 0, 1, 1/2, 1/4
#define PA8_UNIT_HI 0xB4B8BC40u      // codes 4..7: 2 (spare), -1, -1/2, -1/4 (their low bytes are 0)

__device__ __forceinline__ int pa8_dp4a(u32 a, u32 b, int c) {
    int d;                                             // both operands' bytes signed
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ u32 pa8_prmt(u32 a, u32 b, u32 sel) {   // generic prmt: bytes {b, a}
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

__device__ __forceinline__ u32 pa8_lut(u32 sel) {      // 4 codes (sel's low 16 bits) -> 4 int8
    return pa8_prmt(PA8_LUT_LO, PA8_LUT_HI, sel);
}

// The selector of channels 4i..4i+3 of a chunk (its low 16 bits), i = 0..7 (a compile-time i):
// the nibbles of w[i/2] (bits 0-2; the high half shifted down for odd i), or for i = 6, 7 those
// gathered from the words' bit 3s: dequant_pot3_a8's, and the eight pa8_weights builds at once.
__device__ __forceinline__ u32 pa8_selector(const u32 (&w)[PA8_WORDS], int i) {
    if (i < 6) return (w[i >> 1] & PA8_LOW3) >> (16 * (i & 1));
    const u32 e = ((w[0] >> 3) & 0x11111111u) | ((w[1] >> 2) & 0x22222222u) | ((w[2] >> 1) & 0x44444444u);
    return e >> (16 * (i & 1));
}

// a · b on two fp16 pairs, each half once rounded to nearest (subnormals kept, no fma contraction)
__device__ __forceinline__ u32 pa8_hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// One chunk's 32 int8 weights VALUES[code] as eight words (channels 4i..4i+3 in q[i]) from its
// three words w: a block of MT tokens decodes them once for all. The selectors are
// pa8_selector's, built here once for all eight (calling it eight times costs the loop ~130 of
// its ~600 instructions: nvcc 13.0 forms the bit-3 gather twice and shifts each mask).
__device__ __forceinline__ void pa8_weights(const u32 (&w)[PA8_WORDS], u32 (&q)[8]) {
    const u32 m0 = w[0] & PA8_LOW3, m1 = w[1] & PA8_LOW3, m2 = w[2] & PA8_LOW3;
    const u32 e = ((w[0] >> 3) & 0x11111111u) | ((w[1] >> 2) & 0x22222222u) | ((w[2] >> 1) & 0x44444444u);
    q[0] = pa8_lut(m0);
    q[1] = pa8_lut(m0 >> 16);
    q[2] = pa8_lut(m1);
    q[3] = pa8_lut(m1 >> 16);
    q[4] = pa8_lut(m2);
    q[5] = pa8_lut(m2 >> 16);
    q[6] = pa8_lut(e);
    q[7] = pa8_lut(e >> 16);
}

// Σ VALUES[code]·x8 over one chunk (exact in int32): q its weights (pa8_weights), x a
// token's 32 int8 as 8 words.
__device__ __forceinline__ int pa8_dot(const u32 (&q)[8], const u32 (&x)[8]) {
    int d = pa8_dp4a(q[0], x[0], 0);
#pragma unroll
    for (int i = 1; i < 8; ++i) d = pa8_dp4a(q[i], x[i], d);
    return d;
}

// Weights are read once: no L1 allocation; 256-byte L2 sectors as ldg_stream (common.cuh) asks
// (a block's lines of a step are 3 KB in a row).
__device__ __forceinline__ u32 pa8_ldw(const u32* p) {
    u32 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ u32 pa8_lds(const unsigned short* p) {     // a scale's fp16 bits
    unsigned short r;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}

// x8 is written by the kernel before this one (PDL): a coherent load, after the wait.
__device__ __forceinline__ void pa8_ldx(const i8* p, u32 (&x)[8]) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3]) : "l"(p) : "memory");
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(x[4]), "=r"(x[5]), "=r"(x[6]), "=r"(x[7]) : "l"(p + 16) : "memory");
}

// ---------------------------------------------------------------- M above the GEMV's rows
// For many tokens (prefill; engine/gpu/pot_a8.py gemm_pot_a8) the GEMV would read the weights
// once a token. Instead: Ŵ in fp16 (dequant_pot3_a8), the tokens' int8 rows in fp16
// (rows_i8_to_f16: exact), cuBLAS C (M, N) fp32 = x · Ŵᵀ (every product x8·Ŵ is exact in fp32:
// 7 bits times 11), and out = fp16(C · sx) (scale_rows_pa8). That is the GEMV's function up to
// the order of the fp32 sums, where Ŵ is exact in fp16 (every scale·2^e held exactly, a subnormal
// too where its bits fit, none past 65504: formats/pot_a8.py fp16_exact, checked once a layer; a
// layer without it stays on the GEMV).

// w16 (N, K) fp16 = fp16(s/4 · VALUES[code]) of every weight, bit for bit
// formats/pot_a8.py dequantized_f16: one thread a (row, chunk of 32 channels), from the full
// steps' words and scales or the tail's (read before the PDL wait: no kernel writes them). The
// GEMV's selectors look the units' fp16 high bytes up by prmt (four weights a prmt; a unit's low
// byte is 0), two more prmts spread them into fp16 pairs and one f16x2 multiply by s makes two
// weights: one rounding of the exact s · unit, as fp16(float(s/4) · VALUES) is (both exact where
// fp16_exact holds, subnormals included; ±0 alike). 24 PRMT, 16 HMUL2 and ~12 LOP3/SHF a chunk of
// 32 where a scalar decode took ~12 a weight, yet the same time (H100, the 7B prefill's 128
// launches: 10.4 ms against 10.2, ~1.25 TB/s of Ŵ written): what bounds it is the stores. So a
// warp whose 32 chunks are whole (K % 8 == 0) stages its 2 KB in shared memory and stores 512
// contiguous bytes an instruction (session 41: 4.81 ms on an H200, 2.7 TB/s); a lone whole chunk
// leaves as four 16-byte stores, else half by half. Grid (ceil(KC / blockDim), N): row blockIdx.y.
__global__ void __launch_bounds__(128) dequant_pot3_a8(
    const u32* __restrict__ words, const __half* __restrict__ scale, const u32* __restrict__ tail,
    const __half* __restrict__ stail, __half* __restrict__ w16, int N, int KC, int K) {
    constexpr int TILE_STEP = PA8_WORDS * PA8_TILE_ROWS * PA8_STEP;
    constexpr int SCALES_STEP = PA8_TILE_ROWS * PA8_STEP * PA8_CHUNK / PA8_GROUP;
    static_assert(PA8_GROUP == 4 * PA8_CHUNK, "four chunks a scale");
    const int n = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    const int steps = KC / PA8_STEP, tl = KC % PA8_STEP;
    const int tg = (tl + 3) >> 2;                      // the tail's scales
    const int t = n / PA8_TILE_ROWS, r = n % PA8_TILE_ROWS, st = c / PA8_STEP, l = c % PA8_STEP;
    u32 w[PA8_WORDS] = {0u, 0u, 0u};
    unsigned short sb = 0;
    if (c < KC && st < steps) {
        const size_t ts = (size_t)t * steps + st;
#pragma unroll
        for (int j = 0; j < PA8_WORDS; ++j) w[j] = words[ts * TILE_STEP + (j * PA8_TILE_ROWS + r) * PA8_STEP + l];
        sb = reinterpret_cast<const unsigned short*>(scale)[ts * SCALES_STEP + r * (SCALES_STEP / PA8_TILE_ROWS)
                                                             + (l >> 2)];
    } else if (c < KC) {
#pragma unroll
        for (int j = 0; j < PA8_WORDS; ++j)
            w[j] = tail[(((size_t)t * PA8_WORDS + j) * PA8_TILE_ROWS + r) * tl + l];
        sb = reinterpret_cast<const unsigned short*>(stail)[(size_t)n * tg + (l >> 2)];
    }
    pdl_enter();                                       // w16 may still be read by the GEMM before us
    if (c >= KC) return;
    const u32 s2 = (u32)sb | ((u32)sb << 16);          // s in both halves
    u32 h[PA8_CHUNK / 2];                              // the chunk's fp16 weights, channels 2i, 2i+1 in word i
#pragma unroll
    for (int i = 0; i < 8; ++i) {                      // channels 4i..4i+3: the GEMV's selectors (pa8_weights)
        const u32 b = pa8_prmt(PA8_UNIT_LO, PA8_UNIT_HI, pa8_selector(w, i));  // their units' fp16 high bytes
        h[2 * i] = pa8_hmul2(pa8_prmt(b, 0u, 0x1404u), s2);                   // (0, b0, 0, b1): channels 4i, 4i+1
        h[2 * i + 1] = pa8_hmul2(pa8_prmt(b, 0u, 0x3424u), s2);               // 4i+2, 4i+3
    }
    const int nk = min(PA8_CHUNK, K - c * PA8_CHUNK);
    __half* o = w16 + (size_t)n * K + (size_t)c * PA8_CHUNK;
    const int c0 = c - (threadIdx.x & 31);             // the warp's first chunk
    if ((c0 + 32) * PA8_CHUNK <= K && (K & 7) == 0) {  // the warp's 32 chunks whole: 2 KB of one row
        // through shared memory, so that each store instruction writes 512 contiguous bytes (a
        // lane's own 64 bytes as four 16-byte stores 64 bytes apart took ~1.3 TB/s)
        __shared__ uint4 stage[4][32 * PA8_CHUNK / 8];
        uint4* sw = stage[threadIdx.x >> 5];
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int v4 = 0; v4 < PA8_CHUNK / 8; ++v4)    // slot 4·lane + v4, rotated against bank conflicts
            sw[4 * lane + ((v4 + lane) & 3)] = make_uint4(h[4 * v4], h[4 * v4 + 1], h[4 * v4 + 2], h[4 * v4 + 3]);
        __syncwarp();
        uint4* ow = reinterpret_cast<uint4*>(w16 + (size_t)n * K + (size_t)c0 * PA8_CHUNK);
#pragma unroll
        for (int i = 0; i < PA8_CHUNK / 8; ++i) {      // 16-byte piece 32i + lane: chunk 8i + lane/4, part lane % 4
            const int q = 32 * i + lane, src = q >> 2, part = q & 3;
            ow[q] = sw[4 * src + ((part + src) & 3)];
        }
    } else if (nk == PA8_CHUNK && (K & 7) == 0) {      // 16-byte aligned: row n starts at 2nK bytes
#pragma unroll
        for (int v4 = 0; v4 < PA8_CHUNK / 8; ++v4)
            reinterpret_cast<uint4*>(o)[v4] = make_uint4(h[4 * v4], h[4 * v4 + 1], h[4 * v4 + 2], h[4 * v4 + 3]);
    } else {
        unsigned short* o16 = reinterpret_cast<unsigned short*>(o);
#pragma unroll
        for (int q = 0; q < PA8_CHUNK; ++q)
            if (q < nk) o16[q] = (unsigned short)(h[q >> 1] >> (16 * (q & 1)));
    }
}

// xh (M, K) fp16 = x8 (M, ldx) int8's first K columns (exact): eight a thread, by one 8-byte load
// and one 16-byte store where vec (the launcher's: K and ldx multiples of 8, x8 8-byte and xh
// 16-byte aligned), else one by one. Grid (ceil(K / (8 · blockDim)), M).
__global__ void __launch_bounds__(256) rows_i8_to_f16(const i8* __restrict__ x8, __half* __restrict__ xh, int K,
                                                      int ldx, int vec) {
    pdl_enter();
    const int m = blockIdx.y, k0 = 8 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (k0 >= K) return;
    const i8* src = x8 + (size_t)m * ldx + k0;
    __half* dst = xh + (size_t)m * K + k0;
    if (vec) {                                         // then k0 + 8 <= K
        const uint2 v = *reinterpret_cast<const uint2*>(src);
        u32 o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 word = i < 2 ? v.x : v.y;
            const int lo = (int)(signed char)(word >> (16 * (i & 1)));
            const int hi = (int)(signed char)(word >> (16 * (i & 1) + 8));
            o[i] = (u32)__half_as_ushort(__int2half_rn(lo)) | ((u32)__half_as_ushort(__int2half_rn(hi)) << 16);
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(o[0], o[1], o[2], o[3]);
    } else {
        for (int i = 0; i < 8 && k0 + i < K; ++i) dst[i] = __int2half_rn((int)src[i]);
    }
}

// out (M, N) fp16 = fp16(c32 · sx[m]), the GEMV's epilogue on cuBLAS's fp32 product, or with
// resid (non-null) resid += float(that) instead, as the GEMV's resid: four a thread, by 16-byte
// loads (and an 8-byte store of out) where vec (the launcher's: N % 4 == 0, c32 and resid 16-byte
// and out 8-byte aligned), else one by one. Grid (ceil(N / (4 · blockDim)), M).
__global__ void __launch_bounds__(256) scale_rows_pa8(const float* __restrict__ c32, const float* __restrict__ sx,
                                                      __half* __restrict__ out, float* __restrict__ resid, int N,
                                                      int vec) {
    pdl_enter();
    const int m = blockIdx.y, n0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (n0 >= N) return;
    const size_t i0 = (size_t)m * N + n0;
    const float s = sx[m];
    if (vec) {                                         // then n0 + 4 <= N
        const float4 c = *reinterpret_cast<const float4*>(c32 + i0);
        const __half y0 = __float2half_rn(c.x * s), y1 = __float2half_rn(c.y * s);
        const __half y2 = __float2half_rn(c.z * s), y3 = __float2half_rn(c.w * s);
        if (resid) {
            float4 h = *reinterpret_cast<const float4*>(resid + i0);
            h.x += __half2float(y0);
            h.y += __half2float(y1);
            h.z += __half2float(y2);
            h.w += __half2float(y3);
            *reinterpret_cast<float4*>(resid + i0) = h;
        } else {
            *reinterpret_cast<uint2*>(out + i0) =
                make_uint2((u32)__half_as_ushort(y0) | ((u32)__half_as_ushort(y1) << 16),
                           (u32)__half_as_ushort(y2) | ((u32)__half_as_ushort(y3) << 16));
        }
    } else {
        for (int n = 0; n < 4 && n0 + n < N; ++n) {
            const __half y = __float2half_rn(c32[i0 + n] * s);
            if (resid) resid[i0 + n] += __half2float(y);
            else out[i0 + n] = y;
        }
    }
}

template <int RB, int MT = 1>
struct Pa8Batch {                    // one warp step of a lane: its chunk of RB rows
    u32 w[RB][PA8_WORDS];
    u32 s[RB];                       // fp16 bits of the chunk's group scale
    u32 x[MT][8];                    // that chunk of x8 of each of the block's MT tokens
};

// words (T, S, 3, 8, 32) uint32 and scale (T, S, 8, 8) fp16 (the full steps), tail (T, 3, 8, L)
// uint32 and stail (8T, ceil(L / 4)) fp16, T = ceil(N / 8), S = KC / 32, L = KC % 32 (unread if 0);
// x8 (M, ldx) int8, ldx ≥ 32·KC and a multiple of 16, 16-byte aligned (bytes past K meet code 0);
// sx (M) the tokens' scales; out (M, ldo) fp16. RB = 4 or 8 rows a block (half a tile or one).
// MT tokens a block (M a multiple of MT): each chunk's weights are decoded once for all of them
// (pa8_weights), each token's sums in the same order as alone, so the same bits. Grid
// (ceil(N / RB), M / MT): tokens MT·blockIdx.y..; with tok_x, (M / MT, ceil(N / RB)): tokens
// MT·blockIdx.x.., so the blocks of a row block are issued together and the later ones may find
// its weights in L2 (M > 1: batched decode). Each block reads the weights again: a prefill past
// WB_TUNE.pa8_gemv_max_m tokens takes Ŵ in fp16 and cuBLAS instead (gemm_pot_a8).
// SILU (the batch-1 decode step's fused gate|up layer, engine/gpu/model.py _fold_quant; RB = 8, one
// token): N = 2I rows, gate then up, I % 8 == 0; block b takes gate rows 4b..4b+3 and up rows
// I + 4b..I + 4b + 3 (its rows 0-3 and 4-7, two halves of one tile each, from two pointers), and
// writes mf[4b + t] (float32, (I)) = silu_mul of the fp16-rounded gate and up, the same fp16 values
// the plain variant would write to out, and the max of |mf| over its 4 channels atomically into
// *amax (float bits, NaN-propagating, zeroed by the norm before): quant_amax then quantizes mf for
// down, as after the A8W4 SiLU GEMV (cuda/gemm_a8w4.cu silu_epilogue). out and ldo are unused.
// resid (not SILU; null: none): y is added to the float32 residual stream (M, ldo) instead of
// stored, resid[m, n] += float(fp16(y[m, n])), the add the norm after o and down would make (as
// the A8W4 GEMV's resid, cuda/gemm_a8w4.cu); out is then unused. One thread owns each element,
// and the next kernel's PDL wait covers this grid's writes.
template <int RB, int NW, bool SILU = false, int MT = 1>
__global__ void __launch_bounds__(32 * NW) gemv_pot3_a8(
    const u32* __restrict__ words, const __half* __restrict__ scale, const u32* __restrict__ tail,
    const __half* __restrict__ stail, const i8* __restrict__ x8, const float* __restrict__ sx,
    __half* __restrict__ out, int N, int KC, int ldx, int ldo, float* __restrict__ mf, unsigned* __restrict__ amax,
    float* __restrict__ resid, int tok_x) {
    static_assert(PA8_GROUP == 4 * PA8_CHUNK, "a lane's scale index is its chunk / 4");
    static_assert(PA8_TILE_ROWS % RB == 0, "a block takes a tile or a part of one");
    static_assert(!SILU || RB == PA8_TILE_ROWS, "the SiLU variant takes 4 gate and 4 up rows a block");
    static_assert(!SILU || MT == 1, "the SiLU variant takes one token");
    constexpr int HALF = SILU ? RB / 2 : RB;          // rows from the first pointer; the rest from the second
    constexpr int TILE_STEP = PA8_WORDS * PA8_TILE_ROWS * PA8_STEP;                // words a (tile, step)
    constexpr int SCALES_STEP = PA8_TILE_ROWS * PA8_STEP * PA8_CHUNK / PA8_GROUP;  // scales a (tile, step)
    __shared__ float red[NW][RB * MT];                // slot t·RB + r: token t, row r
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int token = (tok_x ? blockIdx.x : blockIdx.y) * MT, row_blk = tok_x ? blockIdx.y : blockIdx.x;
    const int n0 = SILU ? row_blk * HALF : row_blk * RB;           // SILU: the block's first gate row
    const int steps = KC / PA8_STEP;                   // full warp steps (the loop's)
    const int tl = KC % PA8_STEP;                      // the tail's chunks: lanes 0..tl-1; 0 if none
    const int tg = (tl + PA8_GROUP / PA8_CHUNK - 1) / (PA8_GROUP / PA8_CHUNK);   // and its groups
    x8 += (size_t)token * ldx + lane * PA8_CHUNK;      // the first token's row of x8 (the lane's chunk), scale, out
    sx += token;
    out += (size_t)token * ldo;

    // The block's rows' words and scales of step `warp`, lane `lane`: row r, word j at + (j·8 + r)·32,
    // and every later step a constant stride on.
    const size_t ts = (size_t)(n0 / PA8_TILE_ROWS) * steps + warp, r0 = n0 % PA8_TILE_ROWS;
    const u32* wp = words + ts * TILE_STEP + r0 * PA8_STEP + lane;
    const unsigned short* sp = reinterpret_cast<const unsigned short*>(scale) + ts * SCALES_STEP
                               + r0 * (SCALES_STEP / PA8_TILE_ROWS) + (lane >> 2);
    // SILU: the up rows n0 + N/2 lie at the same row of their tile (N/2 % 8 == 0), N/16 tiles on
    const size_t tu = SILU ? (size_t)(N / 2 / PA8_TILE_ROWS) * steps : 0;
    const u32* wpu = wp + tu * TILE_STEP;
    const unsigned short* spu = sp + tu * SCALES_STEP;
    // half = 0: the step at the pointers, 1: NW steps on
    auto load_w = [&](int half, Pa8Batch<RB, MT>& b) {
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            const u32* w = r < HALF ? wp : wpu;        // resolved at compile time (r unrolled)
            const int rr = r < HALF ? r : r - HALF;
#pragma unroll
            for (int j = 0; j < PA8_WORDS; ++j)
                b.w[r][j] = pa8_ldw(w + half * NW * TILE_STEP + (j * PA8_TILE_ROWS + rr) * PA8_STEP);
            b.s[r] = pa8_lds((r < HALF ? sp : spu) + half * NW * SCALES_STEP + rr * (SCALES_STEP / PA8_TILE_ROWS));
        }
    };
    auto load_x = [&](int st, Pa8Batch<RB, MT>& b) {
        // chunk 32·st + lane, below KC in a full step (and lanes < tl read the tail's), of each token
#pragma unroll
        for (int t = 0; t < MT; ++t)
            pa8_ldx(x8 + (size_t)t * ldx + (size_t)st * (PA8_STEP * PA8_CHUNK), b.x[t]);
    };
    // The tail of the block's rows, lane `lane`: row r's word j at + (j·8 + r)·tl, its scale at
    // + r·tg; SILU: the up rows' tiles N/16 tiles on, their scale rows N/2 on. Only warp
    // steps % NW reads it (its last step, after steps / NW full ones), lanes < tl.
    const bool tw = tl > 0 && warp == steps % NW;
    const size_t tr = (size_t)(n0 / PA8_TILE_ROWS) * (PA8_WORDS * PA8_TILE_ROWS) + r0;   // (j, r) rows before ours
    const u32* tp = tail + tr * tl + lane;
    const unsigned short* tsp = reinterpret_cast<const unsigned short*>(stail) + (size_t)n0 * tg + (lane >> 2);
    const size_t ru = SILU ? (size_t)(N / 2 / PA8_TILE_ROWS) : 0;                   // the up rows' tiles on
    const u32* tpu = tp + ru * (PA8_WORDS * PA8_TILE_ROWS) * tl;
    const unsigned short* tspu = tsp + ru * PA8_TILE_ROWS * tg;
    auto load_t = [&](Pa8Batch<RB, MT>& t) {
        if (lane < tl) {
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                const u32* wt = r < HALF ? tp : tpu;
                const int rt = r < HALF ? r : r - HALF;
#pragma unroll
                for (int j = 0; j < PA8_WORDS; ++j)
                    t.w[r][j] = pa8_ldw(wt + (j * PA8_TILE_ROWS + rt) * tl);
                t.s[r] = pa8_lds((r < HALF ? tsp : tspu) + rt * tg);
            }
        }
    };
    auto load_tx = [&](Pa8Batch<RB, MT>& t) {
        if (lane < tl) load_x(steps, t);
    };
    auto advance = [&]() {
        wp += 2 * NW * TILE_STEP;
        sp += 2 * NW * SCALES_STEP;
        if (SILU) {
            wpu += 2 * NW * TILE_STEP;
            spu += 2 * NW * SCALES_STEP;
        }
    };
    float acc[RB * MT];                                // slot t·RB + r, as red
#pragma unroll
    for (int i = 0; i < RB * MT; ++i) acc[i] = 0.f;
    auto compute = [&](const Pa8Batch<RB, MT>& b) {
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            u32 q[8];
            pa8_weights(b.w[r], q);
            const float sc = __half2float(__ushort_as_half((unsigned short)b.s[r]));
#pragma unroll
            for (int t = 0; t < MT; ++t) acc[t * RB + r] = fmaf(sc, (float)pa8_dot(q, b.x[t]), acc[t * RB + r]);
        }
    };

    Pa8Batch<RB, MT> b0, b1;
    if (warp < steps) load_w(0, b0);                   // warp-uniform branches throughout
    if (warp + NW < steps) load_w(1, b1);
    else if (tw) load_t(b1);                           // the tail is the warp's first or second step
    pdl_enter();
    float sxq = 0.f;
    if (threadIdx.x < RB * MT) sxq = 0.25f * sx[threadIdx.x / RB];   // token t = tid / RB's; exact: a power of two
    if (warp < steps) load_x(warp, b0);
    if (warp + NW < steps) load_x(warp + NW, b1);
    else if (tw) load_tx(b1);
    for (int st = warp; st < steps; st += 2 * NW) {
        compute(b0);
        advance();
        if (st + 2 * NW < steps) {
            load_w(0, b0);
            load_x(st + 2 * NW, b0);
        }
        if (st + NW >= steps) break;
        compute(b1);
        if (st + 3 * NW < steps) {
            load_w(1, b1);
            load_x(st + 3 * NW, b1);
        }
    }
    if (tw) {                                          // the tail, in b1 (the loop is done with it)
        if (warp + NW < steps) {                       // after two or more full steps: loaded now
            load_t(b1);
            load_tx(b1);
        }
        if (lane < tl) compute(b1);                    // lanes past the tail add nothing
    }

#pragma unroll
    for (int i = 0; i < RB * MT; ++i)
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    if (lane == 0)
#pragma unroll
        for (int i = 0; i < RB * MT; ++i) red[warp][i] = acc[i];
    __syncthreads();
    auto row_sum = [&](int i) {                        // slot i's warp sums in order 0..NW-1
        float v = red[0][i];
#pragma unroll
        for (int w = 1; w < NW; ++w) v += red[w][i];
        return v;
    };
    if constexpr (SILU) {
        if (threadIdx.x < HALF) {                      // lanes 0..3 of warp 0: gate row n0 + t, up row N/2 + n0 + t
            const float g = __half2float(__float2half_rn(row_sum(threadIdx.x) * sxq));
            const float u = __half2float(__float2half_rn(row_sum(threadIdx.x + HALF) * sxq));
            const float v = silu_mul(g, u);
            mf[(size_t)token * (N / 2) + n0 + threadIdx.x] = v;
            float a = fabsf(v);
            a = nan_max(a, __shfl_xor_sync(0xfu, a, 1));
            a = nan_max(a, __shfl_xor_sync(0xfu, a, 2));
            if (threadIdx.x == 0 && !(a <= 0.f)) atomicMax(amax + token, __float_as_uint(a));
        }
    } else if (threadIdx.x < RB * MT && n0 + (int)(threadIdx.x % RB) < N) {
        const int r = threadIdx.x % RB, t = threadIdx.x / RB;   // row n0 + r of token `token` + t
        const __half y = __float2half_rn(row_sum(threadIdx.x) * sxq);
        if (resid) resid[(size_t)(token + t) * ldo + n0 + r] += __half2float(y);   // h += fp16(y)
        else out[(size_t)t * ldo + n0 + r] = y;
    }
}

