"""Preallocated key/value cache for incremental decoding (one sequence).

kv8 stores K and V as symmetric INT8 with one float32 scale per (token, kv head) and
dequantizes on read: this is the reference the GPU engine's INT8 cache matches
(engine/gpu/model.py GpuKVCache, cuda/attention.cu).
"""
from __future__ import annotations

import numpy as np

from .. import formats
from ..io.config import ModelConfig


def bytes_per_position(config: ModelConfig, kv8: bool, kv_heads: int | None = None) -> int:
    """K and V bytes of one position of one sequence in one layer as the GPU engine stores them:
    fp16, or (kv8) INT8 plus one float32 scale per kv head; kv_heads: those held (default all)."""
    heads = config.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * heads * (config.head_dim + 4 if kv8 else 2 * config.head_dim)


def quantize_kv_ref(x):
    """x (..., D), e.g. (T, Hkv, D) -> (x8 int8 (..., D), s float32 (...)): x8 = clamp(rint(x / s), ±127),
    s = max|x| / 127 over the D values of one token and head (1 for an all-zero row)."""
    flat = x.reshape(-1, x.shape[-1])                                 # (T·Hkv, D)
    s = formats.act_scale_dynamic(flat)                               # (T·Hkv,)
    return formats.quantize_act_ref(flat, s).reshape(x.shape), s.reshape(x.shape[:-1])


class KVCache:
    """K and V for every layer: (L, capacity, Hkv, D) each, filled up to `length`.

    kv8: K, V are int8 with scales ks, vs (L, capacity, Hkv); write() returns them dequantized.
    """

    def __init__(self, config: ModelConfig, capacity: int, xp, dtype=None, kv8: bool = False):
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        shape = (config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim)
        if kv8 and dtype is not None:
            raise ValueError("a kv8 cache stores int8 with float32 scales: pass no dtype")
        self.kv8 = kv8
        dtype = xp.int8 if kv8 else (dtype or xp.float32)
        try:
            self.k = xp.zeros(shape, dtype=dtype)
            self.v = xp.zeros(shape, dtype=dtype)
            if kv8:
                self.ks = xp.zeros(shape[:-1], dtype=xp.float32)
                self.vs = xp.zeros(shape[:-1], dtype=xp.float32)
        except MemoryError:
            gib = 2 * int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize / 2**30
            raise ValueError(f"a KV cache of {capacity} tokens needs {gib:.1f} GiB, more than this "
                             "machine can hold; ask for a smaller capacity") from None
        self.capacity = capacity
        self.length = 0          # tokens committed (all layers)

    def write(self, layer: int, k, v):
        """Store k, v (T, Hkv, D) after the committed tokens; return the layer's K, V so far."""
        t = k.shape[0]
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens exceed its capacity of {self.capacity}")
        if not self.kv8:
            self.k[layer, self.length:end] = k
            self.v[layer, self.length:end] = v
            return self.k[layer, :end], self.v[layer, :end]
        self.k[layer, self.length:end], self.ks[layer, self.length:end] = quantize_kv_ref(k)
        self.v[layer, self.length:end], self.vs[layer, self.length:end] = quantize_kv_ref(v)
        kd = self.k[layer, :end] * self.ks[layer, :end, :, None]       # (S, Hkv, D) float32
        vd = self.v[layer, :end] * self.vs[layer, :end, :, None]
        return kd, vd

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.k, self.v) + ((self.ks, self.vs) if self.kv8 else ()))

    def commit(self, t: int):
        self.length += t

    def reset(self):
        self.length = 0
