"""Where a graphed decode step of a random Llama-2-7B-shaped DGQ model spends its time.

    python bench/profile_decode.py [--model smollm2] [--batch 8]

Prints the first-run cost (model build with the fused.cu compile, first prefill with the
GEMM compiles, first decode steps with the GEMV compiles and the graph capture; CuPy
caches compiled kernels on disk, so a second run shows the warm figures), the graphed
decode speed, and the per-launch breakdown of engine.bench_e2e.graph_breakdown (what
each launch costs inside a graph; no profiler needed: the device has ncu, no nsys).
"""
import argparse
import time

import numpy as np

from engine.backend import _cupy
from engine.bench_e2e import LLAMA2_7B, SMOLLM2, format_breakdown, graph_breakdown, graph_time, random_model
from engine.model_cuda import CudaModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("llama7b", "smollm2"), default="llama7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--sweep-gemv", action="store_true", help="time every GEMV config on each linear shape")
    a = ap.parse_args()
    cp = _cupy()
    mw = random_model(LLAMA2_7B if a.model == "llama7b" else SMOLLM2, True)
    t0 = time.perf_counter()
    gm = CudaModel(mw)
    cp.cuda.Device().synchronize()
    t1 = time.perf_counter()
    cache = gm.new_cache(a.ctx + 2 * a.steps + 4, batch=a.batch)
    rng = np.random.default_rng(0)
    firsts = [int(gm.prefill(rng.integers(0, mw.config.vocab_size, a.ctx), cache, seq=i)[0].argmax())
              for i in range(a.batch)]
    t2 = time.perf_counter()
    gm.decode_greedy(cache, firsts, 2)
    t3 = time.perf_counter()
    print(f"build {t1 - t0:.2f} s (pack + upload + fused.cu compile), first prefill {t2 - t1:.2f} s, "
          f"first 2 decode steps incl. capture {t3 - t2:.2f} s")
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    gm.decode_greedy(cache, firsts, a.steps)
    dt = time.perf_counter() - t0
    print(f"decode b={a.batch}: {a.steps * a.batch / dt:.0f} tok/s, {1e3 * dt / a.steps:.3f} ms/step")
    print(format_breakdown(graph_breakdown(gm, cache)))
    if a.sweep_gemv:
        sweep_gemv(gm, cp, a.batch)


def sweep_gemv(gm, cp, m):
    """Each linear shape, every layer's weights in turn, under each instantiated GEMV config."""
    from engine import ops_cuda
    mt = ops_cuda.gemv_mt(m)
    for key in ("qkv", "o", "gu", "down"):
        lins = [L[key].packed for L in gm.layers]
        x8 = cp.ones((m, lins[0].k_pad), cp.int8)
        sx = cp.ones((m,), cp.float32)
        out = cp.empty((m, lins[0].n), cp.float16)
        mb = sum(p.nbytes() for p in lins) / len(lins) / 1e6
        res = []
        for rw, u in ops_cuda.GEMV_CFGS[mt]:
            fns = [lambda p=p: ops_cuda.gemm_a8w4(x8, sx, p, kernel="gemv", cfg={"mt": mt, "rw": rw, "u": u},
                                                  out=out) for p in lins]
            us = graph_time(cp, fns)
            res.append(f"RW={rw} U={u}: {us:6.2f} us ({mb / us:.2f} TB/s)")
        print(f"gemv M={m} {key} N={lins[0].n} K={lins[0].k_pad} {mb:.1f} MB | " + " | ".join(res))


if __name__ == "__main__":
    main()
