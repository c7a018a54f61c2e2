"""What every benchmark shares: event timing, the copy-bandwidth ceiling, L2-busting buffer counts.

Timing: CUDA events around every call, median of >= 50 calls
after warm-up. Before each timed batch a spin kernel holds the GPU for a few ms while the
host enqueues the whole batch, so Python launch overhead never shows up as GPU idle time
inside an event pair. Weight buffers rotate (several copies whose total exceeds the L2 size)
so decode shapes stream from HBM as they would in a model, not from L2.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..gpu import backend, kernels

_SPIN_SRC = r"""
extern "C" __global__ void empty() {}
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


class BenchError(ValueError):
    """The benchmark cannot run here (no GPU) or was given impossible options."""


def ints(text: str, flag: str, least: int = 1, sep: str = ",") -> tuple[int, ...]:
    """A command line's list of integers (comma-separated, or by sep), each at least `least`;
    BenchError naming the flag otherwise."""
    what = ("comma" if sep == "," else f"{sep!r}") + "-separated " + (
        "positive integers" if least == 1 else f"integers >= {least}")
    try:
        vals = tuple(int(v) for v in text.split(sep) if v.strip())
    except ValueError:
        raise BenchError(f"{flag}: {what}, got {text!r}") from None
    if not vals or min(vals) < least:
        raise BenchError(f"{flag}: {what}, got {text!r}")
    return vals


def cp_or_fail():
    cp = backend.cupy_or_none()
    if cp is None:
        raise BenchError("python -m engine.bench needs an NVIDIA GPU with CuPy")
    return cp


_SPIN = None


def _spin_module():
    global _SPIN
    if _SPIN is None:
        _SPIN = cp_or_fail().RawModule(code=_SPIN_SRC)
    return _SPIN


def _spin(ns: int):
    _spin_module().get_function("spin")((1,), (1,), (np.uint64(ns),))


def warm_clocks(cp, fn, seconds: float = 0.5) -> None:
    """Call fn until `seconds` of wall time have passed (at least once), synchronizing after each:
    an idle H200 sits at 345 MHz and takes tens of milliseconds of work to reach its 1980 MHz
    boost, so a prefill timed after one warm-up call ran up to 2× slow (24.45 against 12.5 ms, H200,
    commit 975675d)."""
    t0 = time.perf_counter()
    while True:
        fn()
        cp.cuda.Device().synchronize()
        if time.perf_counter() - t0 >= seconds:
            return


def launch_overhead_ms() -> float:
    """Median event-timed duration of an empty kernel: the floor under every row's time."""
    fn = _spin_module().get_function("empty")
    return time_calls(lambda i: fn((1,), (32,), ()), reps=50)


def time_calls(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median GPU milliseconds of fn(i) over `reps` calls, each between its own pair of events."""
    cp = cp_or_fail()
    dev = cp.cuda.Device()
    t0 = time.perf_counter()
    for i in range(warmup):
        fn(i)
    dev.synchronize()
    host_per_call = (time.perf_counter() - t0) / max(warmup, 1)
    starts = [cp.cuda.Event() for _ in range(reps)]
    ends = [cp.cuda.Event() for _ in range(reps)]
    _spin(int(min(0.3, max(0.002, 3 * host_per_call * reps)) * 1e9))
    for i in range(reps):
        starts[i].record()
        fn(warmup + i)
        ends[i].record()
    ends[-1].synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)]))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written."""
    cp = cp_or_fail()
    src = cp.ones((nbytes,), dtype=cp.uint8)
    dst = cp.empty_like(src)
    ms = time_calls(lambda i: cp.copyto(dst, src), reps=20, warmup=3)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def n_buffers(nbytes: int) -> int:
    l2 = kernels.device_info()["l2_bytes"]
    return int(min(16, max(2, math.ceil(3 * l2 / max(nbytes, 1)))))


VERDICT = {True: "meets", False: "short", None: "not timed"}     # a summary's target: met, missed, no peer


def geomean(values) -> float | None:
    """The geometric mean of positive numbers; None for none."""
    vals = [float(v) for v in values]
    if any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise ValueError(f"a geometric mean needs positive finite ratios, got {vals}")
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None
