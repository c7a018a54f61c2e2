"""Where a graphed decode step of a random Llama-2-7B-shaped DGQ model spends its time.

    python bench/profile_decode.py [--model smollm2] [--batch 8] [--fp16] [--sweep-gemv] [--ablate] [--int8-head]
                                   [--gemv-tunes '1,2/1,3;1,2/1,2,16'] [--row-widths 2048,4096]

Prints the first-run cost (model build with the fused.cu compile, first prefill with the
GEMM compiles, first decode steps with the GEMV compiles and the graph capture; CuPy
caches compiled kernels on disk, so a second run shows the warm figures), the graphed
decode speed, and the per-launch breakdown of engine.bench.e2e.graph_breakdown (what
each launch costs inside a graph; no profiler needed: the device has ncu, no nsys). --ablate
times the step with each kind of launch left out, which is a kernel's cost in place on the
critical path; the A/B lines compare PDL, attn_decode's cluster merge, the SiLU GEMV with
quant_amax against silu_mul_quant and quant_rows (model_cuda.FOLD_QUANT) and GEMV settings.
"""
import argparse
import contextlib
import time

import numpy as np

from engine.gpu.backend import cupy_or_none
from engine.gpu import kernels, launch
from engine.gpu import model as model_cuda
from engine.gpu import ops as ops_cuda
from engine.bench.e2e import (LLAMA2_7B, SMOLLM2, dequantized_copy, format_breakdown, graph_breakdown,
                              graph_time, random_model)
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
                    "each 'RW,U/RW,U[,NW]': (RW, U) for shapes with many row tiles / few (ops_cuda.TUNE gemv, gemv_few, "
                    "gemv_few_nw: warps a block)")
    ap.add_argument("--ablate", action="store_true", help="time the step with each kind of launch left out: what it "
                    "costs on the critical path in place (the outputs are wrong; timing only)")
    ap.add_argument("--int8-head", action="store_true", help="also time the step with the INT8 lm_head "
                    "(ModelWeights.with_int8_lm_head, dgq-run --lm-head int8)")
    ap.add_argument("--row-widths", default="", help="comma-separated model_cuda.ROW_CTA_WIDTH values to time, for every row kernel "
                    "(a row wider than this is split over a cluster of CTAs)")
    a = ap.parse_args()
    cp = cupy_or_none()
    mw = random_model(LLAMA2_7B if a.model == "llama7b" else SMOLLM2, True)
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
    if gm._clusters and model_cuda.decode_cluster(2, a.batch * gm.config.num_attention_heads,
                                                  kernels.device_info()["sm_count"]):
        _variant(gm, mw, a, "attention merge through global memory", "decode_cluster", lambda *args: 0)
    _variant(gm, mw, a, f"row kernels with ROW_VEC_FEW = {not model_cuda.ROW_VEC_FEW}", "ROW_VEC_FEW",
             not model_cuda.ROW_VEC_FEW)
    if model_cuda.FOLD_QUANT and gm._fold_quant(a.batch):
        _variant(gm, mw, a, "quant_rows + silu_mul_quant (not folded)", "FOLD_QUANT", False)
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
        saved = (dict(ops_cuda.TUNE["gemv"]), dict(ops_cuda.TUNE["gemv_few"]), ops_cuda.TUNE["gemv_few_nw"])
        ops_cuda.TUNE["gemv"][1], ops_cuda.TUNE["gemv_few"][1] = many[:2], few[:2]
        ops_cuda.TUNE["gemv_few_nw"] = few[2] if len(few) > 2 else 8
        try:
            c5, f5 = _prefilled(gm, mw, a)
            print(f"A8W4 decode b={a.batch}, GEMV (RW, U[, NW]) many {many} few {few}: {_decode(gm, c5, f5, a)}")
            del c5
        finally:
            ops_cuda.TUNE["gemv"], ops_cuda.TUNE["gemv_few"], ops_cuda.TUNE["gemv_few_nw"] = saved
    print(format_breakdown(graph_breakdown(gm, cache)))
    for w in filter(None, a.row_widths.split(",")):
        saved, model_cuda.ROW_CTA_WIDTH = model_cuda.ROW_CTA_WIDTH, int(w)
        by_kernel, model_cuda.ROW_CTA_WIDTH_BY_KERNEL = model_cuda.ROW_CTA_WIDTH_BY_KERNEL, {}
        try:
            c3, f3 = _prefilled(gm, mw, a)
            print(f"A8W4 decode b={a.batch}, ROW_CTA_WIDTH {w}: {_decode(gm, c3, f3, a)}")
            del c3
        finally:
            model_cuda.ROW_CTA_WIDTH, model_cuda.ROW_CTA_WIDTH_BY_KERNEL = saved, by_kernel
    if a.sweep_gemv:
        sweep_gemv(gm, cp, a.batch)
    if a.fp16:
        del gm, cache
        cp.get_default_memory_pool().free_all_blocks()
        g16 = CudaModel(dequantized_copy(mw))
        c16, f16 = _prefilled(g16, mw, a)
        print(f"FP16 decode b={a.batch}, PDL {'on' if launch.pdl_enabled() else 'off'}: {_decode(g16, c16, f16, a)}")
        print(format_breakdown(graph_breakdown(g16, c16)))


def _variant(gm, mw, a, label: str, attr: str, value):
    """One decode line with model_cuda.<attr> set to value while its step is captured."""
    saved = getattr(model_cuda, attr)
    setattr(model_cuda, attr, value)
    try:
        cache, firsts = _prefilled(gm, mw, a)
        print(f"A8W4 decode b={a.batch}, {label}: {_decode(gm, cache, firsts, a)}")
    finally:
        setattr(model_cuda, attr, saved)


@contextlib.contextmanager
def _without(gm, kind: str):
    """Leave out every launch whose name contains `kind` (kernel expressions, 'N=<out features>'
    for the linears, 'lm_head', 'sample_rows') while decode steps are run and captured."""
    G = model_cuda.GpuLinear
    orig = (gm._launch, gm._attn, G.__call__, model_cuda.matmul_f16, model_cuda.ops_cuda.sample_rows,
            G.silu_gemv, model_cuda.matmul_w8)

    def skip(fn, name_of):
        def wrapped(*args, **kw):
            return None if kind in name_of(*args) else fn(*args, **kw)
        return wrapped
    gm._launch = skip(orig[0], lambda name, *r: name)
    gm._attn = skip(orig[1], lambda name, *r: name)
    model_cuda.GpuLinear.__call__ = skip(orig[2], lambda self, *r: f"N={self.n}")
    model_cuda.matmul_f16 = skip(orig[3], lambda cp, x, w, out: "lm_head" if w is gm.lm_head else "")
    model_cuda.ops_cuda.sample_rows = skip(orig[4], lambda *r: "sample_rows")
    G.silu_gemv = skip(orig[5], lambda self, *r: f"N={self.n}")
    model_cuda.matmul_w8 = skip(orig[6], lambda *r: "lm_head")
    try:
        yield
    finally:
        (gm._launch, gm._attn, G.__call__, model_cuda.matmul_f16, model_cuda.ops_cuda.sample_rows,
         G.silu_gemv, model_cuda.matmul_w8) = orig


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
        lins = [L[key].packed for L in gm.layers]
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
