"""Device memory of the CuPy model: the KV cache and the preallocated activations."""
from __future__ import annotations

import numpy as np

from ..io.config import ModelConfig
from ..model.kv_cache import bytes_per_position


class GpuKVCache:
    """K/V for L layers and B sequences: (L, B, cap, Hkv, D); lengths on host and device.

    float16, or with kv8 int8 plus float32 scales ks, vs (L, B, cap, Hkv): one per token and
    kv head, x8 = clamp(rint(x / s), ±127), s = max|x| / 127 (formats.quantize_act_ref).
    """

    def __init__(self, cp, config: ModelConfig, capacity: int, batch: int = 1, kv8: bool = False):
        shape = (config.num_hidden_layers, batch, capacity, config.num_key_value_heads, config.head_dim)
        self.kv8 = kv8
        self.k = cp.zeros(shape, dtype=cp.int8 if kv8 else cp.float16)
        self.v = cp.zeros(shape, dtype=cp.int8 if kv8 else cp.float16)
        # the fp16 kernels take scale pointers but never read them: one float per layer
        sshape = shape[:-1] if kv8 else (shape[0], 1)
        self.ks = cp.ones(sshape, dtype=cp.float32)
        self.vs = cp.ones(sshape, dtype=cp.float32)
        self.capacity, self.batch = capacity, batch
        self.lens_host = np.zeros(batch, dtype=np.int64)
        self.step = None           # the decode step's state and captured graph (gpu/decode.py), on first use

    @staticmethod
    def bytes_needed(config: ModelConfig, capacity: int, batch: int = 1, kv8: bool = False) -> int:
        """What __init__ allocates: K and V, plus kv8's float32 scale per token and kv head."""
        return config.num_hidden_layers * batch * capacity * bytes_per_position(config, kv8)

    @property
    def length(self) -> int:
        return int(self.lens_host[0])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (self.ks.nbytes + self.vs.nbytes if self.kv8 else 0)

    def view(self, batch: int) -> "GpuKVCache":
        """The first `batch` sequences as a cache of their own, sharing this one's memory: the
        kernels index sequence b of a layer's (B, cap, Hkv, D) array, so a decode step for the
        view runs `batch` rows. lens_host is a view too (a decode's += reaches this cache);
        each view keeps its own decode state and graph (gpu/decode.py SlotBatch keeps one per
        batch bucket)."""
        if not 1 <= batch <= self.batch:
            raise ValueError(f"a view of 1..{self.batch} sequences, got {batch}")
        v = object.__new__(GpuKVCache)
        v.kv8, v.k, v.v, v.ks, v.vs = self.kv8, self.k, self.v, self.ks, self.vs
        v.capacity, v.batch = self.capacity, batch
        v.lens_host = self.lens_host[:batch]
        v.step = None
        return v

    def move(self, src: int, dst: int) -> None:
        """Sequence src's cached positions (and length) into slot dst (SlotBatch compacts the
        running sequences into the first slots when one leaves). One layer at a time: each
        copy is then between two disjoint contiguous blocks and runs in place, where a copy
        spanning the layers has overlapping bounds and goes through a temporary the size of
        the sequence's whole KV."""
        n = int(self.lens_host[src])
        if n and src != dst:
            for a in (self.k, self.v) + ((self.ks, self.vs) if self.kv8 else ()):
                for layer in range(a.shape[0]):
                    a[layer, dst, :n] = a[layer, src, :n]
        self.lens_host[dst] = n


class Buffers:
    """Preallocated activations for up to M rows (graph capture allows no allocation).

    Scratch that holds operands of different widths is one flat buffer, viewed as a
    contiguous (m, n) matrix on demand: kernels and GEMMs index rows densely.
    """

    def __init__(self, cp, c: ModelConfig, m: int, vocab_rows: int, wide: int):
        h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
        self.m, self.vocab_rows = m, vocab_rows
        f16, f32 = cp.float16, cp.float32
        self.h = cp.zeros((m, h), f32)
        self._x8 = cp.zeros((m * wide,), cp.int8)
        self._xh = cp.zeros((m * wide,), f16)
        self.sx = cp.zeros((m,), f32)
        self.qkv = cp.zeros((m, c.q_size + 2 * c.kv_size), f16)
        self.q = cp.zeros((m, c.num_attention_heads, d), f16)
        self.a = cp.zeros((m, c.q_size), f16)
        self.y = cp.zeros((m, h), f16)
        # a sandwich layer's o and down accumulators (int32), normed and added in float32 (gpu/model.py _sublayer)
        self.yi = cp.zeros((m, h), cp.int32) if c.sandwich_norm else None
        self.gu = cp.zeros((m, 2 * i), f16)
        self.mf = cp.zeros((m, i), f32)               # silu(gate)·up of the SiLU GEMV (fold_quant)
        self.amax = cp.zeros((2, m), cp.uint32)       # max|row| of b.a (o's input) and of mf, float bits
        self.logits = cp.zeros((vocab_rows, c.vocab_size), f16)

    def x8(self, m: int, n: int):
        return self._x8[:m * n].reshape(m, n)

    def xh(self, m: int, n: int):
        return self._xh[:m * n].reshape(m, n)
