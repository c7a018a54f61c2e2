"""Smoothing: the three scale rules, and folding that leaves the float model's output unchanged."""
import numpy as np
import pytest

from converters import calibrate as cal
from converters import smooth
from converters.dgq import dgq_linear
from engine.model import Model, ModelWeights
from tiny_model import make_tiny_config, make_tiny_tensors


def tiny_weights(seed=0, **kw):
    c = make_tiny_config(**kw)
    return ModelWeights.from_hf(c, make_tiny_tensors(c, seed))


def test_percentile_scales_follow_the_rule():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2.0, 600)
    a[[3, 77, 500]] = [50.0, 30.0, 40.0]                     # three outlier channels
    s = smooth.percentile_scales(a)
    k = int(0.005 * 600 + 1.5)                               # 4: the 4th largest is the clip point
    b = np.sort(a)[::-1][k - 1]
    assert k == 4 and b == np.sort(a)[-4]
    np.testing.assert_allclose(s[[3, 77, 500]], a[[3, 77, 500]] / b, rtol=1e-6)
    assert np.count_nonzero(s != 1.0) == 3
    np.testing.assert_allclose((a / s).max(), b, rtol=1e-6)   # outliers clipped to the k-th largest
    np.testing.assert_array_equal(smooth.percentile_scales(np.zeros(8)), np.ones(8))


def test_smoothquant_and_lae_scales():
    a = np.array([4.0, 0.25, 0.0, 100.0])
    w1 = np.array([[1.0, -0.5, 0.2, 0.01]])
    w2 = np.array([[-2.0, 0.1, 0.3, 0.04]])
    s = smooth.smoothquant_scales(a, [w1, w2], alpha=0.5)
    wmax = np.array([2.0, 0.5, 0.3, 0.04])
    np.testing.assert_allclose(s[[0, 1, 3]], (np.sqrt(a) / np.sqrt(wmax))[[0, 1, 3]], rtol=1e-6)
    assert s[2] == 1.0                                       # a dead channel is left alone
    lae = smooth.lae_scales(a)
    np.testing.assert_allclose(lae[[0, 1, 3]], (a / np.log2(2 + a))[[0, 1, 3]], rtol=1e-6)
    assert lae[2] == 1.0


@pytest.mark.parametrize("method", smooth.SMOOTHING_METHODS + ("random",))
@pytest.mark.parametrize("tie", [False, True])
def test_fold_leaves_float_output_unchanged(method, tie):
    w = tiny_weights(tie_word_embeddings=tie, hidden_size=256, intermediate_size=320, head_dim=16)
    c = w.config
    rng = np.random.default_rng(2)
    seqs = rng.integers(0, c.vocab_size, size=(2, 20))
    stats = cal.calibrate(w, seqs, gram=False, progress=False)
    scales = {}
    for li in range(c.num_hidden_layers):
        for site in smooth.FOLDABLE_SITES:
            a = stats.sites[(li, site)].absmax.copy()
            a[li + 3] *= 40.0                                 # an outlier channel, so every rule moves
            scales[(li, site)] = (rng.uniform(0.1, 10.0, a.shape).astype(np.float32) if method == "random"
                                  else smooth.scales_for(method, a, w.layers[li], site))
    assert all(np.ptp(s) > 0.5 for s in scales.values())
    folded = smooth.fold_scales(w, scales)
    for s in seqs:
        ref = Model(w).forward(s)
        out = Model(folded).forward(s)
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    # the inputs really were divided by s
    s2 = cal.calibrate(folded, seqs, gram=False, progress=False)
    for key, s in scales.items():
        np.testing.assert_allclose(s2.sites[key].absmax, stats.sites[key].absmax / s, rtol=1e-5)
    # the original weights are untouched
    assert folded.layers[0].q is not w.layers[0].q


def test_fold_rejects_bad_input():
    w = tiny_weights()
    h = w.config.hidden_size
    with pytest.raises(smooth.SmoothError):
        smooth.fold_layer(w.layers[0], "o_in", np.ones(w.config.q_size, np.float32))
    with pytest.raises(smooth.SmoothError):
        smooth.fold_layer(w.layers[0], "attn_in", np.zeros(h, np.float32))
    with pytest.raises(smooth.SmoothError):
        smooth.fold_layer(w.layers[0], "attn_in", np.ones(h + 1, np.float32))
    L = w.layers[0]
    import dataclasses
    Lq = dataclasses.replace(L, q=dgq_linear(L.q, None, 16, "dynamic"))
    with pytest.raises(smooth.SmoothError):
        smooth.fold_layer(Lq, "attn_in", np.ones(h, np.float32))
    with pytest.raises(smooth.SmoothError):
        smooth.scales_for("awq", np.ones(h), L, "attn_in")
