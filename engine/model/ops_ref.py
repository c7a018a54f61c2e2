"""Reference ops of the decoder forward pass, written once against an array module `xp`.

Every op takes and returns float32 arrays of the module that holds its inputs
(NumPy here; CuPy arrays work too for the float ops). The quantized linear is
NumPy-only: it is the integer reference (engine/formats/) the GPU kernels match.
"""
from __future__ import annotations

import numpy as np

from .. import formats
from ..io.config import rope_inv_freq  # noqa: F401  (the RoPE frequencies a config states)
from ..util.arrays import xp_of

# K-chunk for the exact float32 integer GEMM: products |x8·w8| ≤ 127² = 16129, so a
# chunk of 1040 channels keeps every partial sum below 2^24, where float32 is exact
# whatever order BLAS sums in. Chunks are then added in int64.
EXACT_F32_CHUNK = (1 << 24) // (formats.QMAX_I8 * formats.QMAX_I8)  # 1040

# Query rows a block of the reference attention (attention below).
ATTN_ROW_BLOCK = 128


def rmsnorm(x, w, eps: float):
    xp = xp_of(x)
    var = (x * x).mean(axis=-1, keepdims=True)              # (T, 1)
    return (x * (1.0 / xp.sqrt(var + eps))).astype(xp.float32) * w


def rope_tables(xp, head_dim: int, theta: float, positions, inv_freq=None):
    """cos, sin of shape (T, head_dim) for HF's rotate-half layout (inv_freq: rope_inv_freq's
    scaled frequencies; None: plain θ^(−2i/D))."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta)                                          # (D/2,)
    freqs = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)                    # (T, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                                          # (T, D)
    return xp.asarray(np.cos(emb), dtype=xp.float32), xp.asarray(np.sin(emb), dtype=xp.float32)


def apply_rope(x, cos, sin):
    """x (T, H, D) rotated by position: x·cos + rotate_half(x)·sin."""
    xp = xp_of(x)
    half = x.shape[-1] // 2
    rot = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (T, H, D)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def attention(q, k, v, q_start: int, window: int | None = None, scale: float | None = None):
    """Causal grouped-query attention.

    q (T, Hq, D) at absolute positions q_start..q_start+T-1; k, v (S, Hkv, D) at
    positions 0..S-1. Query i sees keys 0..q_start+i, and with a sliding `window` only the
    last `window` of them (itself included: key j with j > q_start + i − window, as
    transformers' sliding_window_overlay). scale: on q·k (None: 1/√D). Returns (T, Hq·D).

    The q·k scores are one product, as before; the float64 softmax and the product with V go a
    block of ATTN_ROW_BLOCK query rows at a time. A block's exponentials are taken only for the
    keys c0..c1−1 some row of it sees (causal: none past its last row; a window: none before its
    first row's window); the rest of its (B, S) rows are exact zeros, as exp(−inf) gave before,
    so the row sums and the product with V are the same sums of the same numbers: the same floats
    as one (T, S) block on every OpenBLAS kernel tried (tests/test_model.py), with a block's
    float64 memory instead of the whole (T, S) (4096 tokens, SmolLM2's heads: 1.7 GB -> 0.66 GB,
    3.3-4.2 s -> 1.0 s). Scores sliced per block instead would save more, but OpenBLAS's
    Haswell and Zen kernels round a block's float32 product differently from the whole one.
    """
    xp = xp_of(q)
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    rep = hq // hkv
    if t == 0:
        return xp.zeros((0, hq * d), xp.float32)
    qg = q.reshape(t, hkv, rep, d).transpose(1, 2, 0, 3)                  # (Hkv, rep, T, D)
    # K head-major and contiguous, read transposed: each head's product is then the same matmul
    # however many heads there are (with k.transpose(1, 2, 0), strided by Hkv, a tensor-parallel
    # rank's heads rounded otherwise in the last bit, tests/test_tp_sim.py). The copy is of rows
    # of D: a 2048-key decode step costs as before (a copy of the (D, S) transpose doubled it)
    kt = xp.ascontiguousarray(k.transpose(1, 0, 2)).swapaxes(-1, -2)     # (Hkv, D, S)
    vt = v.transpose(1, 0, 2)[:, None]                                    # (Hkv, 1, S, D)
    scale = 1.0 / np.sqrt(d) if scale is None else np.float64(scale)
    scores = qg @ kt[:, None]                                             # (Hkv, rep, T, S)
    out = p = None
    i1 = 0
    while i1 < t:
        i0, i1 = i1, i1 + ATTN_ROW_BLOCK
        if i1 + ATTN_ROW_BLOCK // 2 > t:          # a short remainder joins this block: BLAS
            i1 = t                                # rounds a p·V of a few rows otherwise
        c0 = 0 if window is None else min(s, max(0, q_start + i0 - window + 1))
        c1 = min(s, q_start + i1)                                         # keys c0..c1−1
        if c1 <= c0:                 # keys shorter than the positions: every key, as before
            c0, c1 = 0, s
        sc = scores[:, :, i0:i1, c0:c1]                                   # (Hkv, rep, B, C)
        # A float64 scale makes the softmax float64 (NEP 50: a NumPy scalar is not weak; p takes
        # whatever type xp's own multiply gives). It works in place in one (B, S) array: the
        # same operations in the same order as separate temporaries gave, bit for bit.
        if p is None or p.shape[2] != i1 - i0:
            kind = xp.multiply(sc[..., :1, :1], scale).dtype
            p = xp.zeros(sc.shape[:3] + (s,), kind)                        # (Hkv, rep, B, S)
        else:
            p[..., :c0] = 0
            p[..., c1:] = 0
        pc = p[..., c0:c1]                                                # (Hkv, rep, B, C)
        xp.multiply(sc, scale, out=pc)
        qpos = q_start + xp.arange(i0, i1)[:, None]                       # (B, 1)
        kpos = xp.arange(c0, c1)[None, :]                                 # (1, C)
        seen = kpos <= qpos                                               # (B, C)
        if window is not None:
            seen &= kpos > qpos - window
        xp.copyto(pc, -xp.inf, where=~seen)
        pc -= pc.max(axis=-1, keepdims=True)
        xp.exp(pc, out=pc)
        pc /= p.sum(axis=-1, keepdims=True)
        o = p @ vt                                                        # (Hkv, rep, B, D)
        if out is None:
            out = xp.empty(o.shape[:2] + (t, d), o.dtype)                  # (Hkv, rep, T, D)
        out[:, :, i0:i1] = o
    return out.transpose(2, 0, 1, 3).reshape(t, hq * d).astype(xp.float32)


def silu(x):
    xp = xp_of(x)
    return x / (1.0 + xp.exp(-x))


def gelu_tanh(x):
    """GELU, tanh approximation (transformers' gelu_pytorch_tanh; Gemma's GeGLU)."""
    xp = xp_of(x)
    c = xp.float32(np.sqrt(2.0 / np.pi))
    return (xp.float32(0.5) * x * (1.0 + xp.tanh(c * (x + xp.float32(0.044715) * x * x * x)))).astype(xp.float32)


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}      # config.hidden_act -> op


def gemm_int8_exact(x8, w8f):
    """acc = x8 · w8ᵀ exactly, with float32 BLAS on K-chunks of ≤ EXACT_F32_CHUNK.

    x8 (M, K) int8; w8f (N, K) float32 holding int8 values. Returns (M, N) int32,
    equal to formats.gemm_a8w4_ref (tested) but about 2-4× faster on the CPU.
    """
    xf = x8.astype(np.float32)                                           # (M, K)
    k = xf.shape[1]
    if k <= EXACT_F32_CHUNK:                   # one chunk: its float32 sums are the integers already
        return (xf @ w8f.T).astype(np.int32)                             # (M, N)
    acc = np.zeros((xf.shape[0], w8f.shape[0]), dtype=np.int64)          # (M, N)
    for k0 in range(0, k, EXACT_F32_CHUNK):
        k1 = min(k, k0 + EXACT_F32_CHUNK)
        acc += (xf[:, k0:k1] @ w8f[:, k0:k1].T).astype(np.int64)
    return acc.astype(np.int32)


class PreparedLinear:
    """A QuantLinear with its weight expanded once for the NumPy reference path."""

    def __init__(self, ql: formats.QuantLinear):
        self.ql = ql
        if ql.kind in ("dg", "i8") and ql.act != "none":
            self.w8f = ql.int8_weight().astype(np.float32)   # (N, K), exact integers
            self.wdeq = None
        else:
            self.w8f = None
            self.wdeq = ql.dequantize()                      # (N, K) f32

    def __call__(self, x):
        ql = self.ql
        x = np.asarray(x, dtype=np.float32)
        if self.w8f is None:
            return formats.linear_ref(x, ql, wdeq=self.wdeq)
        sx = formats.activation_scales(ql, x)                # (M,)
        x8 = formats.quantize_act_ref(x, sx)                 # (M, K) int8
        acc = gemm_int8_exact(x8, self.w8f)                  # (M, N) int32
        return formats.epilogue_ref(acc, sx, ql.cscale)


def linear(x, w):
    """y = x · wᵀ for a float weight (N, K), or w(x) for a prepared linear (PreparedLinear, or
    the converter's CuPy one, converters/calibrate.py)."""
    if callable(w):
        return w(x)
    return x @ w.T
