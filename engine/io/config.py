"""Model hyper-parameters: one plain dataclass for every Llama-family model we run.

Field names follow Hugging Face's config.json so `from_hf`/`to_hf` are near
identity maps; GGUF import fills the same fields from `llama.*` keys.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass


class ConfigError(ValueError):
    """A model config that is missing a field or holds an impossible value."""


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
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"config field {f} must be a token id (an integer >= 0) or null, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config field tie_word_embeddings must be true or false, "
                              f"got {self.tie_word_embeddings!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (Llama/Mistral/SmolLM layout)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        try:
            heads = _int(d, "num_attention_heads")
            hidden = _int(d, "hidden_size")
            eos = d.get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            tie = d.get("tie_word_embeddings", False)
            if tie is None:
                tie = False
            return cls(
                vocab_size=_int(d, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_int(d, "intermediate_size"),
                num_hidden_layers=_int(d, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=_int(d, "num_key_value_heads", heads),
                head_dim=_int(d, "head_dim", hidden // heads if heads > 0 else 0),
                rope_theta=_float(d, "rope_theta", 10000.0),
                rms_norm_eps=_float(d, "rms_norm_eps", 1e-5),
                max_position_embeddings=_int(d, "max_position_embeddings", 2048),
                tie_word_embeddings=tie,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
            )
        except KeyError as e:
            raise ConfigError(f"config is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config holds a value of the wrong type: {e}") from None

    def to_hf(self) -> dict:
        d = dataclasses.asdict(self)
        d["architectures"] = ["LlamaForCausalLM"]
        d["model_type"] = "llama"
        d["hidden_act"] = "silu"
        return d


def _int(d: dict, key: str, default=None) -> int:
    """An integer field: a JSON integer (or an integral float such as 2048.0), never a bool,
    a string or NaN. A missing or null field takes `default` (KeyError when there is none)."""
    v = d.get(key)
    if v is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config field {key} must be an integer, got {v!r}")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise ConfigError(f"config field {key} must be an integer, got {v!r}")
    return int(v)


def _float(d: dict, key: str, default: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config field {key} must be a number, got {v!r}")
    return float(v)
