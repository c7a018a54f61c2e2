"""SmolLM2 quantized (A8W4 "dg") on the GPU engine against the NumPy integer reference.

gpu- and slow-marked. Every linear is quantized here to the DGQ format at the search's
start point (converters.dgq.dgq_linear without search or smoothing, dynamic per-token
activations), so the test costs seconds; the kernels do not care how the codes were chosen.
"""
import numpy as np
import pytest

from engine.io import corpus as data
from engine.gpu.backend import has_gpu
from engine.io.checkpoint import default_model_path
from engine.io.layout import WeightsError

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def models():
    from converters.dgq import dgq_linear
    from engine.model import LINEAR_NAMES, Model, ModelWeights
    from engine.gpu.model import CudaModel
    from engine.io.checkpoint import load_checkpoint
    try:
        ck = load_checkpoint(default_model_path())
    except WeightsError as e:
        pytest.skip(str(e))
    mw = ModelWeights.from_hf(ck.config, ck.tensors)
    for L in mw.layers:
        for n in LINEAR_NAMES:
            setattr(L, n, dgq_linear(getattr(L, n), None, 128, "dynamic", None, search=False))
    return ck.tokenizer, Model(mw), CudaModel(mw)


def test_logits_match_integer_reference(models):
    """GPU logits vs the NumPy integer reference, within 2× the reference's own fp16 sensitivity.

    The GPU keeps GEMM outputs, q/k/v and the KV cache in fp16. A quantized model amplifies
    tiny differences: an activation that moves across an INT8 rounding boundary changes by a
    whole quantization step (per-token scales reach 18 on SmolLM2's down_proj input), and 30
    layers compound it. So the bound is measured, not guessed: the same reference with every
    linear output rounded to fp16 (measured 2026-11-25: rel 0.14, top-1 agreement 0.6) sets
    the scale, and the GPU must stay within twice that (the project's rule: fp16 kernels within 2× the
    error of an fp16 reference).
    """
    from engine.model import ops_ref
    tok, ref, gpu = models
    ids = np.array(tok.encode("The quick brown fox jumps over the lazy dog because").ids)
    r = ref.forward(ids)
    orig = ops_ref.linear
    ops_ref.linear = lambda x, w: orig(x, w).astype(np.float16).astype(np.float32)
    try:
        r16 = ref.forward(ids)
    finally:
        ops_ref.linear = orig
    g = gpu.forward(ids).get()

    def rel(a):
        return float(np.linalg.norm(a - r) / np.linalg.norm(r))
    assert np.isfinite(g).all()
    assert rel(g) <= 2 * rel(r16) + 1e-3, (rel(g), rel(r16))


def test_greedy_64_tokens_match_numpy(models):
    from engine.model.generate import generate
    tok, ref, gpu = models
    ids = tok.encode("The capital of France is").ids
    want, _ = generate(ref, ids, 64)
    got, _ = generate(gpu, ids, 64)
    n = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if n is not None:   # a divergence is allowed only at a near-tie of the reference logits
        logits = ref.forward(np.array(ids + want[:n]))[-1]
        top = np.sort(logits)[-2:]
        assert top[1] - top[0] < 0.05 * max(1.0, abs(top[1])), (n, want[:n + 1], got[:n + 1])


def test_wiki_perplexity_matches_numpy(models):
    """Within 0.5 % over 8 windows of 512 (4088 scored tokens). Over 2 windows the ratio is
    noise: fp32 reductions in another order move activations across INT8 rounding boundaries
    (see above), and two launch shapes of the same row kernels measured −0.52 % and +0.64 %
    there, −0.09 % and +0.13 % over 8 windows (H100, 2026-11-25)."""
    from engine.model.perplexity import perplexity
    tok, ref, gpu = models
    try:
        tokens = np.asarray(data.encode_text(tok, data.wiki_text("eval")), dtype=np.int32)
    except data.DataError as e:
        pytest.skip(str(e))
    r = perplexity(lambda t: ref.forward(t), tokens, 512, max_windows=8, progress=False)
    g = perplexity(lambda t: gpu.forward(t), tokens, 512, max_windows=8, progress=False)
    assert abs(g["perplexity"] / r["perplexity"] - 1) < 0.005, (g["perplexity"], r["perplexity"])


def test_pot4_wiki_perplexity_matches_numpy():
    """A SmolLM2 PoT-W4 model (every linear pot4 g128 at the data-free start, no calibration:
    seconds) through the GPU engine (gemv_wb, fp16 activations) against the NumPy reference:
    perplexity within 0.5 % over 8 windows of 512."""
    from converters.pot import pot_linear
    from engine.gpu.model import CudaModel
    from engine.io.checkpoint import load_checkpoint
    from engine.model import LINEAR_NAMES, Model, ModelWeights
    from engine.model.perplexity import perplexity
    try:
        ck = load_checkpoint(default_model_path())
        tokens = np.asarray(data.encode_text(ck.tokenizer, data.wiki_text("eval")), dtype=np.int32)
    except (WeightsError, data.DataError) as e:
        pytest.skip(str(e))
    mw = ModelWeights.from_hf(ck.config, ck.tensors)
    for L in mw.layers:
        for n in LINEAR_NAMES:
            setattr(L, n, pot_linear(getattr(L, n), 4, 128, search=False))
    ref, gpu = Model(mw), CudaModel(mw)
    r = perplexity(lambda t: ref.forward(t), tokens, 512, max_windows=8, progress=False)
    g = perplexity(lambda t: gpu.forward(t), tokens, 512, max_windows=8, progress=False)
    assert abs(g["perplexity"] / r["perplexity"] - 1) < 0.005, (g["perplexity"], r["perplexity"])
