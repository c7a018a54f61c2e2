"""The Llama layout: tensor names and shapes, and the weight records every room passes around.

A checkpoint in memory is float32 tensors under their Hugging Face names (`expected_shapes`
lists them; linear weights are (N out, K in), q/k rows in HF "rotate-half" RoPE order).
`ModelWeights` holds them by role, each linear a float array or a formats.QuantLinear.
The loaders (hf_dir, gguf_file, qfile) build these records; engine/model runs them.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from .. import formats
from .config import ModelConfig

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
# HF tensor name of each linear, relative to model.layers.{i}.
HF_LINEAR = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


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

    @classmethod
    def from_hf(cls, config: ModelConfig, tensors, li: int) -> "LayerWeights":
        """Layer `li`'s float32 weights out of an HF-named mapping (a dict or LazyTensors: only
        this layer's nine tensors are read), every name and shape checked."""
        p = f"model.layers.{li}."
        get = _getter(config, tensors)
        lin = {n: get(p + HF_LINEAR[n] + ".weight") for n in LINEAR_NAMES}
        return cls(attn_norm=get(p + "input_layernorm.weight"),
                   mlp_norm=get(p + "post_attention_layernorm.weight"), **lin)


def _getter(config: ModelConfig, tensors):
    shapes = expected_shapes(config)

    def get(name):
        if name not in tensors:
            raise ModelError(f"tensor {name} is missing")
        a = tensors[name]
        if tuple(a.shape) != shapes[name]:
            raise ModelError(f"tensor {name} has shape {tuple(a.shape)}, expected {shapes[name]}")
        return np.asarray(a, dtype=np.float32)
    return get


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
        get = _getter(c, tensors)
        layers = [LayerWeights.from_hf(c, tensors, i) for i in range(c.num_hidden_layers)]
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


def n_params(c: ModelConfig) -> int:
    """Parameters the config implies (Python ints: a corrupt config cannot overflow this)."""
    h, i = c.hidden_size, c.intermediate_size
    per_layer = 2 * h + c.q_size * h * 2 + c.kv_size * h * 2 + 3 * i * h
    return c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h + c.num_hidden_layers * per_layer


def n_tensors(c: ModelConfig) -> int:
    """Tensors of the HF layout (9 a layer: 2 norms and 7 linears)."""
    return 2 + (0 if c.tie_word_embeddings else 1) + 9 * c.num_hidden_layers


def check_fits(c: ModelConfig, where, tensors_held: int, bytes_held: int, min_bits: float,
               tensors_per_linear: int = 1) -> None:
    """Refuse a config that the file cannot hold before anything is sized from it: a corrupt
    layer count or width would otherwise build a name table of 10^9 layers or a TiB array.
    tensors_held / bytes_held: what the file really holds; min_bits: the fewest bits a
    parameter can take in this kind of file."""
    # Half the need, so that a file short of a tensor or two still gets the precise
    # "missing tensor X" from the loader; a corrupt count is off by far more.
    need_t = 2 + (0 if c.tie_word_embeddings else 1) + c.num_hidden_layers * (2 + 7 * tensors_per_linear)
    if 2 * tensors_held + 9 < need_t:
        raise WeightsError(f"{where}: the config declares {c.num_hidden_layers} layers "
                           f"({need_t} tensors at least) but the file holds {tensors_held} tensors; "
                           "the config or the file is corrupt")
    need_b = int(n_params(c) * min_bits / 8)
    if 2 * bytes_held < need_b:
        raise WeightsError(f"{where}: the config needs {n_params(c)} parameters "
                           f"(at least {need_b} bytes) but the weights hold {bytes_held} bytes; "
                           "the config or the file is corrupt (or truncated)")


def check_finite(name: str, a: np.ndarray, where) -> None:
    """Raise WeightsError naming the tensor when a float tensor holds NaN or Inf."""
    if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise WeightsError(f"{where}: tensor {name} holds {bad} NaN/Inf value(s); "
                           "the checkpoint is damaged (re-download or re-export it)")


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




class WeightsError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match its config."""


class LazyTensors(Mapping):
    """HF name -> float32 array, each read from its file when asked for (engine/io/hf_dir.py,
    gguf_file.py with lazy=True): a converter can walk a model larger than memory one layer at a
    time. Every access reads afresh (nothing is cached here: the caller owns what it keeps);
    `loads` counts reads and `live()` names the arrays still referenced, so tests can check
    that only one layer's weights are resident at a time."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple]):
        self._loaders = dict(loaders)
        self.shapes = dict(shapes)                      # name -> shape, known without a read
        self.loads = 0
        self._live: dict[int, str] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._loaders:
            raise KeyError(name)
        a = self._loaders[name]()
        self.loads += 1
        key = id(a)
        self._live[key] = name
        weakref.finalize(a, self._live.pop, key, None)
        return a

    def __contains__(self, name) -> bool:               # Mapping's default would read the tensor
        return name in self._loaders

    def __iter__(self):
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def live(self) -> list[str]:
        """Names of the arrays handed out that are still referenced somewhere."""
        return sorted(self._live.values())


@dataclass
class Checkpoint:
    """A float checkpoint as every loader returns it (engine/io/hf_dir.py, gguf_file.py)."""
    config: ModelConfig
    tensors: Mapping[str, np.ndarray]     # HF name -> float32 array (lm_head.weight absent when tied);
                                          # a dict, or LazyTensors (read on access) with lazy=True
    tokenizer: Any                        # tokenizers.Tokenizer | None
    chat_template: str | None
    source: str


def check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise WeightsError naming `where` and the tensor unless `tensors` is exactly the expected set."""
    want = expected_shapes(config)
    for name, shape in want.items():
        if name not in tensors:
            raise WeightsError(f"{where}: missing tensor {name} (expected shape {shape})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise WeightsError(f"{where}: tensor {name} has shape {got}, the config needs {shape}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise WeightsError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all); "
                           "is this a Llama-family checkpoint?")
