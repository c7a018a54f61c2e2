"""Kind "g": group-wise asymmetric W4 with float group scales (the RTN, SmoothQuant and FPTQ
baselines):  W[n,k] ≈ (q[n,k] - z[n,g]) · wscale[n,g]. No integer kernel: with quantized
activations the reference simulates the product in float64."""
from __future__ import annotations

import numpy as np

from .common import QMAX_U4, check, check_even_k, check_scale, expand_groups, n_groups, unpack_uint4

NAME = "g"
INTEGER = False
CODES_PER_COLUMN = 2    # input channels a qweight column holds (two UINT4 codes a byte)


def tensors(n: int, k: int, group: int) -> dict:
    check_even_k(k)
    G = n_groups(k, group)
    return {"qweight": (np.uint8, (n, k // 2)), "qzeros": (np.uint8, (n, G)), "wscale": (np.float32, (n, G))}


def validate(ql) -> None:
    check(int(ql.qzeros.max(initial=0)) <= QMAX_U4, "zero points must lie in 0..15")
    check_scale("wscale", ql.wscale, QMAX_U4)


def dequantize(ql) -> np.ndarray:
    k, g = ql.in_features, ql.group
    q = unpack_uint4(ql.qweight).astype(np.float32)
    z = expand_groups(ql.qzeros, k, g).astype(np.float32)
    s = expand_groups(ql.wscale, k, g).astype(np.float32)
    return (q - z) * s
