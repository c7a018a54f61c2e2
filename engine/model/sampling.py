"""Next-token selection from one row of logits: greedy, or temperature + top-k + top-p.

Order of operations (the usual one, as in Hugging Face's generate):
  1. temperature 0 -> argmax; ties go to the lowest token id. top_k/top_p are ignored.
  2. p = softmax(logits / T), computed stably in float64.
  3. top-k (k > 0): keep the k most probable tokens.
  4. top-p (p < 1): of those, keep the smallest most-probable prefix whose
     probability (renormalised after top-k) reaches top_p; never fewer than one.
  5. draw one token from the kept set, renormalised, with `rng`.
Candidates are ranked by a stable sort, so equal probabilities rank by lower id and
a cut at k or at p is deterministic. The draw is one rng.random() through the
inverse CDF, so a seeded np.random.Generator reproduces the same token sequence.

This is the host (NumPy) sampler; cupy logits are copied to the host. The GPU
engine samples on the device by the same rules (cuda/sample.cu, inside the graphed
decode step): exact top-k/top-p on the fp16 logits, ties by id, one draw through the
inverse CDF, with Philox random numbers keyed by the seed and counted by (sequence,
position). A seed reproduces its tokens on each path, not across the two.
"""
from __future__ import annotations

import math

import numpy as np

from ..util.arrays import to_numpy
from ..util.errors import param_error


class SamplingError(ValueError):
    """A sampling flag outside its range, or logits that cannot be sampled."""


def check_args(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """Validate the settings up front (the CLI calls this before loading a model)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise param_error(SamplingError, "temperature", f"must be a finite number >= 0 (0 = greedy), "
                                                        f"got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise param_error(SamplingError, "top_k", f"must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating, np.integer)) \
            or not (0.0 < top_p <= 1.0):    # also rejects NaN
        raise param_error(SamplingError, "top_p", f"must be in (0, 1] (1 = no limit), got {top_p!r}")


def sample(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """One token id from logits (V,). See the module docstring for the rules.

    rng: the generator to draw from; None uses a fresh, unseeded one (not
    reproducible). Pass np.random.default_rng(seed) for a reproducible stream.
    """
    check_args(temperature, top_k, top_p)
    x = to_numpy(logits)
    if x.ndim != 1 or x.size == 0:
        raise SamplingError(f"logits must be a non-empty 1-D array (V,), got shape {x.shape}")
    x = x.astype(np.float64, copy=False)                        # (V,)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise SamplingError("logits contain NaN or +inf; the model output is broken")
    if np.isneginf(x).all():
        raise SamplingError("every logit is -inf; no token can be sampled")

    if temperature == 0:
        return int(np.argmax(x))                                # first maximum = lowest id

    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise SamplingError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    with np.errstate(over="ignore"):    # a tiny T sends far-below-max logits to -inf: fine
        z = (x - x.max()) / float(temperature)                  # (V,) <= 0, max is 0
    if 0 < top_k < z.size:
        # np.partition finds the k-th largest in O(V); ties at the cut are settled below by id.
        kth = np.partition(z, z.size - top_k)[z.size - top_k]   # k-th largest value
        cand = np.flatnonzero(z >= kth)                         # (>=k,) ascending ids
    else:
        cand = np.arange(z.size)                                # (V,)
    zc = z[cand]
    order = np.argsort(-zc, kind="stable")                      # best first, ties: lower id
    cand, zc = cand[order][:top_k or None], zc[order][:top_k or None]

    p = np.exp(zc)                                              # (C,) zc[0] = 0 is the max
    p /= p.sum()
    if top_p < 1.0:
        cum = np.cumsum(p)                                      # (C,)
        n = min(int(np.searchsorted(cum, top_p, side="left")) + 1, p.size)
        cand, p = cand[:n], p[:n]
    cdf = np.cumsum(p)                                          # (C,)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(cand[min(i, cand.size - 1)])
