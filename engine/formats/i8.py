"""Kind "i8": per-channel symmetric W8 (the A8W8 baseline): W[n,k] ≈ s8[n] · q8[n,k]."""
from __future__ import annotations

import numpy as np

from .common import QMAX_I8, check, check_scale

NAME = "i8"
INTEGER = True
CODES_PER_COLUMN = 1    # input channels a qweight column holds


def tensors(n: int, k: int, group: int) -> dict:
    return {"qweight": (np.int8, (n, k)), "cscale": (np.float32, (n,))}


def validate(ql) -> None:
    check(ql.qweight.size == 0 or int(ql.qweight.min()) >= -QMAX_I8, "int8 weights must not use -128")
    check_scale("cscale", ql.cscale, QMAX_I8)


def int8_weight(ql, xp=np) -> np.ndarray:
    return xp.asarray(ql.qweight)


def dequantize(ql) -> np.ndarray:
    return ql.qweight.astype(np.float32) * ql.cscale[:, None]
