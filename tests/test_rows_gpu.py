"""The row kernels' arithmetic shortcuts (cuda/rows.cuh) against the forms they replace, on the GPU.

RowQuant (one reciprocal a row) must give quant1's codes (an IEEE division an element) for every
value and scale, the half-integer quotients where a rounding slip would show included; silu_mul
(approximate ex2 and rcp) must stay within a few ulps of g / (1 + __expf(-g)) · u for every fp16
gate value, with the same infinities and NaNs (and under 1e-30 where the division is).
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.gpu import backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not backend.has_gpu(), reason="needs an NVIDIA GPU and CuPy")]

PROBES = r'''
extern "C" __global__ void quant_probe(const float* x, const float* s, int n, int per, signed char* fast,
                                       signed char* ref, int* ok) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float sc = s[i / per];
    ok[i] = RowQuant::ok(sc);
    ref[i] = quant1(x[i], sc);
    fast[i] = RowQuant::ok(sc) ? RowQuant(sc)(x[i]) : quant1(x[i], sc);
}
extern "C" __global__ void silu_probe(const float* g, const float* u, int n, float* before, float* now) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    before[i] = __fdiv_rn(g[i], 1.f + __expf(-g[i])) * u[i];
    now[i] = silu_mul(g[i], u[i]);
}
'''


@pytest.fixture(scope="module")
def probes():
    import cupy as cp
    from engine.gpu import kernels
    mod = cp.RawModule(code=kernels.source("rows.cuh") + PROBES,
                       options=("--std=c++17", f"--gpu-architecture={kernels.arch_flag()}"))
    return cp, mod.get_function("quant_probe"), mod.get_function("silu_probe")


def _run(cp, fn, n, *args):
    fn((-(-n // 256),), (256,), args)


def test_row_quant_gives_quant1_codes(probes):
    cp, quant, _ = probes
    rng = np.random.default_rng(0)
    # scales over the whole float range (ok() keeps 2^±100), typical activation scales, and the edges
    scales = np.concatenate([2.0 ** rng.uniform(-126, 127, 96), rng.uniform(1e-4, 1.0, 96),
                             [2.0 ** -100, 2.0 ** 100, np.nextafter(np.float32(2.0 ** -100), np.float32(0)),
                              np.nextafter(np.float32(2.0 ** 100), np.float32(np.inf)), 1.0, 1 / 127, np.inf, np.nan,
                              np.float32(1e-40), 0.0]]).astype(np.float32)
    k = np.arange(-131, 131, dtype=np.float64) + 0.5
    rows = []
    for s in scales:
        with np.errstate(over="ignore"):
            half = (k * np.float64(s)).astype(np.float32)        # quotients at the half-integers ...
        near = np.concatenate([np.nextafter(half, np.float32(np.inf)), np.nextafter(half, np.float32(-np.inf)),
                               np.nextafter(np.nextafter(half, np.float32(np.inf)), np.float32(np.inf))])
        with np.errstate(over="ignore"):
            wide = (rng.uniform(-140, 140, 512) * np.float64(s)).astype(np.float32)  # ... beside them, past ±128 s
        # finite: a row holding a NaN or an Inf has a NaN scale (row_scale), which RowQuant::ok refuses
        special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 3e38, -3e38], np.float32)
        rows.append(np.concatenate([half, near, wide, special]).astype(np.float32))
    per = len(rows[0])
    x = np.concatenate(rows)
    n = x.size
    fast, ref = cp.full(n, 99, cp.int8), cp.full(n, 99, cp.int8)
    ok = cp.zeros(n, cp.int32)
    with np.errstate(all="ignore"):
        x = np.nan_to_num(x, posinf=3e38, neginf=-3e38)          # k · s past the float range
        _run(cp, quant, n, cp.asarray(x), cp.asarray(scales), np.int32(n), np.int32(per), fast, ref, ok)
    fast, ref, ok = fast.get(), ref.get(), ok.get()
    assert ok.sum() > n // 2                                     # the fast path was exercised
    bad = np.flatnonzero(fast != ref)
    assert bad.size == 0, [(float(x[i]), float(scales[i // per]), int(fast[i]), int(ref[i])) for i in bad[:8]]
    # and both are NumPy's float32 rule where the scale is ordinary
    typical = slice(96 * per, 192 * per)
    with np.errstate(all="ignore"):
        want = np.clip(np.rint(x[typical] / np.repeat(scales[96:192], per)), -127, 127)
    want = np.where(np.isnan(want), 0, want)
    np.testing.assert_array_equal(ref[typical], want.astype(np.int8))


def test_silu_mul_within_ulps_of_the_division(probes):
    cp, _, silu = probes
    g = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # every fp16
    rng = np.random.default_rng(1)
    for u in (np.ones_like(g), rng.standard_normal(g.size).astype(np.float32) * 4):
        before, now = cp.zeros(g.size, cp.float32), cp.zeros(g.size, cp.float32)
        _run(cp, silu, g.size, cp.asarray(g), cp.asarray(u), np.int32(g.size), before, now)
        b, w = before.get(), now.get()
        np.testing.assert_array_equal(np.isnan(b), np.isnan(w))
        inf = np.isinf(b)
        np.testing.assert_array_equal(b[inf], w[inf])
        # below 2^-126 the rcp flushes (g < -87.3: the division gave under 1e-37, 0 in fp16 or int8)
        tiny = np.abs(b) < 1e-30
        assert (np.abs(w[tiny]) < 1e-30).all()
        ok = np.isfinite(b) & ~tiny
        assert ok.sum() > 50000                                  # all but NaN, ±inf and the flushed tail
        np.testing.assert_array_equal(np.signbit(b[ok]), np.signbit(w[ok]))
        np.testing.assert_allclose(w[ok], b[ok], rtol=6e-7, atol=0)
