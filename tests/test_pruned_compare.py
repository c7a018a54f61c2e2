"""bench/pruned_compare.py's fp16-storage diagnostic: the NumPy model with the GPU's fp16 storage
points rounded, and the reference restored afterwards."""
import importlib.util
from pathlib import Path

import numpy as np

from engine.model import Model, ModelWeights, ops_ref
from tiny_model import make_tiny_config, make_tiny_tensors

_SPEC = importlib.util.spec_from_file_location("pruned_compare", Path(__file__).parents[1] / "bench" / "pruned_compare.py")
pruned_compare = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pruned_compare)


def test_fp16_storage_rounds_inside_and_restores_after():
    c = make_tiny_config()
    model = Model(ModelWeights.from_hf(c, make_tiny_tensors(c, seed=4)))
    tokens = np.arange(3, 40)
    ref = model.forward(tokens)
    linear, attention = ops_ref.linear, ops_ref.attention
    with pruned_compare.fp16_storage():
        x = np.random.default_rng(0).standard_normal((5, c.hidden_size)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((7, c.hidden_size)).astype(np.float32)
        y = ops_ref.linear(x, w)
        np.testing.assert_array_equal(y, y.astype(np.float16).astype(np.float32))   # fp16 values
        got = model.forward(tokens)
    assert (ops_ref.linear, ops_ref.attention) == (linear, attention)
    assert not np.array_equal(got, ref)                        # the rounding reached the logits
    np.testing.assert_allclose(got, ref, atol=2e-2 * np.abs(ref).max())
    np.testing.assert_array_equal(model.forward(tokens), ref)  # and is gone after the block
    with pruned_compare.fp16_storage(False):
        np.testing.assert_array_equal(model.forward(tokens), ref)
