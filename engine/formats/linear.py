"""QuantLinear: one quantized linear layer in the canonical, kernel-agnostic layout, and the
NumPy reference y = x · Ŵᵀ that every kind's kernels must match.

Each weight kind lives in its own module (dg.py, g.py, i8.py; pot.py and intb.py define one
kind per code width: pot2..pot4, int2..int4) and defines there, once, the
tensors it stores (`tensors(n, k, group)`: name -> (dtype, shape)), its value checks and its
dequantization. This module only dispatches on `QuantLinear.kind`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import dg, g, i8, intb, pot
from .common import (ACT_MODES, FP16_MAX, QMAX_I8, FormatError, act_scale_dynamic, check, check_tensors, epilogue_ref,
                     gemm_a8w4_ref, quantize_act_ref, unpack_uint4)

KINDS = {**{m.NAME: m for m in (dg, g, i8)}, **pot.KINDS, **intb.KINDS}
WEIGHT_KINDS = tuple(KINDS)
ARRAY_FIELDS = ("qweight", "qzeros", "gscale", "cscale", "wscale")


@dataclass
class QuantLinear:
    """One quantized linear layer; which arrays it carries depends on the kind:

    kind "dg": qweight (N, K/2) u8, qzeros (N, G) u8, gscale (N, G) u8, cscale (N,) f32
    kind "g":  qweight (N, K/2) u8, qzeros (N, G) u8, wscale (N, G) f32
    kind "i8": qweight (N, K) i8,  cscale (N,) f32
    act "static" also carries ascale, a float32 scalar.
    """
    kind: str
    act: str
    in_features: int
    out_features: int
    group: int
    qweight: np.ndarray
    qzeros: np.ndarray | None = None
    gscale: np.ndarray | None = None
    cscale: np.ndarray | None = None
    wscale: np.ndarray | None = None
    ascale: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        validate(self)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def tensors(self) -> dict:
        """name -> array of the tensors this kind stores (kind module's `tensors`)."""
        return {t: getattr(self, t) for t in kind_tensors(self.kind, *self.shape, self.group)}

    def codes(self) -> np.ndarray:
        """(N, K) uint8 codes for the UINT4 kinds ("dg", "g")."""
        return unpack_uint4(self.qweight)

    def int8_weight(self, xp=np) -> np.ndarray:
        """(N, K) int8 W8 of an integer kind: (q - z) · S for "dg", q8 for "i8"; computed on
        the array module xp (NumPy, or CuPy for the converter's device calibration)."""
        mod = KINDS[self.kind]
        if not mod.INTEGER:
            raise FormatError(f"kind {self.kind!r} has no integer weight")
        return mod.int8_weight(self, xp)

    def dequantize(self) -> np.ndarray:
        """(N, K) float32 weight this layer stands for."""
        return KINDS[self.kind].dequantize(self)

    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in ARRAY_FIELDS if getattr(self, f) is not None) + (
            4 if self.ascale is not None else 0)

    def take_rows(self, rows) -> QuantLinear:
        """The layer of output rows `rows` (a slice or an index array, in that order): every
        per-row array taken with them (C-contiguous); kind, act, ascale and meta unchanged."""
        arrays = {f: np.ascontiguousarray(getattr(self, f)[rows]) for f in ARRAY_FIELDS
                  if getattr(self, f) is not None}
        return QuantLinear(self.kind, self.act, self.in_features, arrays["qweight"].shape[0], self.group,
                           ascale=self.ascale, meta=dict(self.meta), **arrays)


def kind_tensors(kind: str, n: int, k: int, group: int) -> dict:
    """name -> (dtype, shape) of the arrays a layer of `kind` stores (FormatError for an unknown kind)."""
    check(kind in KINDS, f"unknown weight kind {kind!r}; expected one of {WEIGHT_KINDS}")
    return KINDS[kind].tensors(n, k, group)


def validate(ql: QuantLinear) -> None:
    """Check kinds, dtypes, shapes and value ranges; raise FormatError naming the problem."""
    check(ql.kind in KINDS, f"unknown weight kind {ql.kind!r}; expected one of {WEIGHT_KINDS}")
    check(ql.act in ACT_MODES, f"unknown activation mode {ql.act!r}; expected one of {ACT_MODES}")
    n, k, grp = ql.out_features, ql.in_features, ql.group
    check(n > 0 and k > 0 and grp > 0, f"bad layer size N={n} K={k} group={grp}")
    check_tensors(ql, kind_tensors(ql.kind, n, k, grp))
    KINDS[ql.kind].validate(ql)
    if ql.act == "static":
        check(ql.ascale is not None and np.isfinite(ql.ascale) and ql.ascale > 0,
              "a static activation mode needs a positive finite ascale")
        check(float(ql.ascale) * QMAX_I8 <= FP16_MAX,
              f"ascale {float(ql.ascale):.3g} puts activations beyond fp16 (the file is corrupt)")
        ql.ascale = float(np.float32(ql.ascale))


def activation_scales(ql: QuantLinear, x: np.ndarray) -> np.ndarray:
    """(M,) float32 activation scale per token for this layer's activation mode."""
    m = x.shape[0]
    if ql.act == "static":
        return np.full((m,), ql.ascale, dtype=np.float32)
    return act_scale_dynamic(x)


def linear_ref(x: np.ndarray, ql: QuantLinear, w8: np.ndarray | None = None,
               wdeq: np.ndarray | None = None) -> np.ndarray:
    """Reference y = x · Ŵᵀ for a quantized layer, float32 (M, N).

    For the integer kinds ("dg", "i8") this is the bit-exact integer path the GPU kernels
    match. For "g" and "pot<b>" with quantized activations, x is quantized by the same rule and
    the product runs in float64 on the dequantized weights (for "g" a simulation: that baseline has
    no integer kernel; pot3's GPU GEMV matches it within its fp16 output rounding). `w8`/`wdeq`
    pass cached expansions.
    """
    x = np.asarray(x, dtype=np.float32)
    if ql.act == "none":
        w = ql.dequantize() if wdeq is None else wdeq
        return x @ w.T
    sx = activation_scales(ql, x)                        # (M,)
    x8 = quantize_act_ref(x, sx)                         # (M, K) int8
    if KINDS[ql.kind].INTEGER:
        w8 = ql.int8_weight() if w8 is None else w8      # (N, K) int8
        acc = gemm_a8w4_ref(x8, w8)                      # (M, N) int32
        return epilogue_ref(acc, sx, ql.cscale)
    w = ql.dequantize() if wdeq is None else wdeq        # (N, K) f32
    y = (x8.astype(np.float64) @ w.astype(np.float64).T) * sx[:, None]
    return y.astype(np.float32)
