"""Quantize a float checkpoint: calibration, smoothing, per-layer quantization, the recipe.

    from engine.io.checkpoint import load_checkpoint
    from converters.quantize import quantize_checkpoint, quantize_to_file
    from engine.io.qfile import save_qfile
    ck = load_checkpoint(path)
    weights, recipe = quantize_checkpoint(ck, "dgq")             # the whole result in memory
    save_qfile("model.q.safetensors", weights, ck.config, ck.tokenizer, ck.chat_template, recipe)
    # or streamed, one layer in memory at a time (what dgq-quantize does):
    recipe, size, _ = quantize_to_file(load_checkpoint(path, lazy=True), "model.q.safetensors", "dgq")

Methods (METHODS; `wbits`, `act` as noted):
  dgq          percentile smoothing (q,k,v and gate,up inputs) + DGQ search, kind "dg";
               act="static": per-tensor A8 except down_proj (per token), or act="dynamic"
  dgq-rtn      the same format at the search's start point (r = 1, r = 1): the ablation
  fptq         FPTQ per-site policy (static / LAE+static / dynamic per token) + kind "g"
               weights with DGQ's phase-1 clipping search
  fptq-dg      the FPTQ policy with DGQ "dg" weights (runs on the integer A8W4 kernel)
  rtn          RTN A8W4: kind "g" min-max, static per-tensor A8 (wbits=8: per-channel W8)
  smoothquant  SmoothQuant α = 0.5 + RTN "g" (wbits=8: SmoothQuant W8A8, kind "i8")
  w4a16        RTN "g" g128, float activations (act "none"), no calibration
  w8a8         per-channel symmetric W8 (kind "i8"), static A8 = rtn with wbits=8
  pot          power-of-two weights, wbits 2/3/4 (kind "pot<b>"), float activations: PoTPTQ's
               data-free scale grid, then refinement on the calibration Gram matrix (pot.py);
               act="dynamic": the codes run with per-token INT8 activations (W-PoT × INT8; with
               float calibration the codes of act="none", with sequential calibration not)
  int-rtn      uniform asymmetric min-max weights, wbits 2/3/4 (kind "int<b>"), float activations
  int-search   the same format with PoT's two-step scale search: the fair baseline for pot
  --gptq       GPTQ error-compensated rounding: a per-row candidate in dgq / fptq-dg's search (on by
               default for dgq), or for pot / int-search the codes re-rounded on the searched grid
               (off by default; converters/gptq.py, docs/QUALITY.md)

The model is walked one decoder layer at a time (issue 18): read the layer's float weights
(lazily, with load_checkpoint(path, lazy=True)), run the calibration activations through it
gathering its statistics, fold the smoothing, quantize its seven linears, hand the layer on
(quantize_to_file writes it at once), free. Memory: one layer's float weights and statistics
plus the (n, T, H) activations, whatever the depth. The activations are the float model's
(calibration="float": every statistic, code and scale equals the former whole-model pass bit
for bit) or the quantized layers' outputs ("sequential", as GPTQ/AWQ). Each method's default
(MethodSpec.calibration) follows the SmolLM2 measurement (docs/QUALITY.md): sequential for dgq,
dgq-rtn and rtn, where it measured better; float for smoothquant (much worse sequentially) and
for the methods not measured both ways.
One pass per layer serves every method: smoothing rescales the recorded absmax and H exactly
(calibrate.scaled); only a percentile activation clip after smoothing needs a second pass
over the folded layer.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from engine import formats
from engine.formats import dg as dg_format
from engine.formats import pot as pot_format
from engine.formats import pot_a8
from engine.io.layout import HF_LINEAR, LINEAR_NAMES, LayerWeights, ModelError, ModelWeights, expected_shapes
from engine.io.qfile import QFileWriter
from engine.model.llama import SITE_OF, check_tokens, embed_tokens
from engine.util.progress import progress_bar
from engine.util.sysinfo import peak_rss_mb

from . import calibrate as cal
from . import smooth
from .baselines import g_linear, i8_linear
from .dgq import QuantizeError, dgq_linear
from .gptq import DEFAULT_DAMP
from .pot import BITS as WEIGHT_ONLY_BITS
from .pot import check_bits_group, int_linear, pot_linear

# FPTQ's per-site thresholds on the calibration max|X| (the FPTQ paper): up to 15 static
# per-tensor INT8, up to 150 LAE + static, above that per-token dynamic.
FPTQ_STATIC_MAX = 15.0
FPTQ_LAE_MAX = 150.0


# Where SmoothQuant-style smoothing is folded: the inputs of q,k,v and of gate,up, as in
# SmoothQuant's own Llama code. Not down_proj's input: its massive first-token outliers
# (SmolLM2: max|x| up to 3119 at layer 11, ~9 after percentile smoothing) would move into
# down_proj's columns as ×100s, and the dual-grained format (one INT8 scale per row)
# cannot absorb that — measured: DGQ with down_in smoothed, ppl 1432 vs 25.5 (float 21.2).
SMOOTH_SITES = ("attn_in", "mlp_in")
# Sites kept per-token dynamic under act="static" for DGQ: down_proj's input has those
# token outliers, and one static per-tensor scale cannot cover 3119 and 1 (measured:
# every site static ppl 59.6; down_proj dynamic 25.8; everything dynamic 25.5).
DGQ_DYNAMIC_SITES = ("down_in",)


@dataclass(frozen=True)
class MethodSpec:
    weights: str                 # "dg" | "g" | "i8" | "pot" | "int" (the last two: b-bit; weight-only but pot --act dynamic)
    search: bool                 # weight search on the output objective (needs H)
    smoothing: str | None        # "percentile" | "smoothquant" | "lae" (fptq: per-site) | None
    fptq: bool = False           # per-site activation policy
    dynamic_sites: tuple = ()    # sites that stay per-token dynamic when act="static"
    calibration: str = "float"   # the default: "sequential" where measured better (docs/QUALITY.md)
    # The recipe a plain `dgq-quantize --method M` uses; each measured in docs/QUALITY.md.
    act: str = "static"          # --act
    gptq: bool = False           # --gptq
    sink_weight: float = 1.0     # --sink-weight


METHODS = {
    # dgq's default: per-token activations, GPTQ rounding, sink weight 512 (SmolLM2 1.137x the
    # float perplexity, against 1.218x static without GPTQ; docs/QUALITY.md).
    "dgq": MethodSpec("dg", True, "percentile", dynamic_sites=DGQ_DYNAMIC_SITES, calibration="sequential",
                      act="dynamic", gptq=True, sink_weight=512.0),
    "dgq-rtn": MethodSpec("dg", False, "percentile", dynamic_sites=DGQ_DYNAMIC_SITES, calibration="sequential"),
    "fptq": MethodSpec("g", True, "lae", fptq=True),
    "fptq-dg": MethodSpec("dg", True, "lae", fptq=True),
    "rtn": MethodSpec("g", False, None, calibration="sequential"),
    "smoothquant": MethodSpec("g", False, "smoothquant"),       # sequential measured worse: 60.2 vs 38.5
    "w4a16": MethodSpec("g", False, None, act="none"),
    "w8a8": MethodSpec("i8", False, None),
    # pot and int-search: GPTQ rounding with sink weight 512 (SmolLM2 W3 g128: pot 47.00 -> 41.60,
    # int-search 49.36 -> 38.24; W4: 32.78 -> 30.88, 27.09 -> 25.47), then the joint scale refit
    # (converters/pot.py REFIT: 41.05, 37.12; 30.79, 25.28; docs/QUALITY.md)
    "pot": MethodSpec("pot", True, None, act="none", gptq=True, sink_weight=512.0),
    "int-rtn": MethodSpec("int", False, None, act="none"),
    "int-search": MethodSpec("int", True, None, act="none", gptq=True, sink_weight=512.0),
}


def method_spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return METHODS[method]


def resolve_defaults(method: str, act: str | None, gptq: bool | None, sink_weight: float | None):
    """(act, gptq, sink_weight) with each None replaced by the method's default (MethodSpec)."""
    spec = method_spec(method)
    return (spec.act if act is None else act, spec.gptq if gptq is None else bool(gptq),
            spec.sink_weight if sink_weight is None else sink_weight)


def _resolve(method: str, wbits: int, act: str | None) -> tuple[MethodSpec, int, str]:
    spec = method_spec(method)
    act = spec.act if act is None else act
    if spec.weights in ("pot", "int"):
        if wbits not in WEIGHT_ONLY_BITS:
            raise QuantizeError(f"{method} takes --wbits 2, 3 or 4, got {wbits!r}")
        if spec.weights == "pot" and act in pot_format.ACTS:
            return spec, wbits, act
        if spec.weights == "pot":
            raise QuantizeError(f"pot keeps float activations by default (no --act) or takes --act dynamic "
                                f"(per-token INT8), not {act!r}")
        if act != "none":
            raise QuantizeError(f"{method} keeps activations in float; --act does not apply")
        return spec, wbits, "none"
    bits = 8 if method == "w8a8" else wbits
    if bits not in (4, 8):
        raise QuantizeError(f"--wbits must be 4 or 8 for {method}, got {wbits!r}")
    if bits == 8:
        if method not in ("rtn", "smoothquant", "w8a8"):
            raise QuantizeError(f"method {method} quantizes weights to 4 bits; 8-bit weights: "
                                "rtn, smoothquant or w8a8")
        spec = MethodSpec("i8", False, spec.smoothing, dynamic_sites=spec.dynamic_sites)   # float: not measured
    if act not in formats.ACT_MODES:
        raise QuantizeError(f"--act must be one of {', '.join(formats.ACT_MODES)}, got {act!r}")
    if method == "w4a16":
        if act != "none":
            raise QuantizeError("w4a16 keeps activations in float; --act does not apply")
    elif spec.fptq and act != "static":
        raise QuantizeError(f"{method} picks the activation mode per layer; --act does not apply")
    elif act == "none" and method != "rtn":
        raise QuantizeError(f"--act none (weight-only) is for rtn / w4a16, not {method}")
    return spec, bits, act


def check_options(method: str, wbits: int = 4, group: int = formats.DEFAULT_GROUP, act: str | None = None) -> None:
    """Every option that needs no model, checked before one is loaded (QuantizeError)."""
    if isinstance(wbits, bool) or not isinstance(wbits, (int, np.integer)):
        raise QuantizeError(f"--wbits must be an integer, got {wbits!r}")
    spec, bits, _ = _resolve(method, int(wbits), act)
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise QuantizeError(f"--group must be a positive integer, got {group!r}")
    if spec.weights in ("pot", "int"):
        check_bits_group(bits, int(group))


def gpu_refusal(method: str, wbits: int = 4, group: int = formats.DEFAULT_GROUP, act: str | None = None) -> str | None:
    """Why the GPU engine will not run the file these (checked) options make, or None: it runs
    dual-grained layers of groups 64·2^j, every weight-only pot/int layer and pot3 g128 with INT8
    activations (engine/gpu/linear.py)."""
    spec, _, act = _resolve(method, int(wbits), act)
    if spec.weights not in ("dg", "pot", "int"):
        return f"{method} writes '{spec.weights}' layers, which the GPU engine does not run"
    if spec.weights == "dg" and not dg_format.gpu_group(int(group)):
        return f"the GPU kernels take dual-grained groups of 64·2^j (64, 128, 256, ...), not {group}"
    if spec.weights == "pot" and act == "dynamic" and not pot_a8.takes(wbits, group):
        return (f"the GPU runs power-of-two weights with INT8 activations (--act dynamic) as pot3 in groups of "
                f"{pot_a8.GROUP} only, not --wbits {wbits} --group {group}")
    return None


def needs_calibration(method: str, wbits: int = 4, act: str | None = None, kv8: bool = False) -> bool:
    """Whether the method (with these options) reads calibration text: a static activation scale,
    a weight search's H, smoothing scales or KV-cache scales need it; w4a16, int-rtn and a
    weight-only rtn do not."""
    spec, _, act = _resolve(method, wbits, resolve_defaults(method, act, None, None)[0])
    return _needs_calibration(spec, act, kv8)


def _needs_calibration(spec: MethodSpec, act: str, kv8: bool) -> bool:
    return act == "static" or spec.fptq or spec.search or bool(spec.smoothing) or kv8


def _fptq_mode(amax: float, site: str) -> str:
    """FPTQ's policy for one site: 'static', 'lae' (LAE + static) or 'dynamic'."""
    if amax <= FPTQ_STATIC_MAX:
        return "static"
    if amax <= FPTQ_LAE_MAX and site in smooth.FOLDABLE_SITES:
        return "lae"
    # > 150, or o_in between 15 and 150 where LAE cannot be folded (GQA): per token.
    return "dynamic"


def quantize_linear(W, weights: str, act: str, ascale, group: int, H=None, search: bool = False,
                    bits: int = 4, gptq: bool = False, xp=np):
    """One float (N, K) weight -> QuantLinear of kind `weights` ("dg" | "g" | "i8" | "pot" | "int").
    gptq: the GPTQ-compensated candidate (converters/gptq.py; "dg", or searched "pot" / "int", with H only).
    xp: the array module the dual-grained search runs on (numpy, or cupy for --device cuda: the
    weight and H are copied there and the result comes back as NumPy)."""
    if weights in ("pot", "int"):                 # they refuse gptq without search and H (pot.py)
        make = pot_linear if weights == "pot" else int_linear
        ql = make(W, bits, group, H=H if search else None, search=search, compensate=gptq)
        # --method pot --act dynamic: these codes, run with per-token INT8 inputs (W-PoT × INT8)
        return ql if act == ql.act else dataclasses.replace(ql, act=act)
    if weights == "dg":
        if gptq and H is None:
            raise QuantizeError("--gptq needs the layer's calibration Gram matrix (a searched method)")
        if xp is not np:
            W, H = xp.asarray(W), None if H is None else xp.asarray(H)
        return dgq_linear(W, H, group, act, ascale, search=search, compensate=gptq)
    if weights == "g":
        return g_linear(W, group, act, ascale, H=H if search else None)
    if weights == "i8":
        return i8_linear(W, act, ascale, group)
    raise QuantizeError(f"unknown weight kind {weights!r}")


CALIBRATIONS = ("float", "sequential")


GPTQ_WEIGHTS = ("dg", "pot", "int")      # weight kinds whose searched methods take --gptq


def sink_weight_acts(method: str) -> bool:
    """Whether --sink-weight can change the file: it weights the first token in the q/k/v Gram
    matrix H, which only a method with the output-error weight search gathers (MethodSpec.search)."""
    return method_spec(method).search


def check_gptq(method: str, gptq: bool) -> None:
    """--gptq needs a scale search on the calibration Gram matrix: dgq, fptq-dg (the GPTQ candidate
    joins their search) and pot, int-search (codes re-rounded on the searched grid). gptq: the
    resolved flag (resolve_defaults)."""
    spec = METHODS.get(method)
    if gptq and not (spec is not None and spec.weights in GPTQ_WEIGHTS and spec.search):
        dg = ", ".join(m for m, sp in METHODS.items() if sp.weights == "dg" and sp.search)
        wo = ", ".join(m for m, sp in METHODS.items() if sp.weights in ("pot", "int") and sp.search)
        raise QuantizeError(f"--gptq applies to {dg} (searched dual-grained weights) and {wo} (searched "
                            f"weight-only), not {method!r}: it needs the scale search and its Gram matrix")


def quantize_checkpoint(ckpt, method: str, wbits: int = 4, group: int = formats.DEFAULT_GROUP,
                        act: str | None = None, kv8: bool = False, calib=None, progress: bool = True, *,
                        n_seq: int = cal.DEFAULT_N_SEQ, seq_len: int = cal.DEFAULT_SEQ_LEN,
                        act_clip="max", seed: int = cal.DEFAULT_SEED, calibration: str | None = None,
                        gptq: bool | None = None, sink_weight: float | None = None, on_layer=None, xp=np):
    """Quantize every linear of a float Checkpoint; return (ModelWeights with QuantLinears, recipe).

    ckpt: engine.io.layout.Checkpoint (config, HF tensors — a dict or a lazy mapping, tokenizer, ...).
    calib: None (wiki "calib" split), a text file path, "random", or an (n, T) token array.
    act_clip: static activation clipping, "max" or a percentile of the per-token absmax.
    calibration: "float" (each layer calibrated on the float model's activations),
    "sequential" (on the outputs of the already quantized layers before it) or None (the
    method's default, MethodSpec.calibration).
    act, gptq, sink_weight: None = the method's default (MethodSpec; dgq: "dynamic", True, 512).
    act: "static" (calibrated per-tensor INT8 scales), "dynamic" (per token at run time), "none".
    gptq: with dgq / fptq-dg, add the GPTQ-compensated rounding as a candidate per row; with
    pot / int-search, re-round the codes on the searched grid with GPTQ, per row where better
    (converters/gptq.py, converters/pot.py; docs/QUALITY.md has its perplexity and time).
    sink_weight: weight of each calibration sequence's first token in the q/k/v Gram matrix
    (converters/calibrate.py; 1 = plain XᵀX).
    on_layer(li, layer): called with each quantized layer as it is done.
    xp: numpy, or cupy to run the weight searches on the GPU (dgq-quantize --device cuda).
    The recipe (a JSON-able dict) records every choice; save it with engine.io.qfile.save_qfile.
    The whole result is held in memory; quantize_to_file streams it to a file instead.
    """
    layers = []

    def keep(li, layer):
        layers.append(layer)
        if on_layer is not None:
            on_layer(li, layer)

    floats, recipe = _quantize(ckpt, method, wbits, group, act, kv8, calib, progress, n_seq, seq_len,
                               act_clip, seed, calibration, keep, floats_out=None, gptq=gptq,
                               sink_weight=sink_weight, xp=xp)
    out = ModelWeights(config=ckpt.config, embed=floats["embed"], layers=layers, norm=floats["norm"],
                       lm_head=floats["lm_head"])
    return out, recipe


def quantize_to_file(ckpt, path, method: str, wbits: int = 4, group: int = formats.DEFAULT_GROUP,
                     act: str | None = None, kv8: bool = False, calib=None, progress: bool = True, *,
                     n_seq: int = cal.DEFAULT_N_SEQ, seq_len: int = cal.DEFAULT_SEQ_LEN, act_clip="max",
                     seed: int = cal.DEFAULT_SEED, calibration: str | None = None, embed_dtype: str = "float16",
                     gptq: bool | None = None, sink_weight: float | None = None, on_layer=None, before_finish=None,
                     xp=np) -> tuple[dict, int, dict]:
    """quantize_checkpoint streamed into a q.safetensors file (engine.io.qfile.QFileWriter): each
    layer is written and dropped as soon as it is quantized, and with a lazy checkpoint
    (load_checkpoint(path, lazy=True)) only one layer's float weights are ever read into memory.
    The file appears atomically at the end; nothing is left behind on an error.
    before_finish(): called before the file is put in place (the CLI re-checks its paths there).

    Returns (recipe, file size in bytes, {"params": linear parameters, "bytes": their stored bytes}).
    """
    sizes = {"params": 0, "bytes": 0}
    with QFileWriter(path, ckpt.config, embed_dtype) as w:
        def write(li, layer):
            t = time.perf_counter()
            w.add_layer(li, layer)
            for n in LINEAR_NAMES:
                ql = getattr(layer, n)
                sizes["params"] += int(np.prod(ql.shape))
                sizes["bytes"] += ql.nbytes() if isinstance(ql, formats.QuantLinear) else ql.nbytes
            phase["write"] += time.perf_counter() - t
            if on_layer is not None:
                on_layer(li, layer)

        phase = {"write": 0.0}
        _, recipe = _quantize(ckpt, method, wbits, group, act, kv8, calib, progress, n_seq, seq_len,
                              act_clip, seed, calibration, write, floats_out=w, phase=phase, gptq=gptq,
                              sink_weight=sink_weight, xp=xp)
        if before_finish is not None:
            before_finish()
        t = time.perf_counter()
        recipe["embed_dtype"] = w.float_dtypes.get("model.embed_tokens.weight", embed_dtype)
        size = w.finish(ckpt.tokenizer, ckpt.chat_template, recipe)
        recipe["phase_s"]["write"] = round(phase["write"] + time.perf_counter() - t, 2)
    return recipe, size, sizes


def _check_tensors(config, tensors) -> None:
    """Every name and shape before the first layer runs (a LazyTensors knows its shapes unread)."""
    shapes = getattr(tensors, "shapes", None)
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise ModelError(f"tensor {name} is missing")
        got = tuple(shapes[name]) if shapes is not None else tuple(tensors[name].shape)
        if got != shape:
            raise ModelError(f"tensor {name} has shape {got}, expected {shape}")


def _float_tensor(tensors, name: str) -> np.ndarray:
    return np.asarray(tensors[name], dtype=np.float32)


def _quantize(ckpt, method, wbits, group, act, kv8, calib, progress, n_seq, seq_len, act_clip, seed,
              calibration, emit, floats_out=None, phase=None, gptq: bool | None = None,
              sink_weight: float | None = None, xp=np):
    """The layer walk behind quantize_checkpoint / quantize_to_file.

    Per layer: read its float weights; gather its statistics on the calibration activations
    (absmax, per-token max, H, KV maxima); fold the smoothing scales (they need only this
    layer's absmax); re-gather after folding where derived statistics do not suffice (a
    percentile clip); quantize the seven linears; hand the layer to `emit`; move the activations
    on through the float layer ("float") or the quantized one ("sequential"); free everything.
    In "float" mode every number equals the whole-model pass the converter used to make.
    Returns ({"embed", "norm", "lm_head"} — None where written to floats_out —, recipe).
    """
    t0 = time.perf_counter()
    phase = {} if phase is None else phase
    for k in ("load", "calibrate", "quantize", "propagate"):
        phase[k] = 0.0
    act, gptq, sink_weight = resolve_defaults(method, act, gptq, sink_weight)
    spec, bits, act = _resolve(method, wbits, act)
    act_clip = cal.parse_act_clip(act_clip)
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise QuantizeError(f"--group must be a positive integer, got {group!r}")
    if calibration is None:
        calibration = spec.calibration
    if calibration not in CALIBRATIONS:
        raise QuantizeError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    check_gptq(method, gptq)
    sink_weight = cal.check_sink_weight(sink_weight)
    config = c = ckpt.config
    if spec.weights in ("pot", "int"):
        check_bits_group(bits, group)                  # before the calibration pass, not after

    if spec.weights in ("dg", "g"):
        for n, k in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size)):
            if k % 2:
                raise QuantizeError(f"4-bit packing needs an even {n}, got {k}")
    tensors = ckpt.tensors
    _check_tensors(config, tensors)
    L = config.num_hidden_layers

    needs_static = act == "static" or spec.fptq
    need_calib = _needs_calibration(spec, act, kv8)
    sequential = need_calib and calibration == "sequential"
    recipe = {"method": method, "wbits": bits, "group": group, "weights": spec.weights,
              "weight_search": spec.search, "act": "per-site" if spec.fptq else act,
              "act_clip": act_clip if needs_static else None, "smoothing": spec.smoothing,
              "smoothing_sites": ("per-site (fptq_policy)" if spec.fptq else
                                  list(SMOOTH_SITES) if spec.smoothing else []),
              "dynamic_sites": list(spec.dynamic_sites) if act == "static" else [],
              "o_proj_smoothing": "skipped (GQA: v_proj rows feed several o_proj input channels)",
              "kv8": bool(kv8),
              "gptq": ({"mode": "grid", "damp": DEFAULT_DAMP} |
                       ({"grid": "searched scales" + (" and zero points" if spec.weights == "int" else ""),
                         "choice": "per row, the lower d H dT of searched and compensated codes"}
                        if spec.weights in ("pot", "int") else {})) if gptq else False,
              "stats_from": ("layer-sequential (each layer on the outputs of the quantized layers before it)"
                             if sequential else "float model (not layer-sequential)"),
              "converter": "dgq-engine converters.quantize", "search_device": "cuda" if xp is not np else "cpu"}
    seqs = None
    if need_calib:
        if not isinstance(calib, np.ndarray):
            cal.check_sizes(n_seq, seq_len, config.max_position_embeddings)
        seqs, source = cal.calibration_tokens(ckpt.tokenizer, calib, n_seq, seq_len, seed, config.vocab_size)
        for row in seqs:
            check_tokens(row, config)
        recipe["calibration"] = {"source": source, "n_seq": int(seqs.shape[0]), "seq_len": int(seqs.shape[1]),
                                 "tokens": int(seqs.size), "seed": seed,
                                 "mode": "sequential" if sequential else "float", "sink_weight": sink_weight}

    # The float tensors outside the layers: written (and dropped) at once when streaming.
    t = time.perf_counter()
    embed = _float_tensor(tensors, "model.embed_tokens.weight")                       # (V, H)
    norm = _float_tensor(tensors, "model.norm.weight")                                # (H,)
    lm_head = embed if c.tie_word_embeddings else _float_tensor(tensors, "lm_head.weight")
    floats = {"embed": embed, "norm": norm, "lm_head": lm_head}
    if floats_out is not None:
        floats_out.add_floats(embed, norm, None if c.tie_word_embeddings else lm_head)
        floats = {"embed": None, "norm": None, "lm_head": None}
    del lm_head, norm

    # Statistics, layer by layer. One pass per layer gives everything; smoothing then only
    # rescales absmax and H (calibrate.scaled). A percentile act_clip needs the per-token
    # maxima of the smoothed inputs, which do not rescale: then a cheap absmax-only pass
    # picks the scales and a second pass runs on the folded layer. In "float" mode that
    # second pass reads the folded model's activations, a stream of its own (Xf), exactly as
    # a second whole-model pass over the folded model would.
    two_pass = bool(spec.smoothing) and needs_static and act_clip != "max"
    X = Xf = None
    if need_calib:
        X = embed_tokens(c, embed, seqs)                                               # (n, T, H)
        if xp is not np:                 # --device cuda: calibration forwards and H on the GPU too
            X = xp.asarray(X)
        if two_pass and not sequential:
            Xf = X.copy()                                                              # (n, T, H)
    del embed
    phase["load"] += time.perf_counter() - t
    recipe["calibration_passes"] = (2 if two_pass else 1) if need_calib else 0
    kv_absmax = np.zeros((L, 2, c.num_key_value_heads), np.float32) if kv8 else None
    site_mode, site_amax, layer_info = {}, {}, {}
    smooth_sites = smooth.FOLDABLE_SITES if spec.fptq else SMOOTH_SITES

    for li in progress_bar(range(L), desc=f"{method}: layers" + (" (sequential)" if sequential else ""),
                           unit="layer", enabled=progress):
        t = time.perf_counter()
        lw = LayerWeights.from_hf(c, tensors, li)
        phase["load"] += time.perf_counter() - t
        stats = None
        t = time.perf_counter()
        if need_calib:
            sites = None if (spec.fptq or not two_pass) else SMOOTH_SITES
            stats, kv = cal.calibrate_layer(
                c, li, lw, X, gram=spec.search and not two_pass, kv=kv8 and not two_pass,
                sites=sites, advance=not sequential, progress=progress, sink_weight=sink_weight,
                desc=f"layer {li}: calibration" + (" (absmax pass)" if two_pass else ""))
            if kv is not None:
                kv_absmax[li] = kv
        if spec.smoothing:
            scales = {}
            for site, st in stats.items():
                if site not in smooth_sites:
                    continue
                if spec.fptq:
                    site_mode[(li, site)] = _fptq_mode(st.amax, site)
                    if site_mode[(li, site)] != "lae":
                        continue
                scales[site] = smooth.scales_for(spec.smoothing, st.absmax, lw, site)
            if spec.fptq:
                for site, st in stats.items():
                    site_mode.setdefault((li, site), _fptq_mode(st.amax, site))
                    site_amax[(li, site)] = st.amax
            st = None                                              # no second reference to an H
            for site in sorted(scales):
                lw = smooth.fold_layer(lw, site, scales[site])
            if two_pass:
                stats, kv = cal.calibrate_layer(c, li, lw, X if sequential else Xf, gram=spec.search,
                                                kv=kv8, advance=not sequential, progress=progress,
                                                sink_weight=sink_weight,
                                                desc=f"layer {li}: calibration (folded layer)")
                if kv is not None:
                    kv_absmax[li] = kv
            else:
                for site, s in scales.items():
                    stats[site] = cal.scaled(stats[site], s)
        phase["calibrate"] += time.perf_counter() - t

        t = time.perf_counter()
        # Each float weight and each site's statistics are dropped as soon as their last
        # linear is done: down_proj's search then runs beside its own H only.
        floatw = {n: getattr(lw, n) for n in LINEAR_NAMES}
        norms = lw.floats()                                        # norms and biases
        del lw
        new, info = {}, {}
        for i, n in enumerate(LINEAR_NAMES):
            site = SITE_OF[n]
            st = stats.get(site) if stats is not None else None
            a_mode = site_mode.get((li, site), "static") if spec.fptq else act
            if a_mode == "static" and site in spec.dynamic_sites:
                a_mode = "dynamic"
            if a_mode == "lae":
                a_mode = "static"
            ascale = cal.static_ascale(st, act_clip) if a_mode == "static" else None
            H = st.H if (st is not None and spec.search) else None
            ql = quantize_linear(np.asarray(floatw.pop(n)), spec.weights, a_mode, ascale, group,
                                 H=H, search=spec.search, bits=bits, gptq=gptq, xp=xp)
            new[n] = ql
            if ql.meta.get("search") and "obj" in ql.meta:
                info[HF_LINEAR[n]] = {k: ql.meta[k] for k in ("obj_rtn", "obj", "rows_rtn", "obj_uncompensated",
                                                              "rows_compensated") if k in ql.meta}
            del st, H, ql
            if stats is not None and (i + 1 == len(LINEAR_NAMES) or SITE_OF[LINEAR_NAMES[i + 1]] != site):
                stats.pop(site, None)
        del stats                                                  # this layer's H: all freed
        qlayer = LayerWeights(**norms, **new)
        del norms, new
        if info:
            layer_info[str(li)] = info
        phase["quantize"] += time.perf_counter() - t
        if sequential:
            t = time.perf_counter()
            cal.run_layer(c, li, qlayer, X, progress=progress, desc=f"layer {li}: quantized outputs")
            phase["propagate"] += time.perf_counter() - t
        emit(li, qlayer)
        del qlayer

    if spec.fptq and spec.smoothing:
        recipe["fptq_policy"] = {
            "static_max": FPTQ_STATIC_MAX, "lae_max": FPTQ_LAE_MAX,
            "sites": {f"{li}.{site}": {"amax": site_amax[(li, site)], "mode": m}
                      for (li, site), m in sorted(site_mode.items())}}
    if need_calib:
        recipe["calibration"]["h_dtype"] = "float64" if spec.search else None
    if layer_info:
        objs = [v for d in layer_info.values() for v in d.values()]
        recipe["objective"] = {k: sum(v[key] for v in objs) for k, key in
                               (("rtn", "obj_rtn"), ("uncompensated", "obj_uncompensated"), ("final", "obj"))
                               if all(key in v for v in objs)}
        recipe["objective"]["layers"] = layer_info
    if kv8:
        s = np.where(kv_absmax > 0, kv_absmax / formats.QMAX_I8, 1.0).astype(np.float32)  # (L, 2, Hkv)
        recipe["kv_cache"] = {"bits": 8, "granularity": "per layer and KV head, symmetric",
                              "k_stat": "max RoPE pair magnitude of k (bounds |k| after rotation)",
                              "k_scale": [[float(x) for x in row] for row in s[:, 0]],
                              "v_scale": [[float(x) for x in row] for row in s[:, 1]]}
    recipe["time_s"] = round(time.perf_counter() - t0, 2)
    recipe["phase_s"] = {k: round(v, 2) for k, v in phase.items()}
    recipe["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return floats, recipe
