"""What every weight kind shares: constants, UINT4 packing, group helpers, checks, and the
INT8 activation rules with the exact integer GEMM reference.

Notation (docs/FORMAT.md): a linear is y = x · Wᵀ with W of shape (N out, K in) and x of
shape (M tokens, K). Groups of `group` consecutive input channels share a zero point and a
scale. When K is not a multiple of the group (SmolLM2 has K = 576 with group 128), the last
group is shorter: G = ceil(K / group) groups, the last one holding K - (G-1)·group channels.

Activation modes (`QuantLinear.act`):
  "static"   per-tensor symmetric INT8 with a calibrated scale `ascale`
  "dynamic"  per-token symmetric INT8, scale = max|x[m,:]| / 127 computed at run time
  "none"     float activations (weight-only, A16W4)

Rounding rule for activations (the GPU kernels must use the same one):
  x8 = clamp(rint(float32(x) / float32(s)), -127, 127)
with IEEE float32 division and round-half-to-even (`np.rint`, CUDA
`__float2int_rn(__fdiv_rn(x, s))`). -128 is never produced, so x8·W8 is symmetric.

Epilogue rule for the integer kinds: y[m,n] = (float32(acc[m,n]) * sx[m]) * s8[n] in float32.
"""
from __future__ import annotations

import numpy as np

DEFAULT_GROUP = 128
QMAX_U4 = 15          # codes and zero points are UINT4: 0..15
QMAX_I8 = 127         # symmetric INT8: -127..127 (never -128)

ACT_MODES = ("static", "dynamic", "none")
# Largest finite fp16: the GPU engine holds weights and activations in fp16, so a scale that
# puts a dequantized weight or an activation beyond it cannot run there (and, finite but
# absurd, only floods the CPU path with overflow warnings): the format rejects it.
FP16_MAX = 65504.0


class FormatError(ValueError):
    """A quantized tensor set that does not follow this format."""


def n_groups(k: int, group: int) -> int:
    return -(-k // group)


def group_index(k: int, group: int) -> np.ndarray:
    """For every input channel, the index of its group: (K,) int."""
    return np.arange(k) // group


def expand_groups(a: np.ndarray, k: int, group: int, xp=np) -> np.ndarray:
    """(N, G) per-group values -> (N, K) per-channel values (on the array module xp)."""
    return xp.asarray(a)[:, xp.asarray(group_index(k, group))]


# ----------------------------------------------------------------------------- UINT4 packing

def pack_uint4(codes: np.ndarray) -> np.ndarray:
    """(N, K) codes in 0..15 -> (N, K/2) uint8; element 2i in the low nibble, 2i+1 in the high."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 2:
        raise FormatError(f"UINT4 packing needs a 2-D array with an even row length, got {codes.shape}")
    c = codes.astype(np.uint8)
    if c.size and int(c.max()) > QMAX_U4:
        raise FormatError("UINT4 codes must lie in 0..15")
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray, xp=np) -> np.ndarray:
    """(N, K/2) uint8 -> (N, K) uint8 codes; the inverse of pack_uint4 (on the array module xp)."""
    p = xp.asarray(packed, dtype=xp.uint8)
    out = xp.empty((p.shape[0], p.shape[1] * 2), dtype=xp.uint8)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return out


# ----------------------------------------------------------------------------- checks

def check(cond: bool, msg: str):
    if not cond:
        raise FormatError(msg)


def check_array(name: str, a, dtype, shape):
    check(a is not None, f"{name} is missing")
    check(isinstance(a, np.ndarray), f"{name} must be a NumPy array")
    check(a.dtype == np.dtype(dtype), f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    check(a.shape == tuple(shape), f"{name} has shape {a.shape}, expected {tuple(shape)}")


def check_tensors(ql, spec: dict) -> None:
    """Every tensor of a kind's spec {name: (dtype, shape)} present on `ql` with that dtype and shape."""
    for name, (dtype, shape) in spec.items():
        check_array(name, getattr(ql, name), dtype, shape)


def check_scale(name: str, s, qmax: int) -> None:
    """Float scales: finite, and |s|·qmax (the largest value they can make) within fp16."""
    a = np.asarray(s, dtype=np.float64)
    check(bool(np.isfinite(a).all()), f"{name} holds NaN or Inf")
    if a.size:
        big = float(np.abs(a).max())
        check(big * qmax <= FP16_MAX, f"{name} holds {big:.3g}: times {qmax} that is beyond fp16's "
                                      f"{FP16_MAX:g}, no real weight is that large (the file is corrupt)")


def check_even_k(k: int) -> None:
    """UINT4 kinds pack two codes a byte along K."""
    check(k % 2 == 0, f"UINT4 layers need an even in_features, got {k}")


# ----------------------------------------------------------------------------- INT8 activations and the integer GEMM

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
    check(x8.shape[-1] == w8.shape[-1], f"K mismatch: x {x8.shape} vs w {w8.shape}")
    acc = x8.astype(np.float64) @ w8.astype(np.float64).T  # (M, N)
    return acc.astype(np.int32)


def epilogue_ref(acc: np.ndarray, sx: np.ndarray, s8: np.ndarray) -> np.ndarray:
    """y = (float32(acc) * sx[m]) * s8[n], float32; sx is (M,) (broadcast a static scalar first)."""
    y = acc.astype(np.float32) * np.asarray(sx, dtype=np.float32)[:, None]
    return y * np.asarray(s8, dtype=np.float32)[None, :]
