"""Where a prefill of a random Llama-2-7B-shaped DGQ model spends its time, A8W4 against FP16.

    python bench/prefill_breakdown.py [--tokens 2048] [--model llama7b|smollm2] [--row-vec 8,1]
                                      [--act-per 0,32] [--patch bench/patches/FILE.json]
                                      [--paths a8w4,fp16,pot3a8]

Runs one warm prefill with every launch (row kernels, attention, linears, lm_head) bracketed
by CUDA events and sums the milliseconds by kind, then the same for the FP16 path (the
dequantized copy: cuBLAS linears). Events around each launch add a little time per launch,
so the totals sit slightly above an unprofiled prefill (printed too); at 2048 tokens every
kernel runs for tens of microseconds or more, so the split is what matters. --row-vec runs
both paths once per tuning.ROWS.vec value (the row kernels' access width), in one process;
--act-per likewise for tuning.ROWS.act_per (silu_mul_quant's values a thread on wide rows);
--patch adds both paths' rows again for each entry's edited kernels (kargs.patched, as
`python -m engine.bench e2e --patch`), in the same process. --paths pot3a8 adds a W3-PoT model
of INT8 tokens (act "dynamic": past WB_TUNE.pa8_gemv_max_m tokens its linears dequantize Ŵ to
fp16 and run cuBLAS, engine/gpu/pot_a8.py gemm_pot_a8), whose steps inside the linears (x8 to fp16,
the dequantization, cuBLAS, the row scales) are timed as kinds of their own too (within the
`linear` rows, not beside them).
"""
import argparse
import time
from collections import defaultdict

import numpy as np

from engine.gpu.backend import cupy_or_none
from engine.gpu import cublas, fused, kargs, linear, pot_a8, tuning
from engine.bench.common import warm_clocks
from engine.bench.e2e import (LLAMA2_7B, SMOLLM2, _patch_setting, dequantized_copy, model_kernel, random_model,
                              read_patches)
from engine.gpu.model import CudaModel


def profile(gm, tokens, cp) -> tuple[dict, float]:
    """({kind: (launches, ms)}, unprofiled prefill ms) for one prefill of `tokens`."""
    cache = gm.new_cache(len(tokens) + 8)
    def again():
        cache.lens_host[:] = 0
        gm.prefill(tokens, cache)
    warm_clocks(cp, again)                          # compiles, buffers, and the GPU's clocks up
    cache = gm.new_cache(len(tokens) + 8)
    t0 = time.perf_counter()
    gm.prefill(tokens, cache)
    cp.cuda.Device().synchronize()
    plain_ms = 1e3 * (time.perf_counter() - t0)
    times = defaultdict(list)

    def timed(name, fn):
        def run(*args, **kw):
            if name(*args) is None:                 # timed by an enclosing wrapper
                return fn(*args, **kw)
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            out = fn(*args, **kw)
            b.record()
            times[name(*args)].append((a, b))
            return out
        return run
    G = linear.GpuLinear
    orig = (G.__call__, fused.matmul_f16, cublas.gemm_f16)
    # the row and attention kernels by name; the GEMMs and GEMVs inside the linears are timed
    # by the linear's wrapper (and the pot3-a8 GEMM's steps by name, inside it: "(in linear)")
    inner = set(pot_a8.GEMM_EXPRS)
    kernel = timed(lambda expr, run: expr.split("<")[0] if model_kernel(expr) else
                   f"{expr} (in linear)" if expr in inner else None, lambda expr, run: run())
    G.__call__ = timed(lambda self, *r: f"linear N={self.n}", orig[0])
    # the FP16 linears call matmul_f16 too, inside GpuLinear.__call__: only the head is its own kind
    fused.matmul_f16 = timed(lambda cp_, x, w, out: "lm_head" if w is gm.lm_head else None, orig[1])
    if any(g.pa8 is not None for L in gm.layers for g in L.linears()):   # the pot3-a8 GEMM's cuBLAS call
        cublas.gemm_f16 = timed(lambda cp_, x, w, out: "cublas, fp32 out (in linear)" if out.dtype == np.float32
                                else None, orig[2])
    try:
        with kargs.intercepted(kernel):
            cache = gm.new_cache(len(tokens) + 8)
            gm.prefill(tokens, cache)
            cp.cuda.Device().synchronize()
    finally:
        G.__call__, fused.matmul_f16, cublas.gemm_f16 = orig
    out = {k: (len(v), sum(cp.cuda.get_elapsed_time(a, b) for a, b in v)) for k, v in times.items()}
    return out, plain_ms


def show(label, prof, plain_ms):
    total = sum(ms for k, (_, ms) in prof.items() if not k.endswith("(in linear)"))   # those: inside `linear`
    print(f"{label}: prefill {plain_ms:.2f} ms unprofiled; launches sum to {total:.2f} ms")
    for k, (n, ms) in sorted(prof.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:28s} {n:5d} launches {ms:8.3f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--model", choices=("llama7b", "smollm2"), default="llama7b")
    ap.add_argument("--row-vec", default=str(tuning.ROWS.vec),
                    help="comma-separated tuning.ROWS.vec values, each 8 or 1 (the instantiated ones)")
    ap.add_argument("--act-per", default=str(tuning.ROWS.act_per),
                    help="comma-separated tuning.ROWS.act_per values (0: the rule; 32)")
    ap.add_argument("--patch", default=None, help="a bench/patches JSON list: each entry's rows too")
    ap.add_argument("--paths", default="a8w4,fp16",
                    help="comma-separated of a8w4, fp16 (its dequantized copy) and pot3a8 (W3-PoT, INT8 tokens)")
    a = ap.parse_args()
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if not paths or not set(paths) <= {"a8w4", "fp16", "pot3a8"}:
        ap.error(f"--paths takes a8w4, fp16 and pot3a8, got {a.paths!r}")
    try:
        patches = read_patches(a.patch) if a.patch else []
    except ValueError as e:
        ap.error(str(e))
    cp = cupy_or_none()
    shape = LLAMA2_7B if a.model == "llama7b" else SMOLLM2
    mw = random_model(shape, True)
    tokens = np.random.default_rng(0).integers(0, mw.config.vocab_size, a.tokens)
    vecs = [int(v) for v in a.row_vec.split(",")]
    if not set(vecs) <= {1, 8}:
        ap.error(f"--row-vec takes 8 or 1, got {a.row_vec}")
    pers = [int(v) for v in a.act_per.split(",")]
    if not set(pers) <= {0, *tuning.ROW_VARIANTS.pers}:
        ap.error(f"--act-per takes 0 or an instantiated PER {tuning.ROW_VARIANTS.pers}, got {a.act_per}")
    builds = {"a8w4": ("A8W4", lambda: mw), "fp16": ("FP16", lambda: dequantized_copy(mw)),
              "pot3a8": ("W3-PoT x INT8", lambda: random_model(shape, 3, act="dynamic"))}
    for label, build in (builds[p] for p in paths):
        gm = CudaModel(build())
        for vec in vecs:
            for per in pers:
                tuning.ROWS.vec, tuning.ROWS.act_per = vec, per
                show(f"{label} ROW_VEC={vec} ACT_PER={per}", *profile(gm, tokens, cp))
                for name, edits, ab in patches:
                    with _patch_setting(edits, ab):
                        show(f"{label} ROW_VEC={vec} ACT_PER={per} patch {name}", *profile(gm, tokens, cp))
        del gm
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
