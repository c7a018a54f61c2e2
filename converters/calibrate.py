"""Calibration: run the float model over token sequences and record each linear input's statistics.

For every layer l and site (engine.model.SITES: attn_in → q,k,v; o_in → o;
mlp_in → gate,up; down_in → down) we accumulate over all calibration tokens:

  absmax      (K,)   float32  per-channel max |x_j|           (smoothing, FPTQ policy)
  tok_absmax  (T,)   float32  per-token max_j |x_j|            (static activation scale)
  H           (K, K) float64  Gram matrix XᵀX                  (DGQ / FPTQ weight search)

and, when asked (kv8), per layer and KV head the max |v| and the max RoPE pair
magnitude sqrt(k_j² + k_{j+D/2}²) of k before rotation — RoPE rotates each such
pair, so this bounds |k| after rotation at every position, also beyond the
calibration length.

`calibrate_layer` gathers one layer's statistics from that layer's inputs (n, T, H) and
moves the inputs on through it: converters/quantize.py walks the model a layer at a time,
so memory holds one layer's weights and statistics, not the whole model's. The inputs are
the float model's activations (calibration "float": each layer's statistics are the ones a
whole-model pass gives, bit for bit) or, with "sequential", the outputs of the
already quantized layers 0..l−1 (as GPTQ and AWQ calibrate). `calibrate` is the whole-model
pass over Model.forward (the reference the layer walk is tested against).

H is accumulated in float64 from one float32 product per sequence (the searches round H
to float32 anyway). Its cost is close to the forward's own linears (SmolLM2, 512 tokens,
2 cores: forward 1.8 s, with float64 products H 3 s). Memory is Σ K² · 8 bytes over the sites: one layer's worth in
the layer walk (TinyLlama: 0.35 GB), every layer's in `calibrate` (SmolLM2-135M: 0.8 GB).

Default calibration set: 64 sequences × 512 tokens (32768 tokens) cut from the
wiki corpus "calib" split (engine.io.corpus.calibration_sequences, seed 0), or a
user's text file. The sequences start mid-text without a BOS token; their first
token acts as the attention sink and carries the massive activations a prompt's
first token carries at run time, so the statistics include them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

import numpy as np

from engine import formats
from engine.model.ops_ref import rmsnorm
from engine.util.arrays import to_numpy, xp_of
from engine.util.progress import progress_bar

DEFAULT_N_SEQ = 64       # calibration sequences ...
DEFAULT_SEQ_LEN = 512    # ... of this many tokens: 32768 tokens for SmolLM2
DEFAULT_SEED = 0


class CalibrationError(ValueError):
    """Calibration input (tokens, text file, options) that cannot be used."""


@dataclass
class SiteStats:
    absmax: np.ndarray                   # (K,) float32
    tok_absmax: np.ndarray | None        # (T,) float32; None once derived by scaled()
    H: np.ndarray | None                 # (K, K) float64, symmetric; None when not collected
    n_tokens: int

    @property
    def amax(self) -> float:
        """max |x| over all tokens and channels."""
        return float(self.absmax.max(initial=0.0))


@dataclass
class Calibration:
    sites: dict                          # (layer, site) -> SiteStats
    kv_absmax: np.ndarray | None         # (L, 2, Hkv) float32: [k pair-magnitude max, v absmax]
    n_seq: int
    seq_len: int
    source: str
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- tokens

MAX_CALIB_TOKENS = 1 << 24    # 16M tokens: far past any useful calibration set, well below RAM


def check_sizes(n_seq, seq_len, context: int | None = None) -> None:
    """n_seq and seq_len: positive integers whose product a calibration pass can hold, and
    seq_len within the model's context when it is known."""
    for flag, v in (("--n-seq", n_seq), ("--seq-len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise CalibrationError(f"{flag} must be a positive integer, got {v!r}")
    if int(n_seq) * int(seq_len) > MAX_CALIB_TOKENS:
        raise CalibrationError(f"--n-seq {n_seq} x --seq-len {seq_len} is {int(n_seq) * int(seq_len)} "
                               f"calibration tokens, more than the {MAX_CALIB_TOKENS} a pass can hold")
    if context is not None and seq_len > context:
        raise CalibrationError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens")


def calibration_tokens(tokenizer, calib=None, n_seq: int = DEFAULT_N_SEQ, seq_len: int = DEFAULT_SEQ_LEN,
                       seed: int = DEFAULT_SEED, vocab_size: int | None = None):
    """Token sequences (n_seq, seq_len) int32 and a description of their source.

    calib: None → the wiki corpus "calib" split (engine.io.corpus); a path → that UTF-8
    text file; "random" → uniform random token ids (FPTQ reports that this works
    too; needs vocab_size); an int array (n, T) → used as given.
    """
    from engine.io import corpus as data  # noqa: PLC0415  (corpus code only when calibrating)
    check_sizes(n_seq, seq_len)
    if isinstance(calib, np.ndarray):
        if calib.ndim != 2 or calib.size == 0 or not np.issubdtype(calib.dtype, np.integer):
            raise CalibrationError(f"calibration tokens must be a non-empty 2-D integer array, got "
                                   f"{calib.dtype} {calib.shape}")
        return calib.astype(np.int32), f"tokens {calib.shape[0]}x{calib.shape[1]}"
    if isinstance(calib, str) and calib == "random":
        if not vocab_size:
            raise CalibrationError("random calibration tokens need the vocabulary size")
        rng = np.random.default_rng(seed)
        return rng.integers(0, vocab_size, size=(n_seq, seq_len)).astype(np.int32), "random tokens"
    if calib is None:
        return data.calibration_sequences(tokenizer, n_seq, seq_len, split="calib", seed=seed), "wiki:calib"
    if isinstance(calib, (str, os.PathLike)):
        text = data.load_text_file(calib)
        return data.calibration_sequences(tokenizer, n_seq, seq_len, text=text, seed=seed), f"file:{calib}"
    raise CalibrationError(f"calib must be None, a text file path, 'random' or a token array, got {type(calib)}")


# ----------------------------------------------------------------------------- statistics

class _Stop(Exception):
    """Raised by the observer past the last layer of interest to end the forward early."""


def _linear_float(w) -> np.ndarray:
    return w.dequantize() if hasattr(w, "dequantize") else w.astype(np.float32, copy=False)


def _kv_weights(layer) -> tuple:
    """(k weight, v weight, k bias | None, v bias | None, k_norm | None) of a layer: what k and v
    are before RoPE (the KV statistics)."""
    return (_linear_float(layer.k), _linear_float(layer.v), layer.bias.get("k"), layer.bias.get("v"),
            layer.k_norm)


# sink_weight: the weight of each sequence's first token in the q/k/v input's Gram matrix (site
# attn_in; 1: plain XᵀX). The attention sink carries huge activations and a near-zero value
# vector, so an error of v_proj on it reaches every position (ALGORITHMS.md); SmolLM2, DGQ
# sequential + --gptq: ×512 took the static recipe from 26.78 to 26.02, dynamic 26.13 to 25.45.
SINK_SITE = "attn_in"


def check_sink_weight(w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not np.isfinite(w) \
            or w < 0:
        raise CalibrationError(f"--sink-weight must be a finite number >= 0 (1 = plain XᵀX), got {w!r}")
    return float(w)


class _Observer:
    def __init__(self, c, gram: bool, kv: bool, layers, sites, kv_w: dict, sink_weight: float = 1.0):
        """kv_w: layer -> (k, v) float weights (only with kv)."""
        self.gram, self.kv = gram, kv
        self.sink_extra = check_sink_weight(sink_weight) - 1.0
        self.layers = set(layers)
        self.last = max(self.layers)
        self.sites = set(sites)
        self.absmax, self.tok, self.H, self.n = {}, {}, {}, {}
        self.kv_absmax = np.zeros((c.num_hidden_layers, 2, c.num_key_value_heads), np.float32) if kv else None
        self.kv_w = kv_w if kv else {}
        self.hkv, self.d, self.eps = c.num_key_value_heads, c.head_dim, c.rms_norm_eps

    def __call__(self, li: int, site: str, x):
        if li > self.last:
            raise _Stop
        if li not in self.layers:
            return
        xp = xp_of(x)                                                    # numpy, or cupy (--device cuda)
        x = x.astype(xp.float32, copy=False)                             # (T, K)
        if site in self.sites:
            key = (li, site)
            ax = xp.abs(x)                                               # (T, K)
            cmax = ax.max(axis=0)                                        # (K,)
            self.absmax[key] = cmax if key not in self.absmax else xp.maximum(self.absmax[key], cmax)
            self.tok.setdefault(key, []).append(ax.max(axis=1))          # (T,)
            self.n[key] = self.n.get(key, 0) + x.shape[0]
            if self.gram:
                k = x.shape[1]
                if key not in self.H:
                    self.H[key] = xp.zeros((k, k), dtype=xp.float64)
                # One float32 GEMM per sequence, summed in float64: the searches use H in
                # float32 anyway, and this halves the statistics' time on a CPU (a float64
                # GEMM per sequence before). Not BLAS syrk: with this OpenBLAS, interleaving
                # ?syrk with the forward's sgemm made both 2-3x slower (measured).
                self.H[key] += x.T @ x                                   # (K, K)
                if self.sink_extra and site == SINK_SITE:                # row 0: the sequence's first token
                    x0 = x[0].astype(xp.float64)
                    self.H[key] += self.sink_extra * xp.outer(x0, x0)
        if self.kv and site == "attn_in":
            wk, wv, bk, bv, k_norm = self.kv_w[li]
            t, h, d = x.shape[0], self.hkv, self.d
            k = (x @ wk.T if bk is None else x @ wk.T + bk).reshape(t, h, d)  # (T, Hkv, D) before RoPE
            v = (x @ wv.T if bv is None else x @ wv.T + bv).reshape(t, h, d)  # (T, Hkv, D)
            if k_norm is not None:                                       # Qwen3 / Gemma: per-head norm
                k = rmsnorm(k, k_norm, self.eps)
            pair = xp.sqrt(k[..., : d // 2] ** 2 + k[..., d // 2:] ** 2)  # (T, Hkv, D/2)
            np.maximum(self.kv_absmax[li, 0], to_numpy(pair.max(axis=(0, 2))), out=self.kv_absmax[li, 0])
            np.maximum(self.kv_absmax[li, 1], to_numpy(xp.abs(v).max(axis=(0, 2))), out=self.kv_absmax[li, 1])


def calibrate(weights, seqs, *, gram: bool = True, kv: bool = False, layers=None, sites=None,
              progress: bool = True, desc: str = "calibrate", source: str = "tokens",
              sink_weight: float = 1.0) -> Calibration:
    """Run engine.model.Model(weights) over each sequence of `seqs` (n, T) and collect statistics.

    gram: also accumulate H = XᵀX (costly: skip it for RTN methods).
    kv:   also collect the per-head K/V maxima for an 8-bit KV cache.
    layers / sites: restrict the statistics (default: all).
    """
    from engine.model.llama import SITES, Model  # noqa: PLC0415
    seqs = np.asarray(seqs)
    if seqs.ndim != 2 or seqs.size == 0:
        raise CalibrationError(f"calibration sequences must be a non-empty (n, T) array, got {seqs.shape}")
    c = weights.config
    layers = list(range(c.num_hidden_layers)) if layers is None else sorted(set(layers))
    sites = SITES if sites is None else tuple(sites)
    kv_w = {li: _kv_weights(weights.layers[li]) for li in layers} if kv else {}
    obs = _Observer(c, gram, kv, layers, sites, kv_w, sink_weight)
    model = Model(weights)
    for i in progress_bar(range(seqs.shape[0]), desc=desc, unit="seq", leave=False, enabled=progress):
        try:
            model.forward(seqs[i], observer=obs, last_only=True)
        except _Stop:
            pass
    return Calibration(sites=_site_stats(obs, gram), kv_absmax=obs.kv_absmax, n_seq=int(seqs.shape[0]),
                       seq_len=int(seqs.shape[1]), source=source)


def _site_stats(obs: _Observer, gram: bool) -> dict:
    stats = {}
    for key in obs.absmax:
        stats[key] = SiteStats(absmax=to_numpy(obs.absmax[key]),
                               tok_absmax=np.concatenate([to_numpy(t) for t in obs.tok[key]]),
                               H=obs.H[key] if gram else None, n_tokens=obs.n[key])   # H stays on its device
        obs.H.pop(key, None)                                             # free as we go
    return stats


def calibrate_layer(config, li: int, layer, X, *, gram: bool = True, kv: bool = False,
                    sites=None, advance: bool = False, progress: bool = False, desc: str = "calibrate",
                    sink_weight: float = 1.0):
    """Statistics of layer `li` (float LayerWeights) on its inputs X (n, T, H) float32.

    Returns ({site: SiteStats}, kv (2, Hkv) float32 or None). Each layer's RoPE follows from the
    config (engine.model.llama.layer_rope: llama3 scaling, Gemma's local layers), built by
    run_layer for positions 0..T−1. advance: X[i] is replaced by the layer's output as soon as
    its statistics are taken (the inputs of the next layer, without a second buffer). The numbers are exactly
    those `calibrate` records for this layer when X holds the float model's activations.
    """
    from engine.model.llama import SITES  # noqa: PLC0415
    sites = SITES if sites is None else tuple(sites)
    layer = on_device(layer, xp_of(X))
    kv_w = {li: _kv_weights(layer)} if kv else {}
    obs = _Observer(config, gram, kv, [li], sites, kv_w, sink_weight)
    run_layer(config, li, layer, X, observer=obs, advance=advance, progress=progress, desc=desc)
    stats = {site: st for (_, site), st in _site_stats(obs, gram).items()}
    return stats, (obs.kv_absmax[li] if kv else None)


def run_layer(config, li: int, layer, X, *, observer=None, advance: bool = True,
              progress: bool = False, desc: str = "layer") -> None:
    """Run layer `li` (float or quantized LayerWeights) over each sequence of X (n, T, H);
    with advance, X[i] becomes its output (in place)."""
    from engine.model.llama import layer_forward, layer_rope, prepare_linears  # noqa: PLC0415
    xp = xp_of(X)
    layer = on_device(layer, xp)
    W = prepare_linears(layer) if xp is np else {n: _DeviceLinear(getattr(layer, n), xp) for n in layer.linears()}
    cos, sin = layer_rope(config, li, xp, np.arange(X.shape[1]))                  # (T, D)
    it = progress_bar(range(X.shape[0]), desc=desc, unit="seq", leave=False, enabled=progress)
    with np.errstate(over="ignore", invalid="ignore"):       # checked inside: one clear ModelError
        for i in it:
            y = layer_forward(config, li, layer, W, X[i], cos, sin, observer=observer)     # (T, H)
            if advance:
                X[i] = y


def on_device(layer, xp):
    """`layer` (LayerWeights) with its float arrays on the array module xp (QuantLinears as they
    are: run_layer expands them there); the layer itself for NumPy."""
    if xp is np:
        return layer
    mv = lambda a: xp.asarray(a) if isinstance(a, np.ndarray) else a  # noqa: E731
    kw = {f.name: mv(getattr(layer, f.name)) for f in fields(layer) if f.name != "bias"}
    return replace(layer, **kw, bias={n: mv(b) for n, b in layer.bias.items()})


class _DeviceLinear:
    """A linear of run_layer on CuPy: the NumPy reference's numbers (formats.linear_ref) with
    the integer GEMM in float64, which is exact for INT8 x INT8 sums (< 2^53)."""

    def __init__(self, w, xp):
        self.xp, self.ql = xp, w if isinstance(w, formats.QuantLinear) else None
        if self.ql is None:
            self.w = w                                                   # float (N, K), on xp
        elif self.ql.act != "none" and formats.KINDS[self.ql.kind].INTEGER:
            self.w = self.ql.int8_weight(xp).astype(xp.float64)                   # (N, K) exact, made on xp
            self.cscale = xp.asarray(self.ql.cscale, dtype=xp.float32)            # (N,)
        else:
            self.w = xp.asarray(self.ql.dequantize(), dtype=xp.float32)           # (N, K)

    def __call__(self, x):
        xp, ql = self.xp, self.ql
        if ql is None or ql.act == "none":
            return x @ self.w.T
        if ql.act == "static":
            sx = xp.full((x.shape[0],), ql.ascale, dtype=xp.float32)             # (M,)
        else:
            amax = xp.abs(x).max(axis=-1)
            sx = xp.where(amax > 0, amax / xp.float32(formats.QMAX_I8), xp.float32(1.0)).astype(xp.float32)
        x8 = xp.clip(xp.rint(x / sx[:, None]), -formats.QMAX_I8, formats.QMAX_I8).astype(xp.float64)
        if self.w.dtype == xp.float64:                                   # integer kinds
            acc = (x8 @ self.w.T).astype(xp.float32)                     # exact integers, then as int32 -> f32
            return acc * sx[:, None] * self.cscale[None, :]
        return ((x8 @ self.w.astype(xp.float64).T) * sx[:, None]).astype(xp.float32)


def scaled(st: SiteStats, s) -> SiteStats:
    """The statistics of the input x / s (s: (K,) smoothing scales), derived without a new pass.

    absmax and H transform exactly (absmax / s, H / (s sᵀ)); the per-token absmax
    does not (it is a max over channels of differently scaled values), so it is
    dropped: after smoothing, only act_clip "max" can use derived statistics.
    """
    s = np.asarray(s, dtype=np.float64)                                  # (K,)
    if st.H is not None:
        xp = xp_of(st.H)
        sd = xp.asarray(s)
        H = st.H / xp.outer(sd, sd)                                      # (K, K)
    else:
        H = None
    return SiteStats(absmax=(st.absmax / s).astype(np.float32), tok_absmax=None, H=H, n_tokens=st.n_tokens)


# ----------------------------------------------------------------------------- activation scales

ACT_CLIPS = ("max",)   # or a percentile in (0, 100] of the per-token absmax, e.g. 99.9


def parse_act_clip(clip) -> str | float:
    """'max' or a float percentile in (0, 100]; raise CalibrationError otherwise."""
    if clip == "max":
        return "max"
    try:
        p = float(clip)
    except (TypeError, ValueError):
        raise CalibrationError(f"act_clip must be 'max' or a percentile in (0, 100], got {clip!r}") from None
    if not 0 < p <= 100:
        raise CalibrationError(f"act_clip percentile must lie in (0, 100], got {p}")
    return p


def static_ascale(st: SiteStats, clip="max") -> float:
    """Per-tensor symmetric INT8 scale: clipped amax / 127.

    clip "max": amax = the largest |x| seen in calibration (never clips a calibration
    token); a percentile p: amax = the p-th percentile of the per-token absmax
    (tokens above it saturate at ±127).
    """
    clip = parse_act_clip(clip)
    if clip == "max":
        amax = st.amax          # = the max of the per-token absmax, and survives scaled()
    else:
        if st.tok_absmax is None:
            raise CalibrationError("a percentile act_clip needs per-token statistics of the final inputs")
        amax = float(np.percentile(st.tok_absmax, clip))
    if not amax > 0:
        amax = 1.0      # an all-zero input: any scale is exact
    return float(np.float32(amax / 127.0))
