"""Kinds "int2", "int3", "int4": uniform asymmetric b-bit weights in the bit-plane layout,
weight-only: the fair baseline for the power-of-two kinds (same bits, same layout, same
tiling in the kernels, so a speed difference isolates the dequantization).

    ŵ[n,k] = (q[n,k] - z[n,g]) · s[n,g]     q, z in 0..2^b-1, s float16 > 0

Tensors: qweight (N, ceil(K/32), b) uint32 bit planes (planes.py), qzeros (N, G) uint8,
wscale (N, G) float16. (Kind "g" is the older 4-bit layout with float32 scales that the
A8W4 baselines use; these kinds exist for 2, 3 and 4 bits alike.)
"""
from __future__ import annotations

import numpy as np

from .common import check, check_scale, expand_groups, n_groups
from .planes import CHUNK, PLANE_BITS, check_group, n_chunks, padding_is_zero, unpack_planes


class IntKind:
    INTEGER = False
    CODES_PER_COLUMN = CHUNK   # input channels a qweight column (one word a bit plane) holds

    def __init__(self, bits: int):
        self.bits = bits
        self.NAME = f"int{bits}"
        self.qmax = (1 << bits) - 1

    def tensors(self, n: int, k: int, group: int) -> dict:
        check_group(self.NAME, group)       # here, so a loader refuses the group before the shapes it implies
        G = n_groups(k, group)
        return {"qweight": (np.uint32, (n, n_chunks(k), self.bits)), "qzeros": (np.uint8, (n, G)),
                "wscale": (np.float16, (n, G))}

    def validate(self, ql) -> None:
        check(ql.act == "none", f"{self.NAME} layers are weight-only (act 'none')")
        check(padding_is_zero(ql.qweight, ql.in_features), "bit planes past in_features must be 0")
        check(int(ql.qzeros.max(initial=0)) <= self.qmax, f"zero points must lie in 0..{self.qmax}")
        s = ql.wscale.astype(np.float32)
        check(bool(np.isfinite(s).all() and (s > 0).all()),
              f"{self.NAME} scales must be positive finite float16 values")
        check_scale("wscale", ql.wscale, self.qmax)      # |q - z| ≤ qmax: the largest weight in fp16

    def dequantize(self, ql) -> np.ndarray:
        k, g = ql.in_features, ql.group
        q = unpack_planes(ql.qweight, self.bits, k).astype(np.float32)   # (N, K)
        z = expand_groups(ql.qzeros, k, g).astype(np.float32)
        s = expand_groups(ql.wscale, k, g).astype(np.float32)
        return (q - z) * s


KINDS = {f"int{b}": IntKind(b) for b in PLANE_BITS}
