"""What holds the W3-PoT × INT8 GEMV below A8W4's streaming rate: its loads, or what it does with them.

    python bench/w3_stream_probe.py [--shapes 4096x11008,4096x22016] [--reps 50] [--json]

Issue 15 asks W3 × INT8 decode for 1.2× A8W4's tokens/s. Session 39's per-launch times fit
t = a + bytes / rate with a ≈ 0 for W3 (q|k|v 8.10 µs, gate|up 14.37) and a ≈ 2.4 µs for A8W4
(10.68, 17.05): W3's kernels stream at ~2.5 TB/s where A8W4's reach ~3.1, and that rate, not a
fixed cost, is what keeps the decode ratio at 1.17×. Nsight Compute (session 41) saw W3 at 64 % of
DRAM bandwidth with half A8W4's warps a scheduler, and five changes that put more bytes in flight
were slower. This times, in one process on the same buffers (rotated past L2):
- the landed GEMV (`gemv_pot3_a8`, default and (4, 4)) and A8W4's, for reference;
- `ldg32`: kernels that issue exactly the GEMV's loads (the grid, 8 rows and 4 warps a block, a warp
  step's 3 words × 8 rows of 4 bytes a lane and its 8 scales, `.nc.L1::no_allocate.L2::256B`) and
  only XOR what arrives: the GEMV's bytes and access pattern without its arithmetic. The probe
  alone fits 16 blocks an SM; "at 4 blocks an SM" (the GEMV's residency at 127 registers) and "at
  8" hold it to fewer by unused dynamic shared memory;
- `ldg128`: the same bytes of each warp step as 16-byte loads (6 a lane, the scales as one word);
- `ldg32-resident`: `ldg32`'s loads from a grid of 4 blocks an SM looping over the tiles (no block
  turnover);
- `read`: a grid-stride 16-byte read of the same buffers, the read ceiling.
If `ldg32` is as slow as the GEMV, the loads (their size, pattern or the one-step blocks) bound it
and a layout or grid change is the lever; if it streams near `read`, the arithmetic between the
loads does, and fewer instructions a weight is. Bench-only code: nothing in the engine uses it.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from engine.bench.common import BenchError, copy_bandwidth, cp_or_fail, n_buffers, time_calls
from engine.bench.wb import parse_shapes, random_pot_a8_layer
from engine.formats import pot_a8 as pa8_fmt
from engine.gpu import kernels, pot_a8
from engine.gpu import ops as ops_cuda

# appended to cuda/gemv_pot_a8.cu as the engine inlines it, so the probes load through the GEMV's
# own helpers (pa8_ldw, pa8_lds) and common.cuh's ldg_stream
_PROBES = r"""
__device__ __forceinline__ void finish(u32 acc, u32* out) {
    for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ u32 red[32];
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 a = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) a ^= red[w];
        out[blockIdx.x] = a;
    }
}
// a (tile, step)'s words and scales in the layout's order (formats/pot_a8.py)
#define PROBE_TILE_STEP (PA8_WORDS * PA8_TILE_ROWS * PA8_STEP)
#define PROBE_SCALES_STEP (PA8_TILE_ROWS * PA8_STEP * PA8_CHUNK / PA8_GROUP)
// one (tile, step) of a warp as gemv_pot3_a8<8, 4> loads it: words[t][st][j][r][lane], scales[t][st][r][lane/4]
__device__ __forceinline__ u32 step32(const u32* words, const unsigned short* scale, size_t ts, int lane) {
    const u32* w = words + ts * PROBE_TILE_STEP;
    const unsigned short* s = scale + ts * PROBE_SCALES_STEP;
    u32 v[PA8_WORDS * PA8_TILE_ROWS], sv[PA8_TILE_ROWS], acc = 0;
#pragma unroll
    for (int j = 0; j < PA8_WORDS; ++j)
#pragma unroll
        for (int r = 0; r < PA8_TILE_ROWS; ++r)
            v[j * PA8_TILE_ROWS + r] = pa8_ldw(w + (j * PA8_TILE_ROWS + r) * PA8_STEP + lane);
#pragma unroll
    for (int r = 0; r < PA8_TILE_ROWS; ++r) sv[r] = pa8_lds(s + r * (PROBE_SCALES_STEP / PA8_TILE_ROWS) + (lane >> 2));
#pragma unroll
    for (int i = 0; i < PA8_WORDS * PA8_TILE_ROWS; ++i) acc ^= v[i];
#pragma unroll
    for (int r = 0; r < PA8_TILE_ROWS; ++r) acc ^= sv[r];
    return acc;
}
extern "C" __global__ void __launch_bounds__(128) probe_ldg32(const u32* words, const unsigned short* scale, int S,
                                                              u32* out) {
    const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 acc = 0;
    for (int st = warp; st < S; st += 4) acc ^= step32(words, scale, (size_t)t * S + st, lane);
    finish(acc, out);
}
extern "C" __global__ void __launch_bounds__(128) probe_ldg32_resident(const u32* words, const unsigned short* scale,
                                                                       int S, int T, u32* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 acc = 0;
    for (int t = blockIdx.x; t < T; t += gridDim.x)
        for (int st = warp; st < S; st += 4) acc ^= step32(words, scale, (size_t)t * S + st, lane);
    finish(acc, out);
}
extern "C" __global__ void __launch_bounds__(128) probe_ldg128(const u32* words, const unsigned short* scale, int S,
                                                               u32* out) {
    const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 acc = 0;
    for (int st = warp; st < S; st += 4) {
        const size_t ts = (size_t)t * S + st;
        const u32x4* w = reinterpret_cast<const u32x4*>(words + ts * PROBE_TILE_STEP);
        constexpr int V = PROBE_TILE_STEP / 4 / 32;   // 16-byte loads a lane (6)
        u32x4 v[V];
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = ldg_stream(w + i * 32 + lane);
        const u32 sv = pa8_ldw(reinterpret_cast<const u32*>(scale + ts * PROBE_SCALES_STEP) + lane);   // 2 a word
#pragma unroll
        for (int i = 0; i < V; ++i) acc ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
        acc ^= sv;
    }
    finish(acc, out);
}
extern "C" __global__ void __launch_bounds__(256) probe_read(const u32x4* a, size_t na, const u32x4* b, size_t nb,
                                                             u32* out) {
    u32 acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < na; i += 4 * stride) {
        u32x4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = ldg_stream(a + i + u * stride);
#pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < na; i += stride) { const u32x4 v = ldg_stream(a + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < nb; j += stride) {
        const u32x4 v = ldg_stream(b + j);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    finish(acc, out);
}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x11008,4096x22016", help="K×N with K a multiple of 1024 (no tail)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    bad = [f"{k}x{n}" for k, n in shapes if k % 1024 or n % 8]
    if bad:
        print(f"w3_stream_probe: {', '.join(bad)}: K must be a multiple of 1024 and N of 8 (no tail, whole tiles)",
              file=sys.stderr)
        return 2
    try:
        cp = cp_or_fail()
    except BenchError as e:
        print(f"w3_stream_probe: {e}", file=sys.stderr)
        return 2
    mod = cp.RawModule(code=kernels.source("gemv_pot_a8.cu") + _PROBES,
                       options=("--std=c++17", f"--gpu-architecture={kernels.arch_flag()}"))
    f32, f32r, f128, fread = (mod.get_function(n) for n in ("probe_ldg32", "probe_ldg32_resident", "probe_ldg128",
                                                             "probe_read"))
    bw = copy_bandwidth()
    info = kernels.device_info()
    sms = info["sm_count"]
    print(f"device: {info['name']}, {sms} SMs, copy bandwidth {bw:.0f} GB/s (read + write)")
    rows = []
    for k, n in shapes:
        layers = [random_pot_a8_layer(cp, n, k)]
        layers += [random_pot_a8_layer(cp, n, k) for _ in range(n_buffers(layers[0].nbytes()) - 1)]
        dg = [ops_cuda.random_packed(n, k, 128, seed=1)]
        dg += [ops_cuda.random_packed(n, k, 128, seed=i) for i in range(2, n_buffers(dg[0].nbytes()) + 1)]
        t_tiles, s_steps = -(-n // 8), pa8_fmt.n_chunks(k) // 32
        x8 = cp.random.randint(-127, 128, (k,), dtype=cp.int32).astype(cp.int8)
        sx = cp.full((1,), 0.01, dtype=cp.float32)
        out = cp.empty((n,), dtype=cp.float16)
        sink = cp.empty((max(t_tiles, 65536),), dtype=cp.uint32)
        nbytes = layers[0].nbytes()
        (ws, _), (ss, _) = pa8_fmt.shapes(n, k)             # (T, S, 3, 8, 32) words, (T, S, 8, 8) scales
        assert layers[0].words.shape == ws == (t_tiles, s_steps, 3, 8, 32) and ss == (t_tiles, s_steps, 8, 8)

        def L(i):
            return layers[i % len(layers)]
        def step_args(i):                   # probe_ldg32's and probe_ldg128's arguments
            return L(i).words, L(i).scale, np.int32(s_steps), sink
        cases = {
            "gemv_pot3_a8 (8, 4)": lambda i: pot_a8.gemv_pot_a8(x8, sx, L(i), out, variant=(8, 4)),
            "gemv_pot3_a8 (4, 4)": lambda i: pot_a8.gemv_pot_a8(x8, sx, L(i), out, variant=(4, 4)),
            "ldg32": lambda i: f32((t_tiles,), (128,), step_args(i)),
            # the GEMV's residency (127 registers: 4 blocks an SM) and twice it, by unused dynamic
            # shared memory (228 KB an SM, 1 KB reserved a block); the probe alone fits 16
            "ldg32 at 4 blocks an SM": lambda i: f32((t_tiles,), (128,), step_args(i), shared_mem=47 << 10),
            "ldg32 at 8 blocks an SM": lambda i: f32((t_tiles,), (128,), step_args(i), shared_mem=26 << 10),
            "ldg32-resident": lambda i: f32r((4 * sms,), (128,), (L(i).words, L(i).scale, np.int32(s_steps),
                                                                  np.int32(t_tiles), sink)),
            "ldg128": lambda i: f128((t_tiles,), (128,), step_args(i)),
            "read": lambda i: fread((8 * sms,), (256,), (L(i).words, np.uint64(L(i).words.nbytes // 16), L(i).scale,
                                                         np.uint64(L(i).scale.nbytes // 16), sink)),
        }
        res = {name: (time_calls(fn, reps=args.reps), nbytes) for name, fn in cases.items()}
        x8d = x8.reshape(1, -1)
        outd = out.reshape(1, -1)
        res["a8w4 GEMV"] = (time_calls(lambda i: ops_cuda.gemm_a8w4(x8d, sx, dg[i % len(dg)], out=outd),
                                       reps=args.reps), dg[0].nbytes())
        for name, (ms, nb) in res.items():
            rows.append({"k": k, "n": n, "kernel": name, "us": 1e3 * ms, "mb": nb / 1e6, "gbs": nb / ms / 1e6,
                         "pct_copy_bw": 100 * nb / ms / 1e6 / bw})
    print("\n| K×N | kernel | µs | MB | GB/s | % copy BW |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']}×{r['n']} | {r['kernel']} | {r['us']:.2f} | {r['mb']:.1f} | {r['gbs']:.0f} | "
              f"{r['pct_copy_bw']:.0f} |")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
