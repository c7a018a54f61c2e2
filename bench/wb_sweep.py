"""What limits the weight-only GEMV (cuda/gemv_wb.cu) at M = 1: a profiling script.

Compiles variants of the source text (tiles in flight WB_U, warps a block WB_WARPS, blocks an SM,
and two ablations: no dequantization, no mma) and times gemv_pot<b, 1, 0> on LLM shapes against a
plain copy of the same bytes (x prefetched into registers, XS = 0).
Run on a GPU: python bench/wb_sweep.py [--json PATH].
"""
from __future__ import annotations

import argparse
import json
import re

import cupy as cp
import numpy as np

from engine.bench.common import copy_bandwidth, n_buffers, time_calls
from engine.formats import tiles
from engine.gpu import kernels

SHAPES = [(8192, 8192), (4096, 11008), (4096, 4096)]          # (K, N)

ABLATE = {
    "no-dequant": [("wb_step<KIND, BITS>(wg, sg, s, zg0, zg1, a[0], a[2]);", "a[0] = wg[s % BITS] ^ s; a[2] = wg[(s + 1) % BITS];"),
                   ("wb_step<KIND, BITS>(wh, sh, s, zh0, zh1, a[1], a[3]);", "a[1] = wh[s % BITS] ^ s; a[3] = wh[(s + 1) % BITS];")],
    "no-x": [("xb[s][j] = wb_x4(x, 8 * j + g, k0 + 16 * s + 4 * t, M, K, vec);", "xb[s][j] = make_uint2(k0 + s, j);")],
    "no-mma": [("            wb_mma(d[j], a, b.x, b.y);",
                "            d[j][0] += __uint_as_float((a[0] ^ a[1] ^ a[2] ^ a[3] ^ b.x ^ b.y) & 0x3fffffffu);")],
}


def variant(u: int, warps: int, min_blocks: int | None, ablate: str | None) -> str:
    src = kernels.source("gemv_wb.cu")
    src = re.sub(r"#define WB_U \d+", f"#define WB_U {u}", src)
    src = re.sub(r"#define WB_WARPS \d+", f"#define WB_WARPS {warps}", src)
    if min_blocks is not None:
        src = src.replace("__launch_bounds__(WB_THREADS, NT == 1 ? 2 : 1)", f"__launch_bounds__(WB_THREADS, {min_blocks})")
    for old, new in ABLATE.get(ablate, ()):
        assert old in src, old
        src = src.replace(old, new)
    return src


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    bw = copy_bandwidth()
    configs = [(4, 8, None, None), (2, 8, None, None), (8, 8, 1, None), (4, 4, None, None), (4, 16, 1, None),
               (2, 16, 1, None), (4, 8, 1, None), (4, 8, None, "no-dequant"), (4, 8, None, "no-mma"),
               (4, 8, None, "no-x")]
    rows = []
    for k, n in SHAPES:
        nt, kt = tiles.tile_dims(n, k)
        for bits in (3, 2, 4):
            words = nt * kt * tiles.tile_words(bits)
            nbytes = 4 * words + 4 * nt * kt * 8
            bufs = [(cp.random.random(words) * 2.0**32).astype(cp.uint32) for _ in range(n_buffers(nbytes))]
            scale = cp.full(nt * kt * 8, 0x2C002C00, dtype=cp.uint32)
            x = cp.asarray(np.random.default_rng(0).standard_normal((1, k)), dtype=cp.float16)
            out = cp.empty((1, n), dtype=cp.float16)
            src = cp.empty(nbytes // 4, cp.uint32)
            dst = cp.empty_like(src)
            t_copy = time_calls(lambda i: dst.__setitem__(Ellipsis, src), reps=30)
            for cfg in configs if bits == 3 else configs[:1]:
                u, warps, mb, abl = cfg
                expr = f"gemv_pot<{bits}, 1, 0>"
                mod = cp.RawModule(code=variant(u, warps, mb, abl), options=("--std=c++17", f"--gpu-architecture={kernels.arch_flag()}"),
                                   name_expressions=[expr])
                fn = mod.get_function(expr)
                # M, N, K, KT, gpt, vec
                a = (np.int32(1), np.int32(n), np.int32(k), np.int32(kt), np.int32(1), np.int32(1))
                ms = time_calls(lambda i: fn((nt,), (32 * warps,), (x, bufs[i % len(bufs)], scale, out) + a), reps=30)
                row = dict(k=k, n=n, bits=bits, u=u, warps=warps, min_blocks=mb, ablate=abl, us=ms * 1e3,
                           pct_bw=100 * nbytes / (ms * 1e-3) / 1e9 / bw, copy_us=t_copy * 1e3, regs=fn.num_regs)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
