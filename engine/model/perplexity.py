"""Perplexity over non-overlapping windows.

The token stream is cut into n = len(tokens) // window windows of `window`
tokens; a short final window is dropped, so every window has the same context
budget and the result does not depend on where the text happens to end. Each
window is scored independently with a fresh context: the model sees tokens
w[0..W-1] and we score its predictions of w[1..W-1], so the first token of every
window is context only and each window contributes W - 1 scored tokens.
(This is the usual "non-overlapping, no stride" WikiText protocol; a sliding
window with overlap would give a lower, more context-rich number.)

    nll        = -(1/N) Σ log softmax(logits[t])[w[t+1]]   over all N scored tokens
    perplexity = exp(nll)

The log-softmax is the stable one (subtract the row max, log-sum-exp) and is
computed and summed in float64, so the number does not drift with N.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..util.arrays import to_numpy
from ..util.errors import param_error
from ..util.progress import progress_bar

ROW_CHUNK = 128  # rows of logits converted to float64 at once: bounds memory at V = 49k


class EvalError(ValueError):
    """Perplexity arguments or model outputs that cannot give a meaningful number."""


def _check_int(name: str, v, lo: int) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
        raise param_error(EvalError, name, f"must be an integer >= {lo}, got {v!r}")
    return int(v)


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf   # exp overflows float64 past 709


def window_nll(logits: np.ndarray, window_tokens: np.ndarray) -> float:
    """Sum over t of -log softmax(logits[t])[tokens[t+1]] for t = 0..W-2, in float64.

    logits: (W, V) float, window_tokens: (W,) int. The last row of logits (the
    prediction after the window) has no target and is ignored.
    """
    w = len(window_tokens)
    targets = window_tokens[1:]                       # (W-1,)
    total = 0.0
    for r0 in range(0, w - 1, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, w - 1)
        x = np.asarray(logits[r0:r1], dtype=np.float64)           # (R, V)
        m = x.max(axis=1, keepdims=True)                          # (R, 1)
        lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]         # (R,)
        picked = x[np.arange(r1 - r0), targets[r0:r1]]            # (R,)
        total += float((lse - picked).sum())
    return total


def perplexity(logits_fn: Callable, tokens, window: int = 512, max_windows: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity of `logits_fn` on `tokens` over non-overlapping windows.

    logits_fn(tokens (W,) int32) -> (W, V) float logits, numpy or cupy (the model's
    forward without a cache). `max_windows` scores only the first windows (a
    quick estimate). With `progress`, stderr shows a bar on a terminal and a line every
    30 s elsewhere (engine/util/progress.py).

    Returns {"perplexity", "nll" (mean per scored token, nats), "n_tokens"
    (scored tokens = n_windows·(window-1)), "n_windows", "window"}.
    """
    window = _check_int("window", window, 2)
    if max_windows is not None:
        max_windows = _check_int("max_windows", max_windows, 1)
    toks = to_numpy(tokens)
    if toks.ndim != 1 or not np.issubdtype(toks.dtype, np.integer):
        raise EvalError(f"tokens must be a 1-D integer array, got shape {toks.shape} "
                        f"dtype {toks.dtype}")
    if len(toks) and int(toks.min()) < 0:
        raise EvalError("tokens must be non-negative token ids")
    n_windows = len(toks) // window
    if n_windows < 1:
        raise param_error(EvalError, "window", f"{window}: the text has only {len(toks)} tokens, fewer than one "
                                               "window; use a longer text or a smaller window")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)

    total_nll, n_scored = 0.0, 0
    bar = progress_bar(total=n_windows, desc="perplexity", unit="win", enabled=progress)
    try:
        for i in range(n_windows):
            w = toks[i * window:(i + 1) * window].astype(np.int32)     # (W,)
            logits = to_numpy(logits_fn(w))                            # (W, V)
            if logits.ndim != 2 or logits.shape[0] != window:
                raise EvalError(f"logits_fn returned shape {logits.shape} for {window} tokens; "
                                f"expected ({window}, vocab)")
            if int(w.max()) >= logits.shape[1]:
                raise EvalError(f"token id {int(w.max())} is outside the model's vocabulary of "
                                f"{logits.shape[1]}; was the text tokenized with another tokenizer?")
            nll = window_nll(logits, w)
            if not math.isfinite(nll):
                raise EvalError(f"window {i}: the model produced non-finite logits (NLL {nll})")
            total_nll += nll
            n_scored += window - 1
            bar.set_postfix(ppl=f"{_ppl(total_nll / n_scored):.3f}", refresh=False)   # shown by the update
            bar.update(1)
    finally:
        bar.close()
    mean = total_nll / n_scored
    return {"perplexity": _ppl(mean), "nll": mean, "n_tokens": n_scored,
            "n_windows": n_windows, "window": window}
