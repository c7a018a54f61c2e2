"""Kind "dg": dual-grained A8W4 (DGQ), the engine's own format.

Integer group scale S ∈ [1, 127] times a float per-row scale s8:
    W8[n,k] = (q[n,k] - z[n,g]) · S[n,g]     (int8, |W8| ≤ 127 by the overflow guard)
    W[n,k]  ≈ s8[n] · W8[n,k]
The GEMM is pure INT8 over the whole K with one float rescale per output
(common.epilogue_ref); cuda/gemm_a8w4*.cu must reproduce it bit for bit.
"""
from __future__ import annotations

import numpy as np

from .common import (QMAX_I8, QMAX_U4, FormatError, check, check_even_k, check_scale, expand_groups,
                     n_groups, unpack_uint4)

NAME = "dg"
S_MIN, S_MAX = 1, 127   # integer group scale range
INTEGER = True          # runs as an INT8 GEMM (int8_weight) when activations are quantized
CODES_PER_COLUMN = 2    # input channels a qweight column holds (two UINT4 codes a byte)
GPU_GROUP_UNIT = 64     # the CUDA kernels' k per 16-byte lane vector (cuda/common.cuh DGQ_CHUNK_K)


def gpu_group(group: int) -> bool:
    """Whether the CUDA kernels run this group size: 64·2^j (64, 128, 256, ...), so that a
    chunk's group is a shift (engine/gpu/ops.py padded_dims). Any group runs on the CPU."""
    u = GPU_GROUP_UNIT
    return group >= u and group % u == 0 and (group // u) & (group // u - 1) == 0


def tensors(n: int, k: int, group: int) -> dict:
    """name -> (dtype, shape) of the arrays a "dg" layer stores."""
    check_even_k(k)
    G = n_groups(k, group)
    return {"qweight": (np.uint8, (n, k // 2)), "qzeros": (np.uint8, (n, G)),
            "gscale": (np.uint8, (n, G)), "cscale": (np.float32, (n,))}


def validate(ql) -> None:
    check(int(ql.qzeros.max(initial=0)) <= QMAX_U4, "zero points must lie in 0..15")
    check(int(ql.gscale.min(initial=S_MIN)) >= S_MIN and int(ql.gscale.max(initial=S_MIN)) <= S_MAX,
          "integer group scales must lie in 1..127")
    check(ql.act != "none", "dual-grained layers quantize activations (act static or dynamic)")
    check_scale("cscale", ql.cscale, QMAX_I8)


def _w8_int16(ql, xp=np) -> np.ndarray:
    k, g = ql.in_features, ql.group
    q = unpack_uint4(ql.qweight, xp).astype(xp.int16)
    z = expand_groups(ql.qzeros, k, g, xp).astype(xp.int16)
    s = expand_groups(ql.gscale, k, g, xp).astype(xp.int16)
    return (q - z) * s                                   # (N, K): |q - z| ≤ 15, S ≤ 127, so no int16 overflow


def int8_weight(ql, xp=np) -> np.ndarray:
    """(N, K) int8 W8 = (q - z) · S on the array module xp (the packed arrays move there
    first); FormatError when the overflow guard is broken (a cast would wrap 128 to -128
    silently)."""
    w = _w8_int16(ql, xp)
    if w.size and int(xp.abs(w).max()) > QMAX_I8:
        raise FormatError(_OVERFLOW)
    return w.astype(xp.int8)


def dequantize(ql) -> np.ndarray:
    return int8_weight(ql).astype(np.float32) * ql.cscale[:, None]


_OVERFLOW = "dual-grained weights overflow int8: some |(q - z) * S| > 127 (docs/FORMAT.md: the file is corrupt)"


def check_no_overflow(ql) -> None:
    """The dual-grained invariant: every |(q - z) · S| fits in int8 (≤ 127).

    Per group only the extreme codes matter: max |q - z| = max(qmax - z, z - qmin). Works on
    uint8 codes and (N, G) extremes, so loaders can afford it on every layer."""
    n, k, g = ql.out_features, ql.in_features, ql.group
    q = unpack_uint4(ql.qweight)                                   # (N, K) uint8
    G = n_groups(k, g)
    pad = G * g - k
    if pad:                                  # repeat a real code: padding changes no extreme
        q = np.concatenate([q, np.repeat(q[:, -1:], pad, axis=1)], axis=1)
    q = q.reshape(n, G, g)
    qmax = q.max(axis=2).astype(np.int32)                          # (N, G)
    qmin = q.min(axis=2).astype(np.int32)                          # (N, G)
    z = ql.qzeros.astype(np.int32)
    worst = np.maximum(qmax - z, z - qmin) * ql.gscale.astype(np.int32)
    if worst.size and int(worst.max()) > QMAX_I8:
        raise FormatError(_OVERFLOW)
