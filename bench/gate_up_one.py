"""The batch-1 decode step's gate|up SiLU GEMV of a 7B-shaped layer alone: A8W4's against W3 × INT8's,
and their plain q|k|v-shaped GEMVs beside them, for timing and for Nsight Compute.

    python bench/gate_up_one.py [--inter 11008] [--k 4096] [--reps 50]
    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        -k regex:gemv -c 8 python bench/gate_up_one.py --reps 2

Why: in the graphed 7B step (session 39, H100), W3's gate|up streams its 35 MB at ~82 % of copy
bandwidth (14.37 µs) and A8W4's its 46 MB at ~91 % (17.05 µs), while both q|k|v GEMVs sit near
80 %. Two ways of feeding W3's GEMV, more blocks an SM and 16-byte loads, did not close that
(session 40, docs/KERNELS-HISTORY.md). The counters of the two SiLU kernels side by side (DRAM
throughput, L2 sectors a request, warp stalls, achieved occupancy) say where the rest goes.

Each kernel runs on its own copies of the weights, enough of them that a call never finds the
last call's in L2 (engine.bench.common.n_buffers). Without ncu this prints each kernel's median µs
over --reps calls (CUDA events, one call each, not graphed: a launch's fixed cost included) and the
weight bytes over that time.
"""
from __future__ import annotations

import argparse

from engine.bench.common import copy_bandwidth, cp_or_fail, n_buffers, time_calls
from engine.bench.wb import random_pot_a8_layer
from engine.gpu import ops as ops_cuda
from engine.gpu import pot_a8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inter", type=int, default=11008, help="intermediate size I (gate|up has 2I rows)")
    ap.add_argument("--k", type=int, default=4096, help="hidden size K")
    ap.add_argument("--qkv", type=int, default=12288, help="rows of the plain GEMV beside it (0: none)")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args(argv)
    if a.inter <= 0 or a.inter % 8 or a.k <= 0 or a.k % 128 or a.qkv < 0 or a.qkv % 16 or a.reps < 1:
        ap.error("--inter a positive multiple of 8, --k of 128, --qkv of 16 (or 0), --reps ≥ 1")
    cp = cp_or_fail()
    n, k = 2 * a.inter, a.k
    x8 = cp.random.randint(-127, 128, (1, k), dtype=cp.int32).astype(cp.int8)
    sx = cp.full((1,), 0.01, dtype=cp.float32)
    mf, amax = cp.zeros((1, a.inter), cp.float32), cp.zeros((1,), cp.uint32)
    dg = [ops_cuda.random_packed(n, k, 128, seed=1)]
    dg += [ops_cuda.random_packed(n, k, 128, seed=i) for i in range(2, n_buffers(dg[0].nbytes()) + 1)]
    pa = [random_pot_a8_layer(cp, n, k)]
    pa += [random_pot_a8_layer(cp, n, k) for _ in range(n_buffers(pa[0].nbytes()) - 1)]
    cases = {
        "A8W4 gate|up SiLU": (lambda i: ops_cuda.gemv_a8w4_silu(x8, sx, dg[i % len(dg)], mf, amax), dg[0].nbytes()),
        "W3 x INT8 gate|up SiLU": (lambda i: pot_a8.gemv_pot_a8_silu(x8.reshape(-1), sx, pa[i % len(pa)],
                                                                      mf.reshape(-1), amax), pa[0].nbytes()),
    }
    if a.qkv:
        dq = [ops_cuda.random_packed(a.qkv, k, 128, seed=100 + i) for i in range(n_buffers(dg[0].nbytes() * a.qkv // n))]
        pq = [random_pot_a8_layer(cp, a.qkv, k) for _ in range(n_buffers(pa[0].nbytes() * a.qkv // n))]
        out = cp.empty((1, a.qkv), cp.float16)
        cases["A8W4 plain"] = (lambda i: ops_cuda.gemm_a8w4(x8, sx, dq[i % len(dq)], out=out), dq[0].nbytes())
        cases["W3 x INT8 plain"] = (lambda i: pot_a8.gemv_pot_a8(x8.reshape(-1), sx, pq[i % len(pq)], out.reshape(-1)),
                                    pq[0].nbytes())
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write); gate|up {n}×{k}, plain {a.qkv}×{k}")
    for name, (fn, nbytes) in cases.items():
        ms = time_calls(fn, reps=a.reps)
        gbs = nbytes / (ms * 1e-3) / 1e9
        print(f"{name:24s} {1e3 * ms:8.2f} µs  {nbytes / 1e6:7.1f} MB  {gbs:6.0f} GB/s  {100 * gbs / bw:5.1f} % of copy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
