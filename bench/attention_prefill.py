"""Prefill attention alone: cuda/attention.cu attn_prefill vs the CuPy float32 path it replaced.

    python bench/attention_prefill.py            # Llama-2-7B shape (Hq = Hkv = 32, D = 128)

Causal FLOPs = 4·D·Hq·Σ_i (start + i + 1) (QKᵀ and PV, only the keys each query sees);
TFLOP/s are against the H100 SXM dense FP16 tensor-core datasheet peak (989 TFLOP/s;
mma.sync reaches about two thirds of it). One line of JSON per case.
"""
import argparse
import json

import numpy as np

from engine.bench.common import time_calls
from engine.gpu.backend import cupy_or_none
from engine.gpu.kernels import device_info
from engine.gpu.attention import attn_prefill, prefill_scale

PEAK_TFLOPS = 989.0


def cupy_f32_attention(cp, q, kc, vc, out, s, start, t):
    """The pre-kernel CudaModel._attend_prefill: float32 scores (Hkv, rep, T, S) through cuBLAS."""
    _, _, hkv, d = kc.shape
    hq = q.shape[1]
    rep, n = hq // hkv, start + t
    qq = q[:t].astype(cp.float32).reshape(t, hkv, rep, d).transpose(1, 2, 0, 3)   # (Hkv, rep, T, D)
    k = kc[s, :n].astype(cp.float32).transpose(1, 2, 0)                          # (Hkv, D, S)
    v = vc[s, :n].astype(cp.float32).transpose(1, 0, 2)                          # (Hkv, S, D)
    sc = cp.matmul(qq, k[:, None]) * np.float32(1.0 / np.sqrt(d))                # (Hkv, rep, T, S)
    future = cp.arange(n)[None, :] > (start + cp.arange(t))[:, None]              # (T, S)
    sc = cp.where(future, cp.float32(-cp.inf), sc)
    sc -= sc.max(axis=-1, keepdims=True)
    p = cp.exp(sc)
    p /= p.sum(axis=-1, keepdims=True)
    o = cp.matmul(p, v[:, None])                                                 # (Hkv, rep, T, D)
    out[:t] = o.transpose(2, 0, 1, 3).reshape(t, hq * d).astype(cp.float16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=32)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--t", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--no-old", action="store_true", help="skip the CuPy float32 path")
    a = ap.parse_args()
    cp = cupy_or_none()
    rng = np.random.default_rng(0)
    for t in a.t:
        n = a.start + t
        q = cp.asarray(rng.standard_normal((t, a.hq, a.d)), dtype=cp.float16)
        kc = cp.asarray(rng.standard_normal((1, n, a.hkv, a.d)), dtype=cp.float16)
        vc = cp.asarray(rng.standard_normal((1, n, a.hkv, a.d)), dtype=cp.float16)
        k8 = cp.asarray(rng.integers(-127, 128, (1, n, a.hkv, a.d)), dtype=cp.int8)
        sc = cp.full((1, n, a.hkv), 0.02, dtype=cp.float32)
        one = cp.ones((1,), cp.float32)
        out = cp.zeros((t, a.hq * a.d), cp.float16)
        ref = cp.zeros_like(out)
        flops = 4.0 * a.d * a.hq * sum(a.start + i + 1 for i in range(t))
        row = {"device": device_info()["name"], "hq": a.hq, "hkv": a.hkv, "d": a.d, "start": a.start, "t": t}

        def run(k, v, ks, vs):
            attn_prefill(q=q, kc=k, vc=v, ks=ks, vs=vs, out=out, t=t, start=a.start, Hq=a.hq, Hkv=a.hkv, cap=n,
                         seq=0, scale_log2=prefill_scale(a.d))
        ms = time_calls(lambda i: run(kc, vc, one, one), reps=30)
        row.update(kernel_ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                   pct_peak=round(100 * flops / ms / 1e9 / PEAK_TFLOPS, 1))
        ms8 = time_calls(lambda i: run(k8, k8, sc, sc), reps=30)
        row.update(kv8_ms=round(ms8, 4), kv8_tflops=round(flops / ms8 / 1e9, 1))
        if not a.no_old:
            old = time_calls(lambda i: cupy_f32_attention(cp, q, kc, vc, ref, 0, a.start, t), reps=10, warmup=2)
            run(kc, vc, one, one)
            err = float(cp.abs(out.astype(cp.float32) - ref.astype(cp.float32)).max())
            row.update(old_ms=round(old, 3), speedup=round(old / ms, 1), max_abs_diff_vs_old=err)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
