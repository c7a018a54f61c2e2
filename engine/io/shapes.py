"""Published model shapes by name: the configurations benchmarks build random weights of
(engine/bench/e2e.py) and `python -m engine.parallel --shape` sizes without any weights."""
from __future__ import annotations

from .config import ModelConfig

_LLAMA = dict(tie_word_embeddings=False, head_dim=128)
SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=64, rope_theta=10000.0,
                      max_position_embeddings=2048, tie_word_embeddings=False),
    "llama7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, max_position_embeddings=4096),
    "llama3-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=8192),
    "llama70b": dict(_LLAMA, vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, rope_theta=10000.0, max_position_embeddings=4096),
    "llama3-70b": dict(_LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "llama3-405b": dict(_LLAMA, vocab_size=128256, hidden_size=16384, intermediate_size=53248,
                        num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8, rope_theta=500000.0,
                        max_position_embeddings=8192),
}


def shape_config(name: str) -> ModelConfig:
    """The ModelConfig of a named shape (ValueError naming the known ones)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name])
