"""bench/pruned_compare.py: its fp16-storage diagnostic (the NumPy model with the GPU's fp16 storage
points rounded, and the reference restored afterwards), and eval of a DIR whose info.json names its
q file, written with the pot3-a8 recipe."""
import importlib.util
from pathlib import Path

import numpy as np

from engine.model import Model, ModelWeights, ops_ref
from tiny_model import make_tiny_checkpoint, make_tiny_config, make_tiny_tensors

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


def test_eval_reads_the_q_file_info_names(tmp_path):
    """A DIR of the pot3-a8 recipe: the q file holds pot3 g128 layers of act "dynamic" under the name
    info.json gives, and eval scores its windows with dgq-eval's function on the CPU."""
    import json

    from converters.quantize import quantize_to_file
    from engine.io.qfile import load_qfile
    ck = make_tiny_checkpoint(tmp_path / "hf")
    d = tmp_path / "dir"
    d.mkdir()
    quantize_to_file(ck, d / "tiny-pot3-a8.q.safetensors", progress=False, n_seq=2, seq_len=32,
                     **pruned_compare.RECIPES["pot3-a8"])
    L = load_qfile(d / "tiny-pot3-a8.q.safetensors").weights.layers[0]
    assert (L.q.kind, L.q.group, L.q.act) == ("pot3", 128, "dynamic")
    tokens = np.random.default_rng(0).integers(0, ck.config.vocab_size, 2 * 16).astype(np.int32)
    np.save(d / pruned_compare.TOKENS, tokens)
    (d / pruned_compare.INFO).write_text(json.dumps({"qfile": "tiny-pot3-a8.q.safetensors", "window": 16}))
    r = pruned_compare.evaluate(d, "cpu")
    assert r["n_windows"] == 2 and r["n_tokens"] == 30 and np.isfinite(r["perplexity"]) and r["perplexity"] > 1
