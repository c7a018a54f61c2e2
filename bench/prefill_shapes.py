"""The linears of a Llama-2-7B prefill at M tokens: every wgmma configuration against cuBLAS FP16.

    python bench/prefill_shapes.py [--m 2048] [--reps 30]

One JSON row per (shape, kernel, configuration) with ms and TOP/s; the cuBLAS FP16 row of each
shape is the FP16 path's linear (cupy.matmul, fp16 out). Each layer's weights rotate through
enough copies that no call finds the previous call's weights in L2 (engine.bench._n_buffers).
The question it answers: which configuration the prefill bucket (tuning.GEMM.wgmma["large"])
should use at this M, and how far each of the four GEMMs of a layer is from cuBLAS FP16.
"""
import argparse
import json

from engine.gpu import ops as ops_cuda
from engine.gpu.backend import cupy_or_none
from engine.bench.common import n_buffers, time_calls
from engine.bench.gemm import gemm_case

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate|up": (4096, 22016), "down": (11008, 4096)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    cp = cupy_or_none()
    m = a.m
    for name, (k, n) in SHAPES.items():
        layers, x8, sx, y = gemm_case(m, k, n)
        nb = len(layers)
        flop = 2.0 * m * n * k
        for bt, st, nwg, wpf, ovl in ops_cuda.WGMMA_CFGS:
            if bt <= 64:                                # the decode-sized tiles
                continue
            cfg = {"bt": bt, "stages": st, "nwg": nwg, "wpf": wpf, "ovl": ovl, "splits": 1}
            ms = time_calls(lambda i: ops_cuda.gemm_a8w4(x8, sx, layers[i % nb], kernel="wgmma", cfg=cfg, out=y),
                            a.reps)
            print(json.dumps({"shape": name, "m": m, "k": k, "n": n, "kernel": "wgmma", "cfg": cfg, "ms": ms,
                              "tops": flop / (ms * 1e-3) / 1e12}), flush=True)
        ms = time_calls(lambda i: ops_cuda.gemm_a8w4(x8, sx, layers[i % nb], out=y), a.reps)
        print(json.dumps({"shape": name, "m": m, "k": k, "n": n, "kernel": "auto (tuning.GEMM)", "ms": ms,
                          "tops": flop / (ms * 1e-3) / 1e12}), flush=True)
        del layers
        nw = max(2, n_buffers(n * k * 2))
        ws = [cp.random.standard_normal((n, k), dtype=cp.float32).astype(cp.float16) for _ in range(nw)]
        xh = cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
        ms = time_calls(lambda i: cp.matmul(xh, ws[i % nw].T, out=y), a.reps)
        print(json.dumps({"shape": name, "m": m, "k": k, "n": n, "kernel": "cuBLAS FP16", "ms": ms,
                          "tops": flop / (ms * 1e-3) / 1e12}), flush=True)
        del ws
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
