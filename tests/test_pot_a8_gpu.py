"""cuda/gemv_pot_a8.cu (W3-PoT × INT8 dp4a GEMV, M = 1) against formats/pot_a8.py's reference, bit for bit (gpu-marked).

Not yet run on a GPU (written without one).
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.formats import pot_a8 as P
from engine.gpu.backend import has_gpu

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)


def layer(rng, n, k):
    codes = rng.integers(0, 8, (n, k)).astype(np.uint8)
    s = (rng.uniform(0.005, 0.05, (n, -(-k // 128))) * rng.choice([-1, 1], (n, -(-k // 128)))).astype(np.float16)
    return P.pack_pot_a8(codes), P.pack_scales(s, k)


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192),
                                 (1, 32), (7, 77), (13, 1000), (40, 3100), (9, 2080), (100, 5000)])
def test_gemv_pot_a8_matches_reference(n, k):
    import cupy as cp

    from engine.gpu import pot_a8
    rng = np.random.default_rng(n * 131 + k)
    words, scale = layer(rng, n, k)
    p = pot_a8.upload(words, scale, n, k)
    kp = 32 * P.n_chunks(k)
    x8 = rng.integers(-127, 128, kp).astype(np.int8)
    x8[k:] = rng.integers(-127, 128, kp - k)            # bytes past K meet code 0: any value
    sx = np.float32(0.0123)
    for rb, nw in pot_a8.VARIANTS:
        want = P.gemv_pot_a8_ref(words, scale, x8, sx, n, k, nw)
        got = pot_a8.gemv_pot_a8(cp.asarray(x8), cp.asarray([sx], dtype=cp.float32), p, variant=(rb, nw)).get()
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (rb, nw)
