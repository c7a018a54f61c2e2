"""Baseline per-layer quantizers: group-wise W4 with float scales ("g") and per-channel W8 ("i8").

- RTN A8W4 / A16W4 / SmoothQuant A8W4: `g_linear(W, group, act, ascale)` — min-max
  asymmetric UINT4 per group (converters.dgq.rtn_w4), float32 group scales.
- FPTQ's weights: `g_linear(W, ..., H=H)` — the same format, but each group's
  clipping ratio picked by DGQ's phase-1 search on the group's output error
  (float scales, so no phase 2 is needed).
- A8W8: `i8_linear(W, act, ascale)` — symmetric per-output-channel INT8,
  s8 = max|W[n,:]|/127, q8 = clamp(round(W/s8), −127, 127).
"""
from __future__ import annotations

import numpy as np

from engine import formats
from engine.formats import QMAX_I8

from .dgq import QuantizeError, _check_gram, _check_weight, h_blocks, phase1


def g_linear(W, group: int = formats.DEFAULT_GROUP, act: str = "static", ascale: float | None = None,
             H=None) -> formats.QuantLinear:
    """Group-wise asymmetric W4 with float32 group scales: QuantLinear(kind="g").

    Without H: round to nearest at the group's min/max (RTN). With H (K, K): DGQ
    phase 1 picks each group's clipping ratio (r = 1 among the candidates, so it
    is never worse than RTN on the group objective).
    """
    W = _check_weight(W)
    n, k = W.shape
    if k % 2:
        raise QuantizeError(f"UINT4 packing needs an even in_features, got {k}")
    Hb = None if H is None else h_blocks(_check_gram(H, k).astype(np.float64, copy=False), group)
    codes, z, s, r = phase1(W, Hb, group)
    meta = {"search": Hb is not None}
    if Hb is not None:
        meta["r1_mean"] = float(r.mean())
    return formats.QuantLinear(
        kind="g", act=act, in_features=k, out_features=n, group=group,
        qweight=formats.pack_uint4(codes.astype(np.uint8)), qzeros=z.astype(np.uint8),
        wscale=s.astype(np.float32), ascale=ascale, meta=meta)


def i8_linear(W, act: str = "static", ascale: float | None = None,
              group: int = formats.DEFAULT_GROUP) -> formats.QuantLinear:
    """Per-output-channel symmetric INT8 weights: QuantLinear(kind="i8").

    `group` is only recorded (the format carries one for every kind); it is unused.
    """
    W = _check_weight(W)
    n, k = W.shape
    amax = np.abs(W).max(axis=1).astype(np.float64)                     # (N,)
    s8 = np.where(amax > 0, amax / QMAX_I8, 1.0).astype(np.float32)     # (N,)
    q8 = np.clip(np.rint(W / s8[:, None].astype(np.float64)), -QMAX_I8, QMAX_I8).astype(np.int8)
    return formats.QuantLinear(kind="i8", act=act, in_features=k, out_features=n, group=group,
                               qweight=q8, cscale=s8, ascale=ascale, meta={})
