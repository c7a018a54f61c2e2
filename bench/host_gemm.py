"""The host's cost of launching A8W4 GEMMs, measured without a GPU.

    python bench/host_gemm.py [--m 512,2048] [--calls 3000] [--profile]

A 512-token prefill of the 7B shape is bound by the host (bench/results/2026-12-04-gemm-tail-h200.md):
its 322 launches take about as long to issue as to run. This times the Python that
ops.gemm_a8w4 runs for one launch (validation, the kernel choice, the tile, split and tail
arithmetic, the argument tuple) with a fake CuPy whose arrays are NumPy arrays and whose kernels
do nothing, on the 7B prefill's four linears (q|k|v, o, gate|up, down) under the learned policy
of the H200 model, as on the device. What it cannot see: CuPy's own launch (~11-22 µs a kernel
on the H200's host, bench/pdl_probe.py) and the CPU's speed there. The `planned` rows make the
calls inside ops.plan_scope, as a prefill's pass does (the launch worked out once a shape).
`--profile` prints the functions that take the time.
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import pstats
import sys
import time
from types import SimpleNamespace

import numpy as np

from engine.gpu import backend, choice, kargs, kernels, launch, ops

H200 = {"name": "NVIDIA H200", "cc": 90, "sm_count": 132, "l2_bytes": 62914560, "smem_optin": 232448}
LINEARS_7B = {"q|k|v": (12288, 4096), "o": (4096, 4096), "gate|up": (22016, 4096), "down": (4096, 11008)}


class _Kernel:
    """A compiled kernel that does nothing when launched."""
    shared_size_bytes = 0
    max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0, cluster=None):
        return None

    def launch_bound(self, grid, block, bound, args, shared_mem=0, cluster=None):
        """launch.Kernel.launch_bound's Python without the driver call: the packed buffer (arrays
        with a .data.ptr, as host_prefill's), else the NumPy-scalar tuple CuPy would take."""
        try:
            bound.layout.pack(bound.values(args))
        except AttributeError:
            self(grid, block, bound.build(args), shared_mem=shared_mem, cluster=cluster)


def fake_cupy():
    """A stand-in for the parts of CuPy that ops.gemm_a8w4 touches: NumPy arrays on one device."""
    cuda = SimpleNamespace(Device=lambda *a: SimpleNamespace(id=0))
    return SimpleNamespace(ndarray=np.ndarray, cuda=cuda, empty=np.empty, zeros=np.zeros, int8=np.int8,
                           int32=np.int32, float16=np.float16, float32=np.float32, uint32=np.uint32)


# the caches that would keep a fake past the block: launches (the kernel), workspaces (NumPy
# arrays), kernels given more shared memory, and the learned policy's picks
CACHES = ((kargs, "_LAUNCHES"), (ops, "_WS"), (ops, "_SMEM_SET"), (choice.STATE, "memo"))


@contextlib.contextmanager
def hooked(hooks):
    """Within the block each (obj, name, value) of hooks is set; after it, as before."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in hooks]
    try:
        for obj, name, value in hooks:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


@contextlib.contextmanager
def faked():
    """Within the block, gpu/ sees fake_cupy() and kernels that do nothing; after it, every hook
    and cache is as before (a GPU test run in the same process must not meet the fakes)."""
    cp, kern = fake_cupy(), _Kernel()
    hooks = ((backend, "cupy_or_none", lambda: cp), (kernels, "function", lambda name, expr, exprs: kern),
             (launch, "clusters_available", lambda: False),          # launch.py holds its own cupy_or_none
             (kernels, "device_info", lambda: H200), (choice.STATE, "policy", None), (choice.STATE, "model", None))
    hooks += tuple((obj, name, {}) for obj, name in CACHES)
    with hooked(hooks):
        yield cp


def layer_of(n: int, k: int, group: int = 128) -> ops.PackedA8W4:
    """A PackedA8W4 of the right shapes (zeros): the host path reads only its sizes."""
    n_pad, k_pad = ops.padded_dims(n, k, group)
    R, C, g_pad = n_pad // ops.TILE_N, k_pad // ops.CHUNK_K, k_pad // group
    return ops.PackedA8W4(n, k, group, n_pad, k_pad, np.zeros((R, C, 32, 4), np.uint32),
                          np.zeros((R, g_pad, 8), np.uint32), np.zeros(n_pad, np.float32))


def time_calls(m: int, calls: int, planned: bool = False) -> dict[str, float]:
    """µs of host time per gemm_a8w4 call, for each 7B linear at M rows (after one warm call);
    planned: inside ops.plan_scope, as a prefill's pass makes them (the warm call plans)."""
    res = {}
    scope = ops.plan_scope() if planned else contextlib.nullcontext()
    with scope:
        _time_each(m, calls, res)
    return res


def _time_each(m: int, calls: int, res: dict):
    for name, (n, k) in LINEARS_7B.items():
        layer = layer_of(n, k)
        x8, sx, out = np.zeros((m, layer.k_pad), np.int8), np.ones(m, np.float32), np.empty((m, n), np.float16)
        ops.gemm_a8w4(x8, sx, layer, out=out)
        t0 = time.perf_counter()
        for _ in range(calls):
            ops.gemm_a8w4(x8, sx, layer, out=out)
        res[name] = (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="512,2048", help="comma-separated token counts")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--profile", action="store_true", help="cProfile the calls of the first M (unplanned)")
    a = ap.parse_args(argv)
    ms = [int(v) for v in a.m.split(",")]
    with faked():
        print(f"policy {choice.resolve()}; µs of host time a call (no CuPy launch), this CPU")
        print("| M | " + " | ".join(LINEARS_7B) + " | mean |")
        print("|---:|" + "---:|" * (len(LINEARS_7B) + 1))
        for m in ms:
            for planned in (False, True):
                r = time_calls(m, a.calls, planned)
                print(f"| {m}{' planned' if planned else ''} | " + " | ".join(f"{v:.1f}" for v in r.values())
                      + f" | {np.mean(list(r.values())):.1f} |")
        if a.profile:
            prof = cProfile.Profile()
            prof.runcall(time_calls, ms[0], a.calls)
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
