"""Kinds "pot2", "pot3", "pot4": power-of-two weights (PoTPTQ, arXiv 2507.11959).

Activations: float ("none", weight-only) or per-token INT8 ("dynamic": x quantized by the
activation rule of common.py, then x8 · Ŵᵀ · sx). The GPU runs "dynamic" for pot3 in groups of
128 only, with its W3 × INT8 dp4a GEMV (pot_a8.py, cuda/gemv_pot_a8.cu); the CPU runs every width.

A b-bit code is 1 sign bit (the top bit) and a (b-1)-bit magnitude field m:
    m = 0          ŵ = 0                      (the zero code)
    m = 1..2^(b-1)-1   ŵ = sign · s[n,g] · 2^-(m-1)
so b = 2 is ternary {0, ±s}, b = 3 is {0, ±s, ±s/2, ±s/4}, b = 4 reaches s/64. The group
scale s is the largest magnitude (the paper writes ŵ = s·2^E with E ≥ 0 from the smallest;
the two are the same set). We keep a zero code although it costs one level: on SmolLM2,
PoT-3 without one scored ppl 77.5 against 45.8 with it (v_proj cannot take weights that
never reach 0).

The spare code (pot2, pot3; SPARE_BITS): with the sign bit set, m = 0 would be a second zero;
there it is one more power of two, ŵ = SPARE · s = 2s, above the largest level. The group scale
may then be negative: ŵ = s · unit mirrors the group, so the spare level lands on the side of
the group's largest weight, which the converter chooses. pot3's levels are {0, ±1/4, ±1/2, ±1}
· |s| and 2|s| on one side (eight distinct values for eight codes), pot2's {0, ±1} · |s| and
2|s|. SmolLM2 g128 wiki perplexity with it: W3 41.05 → 36.08 (int-search W3 37.12), W2 2207 →
285 (docs/QUALITY.md); at 4 bits it measured no gain (30.79 → 31.01), and pot4 keeps the zero
meaning (its INT8 reuse would overflow, converters/pot.py as_dual_grained). Files written before
the spare code existed never hold it (the converter set the sign bit only with m ≥ 1) nor
negative scales, so they read the same.

Why the scale is float16 with a floor: the format guarantees that every weight is a normal
fp16 that a kernel can build with integer arithmetic on the bits of s, bits(ŵ) =
bits(s) - ((m-1) << 10) with the sign XOR-ed in (no int->float convert, no multiply). That
holds while the exponent field of s is at least 2^(b-1)-1, and the validator demands it
(tests/test_pot.py checks the identity). The first GEMV used exactly that; the current GEMV
(cuda/gemv_wb.cu) looks scale-free units 2^-(m-1) up in a byte table and applies s to fp32
partial sums, and its large-M path writes unit · s in fp16 for cuBLAS, exact thanks to the
floor. It costs nothing (scales that small are weights below 0.004, SmolLM2 never hit it).

Tensors: qweight (N, ceil(K/32), b) uint32 bit planes (planes.py), wscale (N, G) float16.
"""
from __future__ import annotations

import numpy as np

from .common import check, expand_groups, n_groups
from .planes import CHUNK, PLANE_BITS, check_group, n_chunks, padding_is_zero, unpack_planes

FP16_EXP_SHIFT = 10
FP16_EXP_BIAS = 15
SPARE_BITS = (2, 3)        # widths whose spare code (sign set, m = 0) is the level +SPARE · s
SPARE = 2.0
ACTS = ("none", "dynamic")  # QuantLinear.act of a pot layer: float, or per-token INT8 activations


class PotKind:
    """One power-of-two kind (b bits); the registry in linear.py holds one per width."""
    INTEGER = False
    CODES_PER_COLUMN = CHUNK   # input channels a qweight column (one word a bit plane) holds

    def __init__(self, bits: int):
        self.bits = bits
        self.NAME = f"pot{bits}"
        self.levels = (1 << (bits - 1)) - 1          # nonzero magnitudes: 2^0 .. 2^-(levels-1)
        self.min_scale_exp = self.levels             # fp16 exponent field of |s| ≥ this (normal ŵ)
        self.spare = SPARE if bits in SPARE_BITS else None    # the spare code's unit, or None (a zero)
        self.spare_code = 1 << (bits - 1)
        # with a spare level 2|s| must be finite too: exponent field of |s| ≤ 29
        self.max_scale_exp = 0x1E - 1 if self.spare else 0x1E

    def tensors(self, n: int, k: int, group: int) -> dict:
        check_group(self.NAME, group)       # here, so a loader refuses the group before the shapes it implies
        return {"qweight": (np.uint32, (n, n_chunks(k), self.bits)),
                "wscale": (np.float16, (n, n_groups(k, group)))}

    def validate(self, ql) -> None:
        check(ql.act in ACTS, f"{self.NAME} layers take float activations ('none') or per-token INT8 "
                              f"('dynamic'), not act {ql.act!r}")
        check(padding_is_zero(ql.qweight, ql.in_features), "bit planes past in_features must be 0")
        bits = ql.wscale.view(np.uint16)
        exp = (bits >> FP16_EXP_SHIFT) & 0x1F
        # with a spare code the sign of s mirrors the group (the spare level's side)
        check(bool((exp < 0x1F).all()) and (self.spare or not (bits & 0x8000).any()),
              f"{self.NAME} scales must be {'' if self.spare else 'positive '}finite float16 values")
        check(bool((exp <= self.max_scale_exp).all()),
              f"{self.NAME} scales must be below 2^{self.max_scale_exp - FP16_EXP_BIAS + 1} in magnitude "
              "(so the spare level 2|s| is a finite float16)")
        check(bool((exp >= self.min_scale_exp).all()),
              f"{self.NAME} scales must be at least 2^{self.min_scale_exp - FP16_EXP_BIAS} in magnitude "
              "(so every level is a normal float16)")

    def magnitudes(self) -> np.ndarray:
        """|ŵ| / s for each magnitude field m = 0 .. levels: (levels + 1,) float32."""
        return np.concatenate([[0.0], 2.0 ** -np.arange(self.levels)]).astype(np.float32)

    def units(self) -> np.ndarray:
        """ŵ / s for each code 0 .. 2^b - 1: sign · 2^-(m-1), 0 for m = 0, and the spare level
        for the spare code where the kind has one: (2^b,) float32."""
        c = np.arange(1 << self.bits)
        u = np.where(c >> (self.bits - 1), np.float32(-1), np.float32(1)) * self.magnitudes()[c & self.levels]
        if self.spare:
            u[self.spare_code] = self.spare
        return u.astype(np.float32)

    def dequantize(self, ql) -> np.ndarray:
        k, g = ql.in_features, ql.group
        codes = unpack_planes(ql.qweight, self.bits, k)                  # (N, K) uint8
        s = expand_groups(ql.wscale, k, g).astype(np.float32)            # (N, K), exact
        return self.units()[codes] * s                                   # exact in float32


KINDS = {f"pot{b}": PotKind(b) for b in PLANE_BITS}
