"""Preallocated key/value cache for incremental decoding (one sequence)."""
from __future__ import annotations

from .config import ModelConfig


class KVCache:
    """K and V for every layer: (L, capacity, Hkv, D) each, filled up to `length`."""

    def __init__(self, config: ModelConfig, capacity: int, xp, dtype=None):
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        shape = (config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim)
        dtype = dtype or xp.float32
        self.k = xp.zeros(shape, dtype=dtype)
        self.v = xp.zeros(shape, dtype=dtype)
        self.capacity = capacity
        self.length = 0          # tokens committed (all layers)

    def write(self, layer: int, k, v):
        """Store k, v (T, Hkv, D) after the committed tokens; return the layer's K, V so far."""
        t = k.shape[0]
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens exceed its capacity of {self.capacity}")
        self.k[layer, self.length:end] = k
        self.v[layer, self.length:end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def commit(self, t: int):
        self.length += t

    def reset(self):
        self.length = 0
