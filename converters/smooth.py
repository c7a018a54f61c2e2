"""Activation smoothing: per-input-channel scales s folded exactly into the float model.

A linear input x (T, K) is replaced by x / s and every weight reading it by
W · diag(s), so x · Wᵀ is unchanged while the activation outliers shrink
(DGQ, SmoothQuant and FPTQ each fold such scales). Three ways to choose s from the calibration
per-channel absmax a_j = max over tokens |x_j|:

- "percentile" (DGQ): k = int(0.005·C + 1.5), b = the k-th largest a_j;
  s_j = a_j / b where a_j > b, else 1 — only the top k−1 channels move.
- "smoothquant" (SmoothQuant, α = 0.5): s_j = a_j^α / max_n|W[n, j]|^(1−α), with
  the weight max taken over every linear reading that input (q,k,v together;
  gate,up together), both clamped at 1e−5 as in the SmoothQuant code.
- "lae" (FPTQ's logarithmic activation equalization): s_j = a_j / log2(2 + a_j).
A channel that is zero on every calibration token keeps s_j = 1.

Where s is folded (exact in exact arithmetic; fp32 rounding only):
  attn_in  (q, k, v):  input_layernorm.weight /= s;  q, k, v columns *= s
  mlp_in   (gate, up): post_attention_layernorm.weight /= s;  gate, up columns *= s
  down_in  (down):     up_proj rows (and its bias) /= s  (down_in = act(gate)·up is linear in up);
                       down_proj columns *= s
Biases of the readers stay as they are (x/s · (W·diag(s))ᵀ + b = x·Wᵀ + b). A norm is the
multiplier RMSNorm applies, also for Gemma's (1 + w) norms (the loaders hold 1 + w), so
dividing it by s is exact for every family.
  o_in     (o):        NOT smoothed. The fold would go into v_proj rows, but under GQA
                       one v row feeds Hq/Hkv o_proj input channels, so s would have
                       to be equal across those channels; we skip o_proj instead
                       (its input is an attention average of v, rarely an outlier site).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine import formats

FOLDABLE_SITES = ("attn_in", "mlp_in", "down_in")
SMOOTHING_METHODS = ("percentile", "smoothquant", "lae")
SQ_ALPHA = 0.5
SQ_EPS = 1e-5


class SmoothError(ValueError):
    """Scales or weights that cannot be folded (wrong shape, non-positive, quantized already)."""


def percentile_scales(absmax) -> np.ndarray:
    """DGQ's percentile clipping smoothing: (K,) float32, ≥ 1."""
    a = np.asarray(absmax, dtype=np.float64)                           # (C,)
    c = a.shape[0]
    k = min(c, int(0.005 * c + 1.5))
    b = np.sort(a)[::-1][k - 1]                                        # k-th largest
    if b <= 0:
        return np.ones(c, dtype=np.float32)
    return np.where(a > b, a / b, 1.0).astype(np.float32)


def smoothquant_scales(absmax, weights, alpha: float = SQ_ALPHA) -> np.ndarray:
    """SmoothQuant: a_j^α / max|W[:, j]|^(1−α) over all `weights` (each (N_i, K)): (K,) float32."""
    a = np.asarray(absmax, dtype=np.float64)
    wmax = np.max([np.abs(np.asarray(w)).max(axis=0) for w in weights], axis=0).astype(np.float64)  # (K,)
    s = np.maximum(a, SQ_EPS) ** alpha / np.maximum(wmax, SQ_EPS) ** (1.0 - alpha)
    s = np.maximum(s, SQ_EPS)
    return np.where(a > 0, s, 1.0).astype(np.float32)


def lae_scales(absmax) -> np.ndarray:
    """FPTQ's LAE: a_j / log2(2 + a_j): (K,) float32."""
    a = np.asarray(absmax, dtype=np.float64)
    return np.where(a > 0, a / np.log2(2.0 + a), 1.0).astype(np.float32)


def site_weights(layer, site: str) -> list:
    """The weights that read a site's input (the ones whose columns get *= s)."""
    return {"attn_in": [layer.q, layer.k, layer.v], "mlp_in": [layer.gate, layer.up],
            "down_in": [layer.down], "o_in": [layer.o]}[site]


def scales_for(method: str, absmax, layer, site: str, alpha: float = SQ_ALPHA) -> np.ndarray:
    if method == "percentile":
        return percentile_scales(absmax)
    if method == "smoothquant":
        return smoothquant_scales(absmax, site_weights(layer, site), alpha)
    if method == "lae":
        return lae_scales(absmax)
    raise SmoothError(f"unknown smoothing {method!r}; expected one of {SMOOTHING_METHODS}")


def _float(w, what: str) -> np.ndarray:
    if isinstance(w, formats.QuantLinear):
        raise SmoothError(f"cannot fold smoothing scales into {what}: it is quantized already")
    return np.asarray(w, dtype=np.float32)


def fold_layer(layer, site: str, s) -> object:
    """A copy of LayerWeights with input scales s (K,) folded at `site` (see the module doc)."""
    if site not in FOLDABLE_SITES:
        raise SmoothError(f"site {site!r} cannot be smoothed; foldable sites: {FOLDABLE_SITES}")
    s = np.asarray(s, dtype=np.float32)
    if s.ndim != 1 or not np.isfinite(s).all() or (s <= 0).any():
        raise SmoothError(f"smoothing scales must be a finite positive (K,) vector (site {site})")
    names = {"attn_in": ("attn_norm", ("q", "k", "v")), "mlp_in": ("mlp_norm", ("gate", "up")),
             "down_in": ("up", ("down",))}[site]
    src, readers = names
    new = {}
    w = _float(getattr(layer, src), src)
    if w.shape[0] != s.shape[0]:
        raise SmoothError(f"{site}: {s.shape[0]} scales for {w.shape[0]} channels")
    new[src] = w / s if w.ndim == 1 else w / s[:, None]                # norm (K,) or up rows (K, H)
    if src in layer.bias:                                              # up's bias: its rows' outputs
        new["bias"] = {**layer.bias, src: np.asarray(layer.bias[src], dtype=np.float32) / s}
    for n in readers:
        new[n] = _float(getattr(layer, n), n) * s[None, :]              # (N, K) columns *= s
    return dataclasses.replace(layer, **new)


def fold_scales(weights, scales: dict):
    """A copy of ModelWeights with {(layer, site): s} folded; the input is left unchanged."""
    layers = list(weights.layers)
    for (li, site), s in sorted(scales.items()):
        layers[li] = fold_layer(layers[li], site, s)
    return dataclasses.replace(weights, layers=layers)
