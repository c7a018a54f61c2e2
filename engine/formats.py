"""THE quantized-linear format: constants, pack/unpack, and the NumPy integer reference.

Everything that defines what a quantized weight *means* lives here, once. The
converters produce `QuantLinear`s, engine/qfile.py stores them, the reference
path in engine/ops_ref.py runs them, and the CUDA kernels (cuda/*.cu, repacked
at load time by engine/ops_cuda.py) must reproduce `gemm_a8w4_ref` bit for bit.

Notation (see ../shared/ALGORITHMS.md §1): a linear is y = x · Wᵀ with W of
shape (N out, K in) and x of shape (M tokens, K). Groups of `group` consecutive
input channels share a zero point and a scale. When K is not a multiple of the
group (SmolLM2 has K = 576 with group 128), the last group is shorter:
G = ceil(K / group) groups, the last one holding K - (G-1)·group channels.

Weight kinds (`QuantLinear.kind`):

  "dg"  dual-grained A8W4 (DGQ). Integer group scale S ∈ [1, 127] times a float
        per-row scale s8:   W8[n,k] = (q[n,k] - z[n,g]) · S[n,g]   (int8, |W8| ≤ 127)
                            W[n,k]  ≈ s8[n] · W8[n,k]
        The GEMM is pure INT8 over the whole K; one float rescale per output.
  "g"   group-wise asymmetric W4 with float group scales (RTN, SmoothQuant, FPTQ
        baselines):         W[n,k]  ≈ (q[n,k] - z[n,g]) · wscale[n,g]
  "i8"  per-channel symmetric W8 (the A8W8 baseline): W[n,k] ≈ s8[n] · q8[n,k]

Activation modes (`QuantLinear.act`):
  "static"   per-tensor symmetric INT8 with a calibrated scale `ascale`
  "dynamic"  per-token symmetric INT8, scale = max|x[m,:]| / 127 computed at run time
  "none"     float activations (weight-only, A16W4)

Rounding rule for activations (the GPU kernels must use the same one):
  x8 = clamp(rint(float32(x) / float32(s)), -127, 127)
with IEEE float32 division and round-half-to-even (`np.rint`, CUDA
`__float2int_rn(__fdiv_rn(x, s))`). -128 is never produced, so x8·W8 is symmetric.

Epilogue rule for "dg": y[m,n] = (float32(acc[m,n]) * sx[m]) * s8[n] in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMAT_NAME = "dgq-safetensors"
FORMAT_VERSION = 1

DEFAULT_GROUP = 128
QMAX_U4 = 15          # codes and zero points are UINT4: 0..15
QMAX_I8 = 127         # symmetric INT8: -127..127 (never -128)
S_MIN, S_MAX = 1, 127  # integer group scale range of the dual-grained format

WEIGHT_KINDS = ("dg", "g", "i8")
ACT_MODES = ("static", "dynamic", "none")


class FormatError(ValueError):
    """A quantized tensor set that does not follow this format."""


def n_groups(k: int, group: int) -> int:
    return -(-k // group)


def group_index(k: int, group: int) -> np.ndarray:
    """For every input channel, the index of its group: (K,) int."""
    return np.arange(k) // group


# ----------------------------------------------------------------------------- packing

def pack_uint4(codes: np.ndarray) -> np.ndarray:
    """(N, K) codes in 0..15 -> (N, K/2) uint8; element 2i in the low nibble, 2i+1 in the high."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 2:
        raise FormatError(f"UINT4 packing needs a 2-D array with an even row length, got {codes.shape}")
    c = codes.astype(np.uint8)
    if c.size and int(c.max()) > QMAX_U4:
        raise FormatError("UINT4 codes must lie in 0..15")
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """(N, K/2) uint8 -> (N, K) uint8 codes; the inverse of pack_uint4."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return out


def expand_groups(a: np.ndarray, k: int, group: int) -> np.ndarray:
    """(N, G) per-group values -> (N, K) per-channel values."""
    return np.asarray(a)[:, group_index(k, group)]


# ----------------------------------------------------------------------------- the layer

@dataclass
class QuantLinear:
    """One quantized linear layer in the canonical, kernel-agnostic layout.

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

    def codes(self) -> np.ndarray:
        """(N, K) uint8 codes for kinds "dg" and "g"."""
        return unpack_uint4(self.qweight)

    def int8_weight(self) -> np.ndarray:
        """(N, K) int8 W8 = (q - z) · S for "dg", q8 for "i8"."""
        if self.kind == "i8":
            return self.qweight
        if self.kind != "dg":
            raise FormatError(f"kind {self.kind!r} has no integer weight")
        k, g = self.in_features, self.group
        q = self.codes().astype(np.int16)
        z = expand_groups(self.qzeros, k, g).astype(np.int16)
        s = expand_groups(self.gscale, k, g).astype(np.int16)
        w8 = (q - z) * s  # (N, K), |w8| <= 127 by the overflow guard
        return w8.astype(np.int8)

    def dequantize(self) -> np.ndarray:
        """(N, K) float32 weight this layer stands for."""
        if self.kind == "dg":
            return self.int8_weight().astype(np.float32) * self.cscale[:, None]
        if self.kind == "i8":
            return self.qweight.astype(np.float32) * self.cscale[:, None]
        k, g = self.in_features, self.group
        q = self.codes().astype(np.float32)
        z = expand_groups(self.qzeros, k, g).astype(np.float32)
        s = expand_groups(self.wscale, k, g).astype(np.float32)
        return (q - z) * s

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.qweight, self.qzeros, self.gscale, self.cscale,
                                      self.wscale) if a is not None) + (4 if self.ascale is not None else 0)


def _check(cond: bool, msg: str):
    if not cond:
        raise FormatError(msg)


def _check_array(name: str, a, dtype, shape):
    _check(a is not None, f"{name} is missing")
    _check(isinstance(a, np.ndarray), f"{name} must be a NumPy array")
    _check(a.dtype == np.dtype(dtype), f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    _check(a.shape == tuple(shape), f"{name} has shape {a.shape}, expected {tuple(shape)}")


def validate(ql: QuantLinear) -> None:
    """Check kinds, dtypes, shapes and value ranges; raise FormatError naming the problem."""
    _check(ql.kind in WEIGHT_KINDS, f"unknown weight kind {ql.kind!r}; expected one of {WEIGHT_KINDS}")
    _check(ql.act in ACT_MODES, f"unknown activation mode {ql.act!r}; expected one of {ACT_MODES}")
    n, k, g = ql.out_features, ql.in_features, ql.group
    _check(n > 0 and k > 0 and g > 0, f"bad layer size N={n} K={k} group={g}")
    G = n_groups(k, g)
    if ql.kind == "i8":
        _check_array("qweight", ql.qweight, np.int8, (n, k))
        _check(ql.qweight.size == 0 or int(ql.qweight.min()) >= -QMAX_I8, "int8 weights must not use -128")
        _check_array("cscale", ql.cscale, np.float32, (n,))
    else:
        _check(k % 2 == 0, f"UINT4 layers need an even in_features, got {k}")
        _check_array("qweight", ql.qweight, np.uint8, (n, k // 2))
        _check_array("qzeros", ql.qzeros, np.uint8, (n, G))
        _check(int(ql.qzeros.max(initial=0)) <= QMAX_U4, "zero points must lie in 0..15")
        if ql.kind == "dg":
            _check_array("gscale", ql.gscale, np.uint8, (n, G))
            _check(int(ql.gscale.min(initial=S_MIN)) >= S_MIN and int(ql.gscale.max(initial=S_MIN)) <= S_MAX,
                   "integer group scales must lie in 1..127")
            _check_array("cscale", ql.cscale, np.float32, (n,))
        else:
            _check_array("wscale", ql.wscale, np.float32, (n, G))
    if ql.act == "static":
        _check(ql.ascale is not None and np.isfinite(ql.ascale) and ql.ascale > 0,
               "a static activation mode needs a positive finite ascale")
        ql.ascale = float(np.float32(ql.ascale))
    if ql.kind == "dg":
        _check(ql.act != "none", "dual-grained layers quantize activations (act static or dynamic)")


def check_no_overflow(ql: QuantLinear) -> None:
    """The dual-grained invariant: every |(q - z) · S| fits in int8 (≤ 127)."""
    k, g = ql.in_features, ql.group
    q = ql.codes().astype(np.int32)
    z = expand_groups(ql.qzeros, k, g).astype(np.int32)
    s = expand_groups(ql.gscale, k, g).astype(np.int32)
    if np.abs((q - z) * s).max(initial=0) > QMAX_I8:
        raise FormatError("dual-grained weights overflow int8: some |(q - z) * S| > 127")


# ----------------------------------------------------------------------------- integer reference

def act_scale_dynamic(x: np.ndarray) -> np.ndarray:
    """Per-token scale (M,) float32: max|x[m,:]| / 127, or 1 for an all-zero row."""
    amax = np.abs(np.asarray(x, dtype=np.float32)).max(axis=-1)
    s = amax / np.float32(QMAX_I8)
    return np.where(amax > 0, s, np.float32(1.0)).astype(np.float32)


def quantize_act_ref(x: np.ndarray, scale) -> np.ndarray:
    """Symmetric INT8: clamp(rint(x / s), -127, 127). `scale` is a scalar or (M,) per token."""
    x = np.asarray(x, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    if s.ndim == 1:
        s = s[:, None]
    return np.clip(np.rint(x / s), -QMAX_I8, QMAX_I8).astype(np.int8)


def gemm_a8w4_ref(x8: np.ndarray, w8: np.ndarray) -> np.ndarray:
    """Exact int32 accumulation acc[m,n] = Σ_k x8[m,k]·w8[n,k].

    float64 BLAS is exact here: every partial sum is an integer below 127²·K < 2^53.
    """
    x8 = np.asarray(x8)
    w8 = np.asarray(w8)
    _check(x8.shape[-1] == w8.shape[-1], f"K mismatch: x {x8.shape} vs w {w8.shape}")
    acc = x8.astype(np.float64) @ w8.astype(np.float64).T  # (M, N)
    return acc.astype(np.int32)


def epilogue_ref(acc: np.ndarray, sx: np.ndarray, s8: np.ndarray) -> np.ndarray:
    """y = (float32(acc) * sx[m]) * s8[n], float32; sx is (M,) (broadcast a static scalar first)."""
    y = acc.astype(np.float32) * np.asarray(sx, dtype=np.float32)[:, None]
    return y * np.asarray(s8, dtype=np.float32)[None, :]


def activation_scales(ql: QuantLinear, x: np.ndarray) -> np.ndarray:
    """(M,) float32 activation scale per token for this layer's activation mode."""
    m = x.shape[0]
    if ql.act == "static":
        return np.full((m,), ql.ascale, dtype=np.float32)
    return act_scale_dynamic(x)


def linear_ref(x: np.ndarray, ql: QuantLinear, w8: np.ndarray | None = None,
               wdeq: np.ndarray | None = None) -> np.ndarray:
    """Reference y = x · Ŵᵀ for a quantized layer, float32 (M, N).

    For "dg" this is the bit-exact integer path the GPU kernels match. For "g"
    and "i8" with quantized activations, x is quantized by the same rule and the
    product runs in float64 on the dequantized weights (a simulation: those
    baselines have no integer kernel here). `w8`/`wdeq` pass cached expansions.
    """
    x = np.asarray(x, dtype=np.float32)
    if ql.act == "none":
        w = ql.dequantize() if wdeq is None else wdeq
        return x @ w.T
    sx = activation_scales(ql, x)                        # (M,)
    x8 = quantize_act_ref(x, sx)                         # (M, K) int8
    if ql.kind in ("dg", "i8"):
        w8 = ql.int8_weight() if w8 is None else w8      # (N, K) int8
        acc = gemm_a8w4_ref(x8, w8)                      # (M, N) int32
        return epilogue_ref(acc, sx, ql.cscale)
    w = ql.dequantize() if wdeq is None else wdeq        # (N, K) f32
    y = (x8.astype(np.float64) @ w.astype(np.float64).T) * sx[:, None]
    return y.astype(np.float32)
