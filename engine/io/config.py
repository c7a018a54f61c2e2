"""Model hyper-parameters: one plain dataclass for every decoder family we run.

Field names follow Hugging Face's config.json where one exists. The families differ only in
data (FAMILIES and the fields after `eos_token_id`): which linears carry a bias, per-head q/k
norms, Gemma's extra norms and scaled embedding, the MLP activation, sliding-window layers,
RoPE scaling and the local layers' RoPE base. `from_hf` is the one place that reads a family's
config.json (GGUF import builds the same dict from its metadata and calls it too); `to_hf`
writes one that transformers loads for that family, and from_hf(to_hf(c)) == c.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np


class ConfigError(ValueError):
    """A model config that is missing a field or holds an impossible value."""


# HF model_type -> (architecture class, what the family fixes). Everything else a family may
# vary (attention_bias, sliding windows, RoPE scaling, ...) is read from config.json.
FAMILIES = {
    "llama": "LlamaForCausalLM",          # Llama 1-3.x, SmolLM; attention_bias / mlp_bias
    "mistral": "MistralForCausalLM",      # sliding_window on every layer when set
    "qwen2": "Qwen2ForCausalLM",          # Qwen2 / 2.5: q, k, v biases always
    "qwen3": "Qwen3ForCausalLM",          # per-head q/k RMSNorm; attention_bias
    "gemma3_text": "Gemma3ForCausalLM",   # GeGLU (tanh), (1 + w) norms, 4 norms a layer, √H embedding,
}                                         # q/k norms, local sliding layers with their own RoPE base
# The same families under other names: Gemma 3's text model is also written "gemma3" by
# tools that take it out of the multimodal checkpoint, which we refuse (its weights sit
# under language_model.*).
ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")      # engine/io/layout.py LINEAR_NAMES
_HF_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


# Bounds no real model reaches but a corrupt file can claim: checked before anything is sized
# from them (a 10^12-token context would size RoPE tables and caches in TiB). The largest
# released contexts are 10M tokens (Llama 4 Scout); 2^24 leaves room.
MAX_CONTEXT = 1 << 24
MAX_DIM = 1 << 20          # hidden, intermediate, head_dim, heads (Llama-3-405B: hidden 16384)
MAX_VOCAB = 1 << 24
MAX_LAYERS = 1 << 12


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # ---- what the families differ in (defaults: Llama)
    model_type: str = "llama"                 # a FAMILIES key
    hidden_act: str = "silu"                  # MLP: act(gate)·up, "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    linear_bias: tuple = ()                   # linears with a bias, e.g. ("q", "k", "v") for Qwen2
    qk_norm: bool = False                     # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False               # norms on the attention and MLP outputs too (Gemma 3)
    norm_offset: float = 0.0                  # HF stores w, RMSNorm multiplies by offset + w (Gemma: 1);
                                              # in memory every norm is the multiplier itself
    embed_scale: float = 1.0                  # h0 = embed[token] · embed_scale (Gemma: √hidden)
    query_pre_attn_scalar: float | None = None  # scores scaled by its −½ power (None: head_dim's)
    sliding_window: int | None = None         # a sliding layer's query sees this many keys, itself included
    layer_types: tuple | None = None          # per layer "full_attention" | "sliding_attention"; None: all full
    rope_type: str = "default"                # RoPE of the full layers: "default" | "linear" | "llama3"
    rope_factor: float = 1.0                  # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0         # llama3
    rope_high_freq_factor: float = 4.0        # llama3
    rope_original_max_position: int = 8192    # llama3
    rope_local_theta: float | None = None     # RoPE base of the sliding layers (Gemma 3: 10000); None: rope_theta

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {f} must be a positive integer, got {v!r}")
        for f, hi in (("max_position_embeddings", MAX_CONTEXT), ("vocab_size", MAX_VOCAB),
                      ("num_hidden_layers", MAX_LAYERS), ("hidden_size", MAX_DIM),
                      ("intermediate_size", MAX_DIM), ("num_attention_heads", MAX_DIM),
                      ("num_key_value_heads", MAX_DIM), ("head_dim", MAX_DIM)):
            if getattr(self, f) > hi:
                raise ConfigError(f"config field {f} = {getattr(self, f)} is beyond any real model "
                                  f"(at most {hi}); the file is corrupt")
        for f in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
                    or (f == "rope_theta" and v == 0):
                sign = "positive" if f == "rope_theta" else "non-negative"
                raise ConfigError(f"config field {f} must be a finite {sign} number, got {v!r}")
        for f in ("bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_VOCAB):
                raise ConfigError(f"config field {f} must be a token id (an integer in [0, {MAX_VOCAB})) "
                                  f"or null, got {v!r:.40}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config field tie_word_embeddings must be true or false, "
                              f"got {self.tie_word_embeddings!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self._check_family_fields()

    def _check_family_fields(self):
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported "
                              f"(supported: {', '.join(FAMILIES)})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only {', '.join(ACTIVATIONS)})")
        if not isinstance(self.linear_bias, tuple) or any(n not in LINEARS for n in self.linear_bias) \
                or len(set(self.linear_bias)) != len(self.linear_bias):
            raise ConfigError(f"linear_bias must be a tuple of distinct linear names {LINEARS}, "
                              f"got {self.linear_bias!r}")
        for f in ("qk_norm", "sandwich_norm"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"config field {f} must be true or false, got {getattr(self, f)!r}")
        for f in ("norm_offset", "embed_scale", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "query_pre_attn_scalar", "rope_local_theta"):
            v = getattr(self, f)
            if v is None and f in ("query_pre_attn_scalar", "rope_local_theta"):
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
                    or (v == 0 and f != "norm_offset"):
                raise ConfigError(f"config field {f} must be a finite positive number, got {v!r}")
        sw = self.sliding_window
        if sw is not None and (not isinstance(sw, int) or isinstance(sw, bool) or not 0 < sw <= MAX_CONTEXT):
            raise ConfigError(f"config field sliding_window must be a positive integer (at most {MAX_CONTEXT}) "
                              f"or null, got {sw!r:.40}")
        lt = self.layer_types
        if lt is not None:
            if not isinstance(lt, tuple) or len(lt) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in lt):
                raise ConfigError(f"layer_types must list {self.num_hidden_layers} entries of {LAYER_TYPES}, "
                                  f"got {str(lt)[:80]}")
            if "sliding_attention" in lt and sw is None:
                raise ConfigError("layer_types names sliding_attention layers but sliding_window is null")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"RoPE scaling {self.rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
        o = self.rope_original_max_position
        if not isinstance(o, int) or isinstance(o, bool) or not 0 < o <= MAX_CONTEXT:
            raise ConfigError(f"rope original_max_position_embeddings must be a positive integer (at most "
                              f"{MAX_CONTEXT}), got {o!r:.40}")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError("llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got "
                              f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}")

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window (and uses the local RoPE)."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def window(self, layer: int) -> int | None:
        """Keys a query of this layer sees (itself included), None for the full causal past."""
        return self.sliding_window if self.is_sliding(layer) else None

    def rope_params(self, layer: int) -> tuple:
        """(theta, rope_type, factor, low, high, original context) of the RoPE layer `layer` uses:
        a sliding layer of a model with a local base (Gemma 3) uses that base, unscaled."""
        if self.rope_local_theta is not None and self.is_sliding(layer):
            return (self.rope_local_theta, "default", 1.0, 1.0, 4.0, 8192)
        return (self.rope_theta, self.rope_type, self.rope_factor, self.rope_low_freq_factor,
                self.rope_high_freq_factor, self.rope_original_max_position)

    @property
    def attn_scale(self) -> float:
        """The factor on q·k: query_pre_attn_scalar^−½ (Gemma), else head_dim^−½."""
        return float((self.query_pre_attn_scalar or self.head_dim) ** -0.5)

    def features(self) -> list[str]:
        """What this model uses beyond the plain Llama layer, in words (every one runs on both
        engines; engine/gpu/model.py gpu_refusals says what the GPU engine cannot run)."""
        out = []
        if self.linear_bias:
            out.append(f"biases on {', '.join(self.linear_bias)}")
        if self.qk_norm:
            out.append("per-head q/k norms")
        if self.sandwich_norm:
            out.append("norms on the attention and MLP outputs")
        if self.hidden_act != "silu":
            out.append(f"the {self.hidden_act} MLP activation (GeGLU)")
        if self.embed_scale != 1.0:
            out.append("a scaled embedding")
        if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar != self.head_dim:
            out.append("an attention scale other than head_dim^-1/2 (query_pre_attn_scalar)")
        if self.layer_types is not None and "sliding_attention" in self.layer_types:
            out.append("sliding-window attention")
        if self.rope_type != "default":
            out.append(f"{self.rope_type} RoPE scaling")
        if self.rope_local_theta is not None and self.layer_types is not None \
                and "sliding_attention" in self.layer_types and self.rope_local_theta != self.rope_theta:
            out.append("a second RoPE base for the local layers")
        return out

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict of a FAMILIES model_type (a config without
        model_type is read as Llama). Features the engine does not run (MoE, other RoPE
        scalings, soft-capping, partial RoPE, ...) are refused by name."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        try:
            return cls(**_family_fields(d))
        except KeyError as e:
            raise ConfigError(f"config is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config holds a value of the wrong type: {e}") from None

    def to_hf(self) -> dict:
        """A config.json dict transformers loads for this family (rope_theta / rope_scaling in
        the form every transformers version reads); from_hf reads it back to this config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _HF_COMMON}
        d["architectures"] = [FAMILIES[self.model_type]]
        d["model_type"] = self.model_type
        bias = set(self.linear_bias)
        if self.model_type == "gemma3_text":
            d["hidden_activation"] = "gelu_pytorch_tanh" if self.hidden_act == "gelu_tanh" else self.hidden_act
            d["query_pre_attn_scalar"] = self.query_pre_attn_scalar or self.head_dim
            d["rope_local_base_freq"] = self.rope_local_theta or self.rope_theta
        else:
            d["hidden_act"] = self.hidden_act
        if self.model_type in ("llama", "qwen3", "gemma3_text"):
            d["attention_bias"] = bool(bias & {"q", "k", "v", "o"})
        if self.model_type == "llama":
            d["mlp_bias"] = bool(bias & {"gate", "up", "down"})
        d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            sliding = [i for i in range(self.num_hidden_layers) if self.is_sliding(i)]
            d["use_sliding_window"] = bool(sliding)
            d["max_window_layers"] = sliding[0] if sliding else self.num_hidden_layers
        if self.model_type in ("qwen2", "qwen3", "gemma3_text"):
            d["layer_types"] = list(self.layer_types or ("full_attention",) * self.num_hidden_layers)
        if self.rope_type == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            d["rope_scaling"] = {"rope_type": "llama3", "factor": self.rope_factor,
                                 "low_freq_factor": self.rope_low_freq_factor,
                                 "high_freq_factor": self.rope_high_freq_factor,
                                 "original_max_position_embeddings": self.rope_original_max_position}
        return d


_HF_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id")
# Defaults of a field config.json leaves out, where a family's differs from Llama's (ours).
_FAMILY_DEFAULTS = {
    "gemma3_text": {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                    "max_position_embeddings": 131072, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6},
    "qwen2": {"rms_norm_eps": 1e-6}, "qwen3": {"rms_norm_eps": 1e-6}, "mistral": {"rms_norm_eps": 1e-6},
}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _family_fields(d: dict) -> dict:
    """ModelConfig keyword arguments from an HF config dict (see ModelConfig.from_hf)."""
    mtype = d.get("model_type", "llama")
    if mtype == "gemma3":
        raise ConfigError("model_type 'gemma3' is the multimodal Gemma 3; only its text model "
                          "(model_type 'gemma3_text', Gemma3ForCausalLM: the 270M and 1B) is supported")
    if mtype not in FAMILIES:
        raise ConfigError(f"model_type {mtype!r} is not supported (supported: {', '.join(FAMILIES)})")
    for k in _MOE_KEYS:
        if d.get(k):
            raise ConfigError(f"mixture-of-experts models ({k} = {d[k]!r}) are not supported")
    for k in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(k) is not None:
            raise ConfigError(f"{k} = {d[k]!r} (logit soft-capping) is not supported")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention (a non-causal model) is not supported")
    fam = _FAMILY_DEFAULTS.get(mtype, {})
    heads = _int(d, "num_attention_heads")
    hidden = _int(d, "hidden_size")
    layers = _int(d, "num_hidden_layers")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    tie = d.get("tie_word_embeddings", fam.get("tie_word_embeddings", False))
    if tie is None:
        tie = False
    act_key = "hidden_activation" if mtype == "gemma3_text" and d.get("hidden_activation") else "hidden_act"
    act = d.get(act_key, "gelu_pytorch_tanh" if mtype == "gemma3_text" else "silu")
    if act not in _HF_ACT or (mtype == "gemma3_text") != (_HF_ACT[act] == "gelu_tanh"):
        raise ConfigError(f"{act_key} {act!r} is not supported for {mtype} "
                          f"(expected {'gelu_pytorch_tanh' if mtype == 'gemma3_text' else 'silu'})")
    out = dict(
        vocab_size=_int(d, "vocab_size"), hidden_size=hidden,
        intermediate_size=_int(d, "intermediate_size"), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=_int(d, "num_key_value_heads", heads),
        head_dim=_int(d, "head_dim", hidden // heads if heads > 0 else 0),
        rms_norm_eps=_float(d, "rms_norm_eps", fam.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=_int(d, "max_position_embeddings", fam.get("max_position_embeddings", 2048)),
        tie_word_embeddings=tie, bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
        model_type=mtype, hidden_act=_HF_ACT[act])

    # biases, norms, embedding
    attn_bias = d.get("attention_bias") is True
    bias = {"qwen2": ("q", "k", "v"), "mistral": ()}.get(mtype, ("q", "k", "v", "o") if attn_bias else ())
    if mtype == "llama" and d.get("mlp_bias") is True:
        bias += ("gate", "up", "down")
    out["linear_bias"] = bias
    out["qk_norm"] = mtype in ("qwen3", "gemma3_text")
    if mtype == "gemma3_text":
        out.update(sandwich_norm=True, norm_offset=1.0, embed_scale=float(hidden) ** 0.5,
                   query_pre_attn_scalar=_float(d, "query_pre_attn_scalar", fam["query_pre_attn_scalar"]))

    # sliding windows: Mistral on every layer; Qwen from max_window_layers up; Gemma by pattern
    sw = _int(d, "sliding_window", 0) if d.get("sliding_window") is not None else fam.get("sliding_window")
    types = d.get("layer_types") if mtype in ("qwen2", "qwen3", "gemma3_text") else None
    if mtype == "llama":
        sw = None                 # HF's Llama has no sliding window, whatever the file says
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
            raise ConfigError(f"layer_types must list {layers} entries of {LAYER_TYPES}, got {str(types)[:80]}")
        types = tuple(types)
        if mtype in ("qwen2", "qwen3") and not d.get("use_sliding_window", True):
            types = None          # transformers drops the window then, whatever layer_types says
    elif mtype == "mistral":
        types = None if sw is None else ("sliding_attention",) * layers
    elif mtype in ("qwen2", "qwen3"):
        if d.get("use_sliding_window") and sw is not None:
            first = _int(d, "max_window_layers", 28)
            types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))
    elif mtype == "gemma3_text":
        pat = _int(d, "sliding_window_pattern", fam["sliding_window_pattern"])
        if pat <= 0:
            raise ConfigError(f"sliding_window_pattern must be positive, got {pat}")
        types = tuple("sliding_attention" if (i + 1) % pat else "full_attention" for i in range(layers))
    if types is not None and "sliding_attention" not in types:
        types = None
    out["layer_types"] = types
    out["sliding_window"] = sw if types is not None else None

    out.update(_rope_fields(d, mtype, fam))
    return out


def _rope_fields(d: dict, mtype: str, fam: dict) -> dict:
    """RoPE fields from rope_theta / rope_scaling (transformers 4) or rope_parameters (5)."""
    full = d.get("rope_scaling")
    local = None
    theta = d.get("rope_theta")
    local_theta = d.get("rope_local_base_freq")
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params or "sliding_attention" in params:
            full, local = params.get("full_attention"), params.get("sliding_attention")
            if isinstance(local, dict):
                local_theta = local.get("rope_theta", local_theta)
                if local.get("rope_type", local.get("type", "default")) != "default":
                    raise ConfigError(f"RoPE scaling {local.get('rope_type')!r} on the sliding layers "
                                      "is not supported")
        else:
            full = params
        if isinstance(full, dict) and full.get("rope_theta") is not None:
            theta = full["rope_theta"]
    elif params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {str(params)[:40]!r}")
    out = {"rope_theta": _float({"t": theta}, "t", fam.get("rope_theta", 10000.0))}
    if mtype == "gemma3_text":
        out["rope_local_theta"] = _float({"t": local_theta}, "t", fam["rope_local_base_freq"])
    if full is None:
        return out
    if not isinstance(full, dict):
        raise ConfigError(f"rope_scaling must be an object, got {str(full)[:40]!r}")
    rtype = full.get("rope_type", full.get("type", "default"))
    if full.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial RoPE (partial_rotary_factor < 1) is not supported")
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"RoPE scaling {rtype!r} is not supported (only {', '.join(ROPE_TYPES)})")
    out["rope_type"] = rtype
    if rtype in ("linear", "llama3"):
        out["rope_factor"] = _float(full, "factor", None)
    if rtype == "llama3":
        out.update(rope_low_freq_factor=_float(full, "low_freq_factor", None),
                   rope_high_freq_factor=_float(full, "high_freq_factor", None),
                   rope_original_max_position=_int(full, "original_max_position_embeddings"))
    return out


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, original_max: int = 8192):
    """RoPE inverse frequencies (D/2,) float64: θ^(−2i/D), then the scaling of `rope_type`:
    "linear" divides them all by factor; "llama3" (transformers' _compute_llama3_parameters)
    divides the low frequencies (wavelength > original_max / low_freq_factor) by factor, keeps
    the high ones (wavelength < original_max / high_freq_factor) and blends in between."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))       # (D/2,)
    if rope_type == "linear":
        return inv / factor
    if rope_type == "llama3":
        wavelen = 2 * np.pi / inv
        low_wl, high_wl = original_max / low_freq_factor, original_max / high_freq_factor
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, blended, scaled)
    return inv


def _number(d: dict, key: str, default, integral: bool):
    """A numeric field: a JSON number, never a bool or a string; with `integral`, an integer
    (or an integral float such as 2048.0, never NaN). A missing or null field takes `default`
    (KeyError when there is none)."""
    v = d.get(key)
    if v is None:
        if default is None:
            raise KeyError(key)
        return default
    what = "an integer" if integral else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            integral and isinstance(v, float) and not (math.isfinite(v) and v.is_integer())):
        raise ConfigError(f"config field {key} must be {what}, got {v!r}")
    return int(v) if integral else float(v)


def _int(d: dict, key: str, default=None) -> int:
    return _number(d, key, default, integral=True)


def _float(d: dict, key: str, default: float | None) -> float:
    return _number(d, key, default, integral=False)
