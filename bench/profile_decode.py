"""Where a graphed decode step of a random Llama-2-7B-shaped DGQ model spends its time.

    python bench/profile_decode.py [--model smollm2] [--batch 8] [--fp16] [--sweep-gemv] [--ablate] [--int8-head]
                                   [--gemv-tunes '1,2/1,3;1,2/1,2,16'] [--row-widths 2048,4096]
    python bench/profile_decode.py --context 128,1024,2048,4096,8192 [--batch 1] [--attn heads,gqa]

Prints the first-run cost (model build with the fused.cu compile, first prefill with the
GEMM compiles, first decode steps with the GEMV compiles and the graph capture; CuPy
caches compiled kernels on disk, so a second run shows the warm figures), the graphed
decode speed, and the per-launch breakdown of engine.bench.e2e.graph_breakdown (what
each launch costs inside a graph; no profiler needed: the device has ncu, no nsys). --ablate
times the step with each kind of launch left out, which is a kernel's cost in place on the
critical path; the A/B lines compare PDL, attn_decode's cluster merge, the SiLU GEMV with
quant_amax against silu_mul_quant and quant_rows (tuning.DECODE.fold_quant) and GEMV settings.
--context times the step at each context instead (fp16 and INT8 KV, engine.bench.e2e.context_row:
the bytes a step reads and the % of copy bandwidth, the attention launch alone against its K/V).
"""
import argparse
import contextlib
import dataclasses
import time

import numpy as np

from engine.gpu.backend import cupy_or_none
from engine.gpu import attention, fused, kargs, kernels, launch, linear, tuning
from engine.gpu import ops as ops_cuda
from engine.bench.common import copy_bandwidth
from engine.bench.e2e import (LLAMA2_7B, SMOLLM2, context_row, dequantized_copy, format_breakdown, graph_breakdown,
                              graph_time, model_kernel, random_model)
from engine.gpu.model import CudaModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("llama7b", "smollm2"), default="llama7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--fp16", action="store_true", help="also time the FP16 path (dequantized copy)")
    ap.add_argument("--sweep-gemv", action="store_true", help="time every GEMV config on each linear shape")
    ap.add_argument("--gemv-tunes", default="", help="';'-separated GEMV settings to time on the whole step, "
                    "each 'RW,U/RW,U[,NW]': (RW, U) for shapes with many row tiles / few (tuning.GEMM gemv, gemv_few, "
                    "gemv_few_nw: warps a block)")
    ap.add_argument("--ablate", action="store_true", help="time the step with each kind of launch left out: what it "
                    "costs on the critical path in place (the outputs are wrong; timing only)")
    ap.add_argument("--int8-head", action="store_true", help="also time the step with the INT8 lm_head "
                    "(ModelWeights.with_int8_lm_head, dgq-run --lm-head int8)")
    ap.add_argument("--row-widths", default="", help="comma-separated tuning.ROWS.cta_width values to time, for every row kernel "
                    "(a row wider than this is split over a cluster of CTAs)")
    ap.add_argument("--context", default="", help="comma-separated contexts (e.g. 128,1024,2048,4096,8192): decode "
                    "tok/s, bytes a step reads and %% of copy bandwidth at each, fp16 and INT8 KV, then exit")
    ap.add_argument("--attn", default="", help="with --context: the decode attention kernels to time, e.g. heads,gqa "
                    "(default: the engine's, DGQ_ATTN_DECODE)")
    a = ap.parse_args()
    cp = cupy_or_none()
    config = LLAMA2_7B if a.model == "llama7b" else SMOLLM2
    if a.context:
        contexts = [int(v) for v in a.context.split(",") if v.strip()]
        config = dataclasses.replace(config, max_position_embeddings=max(config.max_position_embeddings,
                                                                         max(contexts) + a.steps + 3))
        gm = CudaModel(random_model(config, True))
        bw, rng = copy_bandwidth() * 1e9, np.random.default_rng(0)
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
        saved = attention.DECODE_KERNEL
        try:
            for kernel in [k.strip() for k in a.attn.split(",") if k.strip()] or [saved]:
                attention.DECODE_KERNEL = kernel
                for ctx in contexts:
                    for kv8 in (False, True):
                        r = context_row(cp, gm, a.model, ctx, a.batch, kv8, a.steps, bw, rng)
                        if "skipped" in r:
                            print(f"{kernel} ctx {ctx} b={a.batch} {r['kv']} KV: skipped, {r['skipped']}")
                            continue
                        print(f"{kernel} ctx {ctx} b={a.batch} {r['kv']} KV: {r['tok_s']:.0f} tok/s, "
                              f"{r['step_ms']:.3f} ms/step, {r['bytes_per_step'] / 1e6:.0f} MB a step "
                              f"({r['kv_mb']:.0f} K/V), {r['pct_copy_bw']:.0f} % of copy BW "
                              f"(roofline {r['roof_tok_s']:.0f} tok/s); attention "
                              f"{r.get('attn_us', float('nan')):.1f} us/layer, "
                              f"{r.get('attn_pct_copy_bw', float('nan')):.0f} % of copy BW")
        finally:
            attention.DECODE_KERNEL = saved
        return
    mw = random_model(config, True)
    t0 = time.perf_counter()
    gm = CudaModel(mw)
    cp.cuda.Device().synchronize()
    t1 = time.perf_counter()
    cache, firsts = _prefilled(gm, mw, a)
    t2 = time.perf_counter()
    gm.decode_greedy(cache, firsts, 2)
    t3 = time.perf_counter()
    print(f"build {t1 - t0:.2f} s (pack + upload + fused.cu compile), first prefill {t2 - t1:.2f} s, "
          f"first 2 decode steps incl. capture {t3 - t2:.2f} s")
    print(f"A8W4 decode b={a.batch}, PDL {'on' if launch.pdl_enabled() else 'off'}: {_decode(gm, cache, firsts, a)}")
    if launch.pdl_enabled():
        with launch.plain_launches():
            c2, f2 = _prefilled(gm, mw, a)
            print(f"A8W4 decode b={a.batch}, PDL off: {_decode(gm, c2, f2, a)}")
        del c2
    if gm._clusters and attention.decode_cluster(2, a.batch * gm.config.num_attention_heads,
                                                 kernels.device_info()["sm_count"]):
        _variant(gm, mw, a, "attention merge through global memory", attention, "decode_cluster", lambda *args: 0)
    if tuning.DECODE.fold_quant and gm._fold_quant(a.batch):
        _variant(gm, mw, a, "quant_rows + silu_mul_quant (not folded)", tuning.DECODE, "fold_quant", False)
    if a.int8_head:
        g8 = CudaModel(mw.with_int8_lm_head())
        c9, f9 = _prefilled(g8, mw, a)
        print(f"A8W4 decode b={a.batch}, INT8 lm_head: {_decode(g8, c9, f9, a)}")
        del g8, c9
        cp.get_default_memory_pool().free_all_blocks()
    if a.ablate:
        base = _decode(gm, *_prefilled(gm, mw, a), a)
        print(f"A8W4 decode b={a.batch}, everything: {base}")
        for kind in ("attn_decode", "add_rmsnorm_quant", "quant_rows", "silu_mul_quant", "quant_amax", "N=22016", "N=12288",
                     "N=4096", "lm_head", "sample_rows"):
            with _without(gm, kind):
                print(f"A8W4 decode b={a.batch}, without {kind}: {_decode(gm, *_prefilled(gm, mw, a), a)}")
    for tune in filter(None, a.gemv_tunes.split(";")):
        many, few = (tuple(int(v) for v in part.split(",")) for part in tune.split("/"))
        g = tuning.GEMM
        saved = (dict(g.gemv), dict(g.gemv_few), g.gemv_few_nw)
        g.gemv[1], g.gemv_few[1] = tuning.GemvCfg(*many[:2]), tuning.GemvCfg(*few[:2])
        g.gemv_few_nw = few[2] if len(few) > 2 else 8
        try:
            c5, f5 = _prefilled(gm, mw, a)
            print(f"A8W4 decode b={a.batch}, GEMV (RW, U[, NW]) many {many} few {few}: {_decode(gm, c5, f5, a)}")
            del c5
        finally:
            g.gemv, g.gemv_few, g.gemv_few_nw = saved
    print(format_breakdown(graph_breakdown(gm, cache)))
    for w in filter(None, a.row_widths.split(",")):
        rows = tuning.ROWS
        saved, rows.cta_width = rows.cta_width, int(w)
        by_kernel, rows.cta_width_by_kernel = rows.cta_width_by_kernel, {}
        try:
            c3, f3 = _prefilled(gm, mw, a)
            print(f"A8W4 decode b={a.batch}, ROW_CTA_WIDTH {w}: {_decode(gm, c3, f3, a)}")
            del c3
        finally:
            rows.cta_width, rows.cta_width_by_kernel = saved, by_kernel
    if a.sweep_gemv:
        sweep_gemv(gm, cp, a.batch)
    if a.fp16:
        del gm, cache
        cp.get_default_memory_pool().free_all_blocks()
        g16 = CudaModel(dequantized_copy(mw))
        c16, f16 = _prefilled(g16, mw, a)
        print(f"FP16 decode b={a.batch}, PDL {'on' if launch.pdl_enabled() else 'off'}: {_decode(g16, c16, f16, a)}")
        print(format_breakdown(graph_breakdown(g16, c16)))


def _variant(gm, mw, a, label: str, owner, attr: str, value):
    """One decode line with owner.<attr> (a module or a tuning record) set to value while its
    step is captured."""
    saved = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        cache, firsts = _prefilled(gm, mw, a)
        print(f"A8W4 decode b={a.batch}, {label}: {_decode(gm, cache, firsts, a)}")
    finally:
        setattr(owner, attr, saved)


@contextlib.contextmanager
def _without(gm, kind: str):
    """Leave out every launch whose name contains `kind` (kernel expressions, 'N=<out features>'
    for the linears, 'lm_head', 'sample_rows') while decode steps are run and captured."""
    G = linear.GpuLinear
    orig = (G.__call__, fused.matmul_f16, ops_cuda.sample_rows, G.silu_gemv, fused.matmul_w8)

    def skip(fn, name_of):
        def wrapped(*args, **kw):
            return None if kind in name_of(*args) else fn(*args, **kw)
        return wrapped
    # the row and attention kernels by expression (the GEMMs inside the linears go by N=)
    kernel = skip(lambda expr, run: run(), lambda expr, run: expr if model_kernel(expr) else "")
    G.__call__ = skip(orig[0], lambda self, *r: f"N={self.n}")
    fused.matmul_f16 = skip(orig[1], lambda cp, x, w, out: "lm_head" if w is gm.lm_head else "")
    ops_cuda.sample_rows = skip(orig[2], lambda *r: "sample_rows")
    G.silu_gemv = skip(orig[3], lambda self, *r: f"N={self.n}")
    fused.matmul_w8 = skip(orig[4], lambda *r: "lm_head")
    try:
        with kargs.intercepted(kernel):
            yield
    finally:
        G.__call__, fused.matmul_f16, ops_cuda.sample_rows, G.silu_gemv, fused.matmul_w8 = orig


def _prefilled(gm, mw, a):
    cache = gm.new_cache(a.ctx + 2 * a.steps + 4, batch=a.batch)
    rng = np.random.default_rng(0)
    firsts = [int(gm.prefill(rng.integers(0, mw.config.vocab_size, a.ctx), cache, seq=i)[0].argmax())
              for i in range(a.batch)]
    return cache, firsts


def _decode(gm, cache, firsts, a) -> str:
    """Graphed decode speed (warm-up steps first: compile and capture)."""
    cp = gm.cp
    gm.decode_greedy(cache, firsts, 2)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    gm.decode_greedy(cache, firsts, a.steps)
    dt = time.perf_counter() - t0
    return f"{a.steps * a.batch / dt:.0f} tok/s, {1e3 * dt / a.steps:.3f} ms/step"


def sweep_gemv(gm, cp, m):
    """Each linear shape, every layer's weights in turn, under each instantiated GEMV config."""
    from engine.gpu import ops as ops_cuda
    mt = ops_cuda.gemv_mt(m)
    for key in ("qkv", "o", "gu", "down"):
        lins = [getattr(L, key).packed for L in gm.layers]
        x8 = cp.ones((m, lins[0].k_pad), cp.int8)
        sx = cp.ones((m,), cp.float32)
        out = cp.empty((m, lins[0].n), cp.float16)
        mb = sum(p.nbytes() for p in lins) / len(lins) / 1e6
        res = []
        cfgs = [(rw, u, 8) for rw, u in ops_cuda.GEMV_CFGS[mt]] + [(rw, u, 16) for rw, u in
                                                                   ops_cuda.GEMV_WIDE.get(mt, ())]
        for rw, u, nw in cfgs:
            cfg = {"mt": mt, "rw": rw, "u": u, "nw": nw}
            fns = [lambda p=p, cfg=cfg: ops_cuda.gemm_a8w4(x8, sx, p, kernel="gemv", cfg=cfg, out=out) for p in lins]
            us = graph_time(cp, fns)
            res.append(f"RW={rw} U={u} NW={nw}: {us:6.2f} us ({mb / us:.2f} TB/s)")
        print(f"gemv M={m} {key} N={lins[0].n} K={lins[0].k_pad} {mb:.1f} MB | " + " | ".join(res))


if __name__ == "__main__":
    main()
