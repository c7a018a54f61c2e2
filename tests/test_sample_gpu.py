"""The GPU sampling kernel (cuda/sample.cu) against the rules of engine/model/sampling.py (gpu-marked)."""
import numpy as np
import pytest
from scipy import stats

from engine.gpu.backend import has_gpu

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)

import cupy as cp  # noqa: E402

from engine.gpu import ops as ops_cuda  # noqa: E402


def kernel_draws(logits, n, temperature=1.0, top_k=0, top_p=1.0, seed=0, pos=0):
    """n draws from one fp16 row (V,): n rows that repeat it, each with its own Philox counter."""
    out = cp.zeros((n,), cp.int32)
    ops_cuda.sample_rows(cp.asarray(logits, cp.float16), cp.asarray(ops_cuda.sample_params(temperature, top_k,
                         top_p, seed)), cp.arange(n, dtype=cp.int32), cp.full((n,), pos, cp.int32), out, rows=n)
    return out.get()


def exact_probs(logits16, t, k, p):
    """The kept set's renormalised softmax by engine/model/sampling.py's rules (float64, stable ranks)."""
    x = logits16.astype(np.float64)
    probs = np.exp((x - x.max()) / t)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:k or None]
    pk = probs[order] / probs[order].sum()
    n_keep = len(order)
    if p < 1:
        cum = np.cumsum(pk)
        assert np.abs(cum - p).min() > 1e-5, "a cut this close to top_p depends on rounding"
        n_keep = min(int(np.searchsorted(cum, p)) + 1, len(order))
    ref = np.zeros_like(probs)
    ref[order[:n_keep]] = pk[:n_keep] / pk[:n_keep].sum()
    return ref


def chi2_check(draws, probs):
    """No excluded id; frequencies within the 99.9 % chi-square bound (bins under 5 expected merged)."""
    n = len(draws)
    counts = np.bincount(draws, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, np.flatnonzero((probs == 0) & (counts > 0))
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big & (probs > 0)].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    assert chi2 < stats.chi2.ppf(0.999, keep.sum() - 1), (chi2, keep.sum())


def tied_row(v=50, seed=0):
    """Logits on a 0.5 grid: many equal values, so cuts fall inside runs of ties."""
    return (np.round(np.random.default_rng(seed).normal(size=v) * 3) / 2).astype(np.float16)


@pytest.mark.parametrize("t, k, p", [(1.0, 0, 1.0), (0.7, 7, 1.0), (1.3, 0, 0.6), (1.0, 12, 0.75),
                                     (2.0, 40, 0.97)])
def test_small_row_frequencies_match_exact_top_k_top_p(t, k, p):
    x = tied_row()
    chi2_check(kernel_draws(x, 100000, t, k, p, seed=1), exact_probs(x, t, k, p))


@pytest.mark.parametrize("t, k, p", [(1.0, 0, 1.0), (0.8, 0, 0.9), (0.7, 100, 1.0), (1.0, 200, 0.8)])
def test_large_row_frequencies_match_exact_top_k_top_p(t, k, p):
    x = (np.random.default_rng(2).normal(size=32000) * 2.5).astype(np.float16)
    chi2_check(kernel_draws(x, 100000, t, k, p, seed=3), exact_probs(x, t, k, p))


def test_greedy_top_k_1_and_ties_give_lowest_argmax():
    rows = np.stack([tied_row(1000, s) for s in range(6)])                  # (6, 1000) with tied maxima
    rows[5, :] = -np.inf
    rows[4, 3] = -np.inf                                                    # masked, never drawn
    want = np.argmax(rows, axis=1)                                          # first maximum
    want[5] = ops_cuda.SAMPLE_NONFINITE                                     # nothing to draw
    for t, k in [(0.0, 0), (0.0, 5), (0.9, 1), (50.0, 1)]:
        out = cp.zeros((6,), cp.int32)
        ops_cuda.sample_rows(cp.asarray(rows), cp.asarray(ops_cuda.sample_params(t, k, 0.5, 7)),
                             cp.arange(6, dtype=cp.int32), cp.zeros((6,), cp.int32), out)
        np.testing.assert_array_equal(out.get(), want)


def test_seed_reproduces_and_counters_advance():
    x = tied_row(3000, 4)
    a, b = kernel_draws(x, 2000, 1.0, seed=5), kernel_draws(x, 2000, 1.0, seed=5)
    np.testing.assert_array_equal(a, b)
    assert (a != kernel_draws(x, 2000, 1.0, seed=6)).mean() > 0.5
    assert (a != kernel_draws(x, 2000, 1.0, seed=5, pos=1)).mean() > 0.5
    # a decode step: pos and lens advance by one, inside the kernel
    pos, lens, out = cp.asarray([3, 9], cp.int32), cp.asarray([4, 10], cp.int32), cp.zeros((2,), cp.int32)
    ops_cuda.sample_rows(cp.asarray(np.stack([x, x])), cp.asarray(ops_cuda.sample_params(1.0)),
                         cp.arange(2, dtype=cp.int32), pos, out, lens=lens)
    assert pos.get().tolist() == [4, 10] and lens.get().tolist() == [5, 11]


def test_minus_inf_logits_are_never_drawn():
    x = tied_row(64, 5)
    x[::3] = -np.inf
    draws = kernel_draws(x, 5000, 3.0, seed=8)
    assert (draws >= 0).all() and np.isfinite(x[draws].astype(np.float32)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("t, k", [(0.0, 0), (1.0, 0), (0.8, 5)])
def test_nan_or_plus_inf_logits_refuse_the_row(bad, t, k):
    """Like engine/model/sampling.py, which raises: the kernel writes SAMPLE_NONFINITE for a row
    holding a NaN or +Inf anywhere (not just at its maximum), which the engine turns into an error."""
    x = tied_row(3000, 6)
    x[1777] = bad
    assert (kernel_draws(x, 64, t, k, seed=2) == ops_cuda.SAMPLE_NONFINITE).all()
    x[1777] = 0.0
    assert (kernel_draws(x, 64, t, k, seed=2) >= 0).all()


# ----------------------------------------------------------------------------- the decode step

def _model():
    from engine.gpu.model import CudaModel
    from test_model_cuda import quantized_tiny
    return CudaModel(quantized_tiny("dynamic", seed=6, head_dim=64, hidden_size=64, intermediate_size=96))


def _decode(gm, prompt, n, splits=(None,), **kw):
    cache = gm.new_cache(64)
    first = gm.sample_logits(gm.prefill(prompt, cache), 0, len(prompt) - 1, **kw)
    got = [first]
    for m in splits:
        got += gm.decode(cache, [got[-1]], m or n, **kw)[:, 0].tolist()
    return got


def test_decode_temperature_0_and_top_k_1_equal_greedy():
    gm = _model()
    prompt = np.array([5, 9, 2, 44, 7])
    cache = gm.new_cache(64)
    first = int(gm.prefill(prompt, cache).astype(np.float32).argmax())
    greedy = [first] + gm.decode_greedy(cache, [first], 12)[:, 0].tolist()
    # temperature 0 through sample_logits + decode is decode_greedy by construction; what is
    # checked independently: the sampler's top_k = 1 at T > 0, and the host argmax of the
    # prefill path's logits fed the same tokens (the decode kernels agree with prefill's)
    assert _decode(gm, prompt, 12, temperature=1.5, top_k=1, seed=3) == greedy
    ref = gm.prefill(np.concatenate([prompt, greedy[:-1]]), gm.new_cache(64), logits="all").get()
    host = ref[len(prompt) - 1:].astype(np.float32).argmax(axis=-1)
    assert host[0] == greedy[0] and (host == np.array(greedy)).mean() >= 0.9, (host, greedy)


def test_decode_seeded_sampling_replays():
    gm = _model()
    prompt = np.array([5, 9, 2, 44, 7])
    kw = dict(temperature=1.5, top_k=40, top_p=0.95)
    a = _decode(gm, prompt, 16, seed=11, **kw)
    assert _decode(gm, prompt, 16, seed=11, **kw) == a
    assert _decode(gm, prompt, 16, splits=(5, 11), seed=11, **kw) == a     # calls split anywhere
    assert _decode(gm, prompt, 16, seed=12, **kw) != a
    assert len(set(a)) > 3


def test_generate_samples_on_the_gpu():
    from engine.model.generate import generate
    gm = _model()
    gm.forward = None          # the host loop would call forward for every token
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    a, st = generate(gm, prompt, 12, temperature=0.9, top_p=0.9, seed=4)
    assert st.new_tokens == len(a) == 12
    assert generate(gm, prompt, 12, temperature=0.9, top_p=0.9, seed=4)[0] == a
