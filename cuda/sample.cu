// sample.cu — next-token sampling on the GPU: temperature, top-k, top-p, one draw.
//
// What: for row b of fp16 logits (V,), the rules of engine/model/sampling.py: temperature 0
// (or top_k 1) -> argmax, lowest id on ties; else p ∝ exp((x - max) / T), keep the top_k
// most probable (ties at the cut: lower ids first), of those the smallest most-probable
// prefix whose mass reaches top_p, and draw one of the kept tokens by the inverse CDF
// (taken in id order: the order changes which u maps to which token, not the law).
// Writes out[b]; with `advance`, also pos[b] and lens[b] += 1, so a graphed decode step
// feeds the drawn token straight into the next step.
//
// Exact without sorting: an fp16 logit has at most 65536 values, so ranking by
// probability is ranking by a 16-bit key (the fp16 bits made monotone; equal keys are
// equal probabilities). The k-th largest key and the top-p cut key are found by a radix
// select with two 8-bit digits over 256-bin shared histograms (counts for top-k, mass
// for top-p); a cut that splits a run of equal keys is settled by id with one counting
// pass in id order. Probabilities are fixed point: w = rint(exp(z) * 2^40) in uint64
// (the most probable token weighs 2^40; a token under 2^-41 of it weighs 0, together at
// most V * 2^-41 of the mass), so every sum is an exact integer: no result depends on
// the order of atomics, and a seed replays bit for bit.
//
// Randomness: Philox4x32-10 keyed by the 64-bit seed, counter (pos[b], seq[b], 0, 0):
// one draw per (sequence, position). pos lives on the device and this kernel advances
// it, so a replayed graph draws fresh numbers every step, and a seed and prompt give
// the same tokens however the decode is split into calls.
//
// params (uint32[5] in device memory, read at every launch, so one captured graph
// serves every setting): temperature (f32 bits), top_p (f32 bits), top_k (0 = off),
// seed low word, seed high word. Packed by engine/gpu/ops.py sample_params.
//
// Launch: grid (rows), block 1024 (SAMPLE_THREADS). Row b reads logits + b * ld (ld = 0
// repeats one row: the distribution test draws many times from it). Cost, in passes
// over the row (each a coalesced read of V fp16, from L1/L2 after the first): 1 for the
// max (greedy stops here), +2 for top-k, +2 for top-p, +1 per cut that splits a run of
// equal keys, +1 for the draw, then one 1024-id chunk scanned for the drawn id. One block
// (one SM) per row: measured on H100 (bench/sample_kernel.py, 2026-11-25) at V = 32000 /
// 49152, batch 1: greedy 5.7 / 7.8 µs, T 14 / 20, +top-k 50 22 / 38, +top-p 0.9 36 / 50
// (batch 32 within ~25 %): 3 % of a SmolLM2-sized decode step. Splitting a row over a
// cluster of blocks is the open speed-up for batch 1.
#include <cuda_fp16.h>
#include "pdl.cuh"

typedef unsigned int u32;
typedef unsigned long long u64;

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SAMPLE_MAX_CHUNKS 256               // id-order chunks (C ids each) of one row
#define SAMPLE_ONE 1099511627776.0f         // 2^40: the weight of the most probable token
#define SAMPLE_NO_CUT 0x7fffffff            // cut id that keeps every token of the cut key
#define SAMPLE_KEY_FINITE 0x0400u           // keys below: -inf (0x03ff) and NaN (0)
#define SAMPLE_KEY_BAD 0x10000u             // above every key: the row holds a NaN or a +Inf
#define SAMPLE_NONFINITE (-1)               // the token for such a row, or one of only -Inf
                                            // (ops.SAMPLE_NONFINITE; engine/model/sampling.py refuses both)

static_assert(SAMPLE_THREADS == 32 * 32, "warp 0 reduces one value per warp");
static_assert(SAMPLE_MAX_CHUNKS == 32 * 8, "warp 0 scans 8 bins per lane");

// Monotone 16-bit key of an fp16 value; NaN goes below -inf and is never drawn.
__device__ __forceinline__ u32 key_of(__half h) {
    u32 b = __half_as_ushort(h);
    if ((b & 0x7fffu) > 0x7c00u) return 0u;
    if (b == 0x8000u) b = 0u;                            // -0 ranks with +0
    return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
}
__device__ __forceinline__ float value_of(u32 key) {
    u32 b = (key & 0x8000u) ? (key & 0x7fffu) : (~key & 0xffffu);
    return __half2float(__ushort_as_half((unsigned short)b));
}

// Fixed-point probability weight of a token with key `key` and value x.
struct Weight {
    float m, inv_t;     // the max logit, 1 / temperature
    u32 kmax;           // its key: weighs exactly 2^40 (no 0 * inf at a tiny T)
    __device__ __forceinline__ u64 operator()(u32 key, float x) const {
        if (key == kmax) return 1ull << 40;
        if (key < SAMPLE_KEY_FINITE) return 0ull;
        return __float2ull_rn(__expf((x - m) * inv_t) * SAMPLE_ONE);
    }
};

// Tokens kept by the cuts so far: key above the cut key, or equal with id <= cut id.
struct Cut {
    u32 key;
    int id;
    __device__ __forceinline__ bool keeps(u32 k, int v) const { return k > key || (k == key && v <= id); }
};

// f(h, id) for ids lo..hi-1 (lo a multiple of 8) by n threads, this one being t: 16-byte loads
// of 8 logits when the row is 16-byte aligned (V % 8 == 0), a scalar tail.
template <class F>
__device__ __forceinline__ void for_range(const __half* row, int lo, int hi, int t, int n, F f) {
    int mid = lo;
    if ((reinterpret_cast<size_t>(row) & 15) == 0) {
        mid = lo + ((hi - lo) & ~7);
        const uint4* p = reinterpret_cast<const uint4*>(row);
        for (int i = (lo >> 3) + t; i < (mid >> 3); i += n) {
            const uint4 q = p[i];
            const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                f(__ushort_as_half((unsigned short)(w[j] & 0xffffu)), 8 * i + 2 * j);
                f(__ushort_as_half((unsigned short)(w[j] >> 16)), 8 * i + 2 * j + 1);
            }
        }
    }
    for (int v = mid + t; v < hi; v += n) f(row[v], v);
}

__device__ __forceinline__ u64 warp_sum(u64 v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ u64 warp_incl_scan(u64 v) {
    int lane = threadIdx.x & 31;
    for (int o = 1; o < 32; o <<= 1) {
        u64 t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    return v;
}

// Warp 0 only: over bins i = 0..255 (values bin(i), lane l owns 8l..8l+7), the first i at
// which the running total reaches `target` (1 <= target <= total), and the total before it.
template <class Bin>
__device__ void find_reach(Bin bin, u64 target, int* out_i, u64* out_before) {
    int lane = threadIdx.x & 31;
    u64 v[8], s = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) { v[j] = bin(8 * lane + j); s += v[j]; }
    u64 incl = warp_incl_scan(s), c = incl - s;
    if (c < target && target <= incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (c + v[j] >= target) { *out_i = 8 * lane + j; *out_before = c; break; }
            c += v[j];
        }
    }
}

struct Shared {
    u32 hist[256];                  // key-digit counts
    u32 mass_lo[256], mass_hi[256]; // key-digit fixed-point mass, two words (add_mass)
    u64 sums[SAMPLE_MAX_CHUNKS];    // per-chunk sums in id order
    u64 red[32];                    // one value per warp
    u64 before, target;
    int i, found;
};

__device__ u64 block_max(u64 v, u64* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[wid] = v;
    __syncthreads();
    if (wid == 0) {
        v = red[lane];
        for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    v = red[0];
    __syncthreads();
    return v;
}

// Inclusive prefix sum over the block in thread order; *total = the block's sum.
__device__ u64 block_incl_scan(u64 x, u64* red, u64* total) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    u64 incl = warp_incl_scan(x);
    if (lane == 31) red[wid] = incl;
    __syncthreads();
    if (wid == 0) red[lane] = warp_incl_scan(red[lane]);
    __syncthreads();
    *total = red[31];
    if (wid) incl += red[wid - 1];
    __syncthreads();
    return incl;
}

// The id at which the running sum of wt(key, x, id), taken in id order, first reaches
// target(row total) (1 <= target <= total). One pass: each warp sums whole chunks of C
// ids; warp 0 finds the chunk; then the block scans that chunk's ids. -1 if none.
template <class Wt, class Target>
__device__ int select_in_order(const __half* row, int V, Wt wt, Target target, Shared& sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int per = SAMPLE_THREADS * SAMPLE_MAX_CHUNKS;
    const int C = SAMPLE_THREADS * ((V + per - 1) / per);      // nch <= SAMPLE_MAX_CHUNKS
    const int nch = (V + C - 1) / C;
    for (int c = wid; c < nch; c += SAMPLE_WARPS) {
        u64 s = 0;
        for_range(row, c * C, min(V, (c + 1) * C), lane, 32,
                  [&](__half h, int v) { s += wt(key_of(h), __half2float(h), v); });
        s = warp_sum(s);
        if (lane == 0) sh.sums[c] = s;
    }
    __syncthreads();
    if (wid == 0) {
        u64 tot = 0;
        for (int c = lane; c < nch; c += 32) tot += sh.sums[c];
        const u64 t = target(warp_sum(tot));
        if (lane == 0) { sh.target = t; sh.i = 0; sh.before = 0; sh.found = -1; }
        __syncwarp();
        find_reach([&](int i) { return i < nch ? sh.sums[i] : 0ull; }, t, &sh.i, &sh.before);
    }
    __syncthreads();
    const int c = sh.i;
    u64 r = sh.target - sh.before;                              // 1 <= r <= sums[c]
    const int end = min(V, (c + 1) * C);
    for (int base = c * C; base < end; base += SAMPLE_THREADS) {
        const int v = base + threadIdx.x;
        u64 w = 0, tot;
        if (v < end) {
            const __half h = row[v];
            w = wt(key_of(h), __half2float(h), v);
        }
        const u64 incl = block_incl_scan(w, sh.red, &tot);
        if (incl - w < r && r <= incl) sh.found = v;            // exactly one thread
        if (r <= tot) break;                                    // uniform over the block
        r -= tot;
    }
    __syncthreads();
    const int found = sh.found;
    __syncthreads();
    return found;
}

// The n-th (1-based) smallest id among the tokens with key `key`.
__device__ int nth_with_key(const __half* row, int V, u32 key, u64 n, Shared& sh) {
    return select_in_order(row, V, [=](u32 k, float, int) { return (u64)(k == key); },
                           [=](u64) { return n; }, sh);
}

// Philox4x32-10 (Salmon et al., SC'11): 64 random bits for counter (c0, c1, 0, 0), key seed.
__device__ __forceinline__ u64 philox(u32 c0, u32 c1, u64 seed) {
    u32 x0 = c0, x1 = c1, x2 = 0, x3 = 0, k0 = (u32)seed, k1 = (u32)(seed >> 32);
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const u32 h0 = __umulhi(0xD2511F53u, x0), l0 = 0xD2511F53u * x0;
        const u32 h1 = __umulhi(0xCD9E8D57u, x2), l1 = 0xCD9E8D57u * x2;
        x0 = h1 ^ x1 ^ k0; x1 = l1; x2 = h0 ^ x3 ^ k1; x3 = l0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    return (u64)x0 << 32 | x1;
}

__device__ __forceinline__ void zero_hist(Shared& sh) {
    if (threadIdx.x < 256) { sh.hist[threadIdx.x] = 0; sh.mass_lo[threadIdx.x] = 0; sh.mass_hi[threadIdx.x] = 0; }
    __syncthreads();
}

// Exact 64-bit shared-memory add from 32-bit atomics (64-bit ones are a CAS loop in shared
// memory, which stalls on the few hot bins): the low word's carry goes to the high word.
__device__ __forceinline__ void add_mass(u32* lo, u32* hi, u64 w) {
    const u32 wl = (u32)w, old = atomicAdd(lo, wl);
    const u32 up = (u32)(w >> 32) + (old + wl < old);
    if (up) atomicAdd(hi, up);
}
__device__ __forceinline__ u64 mass_of(const Shared& sh, int i) { return (u64)sh.mass_hi[i] << 32 | sh.mass_lo[i]; }

// One token by temperature, top-k, top-p and the draw u = rnd / 2^64 (module comment).
__device__ int draw(const __half* row, int V, float temp, u32 top_k, float top_p, u32 kmax, u64 rnd,
                    Shared& sh) {
    const int wid = threadIdx.x >> 5;
    const Weight W{value_of(kmax), 1.f / temp, kmax};
    Cut cut{0u, SAMPLE_NO_CUT};
    if (top_k > 0 && top_k < (u32)V) {
        // the k-th largest key: high digit, then low digit within it
        zero_hist(sh);
        for_range(row, 0, V, threadIdx.x, SAMPLE_THREADS, [&](__half h, int) { atomicAdd(&sh.hist[key_of(h) >> 8], 1u); });
        __syncthreads();
        if (wid == 0) find_reach([&](int i) { return (u64)sh.hist[255 - i]; }, top_k, &sh.i, &sh.before);
        __syncthreads();
        const u32 hi = 255 - sh.i;
        const u64 above = sh.before;                            // tokens with a higher digit
        __syncthreads();
        zero_hist(sh);
        for_range(row, 0, V, threadIdx.x, SAMPLE_THREADS, [&](__half h, int) {
            const u32 k = key_of(h);
            if ((k >> 8) == hi) atomicAdd(&sh.hist[k & 255], 1u);
        });
        __syncthreads();
        if (wid == 0) find_reach([&](int i) { return (u64)sh.hist[255 - i]; }, top_k - above, &sh.i, &sh.before);
        __syncthreads();
        const u32 lo = 255 - sh.i;
        const u64 need = top_k - above - sh.before;             // of the tokens with the cut key
        const u32 cnt = sh.hist[lo];
        __syncthreads();
        cut.key = hi << 8 | lo;
        if (need < cnt) cut.id = nth_with_key(row, V, cut.key, need, sh);
    }
    if (top_p < 1.f) {
        // the key where the kept mass, from the top, reaches top_p of the total
        zero_hist(sh);
        for_range(row, 0, V, threadIdx.x, SAMPLE_THREADS, [&](__half h, int v) {
            const u32 k = key_of(h);
            if (cut.keeps(k, v)) {
                const u64 w = W(k, __half2float(h));
                if (w) add_mass(&sh.mass_lo[k >> 8], &sh.mass_hi[k >> 8], w);
            }
        });
        __syncthreads();
        if (wid == 0) {
            const int lane = threadIdx.x & 31;
            u64 tot = 0;
            for (int i = lane; i < 256; i += 32) tot += mass_of(sh, i);
            tot = warp_sum(tot);
            const u64 t = min(tot, max(1ull, (u64)ceil((double)top_p * (double)tot)));
            if (lane == 0) sh.target = t;
            find_reach([&](int i) { return mass_of(sh, 255 - i); }, t, &sh.i, &sh.before);
        }
        __syncthreads();
        const u32 hi = 255 - sh.i;
        const u64 target = sh.target, above = sh.before;
        __syncthreads();
        zero_hist(sh);
        for_range(row, 0, V, threadIdx.x, SAMPLE_THREADS, [&](__half h, int v) {
            const u32 k = key_of(h);
            if ((k >> 8) == hi && cut.keeps(k, v)) atomicAdd(&sh.hist[k & 255], 1u);
        });
        __syncthreads();
        if (wid == 0) {
            find_reach([&](int i) {
                const u32 k = hi << 8 | (255 - i);
                return sh.hist[255 - i] ? sh.hist[255 - i] * W(k, value_of(k)) : 0ull;
            }, target - above, &sh.i, &sh.before);
        }
        __syncthreads();
        const u32 lo = 255 - sh.i, key = hi << 8 | lo;
        const u64 w = W(key, value_of(key));
        const u64 need = (target - above - sh.before + w - 1) / w;   // tokens of this key, >= 1
        const u32 cnt = sh.hist[lo];
        __syncthreads();
        if (key != cut.key) cut.id = SAMPLE_NO_CUT;            // above the top-k cut: all kept
        cut.key = key;
        if (need < cnt) cut.id = nth_with_key(row, V, key, need, sh);
    }
    return select_in_order(row, V, [=](u32 k, float x, int v) { return cut.keeps(k, v) ? W(k, x) : 0ull; },
                           [=](u64 tot) { return __umul64hi(rnd, tot) + 1; }, sh);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const __half* __restrict__ logits, long long ld, int V, const u32* __restrict__ params,
            const int* __restrict__ seq, int* __restrict__ pos, int* __restrict__ lens, int advance,
            int* __restrict__ out) {
    pdl_enter();
    __shared__ Shared sh;
    const int b = blockIdx.x;
    const __half* row = logits + (long long)b * ld;
    const float temp = __uint_as_float(params[0]), top_p = __uint_as_float(params[1]);
    const u32 top_k = params[2];
    const u64 seed = (u64)params[4] << 32 | params[3];
    // max key, then lowest id (stored inverted); a NaN or +Inf anywhere gives SAMPLE_KEY_BAD, so
    // the same reduction tells a damaged row (the forward pass overflowed fp16 or met a NaN:
    // cuda/rows.cuh turns a non-finite activation into NaN logits), which the host refuses.
    // -Inf is a masked token, never drawn.
    u64 best = 0;
    for_range(row, 0, V, threadIdx.x, SAMPLE_THREADS, [&](__half h, int v) {
        const u32 b = __half_as_ushort(h);
        const u32 k = (b & 0x7fffu) > 0x7c00u || b == 0x7c00u ? SAMPLE_KEY_BAD : key_of(h);
        best = max(best, (u64)k << 32 | (u32)~v);
    });
    best = block_max(best, sh.red);
    const u32 kmax = (u32)(best >> 32);
    int tok = kmax >= SAMPLE_KEY_FINITE && kmax != SAMPLE_KEY_BAD ? (int)~(u32)best : SAMPLE_NONFINITE;
    if (temp > 0.f && top_k != 1 && tok != SAMPLE_NONFINITE) {
        const int t = draw(row, V, temp, top_k, top_p, kmax, philox((u32)pos[b], (u32)seq[b], seed), sh);
        if (t >= 0) tok = t;
    }
    if (threadIdx.x == 0) {
        out[b] = tok;
        if (advance) { pos[b] += 1; lens[b] += 1; }
    }
}
