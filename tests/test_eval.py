import math

import numpy as np
import pytest

from engine.model.perplexity import EvalError, perplexity, window_nll

V = 37


def uniform_fn(offset=0.0):
    def fn(tokens):
        assert tokens.dtype == np.int32 and tokens.ndim == 1
        return np.full((len(tokens), V), offset, np.float32)
    return fn


def random_fn(seed=0, vocab=V):
    """Logits that depend on the window's tokens and positions, fixed by the seed."""
    table = np.random.default_rng(seed).normal(size=(vocab, vocab)).astype(np.float32) * 3

    def fn(tokens):
        pos = np.arange(len(tokens), dtype=np.float32)[:, None] * 0.01     # (T, 1)
        return table[tokens] + pos                                        # (T, V)
    return fn


def reference_ppl(fn, tokens, window):
    """Independent float64 computation, one token at a time."""
    nll, n = 0.0, 0
    for start in range(0, len(tokens) - window + 1, window):
        w = np.asarray(tokens[start:start + window], np.int32)
        logits = fn(w).astype(np.float64)
        for t in range(window - 1):
            row = logits[t]
            nll -= row[w[t + 1]] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            n += 1
    return math.exp(nll / n), nll / n, n


@pytest.mark.parametrize("offset", [0.0, 1e4, -3e4])
def test_uniform_logits_give_vocab_size(offset):
    tokens = np.random.default_rng(0).integers(0, V, size=100)
    r = perplexity(uniform_fn(offset), tokens, window=10, progress=False)
    assert r["perplexity"] == pytest.approx(V, rel=1e-12)
    assert r["nll"] == pytest.approx(math.log(V), rel=1e-12)
    assert r["n_windows"] == 10 and r["n_tokens"] == 90 and r["window"] == 10


def test_random_logits_match_float64_reference():
    fn = random_fn(1)
    tokens = np.random.default_rng(2).integers(0, V, size=203)
    r = perplexity(fn, tokens, window=50, progress=False)
    ppl, nll, n = reference_ppl(fn, tokens, 50)
    assert r["n_windows"] == 4 and r["n_tokens"] == n == 4 * 49
    assert r["nll"] == pytest.approx(nll, rel=1e-12)
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-12)


def test_row_chunking_is_exact():
    # more rows than ROW_CHUNK, so window_nll walks several chunks
    fn = random_fn(3)
    tokens = np.random.default_rng(4).integers(0, V, size=300).astype(np.int32)
    _, nll, n = reference_ppl(fn, tokens, 300)
    assert window_nll(fn(tokens), tokens) / n == pytest.approx(nll, rel=1e-12)


def test_short_final_window_is_dropped():
    fn = random_fn(5)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, V, size=3 * 16 + 7)
    r = perplexity(fn, tokens, window=16, progress=False)
    tail = tokens.copy()
    tail[48:] = rng.integers(0, V, size=7)
    assert perplexity(fn, tail, window=16, progress=False) == r
    assert r["n_windows"] == 3 and r["n_tokens"] == 45


def test_windows_are_independent_first_token_is_context():
    seen = []

    def fn(tokens):
        seen.append(tokens.copy())
        return uniform_fn()(tokens)
    tokens = np.arange(12) % V
    perplexity(fn, tokens, window=4, progress=False)
    assert [list(s) for s in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_max_windows_and_minimal_window():
    fn = random_fn(7)
    tokens = np.random.default_rng(8).integers(0, V, size=100)
    r = perplexity(fn, tokens, window=10, max_windows=2, progress=False)
    assert r["n_windows"] == 2 and r["n_tokens"] == 18
    assert r["nll"] == pytest.approx(reference_ppl(fn, tokens[:20], 10)[1], rel=1e-12)
    assert perplexity(fn, tokens, window=10, max_windows=50, progress=False)["n_windows"] == 10
    r2 = perplexity(fn, tokens[:2], window=2, progress=False)
    assert r2["n_windows"] == 1 and r2["n_tokens"] == 1


def test_progress_bar_path_runs():
    tokens = np.zeros(20, np.int64)
    assert perplexity(uniform_fn(), tokens, window=5, progress=True)["n_windows"] == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=1), "^window must be an integer >= 2"),
    (dict(window=0), "^window must"),
    (dict(window=2.0), "^window must"),
    (dict(window=True), "^window must"),
    (dict(max_windows=0), "^max_windows must be an integer >= 1"),
    (dict(window=11), "^window 11: the text has only 10 tokens"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(EvalError, match=match):
        perplexity(uniform_fn(), np.zeros(10, np.int32), progress=False, **kwargs)


def test_input_and_output_errors():
    with pytest.raises(EvalError, match="1-D integer"):
        perplexity(uniform_fn(), np.zeros((2, 10), np.int32), window=4, progress=False)
    with pytest.raises(EvalError, match="1-D integer"):
        perplexity(uniform_fn(), np.zeros(10, np.float32), window=4, progress=False)
    with pytest.raises(EvalError, match="non-negative"):
        perplexity(uniform_fn(), np.array([0, -1, 2, 3]), window=4, progress=False)
    with pytest.raises(EvalError, match="shape"):
        perplexity(lambda t: np.zeros((len(t) - 1, V)), np.zeros(8, np.int32), window=4,
                   progress=False)
    with pytest.raises(EvalError, match="vocabulary"):
        perplexity(uniform_fn(), np.array([0, 1, V, 2]), window=4, progress=False)
    with pytest.raises(EvalError, match="non-finite"):
        perplexity(lambda t: np.full((len(t), V), np.nan, np.float32), np.zeros(4, np.int32),
                   window=4, progress=False)
    assert issubclass(EvalError, ValueError)
