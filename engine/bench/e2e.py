"""`python -m engine.bench e2e`: end-to-end prefill and decode speed of the GPU engine.

Models: SmolLM2-135M (random weights of its shape in valid DGQ format; --qfile runs a given
q.safetensors of any shape instead) and a Llama-2-7B-shaped model with random DGQ weights
generated here. Speed depends on shapes, not values, so random weights are honest for
speed (never for quality). Each model also runs through our FP16 path (cuBLAS linears
for prefill, our fp16 GEMV in the graphed decode step) as the in-run baseline; the
A8W4 model also decodes with the INT8 KV cache (kv8 rows). A prefill row is the median of
10 after 0.5 s of warm-up, with host_ms beside it: the time the host takes to issue its
launches (a row whose host_ms is near its step_ms is bound by the host, not the GPU). Its
repeats are one shape, so from the third on they replay a captured graph (tuning.PREFILL, as a
perplexity window or a fixed-size chunk would): the `graphed` rows; the `eager` row beside each
launches every kernel from the host (PREFILL.graphs = 0), as a prompt seen once does.
Prints one JSON object per row with --json, and a table.

--context 128,1024,...: the context table instead (run_context): A8W4 decode tokens/s of each
model at each context for batch 1, 8 and 32, fp16 and INT8 KV, with the bytes a step must read
(linear weights, head, norms, the embedding rows, and the K/V it attends), computed from the
model's shapes and the context, and the % of the copy bandwidth measured in the same process
that this reaches; the attention launch alone is timed too (attention_time) against its K/V
bytes. --attn heads,gqa repeats the table with each decode attention kernel (gpu/attention.py),
--ab FIELD=INT with tuning.GEMM fields set (e.g. gemv_dp_u=4), each in the same process.

A/B rows beside the default's, in the same process (batch-1 decode with its per-launch profile,
and each prefill length): --ab (tuning.GEMM fields; wb.FIELD,
rows.FIELD, prefill.FIELD, decode.FIELD), --patch
FILE.json (kernels compiled from edited source: kargs.patched; bench/patches/; its rows also
for the W<b>-PoT models' batch-1 decode).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from .. import formats
from ..formats import pot
from ..gpu import kargs, launch
from ..gpu.tuning import DECODE, GEMM, PREFILL, ROWS, WB_TUNE
from ..io.config import ModelConfig
from ..io.layout import LINEAR_NAMES, LayerWeights, ModelError, ModelWeights
from ..io.shapes import shape_config
from ..model.kv_cache import bytes_per_position as kv_bytes_per_position
from .common import BenchError, copy_bandwidth, warm_clocks

SMOLLM2, LLAMA2_7B, LLAMA3_8B = (shape_config(n) for n in ("smollm2", "llama7b", "llama3-8b"))
MODELS = {"smollm2": (SMOLLM2, "SmolLM2-135M-shaped (random DGQ)"),
          "llama7b": (LLAMA2_7B, "Llama-2-7B-shaped (random DGQ)"),
          "llama3-8b": (LLAMA3_8B, "Llama-3-8B-shaped (random DGQ)")}


def _shapes(c: ModelConfig) -> dict:
    h, i = c.hidden_size, c.intermediate_size
    return {"q": (c.q_size, h), "k": (c.kv_size, h), "v": (c.kv_size, h), "o": (h, c.q_size),
            "gate": (i, h), "up": (i, h), "down": (h, i)}


def random_dg_layer(rng, n, k, group=128, act="dynamic", ascale=0.05, cscale=None):
    """Random dual-grained weights that satisfy the format (no int8 overflow).

    Zeros 5..10 and S ≤ 11 keep |(q - z)·S| ≤ 110 for any code, so no clamping is needed.
    cscale defaults to 1 / (40 √K), which keeps activations O(1) through random layers.
    """
    g = formats.n_groups(k, group)
    z = rng.integers(5, 11, (n, g), dtype=np.uint8)
    s = rng.integers(1, 12, (n, g), dtype=np.uint8)
    q = rng.integers(0, 16, (n, k // 2), dtype=np.uint8) | (rng.integers(0, 16, (n, k // 2), dtype=np.uint8) << 4)
    if cscale is None:
        cscale = np.full(n, 1.0 / (40 * np.sqrt(k)), np.float32)
    return formats.QuantLinear(kind="dg", act=act, in_features=k, out_features=n, group=group,
                               qweight=q.astype(np.uint8), qzeros=z, gscale=s,
                               cscale=np.asarray(cscale, np.float32),
                               ascale=ascale if act == "static" else None)


def random_pot_layer(rng, n, k, bits, group=128, act="none"):
    """Random valid power-of-two weights: any plane words are valid codes when K is a multiple
    of 32; scales 2/√K put the typical |w| near the random DGQ layers' ~1/√K. The spare code of
    pot2/pot3 (sign set, m = 0: the level +2·s, formats/pot.py) is left out, so the weights
    average zero: with it every random row summed +s/4 of its input a weight, and a 7B-shaped
    stack overflowed float16 in its first two layers (NaN logits)."""
    if k % 32:
        raise ValueError(f"random_pot_layer needs K a multiple of 32, got {k}")
    qw = rng.integers(0, 2**32, (n, k // 32, bits), dtype=np.uint32)
    if bits in pot.SPARE_BITS:                   # the sign plane only where the magnitude is non-zero
        qw[..., bits - 1] &= np.bitwise_or.reduce(qw[..., :bits - 1], axis=-1)
    s = np.full((n, formats.n_groups(k, group)), 2.0 / np.sqrt(k), dtype=np.float16)
    return formats.QuantLinear(kind=f"pot{bits}", act=act, in_features=k, out_features=n, group=group,
                               qweight=qw, wscale=s)


def random_model(c: ModelConfig, quantized: bool | int, seed=0, act="none") -> ModelWeights:
    """One random layer's arrays shared by every layer (the GPU still gets one copy per layer).
    quantized: True = random DGQ (A8W4) layers, an int b = random pot<b> layers of activation mode
    `act` ("none", or "dynamic": INT8 tokens), False = float."""
    rng = np.random.default_rng(seed)
    if quantized is True:
        lin = {n: random_dg_layer(rng, *s) for n, s in _shapes(c).items()}
    elif quantized:
        lin = {n: random_pot_layer(rng, *s, bits=int(quantized), act=act) for n, s in _shapes(c).items()}
    else:
        lin = {n: (rng.standard_normal(s, dtype=np.float32) * (0.5 / np.sqrt(s[1]))) for n, s in _shapes(c).items()}
    ones = np.ones(c.hidden_size, np.float32)
    layers = [LayerWeights(attn_norm=ones, mlp_norm=ones, **{n: lin[n] for n in LINEAR_NAMES})
              for _ in range(c.num_hidden_layers)]
    embed = rng.standard_normal((c.vocab_size, c.hidden_size), dtype=np.float32) * 0.02
    head = embed if c.tie_word_embeddings else rng.standard_normal(embed.shape, dtype=np.float32) * 0.02
    return ModelWeights(config=c, embed=embed, layers=layers, norm=ones, lm_head=head)


def dequantized_copy(mw: ModelWeights) -> ModelWeights:
    """The same model with float linears: the FP16 baseline of an A8W4 file."""
    cache = {}

    def deq(ql):
        if id(ql) not in cache:
            cache[id(ql)] = ql.dequantize() if isinstance(ql, formats.QuantLinear) else ql
        return cache[id(ql)]
    layers = [LayerWeights(attn_norm=L.attn_norm, mlp_norm=L.mlp_norm, **{n: deq(getattr(L, n)) for n in LINEAR_NAMES})
              for L in mw.layers]
    return ModelWeights(config=mw.config, embed=mw.embed, layers=layers, norm=mw.norm, lm_head=mw.lm_head)


def prefill_host_ms(cp, fn, reps: int = 5) -> float:
    """Median milliseconds for fn (a prefill) to return with the logits check, its one wait on
    the GPU, left out: the host's time to issue the launches. Where it comes near the row's own
    time the host, not the GPU, bounds the row (a 7B prefill of 512 tokens, 2026-12-04)."""
    from ..gpu import model as model_mod  # noqa: PLC0415
    ts = []
    with _setting(model_mod, check_finite_logits=lambda cp_, logits, where: logits):
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            cp.cuda.Device().synchronize()
    return 1e3 * float(np.median(ts))


def _timed(cp, fn, reps):
    warm_clocks(cp, fn)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench_model(cp, name, mw, prefill_lens=(512, 2048), batches=(1, 8, 32), kv8_batches=(), ctx=128, steps=64,
                bw=None, variants=()):
    from ..gpu.model import CudaModel  # noqa: PLC0415
    rows = []
    pool = cp.get_default_memory_pool()
    gc.collect()                   # the previous model's graphs and caches, before the baseline
    pool.free_all_blocks()
    base = pool.used_bytes()
    gm = CudaModel(mw)
    wb = gm.weight_bytes()
    n_params = sum(np.prod(getattr(mw.layers[0], n).shape) for n in LINEAR_NAMES) * len(mw.layers)
    bits = 8 * wb["linears"] / n_params
    rng = np.random.default_rng(0)
    c = mw.config
    prefill_lens = [t for t in prefill_lens if t <= c.max_position_embeddings]

    def prefill_row(t, label):
        label += " graphed" if PREFILL.graphs else ""      # its repeats replay a captured prefill
        toks = rng.integers(0, c.vocab_size, t)
        cache = gm.new_cache(t)

        def run():
            cache.lens_host[:] = 0
            gm.prefill(toks, cache)
        s = _timed(cp, run, 10)
        return dict(model=label, phase="prefill", tokens=t, batch=1, seconds=s, tok_s=t / s,
                    step_ms=1e3 * s, host_ms=prefill_host_ms(cp, run),
                    bits_per_param=bits, weight_bytes=wb["linears"] + wb["other"])

    for t in prefill_lens:
        rows.append(prefill_row(t, name))
        if PREFILL.graphs:                       # the same shape from the host, launch by launch
            with _setting(PREFILL, graphs=0):
                rows.append(prefill_row(t, name + " eager"))
    def decode_row(bsz, kv8, label):
        cache = gm.new_cache(ctx + steps + 1, batch=bsz, kv8=kv8)
        firsts = []
        for i in range(bsz):
            firsts.append(int(gm.prefill(rng.integers(0, c.vocab_size, ctx), cache, seq=i)[0].argmax()))
        gm.decode_greedy(cache, firsts, 2)            # warm-up: compiles, captures the step graph
        cache.lens_host[:] = ctx
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        gm.decode_greedy(cache, firsts, steps)        # graph replays only
        s = time.perf_counter() - t0
        # bytes a step must read: every weight once (embedding: one row per sequence) + the KV cache
        kv = cache.nbytes() / cache.capacity * (ctx + steps / 2)
        wbytes = wb["linears"] + wb["other"] - gm.embed.nbytes + bsz * c.hidden_size * 2
        if gm.lm_head is gm.embed:                    # a tied fp16 head reads the whole embedding
            wbytes += gm.embed.nbytes
        row = dict(model=label, phase="decode", tokens=steps, batch=bsz, seconds=s,
                   tok_s=steps * bsz / s, step_ms=1e3 * s / steps, bytes_per_step=wbytes + kv,
                   bits_per_param=bits, pdl=launch.pdl_enabled() and all(gm.graphable(bsz)))
        if bw:
            row["pct_copy_bw"] = 100 * (wbytes + kv) / (s / steps) / bw
        return row, cache

    for bsz, kv8 in [(b, False) for b in batches] + [(b, True) for b in kv8_batches]:
        row, cache = decode_row(bsz, kv8, name + (" kv8" if kv8 else ""))
        rows.append(row)
        if bsz == 1 and not kv8:
            prof = graph_breakdown(gm, cache)
            rows.append(dict(model=name, phase="profile", batch=bsz,
                             us_per_launch={k: [n, round(us, 2)] for k, (n, us) in prof.items()}))
            if launch.pdl_enabled():                  # the same step with plain stream-ordered launches
                del cache
                with launch.plain_launches():
                    row, cache = decode_row(bsz, kv8, name + " no-PDL")
                rows.append(row)
                for suffix, setting in variants:     # A/B rows of settings (run_e2e): decode, each prefill
                    del cache
                    with setting() as used:          # used: a patch's edited files this model ran (else None)
                        got = [prefill_row(t, name + " " + suffix) for t in prefill_lens]
                        row, cache = decode_row(bsz, kv8, name + " " + suffix)
                        got.append(row)
                        prof = graph_breakdown(gm, cache)
                    if used is not None and not used:
                        print(f"[e2e] {name}: {suffix} edits no kernel this model runs: no row", file=sys.stderr)
                        continue
                    rows += got
                    rows.append(dict(model=name + " " + suffix, phase="profile", batch=bsz,
                                     us_per_launch={k: [n, round(us, 2)] for k, (n, us) in prof.items()}))
        del cache
    rows.append(dict(model=name, phase="memory", gpu_bytes=pool.used_bytes() - base, bits_per_param=bits,
                     linear_bytes=wb["linears"]))
    del gm
    pool.free_all_blocks()
    return rows


def _device():
    """(cupy, copy bandwidth in bytes/s read + written, [the device row]) or SystemExit without a GPU."""
    from ..gpu.backend import cupy_or_none  # noqa: PLC0415
    cp = cupy_or_none()
    if cp is None:
        raise SystemExit("engine.bench e2e needs a GPU (CuPy + CUDA device)")
    bw = copy_bandwidth() * 1e9
    return cp, bw, [dict(phase="device", name=cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                         copy_bw_gbs=bw / 1e9)]


def _progress(rows, what: str) -> None:
    """One line on stderr as each model's rows are done: a run cut short still shows them."""
    decode = [r for r in rows if str(r.get("model", "")).startswith(what) and r.get("phase") == "decode"]
    got = ", ".join(f"{r['model'][len(what):].strip()} b{r['batch']} {r['tok_s']:.0f} tok/s".strip() for r in decode)
    print(f"[e2e] {what}: {got or 'done'}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _setting(obj, **values):
    """Within the block, obj's fields (a tuning dataclass) take these values."""
    old = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def decode_variants(ab=(), patches=()) -> list:
    """(row suffix, context manager factory) for the A/B rows (batch-1 decode and the first
    prefill length): each item of ab, a dict of tuning.GEMM fields and values (e.g.
    {"gemv_dp4a": False, "gemv_dp_u": 4}); each of patches, (name, source edits) for
    kargs.patched (read_patches)."""
    out = [(",".join(f"{k}={int(v)}" for k, v in d.items()), functools.partial(_ab_setting, d)) for d in ab]
    out += [(f"patch {name}", functools.partial(_patch_setting, edits, d)) for name, edits, d in patches]
    return out


def args_variants(args) -> list:
    """decode_variants of a command's --ab (repeatable) and --patch FILE.json arguments (gemv-wb,
    gemm-tune), checked before any GPU time: BenchError names what is wrong."""
    try:
        return decode_variants(ab=[parse_ab(a) for a in getattr(args, "ab", None) or ()],
                               patches=read_patch_files(getattr(args, "patch", None) or ()))
    except ValueError as e:
        raise BenchError(str(e)) from None


@contextlib.contextmanager
def _patch_setting(edits, ab: dict):
    """kargs.patched(edits), with a patch's own --ab settings (its "ab" field) set too."""
    with kargs.patched(edits) as used, _ab_setting(ab):
        yield used


def read_patch_files(paths) -> list:
    """read_patches of each --patch FILE (repeatable; one path or a list), their items in order;
    an item name that two files share is an error (the rows are named by it)."""
    out, seen = [], {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for item in read_patches(path):
            if item[0] in seen:
                raise ValueError(f"--patch {path}: item {item[0]!r} is also in {seen[item[0]]}")
            seen[item[0]] = path
            out.append(item)
    return out


def read_patch_item(spec: str) -> tuple:
    """One item of a --patch file named as FILE.json:NAME (sass_scan --patch, DGQ_TEST_PATCH):
    (name, edits, ab dict) as read_patches gives it; ValueError naming the choices otherwise."""
    path, _, name = spec.rpartition(":")
    items = {item[0]: item for item in read_patches(path)} if path else {}
    if name not in items:
        raise ValueError(f"want FILE.json:NAME with NAME one of {sorted(items)}, got {spec!r}")
    return items[name]


def read_patches(path) -> list:
    """--patch FILE: a JSON list of {"name": str, "edits": [[file.cu, old, new], ...]}, each an A/B
    row whose kernels compile from cuda/<file.cu> with every `old` of its inlined source (headers
    included) replaced by `new` (kargs.patched), and with an optional "ab": "FIELD=INT,..." (as
    --ab) set as well. -> [(name, edits, ab dict), ...]; one clear error for a file that is not that."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--patch {path}: cannot read a JSON list from it ({e})") from None
    out, names = [], set()
    if not isinstance(items, list) or not items:
        raise ValueError(f"--patch {path}: want a non-empty JSON list of {{\"name\": ..., \"edits\": [...]}}")
    for i, item in enumerate(items):
        edits = item.get("edits") if isinstance(item, dict) else None
        name = item.get("name") if isinstance(item, dict) else None
        ok = isinstance(name, str) and name and isinstance(edits, list) and edits and all(
            isinstance(e, list) for e in edits)                  # each edit itself: kargs.check_edits
        if not ok or name in names:
            raise ValueError(f"--patch {path}: item {i} is not {{\"name\": str, \"edits\": [[file.cu, old, new], ...]}} "
                             "with a new name")
        names.add(name)
        try:
            ab = item.get("ab", "")
            if not isinstance(ab, str):
                raise ValueError(f"its \"ab\" is not a string FIELD=INT,... but {ab!r}")
            out.append((name, kargs.check_edits(edits), parse_ab(ab) if ab.strip() else {}))
        except ValueError as e:
            raise ValueError(f"--patch {path}: item {i} ({name}): {e}") from None
    return out


# --ab FIELD (tuning.GEMM), wb.FIELD (tuning.WB_TUNE), rows.FIELD (tuning.ROWS, the row kernels),
# prefill.FIELD (tuning.PREFILL, captured prefills) or decode.FIELD (tuning.DECODE)
AB_OBJECTS = {"": GEMM, "wb.": WB_TUNE, "rows.": ROWS, "prefill.": PREFILL, "decode.": DECODE}


def _ab_target(key: str) -> tuple[str, str]:
    """An --ab key -> (its AB_OBJECTS prefix, the field name)."""
    prefix = next((p for p in AB_OBJECTS if p and key.startswith(p)), "")
    return prefix, key[len(prefix):]


def _wb_only(d: dict) -> bool:
    """Whether a parse_ab dict sets tuning.WB_TUNE fields alone (the weight-only kernels')."""
    return all(_ab_target(k)[0] == "wb." for k in d)


@contextlib.contextmanager
def _ab_setting(d: dict):
    """Within the block, the fields of one parse_ab dict take their values."""
    parts: dict = {}
    for k, v in d.items():
        prefix, name = _ab_target(k)
        parts.setdefault(prefix, {})[name] = v
    with contextlib.ExitStack() as stack:
        for prefix, part in parts.items():
            stack.enter_context(_setting(AB_OBJECTS[prefix], **part))
        yield


def parse_ab(item: str) -> dict:
    """"gemv_dp4a=1,gemv_dp_u=4" -> {"gemv_dp4a": True, "gemv_dp_u": 4}: integer or
    boolean fields of tuning.GEMM, of tuning.WB_TUNE as wb.FIELD (e.g. wb.resident=0), of
    tuning.ROWS as rows.FIELD (e.g. rows.act_per=32), of tuning.PREFILL as prefill.FIELD
    (prefill.graphs=0: eager prefills), or of tuning.DECODE as decode.FIELD (decode.gqa_wave_fit=0)."""
    out = {}
    for kv in filter(None, (t.strip() for t in item.split(","))):
        k, _, v = kv.partition("=")
        prefix, name = _ab_target(k)
        cur = getattr(AB_OBJECTS[prefix], name, None)
        if not isinstance(cur, int) or not re.fullmatch(r"-?\d+", v.strip()):
            raise ValueError(f"--ab: {kv!r} is not FIELD=INTEGER for an integer or boolean field of tuning.GEMM "
                             "(or wb.FIELD of tuning.WB_TUNE, rows.FIELD of tuning.ROWS, prefill.FIELD of tuning.PREFILL, "
                             "decode.FIELD of tuning.DECODE)")
        out[k] = bool(int(v)) if isinstance(cur, bool) else int(v)
    if not out:
        raise ValueError(f"--ab: no setting in {item!r}")
    return out


def run_e2e(qfile=None, json_out=False, quick=False, models=("smollm2", "llama7b"), pot_bits=(4, 3, 2),
            ab=(), patches=()):
    cp, bw, rows = _device()
    if qfile:                                          # that file alone, whatever its shape
        from ..io.qfile import load_qfile  # noqa: PLC0415
        q = load_qfile(qfile)
        c = q.config
        qlabel = (f"{Path(qfile).name} ({c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                  f"{q.recipe.get('method', '?')})")
        models, pot_bits = ("qfile",), ()
    for key in models:
        if key == "qfile":
            mw, label, q = q.weights, qlabel, None
        else:
            mw, label = random_model(MODELS[key][0], True), MODELS[key][1]
        kw = dict(prefill_lens=(512,), batches=(1, 8), steps=32) if quick else {}
        rows += bench_model(cp, label + " A8W4", mw, bw=bw, kv8_batches=(1,) if quick else (1, 32),
                            variants=decode_variants(ab if key == "qfile" else   # a file may be weight-only
                                                     [d for d in ab if not _wb_only(d)], patches), **kw)
        _progress(rows, label + " A8W4")
        # the same with the opt-in INT8 output head (--lm-head int8): decode only
        rows += bench_model(cp, label + " A8W4 int8-head", mw.with_int8_lm_head(), bw=bw, prefill_lens=(),
                            batches=(1, 8), steps=kw.get("steps", 64))
        rows += bench_model(cp, label + " FP16", dequantized_copy(mw), bw=bw, **kw)
        del mw
        for b in pot_bits:          # weight-only power-of-two models of the same shape: decode only
            shape, a8 = MODELS[key][0], b == "3a8"
            # "3a8": W3-PoT layers of act "dynamic" (INT8 tokens, the pot3-a8 GEMV, which reads the
            # weights once a token; past WB_TUNE.pa8_gemv_max_m tokens Ŵ in fp16 and cuBLAS): batches
            # 1 and 8, and a prefill of 512 tokens
            pot_label = label.split(" (")[0] + (" (random W3-PoT, INT8 activations)" if a8 else f" (random W{b}-PoT)")
            pmw = random_model(shape, 3 if a8 else b, act="dynamic" if a8 else "none")
            rows += bench_model(cp, pot_label, pmw, bw=bw,
                                prefill_lens=(512,) if a8 else (), batches=(1, 8), steps=kw.get("steps", 64),
                                variants=decode_variants(ab=[d for d in ab if any(_ab_target(k)[0] == "wb." for k in d)],
                                                         patches=patches))
            if a8:                  # beside "A8W4 int8-head": both with the INT8 output head
                rows += bench_model(cp, pot_label + " int8-head", pmw.with_int8_lm_head(), bw=bw, prefill_lens=(),
                                    batches=(1,), steps=kw.get("steps", 64))
            del pmw
    for r in rows:
        if json_out:
            print(json.dumps(r))
    print(format_table(rows))
    return rows


# ----------------------------------------------------------------------------- the context table
def step_bytes(gm, bsz: int, ctx: int, steps: int, kv8: bool) -> tuple[float, float]:
    """(weight bytes, K/V bytes) a decode step of bsz sequences must read, on average over
    `steps` steps that start from `ctx` cached positions: every linear, the head and the norms
    once, one embedding row per sequence; each sequence's K and V (kv8: int8 plus one float32
    scale per token and kv head) at every position it attends, ctx + 1 .. ctx + steps."""
    c = gm.config
    wb = gm.weight_bytes()
    wbytes = wb["linears"] + wb["other"] - gm.embed.nbytes + bsz * c.hidden_size * 2
    if gm.lm_head is gm.embed:                        # a tied fp16 head reads the whole embedding
        wbytes += gm.embed.nbytes
    kv = c.num_hidden_layers * bsz * kv_bytes_per_position(c, kv8) * (ctx + (steps + 1) / 2)
    return float(wbytes), float(kv)


def _fits(cp, nbytes: int, spare: int = 4 << 30) -> bool:
    free = cp.cuda.runtime.memGetInfo()[0] + cp.get_default_memory_pool().free_bytes()
    return nbytes + spare <= free


def context_row(cp, gm, label: str, ctx: int, bsz: int, kv8: bool, steps: int, bw: float | None,
                rng, breakdown: bool = True) -> dict:
    """Graphed decode (A8W4, or the FP16 path) of bsz sequences from ctx cached positions (one
    prefill of ctx random tokens, its K/V copied to every sequence), timed over `steps` replays;
    the row's bytes are step_bytes, and with `breakdown` the attention launch alone
    (attention_time) against the K/V it reads."""
    from ..gpu import attention  # noqa: PLC0415
    from ..gpu.cache import GpuKVCache  # noqa: PLC0415
    c = gm.config
    cap = ctx + steps + 3
    attn = attention.decode_kernel(attention.decode_splits(cap), c.head_dim, bsz)
    attn = f"auto: {attn}" if attention.DECODE_KERNEL == "auto" else attn
    row = dict(model=label, phase="context", attn=attn, context=ctx, batch=bsz,
               kv="int8" if kv8 else "fp16")
    need = GpuKVCache.bytes_needed(c, cap, bsz, kv8)
    if not _fits(cp, need):
        row["skipped"] = f"the cache needs {need / 2**30:.1f} GiB"
        return row
    cp.get_default_memory_pool().free_all_blocks()    # the last row's cache, unfragmented
    try:
        cache = gm.new_cache(cap, batch=bsz, kv8=kv8)
    except ModelError:                                # the free count was optimistic
        row["skipped"] = f"the cache needs {need / 2**30:.1f} GiB (allocation failed)"
        return row
    first = int(gm.prefill(rng.integers(0, c.vocab_size, ctx), cache, seq=0)[0].astype(cp.float32).argmax())
    arrays = (cache.k, cache.v) + ((cache.ks, cache.vs) if kv8 else ())
    for i in range(1, bsz):                           # the same context in every sequence
        for a in arrays:
            a[:, i, :ctx] = a[:, 0, :ctx]
    firsts = [first] * bsz
    cache.lens_host[:] = ctx
    gm.decode_greedy(cache, firsts, 2)                # warm-up: compiles, captures the step graph
    cache.lens_host[:] = ctx
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    gm.decode_greedy(cache, firsts, steps)            # graph replays only
    s = (time.perf_counter() - t0) / steps
    wbytes, kv = step_bytes(gm, bsz, ctx, steps, kv8)
    row.update(tok_s=bsz / s, step_ms=1e3 * s, weight_mb=wbytes / 1e6, kv_mb=kv / 1e6,
               bytes_per_step=wbytes + kv)
    if bw:
        row.update(roof_tok_s=bsz * bw / (wbytes + kv), pct_copy_bw=100 * (wbytes + kv) / s / bw)
    if breakdown and gm.graphable(bsz)[0]:
        name, us = attention_time(gm, cache)
        # the positions of the step attention_time replays: the lengths the timed steps left
        abytes = bsz * kv_bytes_per_position(c, kv8) * (ctx + steps + 1)
        row.update(attn_kernel=name, attn_us=us, attn_gbs=abytes / us / 1e3)
        if bw:
            row["attn_pct_copy_bw"] = 100 * abytes / (us * 1e-6) / bw
    del cache
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()    # the next row's cache may be larger
    return row


def attention_time(gm, cache, reps: int = 20) -> tuple[str, float]:
    """(kernel expression, µs a launch) of the decode attention as a graph replays it: the
    attention launches of one eager step (one a layer, each its own cache) captured into a graph
    of their own (graph_breakdown's method, for this one kind). The step's device state is put
    back afterwards, so the launches see the lengths the cache holds."""
    from ..gpu import decode, kargs  # noqa: PLC0415
    cp, st = gm.cp, cache.step
    saved = {k: getattr(st, k).copy() for k in ("tok", "pos", "lens")}

    def restore():
        for k, v in saved.items():
            getattr(st, k)[...] = v
    calls = []

    def record(expr, run):
        if expr.startswith("attn_decode"):
            calls.append((expr, run))
        return run()
    with kargs.intercepted(record):
        decode.step(gm, cache, st, with_tail=False)      # no sampling: the lengths stay
    cp.cuda.Device().synchronize()
    restore()
    us = graph_time(cp, [fn for _, fn in calls] * -(-reps // len(calls)))
    restore()
    return calls[0][0], us


def run_context(contexts, models=("smollm2", "llama7b"), batches=(1, 8, 32), steps: int = 32,
                attn_kernels=(), json_out: bool = False, qfile=None, ab=(), patches=(),
                fp16: bool = False):
    """The context table (module docstring): every model × decode attention kernel × context ×
    KV type × batch, and again under each --ab setting of tuning.GEMM (ab: parse_ab dicts) and
    each --patch (patches: read_patches; the attention column names the setting), all in one
    process; with fp16, each model's FP16 path too (dequantized_copy, the same graphed step; the
    engine's attention kernel only); rows whose cache does not fit the free memory say so."""
    from ..gpu import attention  # noqa: PLC0415
    from ..gpu.model import CudaModel  # noqa: PLC0415
    cp, bw, rows = _device()
    if json_out:
        print(json.dumps(rows[0]), flush=True)
    kernels = tuple(attn_kernels) or (attention.DECODE_KERNEL,)
    for key in ("qfile",) if qfile else models:      # a given q.safetensors alone, as run_e2e
        if key == "qfile":
            from ..io.qfile import load_qfile  # noqa: PLC0415
            mw, label = load_qfile(qfile).weights, Path(qfile).name
        else:
            mw, label = random_model(MODELS[key][0], True), MODELS[key][1]
        longest = max(contexts) + steps + 3
        if mw.config.max_position_embeddings < longest:   # the shapes, with room for the longest context
            mw = dataclasses.replace(mw, config=dataclasses.replace(mw.config, max_position_embeddings=longest))
        gm = CudaModel(mw)
        rng = np.random.default_rng(0)
        saved = attention.DECODE_KERNEL

        def table(gm, name, suffix=""):
            for ctx in contexts:
                for kv8 in (False, True):
                    for bsz in batches:
                        row = context_row(cp, gm, name, ctx, bsz, kv8, steps, bw, rng)
                        if suffix:
                            row["attn"] += f" {suffix}"
                        rows.append(row)
                        if json_out:
                            print(json.dumps(row), flush=True)
        try:
            settings = [("", contextlib.nullcontext)] + decode_variants(ab=ab, patches=patches)
            for (suffix, setting), kernel in itertools.product(settings, kernels):
                attention.DECODE_KERNEL = kernel
                with setting():
                    table(gm, label + " A8W4", suffix)
        finally:
            attention.DECODE_KERNEL = saved
        del gm
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
        if fp16:                                      # after the A8W4 model is freed: both never share the GPU
            try:
                gm = CudaModel(dequantized_copy(mw))
            except (ModelError, MemoryError) as e:      # CuPy's OutOfMemoryError is a MemoryError
                rows.append(dict(model=label + " FP16", phase="context", attn="", context=max(contexts), batch="",
                                 kv="", skipped=f"the FP16 model does not fit ({str(e)[:120]})"))
            else:
                table(gm, label + " FP16")
                del gm
        del mw
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
    print(format_context_table(rows))
    return rows


def format_context_table(rows) -> str:
    out = ["| model | attention | context | batch | KV | tok/s | step ms | weights MB | K/V MB | roofline tok/s "
           "| % copy BW | attention µs/layer | attention % copy BW |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["phase"] == "device":
            out.insert(0, f"device: {r['name']}, copy bandwidth {r['copy_bw_gbs']:.0f} GB/s (read + write)\n")
            continue
        if r["phase"] != "context":
            continue
        f = lambda k, fmt: (fmt % r[k]) if k in r else ""  # noqa: E731
        head = f"| {r['model']} | {r['attn']} | {r['context']} | {r['batch']} | {r['kv']} |"
        if "skipped" in r:
            out.append(f"{head} skipped: {r['skipped']} | | | | | | | |")
            continue
        out.append(f"{head} {f('tok_s', '%.0f')} | {f('step_ms', '%.3f')} | {f('weight_mb', '%.0f')} | "
                   f"{f('kv_mb', '%.0f')} | {f('roof_tok_s', '%.0f')} | {f('pct_copy_bw', '%.0f')} | "
                   f"{f('attn_us', '%.1f')} | {f('attn_pct_copy_bw', '%.0f')} |")
    return "\n".join(out)


def format_table(rows) -> str:
    out = ["| model | phase | tokens | batch | tok/s | step ms | host ms | % copy BW | bits/param | GPU MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["phase"] == "profile":
            continue
        if r["phase"] == "device":
            out.insert(0, f"device: {r['name']}, copy bandwidth {r['copy_bw_gbs']:.0f} GB/s\n")
            continue
        f = lambda k, fmt: (fmt % r[k]) if k in r else ""  # noqa: E731
        out.append(f"| {r['model']} | {r['phase']} | {f('tokens', '%d')} | {f('batch', '%d')} | "
                   f"{f('tok_s', '%.0f')} | {f('step_ms', '%.2f')} | {f('host_ms', '%.2f')} | {f('pct_copy_bw', '%.0f')} | "
                   f"{f('bits_per_param', '%.2f')} | {('%.0f' % (r['gpu_bytes'] / 2**20)) if 'gpu_bytes' in r else ''} |")
    return "\n".join(out)


# the kernels the model launches itself (gpu/fused.py, gpu/attention.py): a breakdown row each
# by kernel expression; the linears, the lm_head and sampling are rows of their own
MODEL_KERNELS = ("add_rmsnorm_quant", "silu_mul_quant", "quant_rows", "quant_amax", "rope_qkv_cache",
                 "attn_decode", "attn_decode_gqa", "attn_prefill")


def model_kernel(expr: str) -> bool:
    return expr.split("<")[0] in MODEL_KERNELS


def graph_breakdown(gm, cache, reps: int = 20) -> dict:
    """Microseconds per launch of one decode step as a CUDA graph replays it, by kernel.

    Every launch of one eager step is recorded; then the launches of each kind (one per
    layer, each with its own weights, so no false L2 hits) are captured into a graph of
    their own and replayed. A row's time is what that launch costs inside a graph: the
    kernel and the gap to the next node. Returns {name: (count, us per launch)}.
    """
    from ..gpu import decode, fused, kargs, linear  # noqa: PLC0415
    from ..gpu import ops as ops_cuda  # noqa: PLC0415
    cp = gm.cp
    body, tail = gm.graphable(cache.batch)
    if not body:
        raise ValueError(f"a decode step of batch {cache.batch} is not captured as a graph: no breakdown")
    if cache.step is None:
        cache.step = decode.new_state(gm, cache)
    st = cache.step
    # the eager step and the replays of sample_rows advance the step's state, and replayed
    # rope/attention launches must see the same in-bounds positions: restore it around both
    saved = {k: getattr(st, k).copy() for k in ("tok", "pos", "lens")}

    def restore():
        for k, v in saved.items():
            getattr(st, k)[...] = v
    calls = []
    G = linear.GpuLinear
    orig_call, orig_mm, orig_s, orig_w8 = G.__call__, fused.matmul_f16, G.silu_gemv, fused.matmul_w8

    def record(expr, run):
        if model_kernel(expr):
            calls.append((expr, run))
        return run()

    def call(self, *args):
        kind = 'linear_f16' if self.w16 is not None else 'gemv_pot3_a8' if getattr(self, 'pa8', None) is not None else \
            'gemv_wb' if getattr(self, 'wb', None) is not None else 'gemm_a8w4'
        name = f"{kind}{'+resid' if len(args) > 4 and args[4] is not None else ''} N={self.n}"
        calls.append((name, lambda: orig_call(self, *args)))
        return orig_call(self, *args)

    def mm(*args):                       # (cp, x, w, out): only the lm_head's is a row of its own
        if args[2] is gm.lm_head and tail:  # a row where the graph captures it (else it runs after each replay)
            calls.append(("lm_head", lambda: orig_mm(*args)))
        return orig_mm(*args)

    def mm8(*args):                      # the INT8 lm_head (ModelWeights.with_int8_lm_head)
        if tail:
            calls.append(("lm_head int8", lambda: orig_w8(*args)))
        return orig_w8(*args)

    def scall(self, *args):                  # gate|up with SiLU in its epilogue (fold_quant)
        kind = 'gemv_pot3_a8' if getattr(self, 'pa8', None) is not None else 'gemm_a8w4'
        calls.append((f"{kind}+silu N={self.n}", lambda: orig_s(self, *args)))
        return orig_s(self, *args)

    orig_sample = ops_cuda.sample_rows

    def sample(*args, **kw):
        calls.append(("sample_rows", lambda: orig_sample(*args, **kw)))
        return orig_sample(*args, **kw)

    G.__call__, fused.matmul_f16, G.silu_gemv, fused.matmul_w8 = call, mm, scall, mm8
    ops_cuda.sample_rows = sample
    try:
        with kargs.intercepted(record):
            decode.step(gm, cache, st)
    finally:
        G.__call__, fused.matmul_f16, G.silu_gemv, fused.matmul_w8 = orig_call, orig_mm, orig_s, orig_w8
        ops_cuda.sample_rows = orig_sample
    cp.cuda.Device().synchronize()
    restore()
    groups: dict = {}
    for name, fn in calls:
        groups.setdefault(name, []).append(fn)
    out = {}
    for name, fns in groups.items():
        rounds = -(-reps // len(fns))
        out[name] = (len(fns), graph_time(cp, fns * rounds))
    restore()
    return out


def graph_time(cp, fns, reps: int = 5) -> float:
    """Microseconds per call of fns (run in order), captured once as a graph and replayed."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        with launch.capturing():
            stream.begin_capture()
            for fn in fns:
                fn()
            g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            g.launch(stream)
        stream.synchronize()
    return (time.perf_counter() - t0) / (reps * len(fns)) * 1e6


def format_breakdown(prof: dict) -> str:
    total = sum(n * us for n, us in prof.values())
    lines = [f"sum of per-launch graph times: {total / 1e3:.3f} ms over {sum(n for n, _ in prof.values())} launches"]
    for k, (n, us) in sorted(prof.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        lines.append(f"  {k:32s} {n:4d} x {us:8.2f} us = {n * us / 1e3:7.3f} ms")
    return "\n".join(lines)
