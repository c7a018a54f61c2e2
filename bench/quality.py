"""Quality table: SmolLM2-135M perplexity on the wiki evaluation split, one row per method.

    python bench/quality.py [--windows 40] [--out docs/QUALITY.md]
    python bench/quality.py --set weight-only [--groups 128,64] [--bits 4,3,2]   # pot / int-* rows
    python bench/quality.py --set weight-only --gptq-pairs --only pot,int-search # each also with --gptq
    python bench/quality.py --set pot-a8 --windows 20     # W3 codes on the INT8 kernels (issue 15 stretch)
    python bench/quality.py --calibration sequential      # each layer on the quantized layers' outputs

Every row is scored on the same windows (the first N of 512 tokens of the wiki
evaluation split) with the NumPy reference path, so the integer A8W4 rows are
exactly what the GPU kernels compute. Calibration uses the wiki calibration split
(converters/calibrate.py defaults), never the evaluation split.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import numpy as np

ROWS = [  # (label, method, act, wbits, group)
    ("FP32 (dequantized Q4_1 GGUF)", None, None, None, None),
    ("A16W4 RTN g128", "w4a16", "none", 4, 128),
    ("A8W8 (per-channel W8, static A8)", "w8a8", "static", 8, 128),
    ("RTN A8W4 g128", "rtn", "static", 4, 128),
    ("SmoothQuant A8W4 g128", "smoothquant", "static", 4, 128),
    ("FPTQ W4A8 g128", "fptq", "static", 4, 128),
    ("DGQ A8W4 g128 static (down_proj per token)", "dgq", "static", 4, 128),
    ("DGQ A8W4 g128 dynamic", "dgq", "dynamic", 4, 128),
]
WEIGHT_ONLY = ("pot", "int-search", "int-rtn")     # b-bit weights, float activations
GPTQ_METHODS = ("dgq", "fptq-dg", "pot", "int-search")   # the methods that take --gptq


def weight_only_rows(bits, groups, gptq_pairs=False):
    """(label, method, act, wbits, group, as dg, gptq) rows; gptq_pairs: pot / int-search twice,
    without and with --gptq (None: the --gptq flag decides)."""
    rows = [ROWS[0]]
    for g in groups:
        for b in bits:
            for m in WEIGHT_ONLY:
                pair = gptq_pairs and m in GPTQ_METHODS
                rows += [(f"{m} W{b} g{g}", m, "none", b, g, False, False if pair else None)]
                if pair:
                    rows += [(f"{m} W{b} g{g}", m, "none", b, g, False, True)]
    return rows


POT_A8_ROWS = [  # (label, method, act, wbits, group, INT8 activations: False, "dg" (as a dual-grained
    #              layer, converters.pot.as_dual_grained) or "act" (the same layers with act "dynamic"))
    ("pot W3 g128 (A16)", "pot", "none", 3, 128, False),
    ("pot W3 g128, INT8 per-token activations (--act dynamic)", "pot", "none", 3, 128, "act"),
    ("pot W3 g128 as dg, INT8 per-token activations", "pot", "none", 3, 128, "dg"),
    ("int-search W3 g128 (A16)", "int-search", "none", 3, 128, False),
    ("int-search W3 g128 as dg, INT8 per-token activations", "int-search", "none", 3, 128, "dg"),
    ("DGQ A8W4 g128 dynamic", "dgq", "dynamic", 4, 128, False),
]


def as_int8_activations(mw, how: str):
    """Every pot/int linear with per-token INT8 inputs: how "dg", the dual-grained layer of the same
    codes (converters.pot.as_dual_grained); "act", the same layer with act "dynamic" (what
    `dgq-quantize --method pot --act dynamic` writes)."""
    import copy
    import dataclasses

    from converters.pot import as_dual_grained
    from engine.model import LINEAR_NAMES
    mw = copy.copy(mw)
    mw.layers = [copy.copy(L) for L in mw.layers]
    for L in mw.layers:
        for n in LINEAR_NAMES:
            ql = getattr(L, n)
            setattr(L, n, as_dual_grained(ql, "dynamic") if how == "dg" else dataclasses.replace(ql, act="dynamic"))
    return mw


def reuse_calibration():
    """The weight-only rows smooth nothing, so every row's calibration of a layer (on the float
    model's activations) gives the same statistics and outputs: compute each layer's once and
    hand each row a copy (quantize_checkpoint frees each layer's Gram matrices as it goes)."""
    import copy
    import hashlib

    from converters import calibrate as cal
    run, memo = cal.calibrate_layer, {}

    def cached(config, li, layer, X, **kw):
        key = (li, hashlib.blake2b(X.tobytes(), digest_size=16).digest(),
               hashlib.blake2b(b"".join(np.asarray(getattr(layer, n)).tobytes() for n in ("q", "down")),
                               digest_size=16).digest(),
               kw.get("gram"), kw.get("kv"), kw.get("sites"), kw.get("advance"))
        if key not in memo:
            stats, kv = run(config, li, layer, X, **kw)
            memo[key] = (stats, kv, X.copy() if kw.get("advance") else None)
        stats, kv, out = memo[key]
        if out is not None:
            X[...] = out
        return copy.deepcopy(stats), None if kv is None else kv.copy()
    cal.calibrate_layer = cached


def bits_per_weight(mw) -> float:
    """Stored bits of the linears (codes and scales) per weight."""
    from engine import formats
    from engine.model import LINEAR_NAMES
    lin = [getattr(L, n) for L in mw.layers for n in LINEAR_NAMES]
    n = sum(int(np.prod(q.shape)) for q in lin)
    return 8 * sum(q.nbytes() if isinstance(q, formats.QuantLinear) else q.nbytes for q in lin) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma-separated methods to run (labels' method names, or method:act)")
    ap.add_argument("--n-seq", type=int, default=None, help="calibration sequences (default: the converter's)")
    ap.add_argument("--seq-len", type=int, default=None, help="calibration sequence length")
    ap.add_argument("--out", default=None, help="also append the markdown table to this file")
    ap.add_argument("--jsonl", default=None, help="append one JSON object per row to this file")
    ap.add_argument("--set", choices=("a8", "weight-only", "pot-a8"), default="a8",
                    help="a8: the A8W4/A16W4 table; weight-only: pot / int-search / int-rtn rows; pot-a8: "
                         "W3 codes with INT8 activations on the dual-grained kernels")
    ap.add_argument("--calibration", choices=("float", "sequential"), default="float",
                    help="calibrate each layer on the float model's activations or the quantized layers' outputs")
    ap.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                    help="dgq / pot / int-search rows: with (--gptq) or without (--no-gptq) GPTQ-compensated "
                         "rounding; default: each method's own (converters/quantize.py METHODS)")
    ap.add_argument("--gptq-pairs", action="store_true",
                    help="weight-only: each pot / int-search row twice, without and with --gptq")
    ap.add_argument("--sink-weight", type=float, default=None,
                    help="first-token weight in the q/k/v Gram matrix (default: each method's own)")
    ap.add_argument("--bits", default="4,3,2", help="weight-only: code widths")
    ap.add_argument("--groups", default="128,64", help="weight-only: group sizes")
    a = ap.parse_args(argv)

    from converters.quantize import quantize_checkpoint
    from engine.io import corpus as data
    from engine.model.perplexity import perplexity
    from engine.model import Model, ModelWeights
    from engine.io.checkpoint import default_model_path, load_checkpoint
    from engine.util.sysinfo import peak_rss_mb

    ck = load_checkpoint(default_model_path())
    tokens = np.asarray(data.encode_text(ck.tokenizer, data.wiki_text("eval")), dtype=np.int32)
    only = set(a.only.split(",")) if a.only else None
    results = []
    if a.set != "a8":
        reuse_calibration()
    if a.set == "a8":
        rows = ROWS
    elif a.set == "weight-only":
        rows = weight_only_rows([int(b) for b in a.bits.split(",")], [int(g) for g in a.groups.split(",")],
                                a.gptq_pairs)
    else:
        rows = [ROWS[0]] + POT_A8_ROWS
    made = {}                                   # (method, wbits, group) -> (mw, recipe, seconds)
    for label, method, act, wbits, group, *extra in rows:
        if only and (method or "fp32") not in only and f"{method}:{act}" not in only:
            continue
        convert = extra[0] if extra else False        # pot-a8 rows: False, "dg" or "act"
        row_gptq = a.gptq if len(extra) < 2 or extra[1] is None else extra[1]
        t0 = time.perf_counter()
        kw = {}
        key = (method, act, wbits, group, row_gptq)
        if method is None:
            mw, recipe = ModelWeights.from_hf(ck.config, ck.tensors), {}
        elif key in made:
            mw, recipe, _ = made[key]
        else:
            kw = {k: v for k, v in (("n_seq", a.n_seq), ("seq_len", a.seq_len)) if v}
            if row_gptq is not None and method in GPTQ_METHODS:
                kw["gptq"] = row_gptq
            if a.sink_weight is not None:
                kw["sink_weight"] = a.sink_weight
            mw, recipe = quantize_checkpoint(ck, method, wbits=wbits, group=group, act=act, progress=False,
                                             calibration=a.calibration, **kw)
            if a.set == "pot-a8":
                made[key] = (mw, recipe, time.perf_counter() - t0)
        if convert:
            mw = as_int8_activations(mw, convert)
        own = time.perf_counter() - t0                              # this row's quantizing (or reuse)
        tq = own + (made[key][2] if key in made and convert else 0.0)   # + the codes' making
        m = Model(mw)
        r = perplexity(lambda t: m.forward(t), tokens, window=a.window, max_windows=a.windows, progress=False)
        gptq_on = bool(recipe.get("gptq"))                         # what the converter did, defaults included
        sink = (recipe.get("calibration") or {}).get("sink_weight")
        row = dict(label=label + (" +gptq" if gptq_on else "") + (f" sink x{sink:g}" if sink and sink != 1.0 else ""),
                   calibration=a.calibration if method else None, method=method,
                   act="dynamic" if convert else act, wbits=wbits, group=group,
                   gptq=gptq_on, sink_weight=sink, bits_per_weight=bits_per_weight(mw),
                   perplexity=r["perplexity"], n_tokens=r["n_tokens"],
                   quantize_s=tq, eval_s=time.perf_counter() - t0 - own,
                   peak_rss_mb=peak_rss_mb())
        results.append(row)
        print(json.dumps(row), flush=True)
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        del m, mw
    fp = next((r["perplexity"] for r in results if r["method"] is None), None)
    lines = [f"SmolLM2-135M-Instruct, wiki evaluation split, first {a.windows} windows of {a.window} tokens "
             f"({results[0]['n_tokens'] if results else 0} scored tokens), NumPy reference path, "
             f"{datetime.date.today()}.", "",
             "| model | perplexity | vs FP32 | bits/weight | quantize time (2 cores) |", "|---|---|---|---|---|"]
    for r in results:
        rel = f"{100 * (r['perplexity'] / fp - 1):+.1f}%" if fp else ""
        lines.append(f"| {r['label']} | {r['perplexity']:.3f} | {rel} | {r['bits_per_weight']:.3f} | "
                     f"{r['quantize_s']:.0f} s |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
