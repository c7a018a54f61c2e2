"""The decoder layout: tensor names and shapes, and the weight records every room passes around.

A checkpoint in memory is float32 tensors under their Hugging Face names (`expected_shapes`
lists them for a config; linear weights are (N out, K in), q/k rows in HF "rotate-half" RoPE
order). Every norm is held as the multiplier RMSNorm applies: Gemma's HF files store w for a
(1 + w) norm, so the HF reader adds config.norm_offset and the exporter takes it off again
(GGUF files already hold 1 + w). `ModelWeights` holds the tensors by role, each linear a float
array or a formats.QuantLinear; the family's extra tensors (biases, q/k norms, Gemma's output
norms) sit beside them in LayerWeights. The loaders (hf_dir, gguf_file, qfile) build these
records; engine/model runs them.
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


# The norms of a layer by role -> HF name relative to model.layers.{i}. A Llama layer has two:
# before attention and before the MLP (which HF calls post_attention_layernorm). A "sandwich"
# layer (Gemma 3) also norms each sublayer's output before the residual add, and its HF names
# shift: post_attention_layernorm is then the attention output's norm.
HF_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
HF_NORMS_SANDWICH = {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
                     "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}
HF_QK_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
OPTIONAL_NORMS = ("attn_out_norm", "mlp_out_norm", "q_norm", "k_norm")


def layer_norm_names(c: ModelConfig) -> dict:
    """Role -> HF name (relative to model.layers.{i}., without .weight) of every norm of a layer."""
    out = dict(HF_NORMS_SANDWICH if c.sandwich_norm else HF_NORMS)
    if c.qk_norm:
        out.update(HF_QK_NORMS)
    return out


def is_norm_name(name: str) -> bool:
    """An RMSNorm weight (the tensors config.norm_offset applies to)."""
    return name.endswith("norm.weight")


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
    bias: dict = field(default_factory=dict)   # linear name -> (N,) float32, for config.linear_bias
    q_norm: np.ndarray | None = None           # (D,) per-head norm of q before RoPE (config.qk_norm)
    k_norm: np.ndarray | None = None           # (D,)
    attn_out_norm: np.ndarray | None = None    # (H,) norm of the attention output (config.sandwich_norm)
    mlp_out_norm: np.ndarray | None = None     # (H,) norm of the MLP output

    def linears(self) -> dict:
        return {n: getattr(self, n) for n in LINEAR_NAMES}

    def floats(self) -> dict:
        """Everything but the seven linears, as keyword arguments: LayerWeights(**L.floats(), **linears)
        rebuilds a layer with new linears and the same norms and biases."""
        out = {"attn_norm": self.attn_norm, "mlp_norm": self.mlp_norm, "bias": dict(self.bias)}
        out.update({n: getattr(self, n) for n in OPTIONAL_NORMS if getattr(self, n) is not None})
        return out

    def check(self, c: ModelConfig, li: int) -> None:
        """ModelError naming what this layer lacks (or holds) against what the config asks for."""
        want = {n for n in layer_norm_names(c)} - {"attn_norm", "mlp_norm"}
        for n in OPTIONAL_NORMS:
            has = getattr(self, n) is not None
            if has != (n in want):
                raise ModelError(f"layer {li}: {'missing' if not has else 'unexpected'} {n} "
                                 f"(the {c.model_type} config {'asks for' if not has else 'has no'} it)")
        if set(self.bias) != set(c.linear_bias):
            raise ModelError(f"layer {li}: biases on {sorted(self.bias) or 'no linear'}, the {c.model_type} "
                             f"config asks for {list(c.linear_bias) or 'none'}")

    @classmethod
    def from_hf(cls, config: ModelConfig, tensors, li: int) -> "LayerWeights":
        """Layer `li`'s float32 weights out of an HF-named mapping (a dict or LazyTensors: only
        this layer's tensors are read), every name and shape checked."""
        p = f"model.layers.{li}."
        get = _getter(config, tensors)
        lin = {n: get(p + HF_LINEAR[n] + ".weight") for n in LINEAR_NAMES}
        norms = {role: get(p + hf + ".weight") for role, hf in layer_norm_names(config).items()}
        bias = {n: get(p + HF_LINEAR[n] + ".bias") for n in config.linear_bias}
        return cls(**norms, **lin, bias=bias)

    def to_hf(self, config: ModelConfig, li: int) -> dict:
        """This layer's HF-named float tensors (float linears only)."""
        p = f"model.layers.{li}."
        out = {p + hf + ".weight": getattr(self, role) for role, hf in layer_norm_names(config).items()}
        for n in LINEAR_NAMES:
            w = getattr(self, n)
            if isinstance(w, formats.QuantLinear):
                raise ModelError("to_hf() needs float weights; this model holds quantized linears")
            out[p + HF_LINEAR[n] + ".weight"] = w
            if n in self.bias:
                out[p + HF_LINEAR[n] + ".bias"] = self.bias[n]
        return out


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
            out.update(L.to_hf(self.config, i))
        return out


def n_params(c: ModelConfig) -> int:
    """Parameters the config implies (Python ints: a corrupt config cannot overflow this)."""
    h, i = c.hidden_size, c.intermediate_size
    per_layer = c.q_size * h * 2 + c.kv_size * h * 2 + 3 * i * h
    per_layer += sum(s[0] for s in _layer_float_shapes(c).values())
    return c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h + c.num_hidden_layers * per_layer


def n_tensors(c: ModelConfig) -> int:
    """Tensors of the HF layout (Llama: 9 a layer, 2 norms and 7 linears)."""
    return 2 + (0 if c.tie_word_embeddings else 1) + (7 + len(_layer_float_shapes(c))) * c.num_hidden_layers


def _layer_float_shapes(c: ModelConfig) -> dict:
    """HF name (relative to model.layers.{i}.) -> shape of a layer's norms and biases."""
    h, d = c.hidden_size, c.head_dim
    out = {hf + ".weight": ((d,) if role in HF_QK_NORMS else (h,)) for role, hf in layer_norm_names(c).items()}
    n_out = {"q": c.q_size, "k": c.kv_size, "v": c.kv_size, "o": h,
             "gate": c.intermediate_size, "up": c.intermediate_size, "down": h}
    out.update({HF_LINEAR[n] + ".bias": (n_out[n],) for n in c.linear_bias})
    return out


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
    floats = _layer_float_shapes(c)
    for li in range(c.num_hidden_layers):
        p = f"model.layers.{li}."
        for name, s in floats.items():
            out[p + name] = s
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
                           f"is this a {config.model_type} checkpoint?")
