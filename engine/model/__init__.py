"""The NumPy reference model: forward pass, KV cache, sampling, generation, perplexity.
May import engine.formats, engine.io and engine.util.

The names below are re-exported for code that embeds the engine (`from engine.model import
Model, ModelWeights`); the weight records themselves live in engine/io/layout.py.
"""
from ..io.layout import HF_LINEAR, LINEAR_NAMES, LayerWeights, ModelError, ModelWeights, expected_shapes
from .llama import SITE_OF, SITES, Model, check_tokens

__all__ = ["HF_LINEAR", "LINEAR_NAMES", "SITES", "SITE_OF", "LayerWeights", "Model", "ModelError",
           "ModelWeights", "check_tokens", "expected_shapes"]
