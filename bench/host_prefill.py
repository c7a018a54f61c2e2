"""The host's Python for a whole prefill, measured without a GPU.

    python bench/host_prefill.py [--tokens 512] [--reps 20] [--model smollm2|llama7b] [--profile]

A prefill run eagerly (a prompt seen once: tuning.PREFILL's graphs only serve repeats) issues
~10 launches a layer, and at 512 tokens of a 7B model the host takes about as long to issue them
as the GPU to run them (docs/KERNELS.md). This runs CudaModel.prefill with a fake CuPy (NumPy
arrays with CuPy's .data.ptr, modules and kernels that do nothing; bench/host_gemm.py's fakes plus
what the model itself touches) and times the engine's own Python: every launcher, the GEMM plans,
the row and attention launchers, the packed parameter buffers (launch.Kernel.launch_bound). What it
cannot see: the driver's launch call of each kernel and that CPU's speed. The host's time is
per launch, not per FLOP, so the SmolLM2 shape (30 layers) stands for the 7B one (32).
`--profile` prints the functions that take the time.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import sys
import time
from types import SimpleNamespace

import numpy as np

import host_gemm
from engine.bench.e2e import LLAMA2_7B, SMOLLM2, random_model
from engine.gpu import backend, kargs, kernels, tuning


class FakeArray(np.ndarray):
    """A NumPy array with the CuPy attributes the engine reads (.data.ptr, get, set). The pointer
    is read when the array (or view) is made, as CuPy's ndarray holds its MemoryPointer: reading
    .data.ptr then costs about what CuPy's does, not NumPy's ~1 µs array-interface lookup."""

    def __array_finalize__(self, obj):
        self._data = SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def data(self):
        return self._data

    def get(self):
        return np.asarray(self)

    def set(self, a):
        self[...] = a


def _fake(f):
    return lambda *a, **k: np.asarray(f(*a, **k)).view(FakeArray)


class _Module:
    def __init__(self, *a, **k):
        pass

    def get_function(self, name):
        return host_gemm._Kernel()


def fake_cupy():
    """host_gemm.fake_cupy() with what CudaModel and its launchers touch besides the GEMM."""
    cp = host_gemm.fake_cupy()
    dev = SimpleNamespace(id=0, synchronize=lambda: None, compute_capability="90")
    stream = SimpleNamespace(ptr=0, synchronize=lambda: None)
    cp.cuda = SimpleNamespace(Device=lambda *a: dev, get_current_stream=lambda: stream)
    for name in ("uint8", "uint16", "uint64", "int64", "float64"):
        setattr(cp, name, getattr(np, name))
    for name in ("asarray", "arange", "full", "ones", "zeros", "empty", "isfinite", "ascontiguousarray"):
        setattr(cp, name, _fake(getattr(np, name)))
    cp.ndarray, cp.RawModule, cp.asnumpy = FakeArray, _Module, np.asarray
    cp.get_default_memory_pool = lambda: SimpleNamespace(free_all_blocks=lambda: None)
    return cp


@contextlib.contextmanager
def faked():
    """host_gemm.faked() with fake_cupy() as the backend, modules that compile nothing, eager
    prefills and no logits check (it would read the fake logits); all undone after."""
    from engine.gpu import cublas, fused, launch, wb   # noqa: PLC0415
    from engine.gpu import model as model_mod   # noqa: PLC0415
    with host_gemm.faked():
        cp = fake_cupy()
        hooks = tuple((mod, "cupy_or_none", lambda: cp) for mod in (backend, fused, launch, cublas))
        hooks += ((model_mod, "require_cupy", lambda: cp), (wb, "require_cupy", lambda: cp),
                  (kernels, "module", lambda *a, **k: None), (tuning.PREFILL, "graphs", 0),
                  (model_mod, "check_finite_logits", lambda cp_, logits, what: logits),
                  (cublas, "_LIB", [None]))     # no real cuBLAS on fake arrays, and its cached answer kept
        with host_gemm.hooked(hooks):
            yield cp


def host_ms(model: str, tokens: int, reps: int, profile: bool = False) -> tuple[float, int]:
    """(ms of host time a prefill of `tokens`, launches a prefill), after one warm prefill."""
    mw = random_model(LLAMA2_7B if model == "llama7b" else SMOLLM2, True)
    launches = [0]

    def count(expr, run):
        launches[0] += 1
        return run()
    with faked():
        from engine.gpu.model import CudaModel   # noqa: PLC0415
        gm = CudaModel(mw)
        cache = gm.new_cache(tokens + 8)
        toks = np.random.default_rng(0).integers(0, mw.config.vocab_size, tokens)

        def run():
            cache.lens_host[:] = 0
            gm.prefill(toks, cache)
        with kargs.intercepted(count):
            run()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        ms = 1e3 * (time.perf_counter() - t0) / reps
        if profile:
            prof = cProfile.Profile()
            prof.runcall(run)
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)
    return ms, launches[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--model", choices=("smollm2", "llama7b"), default="smollm2")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    ms, n = host_ms(a.model, a.tokens, a.reps, a.profile)
    print(f"{a.model} A8W4 eager prefill of {a.tokens} tokens: {ms:.2f} ms of the engine's Python on this CPU, "
          f"{n} launches ({1e3 * ms / n:.1f} µs each, before the driver's launch call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
