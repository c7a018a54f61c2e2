"""The Llama-family forward pass: flat, written once against `xp`.

RMSNorm → (q, k, v) → RoPE → causal GQA → o → residual → RMSNorm → SwiGLU → residual,
then the final norm and the (possibly tied) lm_head. A linear is a float (N, K)
array or a formats.QuantLinear; the quantized ones run the integer reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import formats, ops_ref
from .config import ModelConfig
from .kv_cache import KVCache

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
# HF tensor name of each linear, relative to model.layers.{i}.
HF_LINEAR = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
# Which observer site feeds each linear (linears at one site share their input).
SITE_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
           "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
SITES = ("attn_in", "o_in", "mlp_in", "down_in")


class ModelError(ValueError):
    """Weights that do not fit the config, or a bad forward-pass argument."""


@dataclass
class LayerWeights:
    attn_norm: np.ndarray            # (H,)
    q: object                        # (Hq·D, H)   float array or QuantLinear
    k: object                        # (Hkv·D, H)
    v: object                        # (Hkv·D, H)
    o: object                        # (H, Hq·D)
    mlp_norm: np.ndarray             # (H,)
    gate: object                     # (I, H)
    up: object                       # (I, H)
    down: object                     # (H, I)

    def linears(self) -> dict:
        return {n: getattr(self, n) for n in LINEAR_NAMES}


@dataclass
class ModelWeights:
    config: ModelConfig
    embed: np.ndarray                # (V, H)
    layers: list = field(default_factory=list)
    norm: np.ndarray | None = None   # (H,)
    lm_head: np.ndarray | None = None  # (V, H); the embedding itself when tied
    lm_head_q: tuple | None = None     # (W8 (V, H) int8, s (V,) float32) when the head is INT8

    def with_int8_lm_head(self) -> "ModelWeights":
        """A copy whose output head is symmetric INT8 with one scale per vocabulary row,
        s = max|row| / 127 (formats.quantize_act_ref's rule, per row): the head's bytes halve
        (Llama-2-7B: 262 → 131 MB read per decoded token). lm_head becomes the float32 W8·s,
        so the NumPy path computes exactly that head; lm_head_q = (W8, s) is what the GPU
        engine streams. A tied embedding stays as it is (the head gets its own copy)."""
        if self.lm_head_q is not None:
            return self
        w = np.asarray(self.lm_head, dtype=np.float32)
        amax = np.abs(w).max(axis=1)
        s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        w8 = formats.quantize_act_ref(w, s)
        return replace(self, lm_head=w8.astype(np.float32) * s[:, None], lm_head_q=(w8, s))

    @classmethod
    def from_hf(cls, config: ModelConfig, tensors: dict) -> "ModelWeights":
        """Pick the tensors out of an HF-named dict, checking every name and shape."""
        c = config
        shapes = expected_shapes(c)

        def get(name):
            if name not in tensors:
                raise ModelError(f"tensor {name} is missing")
            a = tensors[name]
            if tuple(a.shape) != shapes[name]:
                raise ModelError(f"tensor {name} has shape {tuple(a.shape)}, expected {shapes[name]}")
            return np.asarray(a, dtype=np.float32)

        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            lin = {n: get(p + HF_LINEAR[n] + ".weight") for n in LINEAR_NAMES}
            layers.append(LayerWeights(attn_norm=get(p + "input_layernorm.weight"),
                                       mlp_norm=get(p + "post_attention_layernorm.weight"), **lin))
        embed = get("model.embed_tokens.weight")
        lm_head = embed if c.tie_word_embeddings else get("lm_head.weight")
        return cls(config=c, embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)

    def to_hf(self) -> dict:
        """HF-named float tensors (only valid while every linear is a float array)."""
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = L.attn_norm
            out[p + "post_attention_layernorm.weight"] = L.mlp_norm
            for n in LINEAR_NAMES:
                w = getattr(L, n)
                if isinstance(w, formats.QuantLinear):
                    raise ModelError("to_hf() needs float weights; this model holds quantized linears")
                out[p + HF_LINEAR[n] + ".weight"] = w
        return out


def expected_shapes(c: ModelConfig) -> dict:
    """HF tensor name -> shape for a config."""
    h, i = c.hidden_size, c.intermediate_size
    lin = {"q": (c.q_size, h), "k": (c.kv_size, h), "v": (c.kv_size, h), "o": (h, c.q_size),
           "gate": (i, h), "up": (i, h), "down": (h, i)}
    out = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, h)
    for li in range(c.num_hidden_layers):
        p = f"model.layers.{li}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for n, s in lin.items():
            out[p + HF_LINEAR[n] + ".weight"] = s
    return out


def check_tokens(tokens, c: ModelConfig, start: int = 0) -> np.ndarray:
    """tokens as a non-empty 1-D array of valid ids that fit the context after `start`."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ModelError(f"forward needs a non-empty 1-D token array, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= c.vocab_size:
        raise ModelError(f"token ids must lie in [0, {c.vocab_size}), got {tokens.min()}..{tokens.max()}")
    if start + tokens.shape[0] > c.max_position_embeddings:
        raise ModelError(f"sequence of {start + tokens.shape[0]} tokens exceeds the context of "
                         f"{c.max_position_embeddings}")
    return tokens


class Model:
    """Runs ModelWeights with NumPy (the reference path)."""

    def __init__(self, weights: ModelWeights):
        self.w = weights
        self.config = weights.config
        self.xp = np
        # Expand quantized weights once, not per token.
        self._lin = [{n: self._prepare(getattr(L, n)) for n in LINEAR_NAMES} for L in weights.layers]

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
        c, xp = self.config, self.xp
        start = cache.length if cache is not None else 0
        tokens = check_tokens(tokens, c, start)
        t = tokens.shape[0]
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        cos, sin = ops_ref.rope_tables(xp, d, c.rope_theta, np.arange(start, start + t))  # (T, D)
        lin = ops_ref.linear

        h = self.w.embed[tokens]                                        # (T, H)
        for li, L in enumerate(self.w.layers):
            W = self._lin[li]
            x = ops_ref.rmsnorm(h, L.attn_norm, c.rms_norm_eps)         # (T, H)
            if observer:
                observer(li, "attn_in", x)
            q = lin(x, W["q"]).reshape(t, hq, d)                        # (T, Hq, D)
            k = lin(x, W["k"]).reshape(t, hkv, d)                       # (T, Hkv, D)
            v = lin(x, W["v"]).reshape(t, hkv, d)                       # (T, Hkv, D)
            q = ops_ref.apply_rope(q, cos, sin)
            k = ops_ref.apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.write(li, k, v)                            # (S, Hkv, D)
            a = ops_ref.attention(q, k, v, start)                       # (T, Hq·D)
            if observer:
                observer(li, "o_in", a)
            h = h + lin(a, W["o"])                                      # (T, H)
            x = ops_ref.rmsnorm(h, L.mlp_norm, c.rms_norm_eps)          # (T, H)
            if observer:
                observer(li, "mlp_in", x)
            m = ops_ref.silu(lin(x, W["gate"])) * lin(x, W["up"])       # (T, I)
            if observer:
                observer(li, "down_in", m)
            h = h + lin(m, W["down"])                                   # (T, H)
        if cache is not None:
            cache.commit(t)
        if last_only:
            h = h[-1:]
        h = ops_ref.rmsnorm(h, self.w.norm, c.rms_norm_eps)              # (T, H)
        return (h @ self.w.lm_head.T).astype(np.float32)                  # (T, V)
