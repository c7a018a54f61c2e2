"""The decoder forward pass of every family: flat, written once against `xp`.

RMSNorm → (q, k, v) → RoPE → causal GQA → o → residual → RMSNorm → SwiGLU → residual,
then the final norm and the (possibly tied) lm_head. A linear is a float (N, K)
array or a formats.QuantLinear; the quantized ones run the integer reference.

The families' differences are config data (engine/io/config.py), each one line here:
biases after q, k, v (Qwen2: config.linear_bias), an RMSNorm over each q/k head before RoPE
(Qwen3, Gemma 3: qk_norm), norms on the attention and MLP outputs (Gemma 3: sandwich_norm),
GeGLU (hidden_act), the scaled embedding (embed_scale), query_pre_attn_scalar, sliding-window
layers (config.window) and each layer's RoPE (config.rope_params: llama3 scaling, Gemma's
local base). Gemma's (1 + w) norms are plain ones here: the loaders hold the multiplier.
"""
from __future__ import annotations

import numpy as np

from .. import formats
from ..io.config import ModelConfig
from ..io.layout import LINEAR_NAMES, ModelError, ModelWeights
from ..util.arrays import xp_of as xp_of_array
from . import ops_ref
from .kv_cache import KVCache

# Which observer site feeds each linear (linears at one site share their input).
SITE_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
           "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
SITES = ("attn_in", "o_in", "mlp_in", "down_in")


def check_tokens(tokens, c: ModelConfig, start: int = 0) -> np.ndarray:
    """tokens as a non-empty 1-D array of valid ids that fit the context after `start`."""
    try:
        tokens = np.asarray(tokens)
    except (TypeError, ValueError) as e:          # ragged or nested lists
        raise ModelError(f"forward needs a 1-D token array ({e})") from None
    if tokens.ndim != 1 or tokens.size == 0:
        raise ModelError(f"forward needs a non-empty 1-D token array, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":     # a bool array would index as a mask, floats truncate
        raise ModelError(f"token ids must be an integer array, got dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= c.vocab_size:
        raise ModelError(f"token ids must lie in [0, {c.vocab_size}), got {tokens.min()}..{tokens.max()}")
    if start + tokens.shape[0] > c.max_position_embeddings:
        raise ModelError(f"sequence of {start + tokens.shape[0]} tokens exceeds the context of "
                         f"{c.max_position_embeddings}")
    return tokens


def check_finite(x, where: str):
    """One clear error instead of NaN/Inf flowing on: quantizing a NaN activation to INT8
    would turn it into an ordinary number silently. Two reductions, no temporary array
    (NumPy's min/max propagate NaN), so it costs little next to the linears."""
    if x.size and not (np.isfinite(x.max()) and np.isfinite(x.min())):
        raise ModelError(f"non-finite values (NaN/Inf) in the {where}: the weights are damaged or "
                         "their scales are out of range for this input")
    return x


_F32_MAX = float(np.finfo(np.float32).max)


def norm(h, w, eps: float, where: str):
    """RMSNorm that refuses activations past float32's range: there x·x overflows to inf and the
    norm would silently return zeros (a finite, wrong answer)."""
    if h.size:
        lo, hi = float(h.min()), float(h.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            check_finite(h, where)
        if max(hi, -lo) > (_F32_MAX / h.shape[-1]) ** 0.5:        # Σx² may overflow float32
            raise ModelError(f"non-finite values (float32 overflow: |x| up to {max(hi, -lo):.3g}) in the "
                             f"{where}: the weights are damaged or their scales are out of range for this input")
    return ops_ref.rmsnorm(h, w, eps)


def prepare_linears(layer) -> dict:
    """A layer's linears ready for layer_forward: float arrays as they are, QuantLinears
    expanded once (ops_ref.PreparedLinear)."""
    return {n: Model._prepare(getattr(layer, n)) for n in LINEAR_NAMES}


def layer_rope(c: ModelConfig, li: int, xp, positions):
    """cos, sin (T, D) of layer li's RoPE (config.rope_params: its base and scaling) at `positions`."""
    theta, rtype, factor, low, high, orig = c.rope_params(li)
    inv = ops_ref.rope_inv_freq(c.head_dim, theta, rtype, factor, low, high, orig)           # (D/2,)
    return ops_ref.rope_tables(xp, c.head_dim, theta, positions, inv_freq=inv)


def embed_tokens(c: ModelConfig, embed, tokens):
    """The residual stream's start: embedding rows (..., H), times config.embed_scale (Gemma: √H,
    in float32 as transformers computes it for a float32 model)."""
    h = embed[tokens]                                                   # (..., H)
    return h * np.float32(c.embed_scale) if c.embed_scale != 1.0 else h


def layer_forward(c: ModelConfig, li: int, L, W: dict, h, cos=None, sin=None, start: int = 0, cache=None,
                  observer=None):
    """One decoder layer: h (T, H) -> h (T, H). W = prepare_linears(L); cos, sin (T, D): this
    layer's RoPE tables (layer_rope) for the positions start..start+T−1, built here when None.
    The converters run it layer by layer (converters/quantize.py); Model.forward runs it for
    every layer, so both compute exactly the same numbers."""
    t = h.shape[0]
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    eps = c.rms_norm_eps
    L.check(c, li)
    if cos is None:
        cos, sin = layer_rope(c, li, xp_of_array(h), np.arange(start, start + t))        # (T, D)
    fin = check_finite
    b = L.bias

    def lin(x, n):                                                      # y = x·Wᵀ (+ b)
        y = ops_ref.linear(x, W[n])
        return y + b[n] if n in b else y

    where = f"input of layer {li}"
    x = fin(norm(h, L.attn_norm, eps, where), where)                    # (T, H)
    if observer:
        observer(li, "attn_in", x)
    q = fin(lin(x, "q"), f"q of layer {li}").reshape(t, hq, d)        # (T, Hq, D)
    k = fin(lin(x, "k"), f"k of layer {li}").reshape(t, hkv, d)       # (T, Hkv, D); an INT8 cache
    v = fin(lin(x, "v"), f"v of layer {li}").reshape(t, hkv, d)       # (T, Hkv, D)  would hide NaN
    if c.qk_norm:                                                       # per head, before RoPE
        q = norm(q, L.q_norm, eps, f"q of layer {li}")                  # (T, Hq, D)
        k = norm(k, L.k_norm, eps, f"k of layer {li}")                  # (T, Hkv, D)
    q = ops_ref.apply_rope(q, cos, sin)
    k = ops_ref.apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.write(li, k, v)                                    # (S, Hkv, D)
    a = fin(ops_ref.attention(q, k, v, start, window=c.window(li), scale=c.attn_scale),
            f"attention output of layer {li}")                          # (T, Hq·D)
    if observer:
        observer(li, "o_in", a)
    o = lin(a, "o")                                                     # (T, H)
    if c.sandwich_norm:
        where = f"attention output of layer {li}"
        o = fin(norm(fin(o, where), L.attn_out_norm, eps, where), where)
    h = h + o                                                           # (T, H)
    where = f"MLP input of layer {li}"
    x = fin(norm(h, L.mlp_norm, eps, where), where)                     # (T, H)
    if observer:
        observer(li, "mlp_in", x)
    act = ops_ref.ACTIVATIONS[c.hidden_act]
    m = fin(act(lin(x, "gate")) * lin(x, "up"), f"MLP of layer {li}")  # (T, I)
    if observer:
        observer(li, "down_in", m)
    y = lin(m, "down")                                                  # (T, H)
    if c.sandwich_norm:
        where = f"MLP output of layer {li}"
        y = fin(norm(fin(y, where), L.mlp_out_norm, eps, where), where)
    return fin(h + y, f"output of layer {li}")                          # (T, H)


class Model:
    """Runs ModelWeights with NumPy (the reference path)."""

    def __init__(self, weights: ModelWeights):
        self.w = weights
        self.config = weights.config
        self.xp = np
        for li, L in enumerate(weights.layers):
            L.check(self.config, li)
        # Expand quantized weights once, not per token.
        self._lin = [prepare_linears(L) for L in weights.layers]

    @staticmethod
    def _prepare(w):
        if isinstance(w, formats.QuantLinear):
            return ops_ref.PreparedLinear(w)
        return w

    def new_cache(self, capacity: int | None = None, kv8: bool = False) -> KVCache:
        """A float32 cache, or with kv8 INT8 K/V with per-(token, kv head) scales."""
        return KVCache(self.config, capacity or self.config.max_position_embeddings, self.xp, kv8=kv8)

    def forward(self, tokens, cache: KVCache | None = None, observer=None, last_only: bool = False):
        """Logits (T, V) float32 for tokens (T,) — or (1, V) for the last token when last_only.

        With a cache, tokens continue the cached sequence and are appended to it.
        observer(layer, site, x) sees the input of each group of linears (see SITES).
        """
        start = cache.length if cache is not None else 0
        tokens = check_tokens(tokens, self.config, start)
        with np.errstate(over="ignore", invalid="ignore"):    # checked below, one clear error
            return self._forward(tokens, cache, observer, last_only, start)

    def _forward(self, tokens, cache, observer, last_only, start):
        c, xp = self.config, self.xp
        t = tokens.shape[0]
        ropes = {}                                                      # one table pair per RoPE kind
        h = embed_tokens(c, self.w.embed, tokens)                       # (T, H)
        for li, L in enumerate(self.w.layers):
            key = c.rope_params(li)
            if key not in ropes:
                ropes[key] = layer_rope(c, li, xp, np.arange(start, start + t))             # (T, D)
            cos, sin = ropes[key]
            h = layer_forward(c, li, L, self._lin[li], h, cos, sin, start, cache, observer)  # (T, H)
        if cache is not None:
            cache.commit(t)
        if last_only:
            h = h[-1:]
        h = check_finite(norm(h, self.w.norm, c.rms_norm_eps, "final norm"), "final norm")  # (T, H)
        return check_finite((h @ self.w.lm_head.T).astype(np.float32), "logits")  # (T, V)
