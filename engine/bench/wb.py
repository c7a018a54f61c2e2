"""`python -m engine.bench gemv-wb`: the weight-only b-bit GEMVs (pot2..4, int2..4) against our
A8W4 GEMV and cuBLAS FP16, same process, at small M on LLM shapes. Kind "pot3a8" (not in the
default set): the W3-PoT × INT8 dp4a GEMV (cuda/gemv_pot_a8.cu), M = 1 only, one row
a variant (RB, NW) of engine/gpu/pot_a8.py ("pot3a8" itself is the default variant):
    python -m engine.bench gemv-wb --kinds pot3,pot3a8 --ms 1

Weights are random valid codes (made on the GPU) with scales of realistic size; enough copies rotate that a
call never finds the previous call's weights in L2. Bytes counted: codes plus scales (plus
zero points for int), the weights' share of the traffic at small M.
"""
from __future__ import annotations

import json

import numpy as np

from .. import formats
from ..formats import tiles
from ..formats import pot_a8 as pa8_fmt
from ..gpu import ops as ops_cuda
from ..gpu import pot_a8, wb
from .common import VERDICT, BenchError, copy_bandwidth, cp_or_fail, geomean, n_buffers, time_calls
from .gemm import GROUP, Peers

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]     # (K, N)
KINDS = tuple(f"{kind}{b}" for kind in ("pot", "int") for b in (2, 3, 4))
EXTRA_KINDS = ("pot3a8",)        # only when named in --kinds
MS = [1, 4, 16, 64, 256, 1024]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"8192x8192,4096x11008" (K×N; x or ×) -> [(8192, 8192), (4096, 11008)]; one clear error otherwise."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.replace("×", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise BenchError(f"gemv-wb --shapes: {item!r} is not KxN with positive integers (e.g. 8192x8192)")
        out.append((int(parts[0]), int(parts[1])))
    return out


def random_wb_layer(cp, rng, kind: str, bits: int, n: int, k: int, group: int = 128) -> wb.PackedWB:
    """A random valid layer made on the GPU: any tile words are valid codes (K and N are
    multiples of the tile here, so there is no padding to keep zero); scales around 0.02."""
    g = formats.n_groups(k, group)
    nt, kt = tiles.tile_dims(n, k)
    words = (cp.random.random(nt * kt * tiles.tile_words(bits)) * 2.0**32).astype(cp.uint32)
    s = rng.uniform(0.01, 0.03, (n, g)).astype(np.float16)
    z = rng.integers(0, 1 << bits, (n, g)).astype(np.uint8) if kind == "int" else None
    return wb.pack_tiles(kind, bits, n, k, group, None, s, z, words=words)


def random_pot_a8_layer(cp, n: int, k: int) -> pot_a8.PackedPotA8:
    """A random pot3-a8 layer made on the GPU: any words are valid codes (the padding is not zero
    here, which only matters for exactness, not for time); scales around 0.02."""
    (ws, ts), (ss, sts) = pa8_fmt.shapes(n, k)

    def words(shape):
        return (cp.random.random(shape) * 2.0**32).astype(cp.uint32)

    def scales(shape):
        return cp.random.uniform(0.01, 0.03, shape).astype(cp.float16)
    return pot_a8.PackedPotA8(n, k, words(ws), scales(ss), words(ts), scales(sts))


def cmd_gemv_wb(args) -> int:
    shapes = parse_shapes(getattr(args, "shapes", "") or "") or SHAPES
    kinds = [k.strip() for k in (getattr(args, "kinds", "") or "").split(",") if k.strip()] or KINDS
    bad = [k for k in kinds if k not in KINDS + EXTRA_KINDS]
    if bad:
        raise BenchError(f"gemv-wb --kinds: {', '.join(bad)} not among {', '.join(KINDS + EXTRA_KINDS)}")
    ms_list = [int(v) for v in args.ms.split(",")] if getattr(args, "ms", None) else MS
    from .e2e import args_variants  # noqa: PLC0415
    variants = args_variants(args)
    cp = cp_or_fail()
    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)")
    rows = []
    peers = Peers()
    for k, n in shapes:
        cases = {}
        for kind in ("pot", "int"):
            for bits in (2, 3, 4):
                if f"{kind}{bits}" not in kinds:
                    continue
                layer = random_wb_layer(cp, rng, kind, bits, n, k)
                cases[f"{kind}{bits}"] = [layer] + [random_wb_layer(cp, rng, kind, bits, n, k)
                                                     for _ in range(n_buffers(layer.nbytes()) - 1)]
        pa8 = []
        if "pot3a8" in kinds:
            pa8 = [random_pot_a8_layer(cp, n, k)]
            pa8 += [random_pot_a8_layer(cp, n, k) for _ in range(n_buffers(pa8[0].nbytes()) - 1)]
        dg = ops_cuda.random_packed(n, k, 128, seed=1)
        cases["a8w4"] = [dg] + [ops_cuda.random_packed(n, k, 128, seed=i) for i in range(2, n_buffers(dg.nbytes()) + 1)]
        w16 = [cp.asarray(rng.standard_normal((n, k)) * 0.02, dtype=cp.float16)
               for _ in range(n_buffers(2 * n * k))]
        tiny = peers.tiny_setup(n, k, n_buffers(n * k // 2))
        for m in ms_list:
            x = cp.asarray(rng.standard_normal((m, k)), dtype=cp.float16)
            x8 = cp.random.randint(-127, 128, (m, k), dtype=cp.int32).astype(cp.int8)
            sx = cp.full((m,), 0.01, dtype=cp.float32)
            out = cp.empty((m, n), dtype=cp.float16)
            res = {}
            for name, layers in cases.items():
                if name == "a8w4":
                    fn = lambda i, L=layers: ops_cuda.gemm_a8w4(x8, sx, L[i % len(L)], out=out)   # noqa: E731
                else:
                    fn = lambda i, L=layers: wb.gemv_wb(x, L[i % len(L)], out)                    # noqa: E731
                res[name] = (time_calls(fn, reps=args.reps), layers[0].nbytes())
                for vname, setting in variants if name != "a8w4" else ():     # same process, same buffers
                    with setting():
                        res[f"{name} [{vname}]"] = (time_calls(fn, reps=args.reps), layers[0].nbytes())
                if name in ("pot3", "int3") and m > wb.WB.gemv_max_m:   # the in-register GEMM, for comparison
                    res[name + "-mma"] = (time_calls(lambda i, L=layers: wb.gemv_wb(x, L[i % len(L)], out, large_m="mma"),
                                                     reps=args.reps), layers[0].nbytes())
            if pa8 and m == 1:            # the W3-PoT × INT8 dp4a GEMV: every variant, the default as "pot3a8"
                out1 = out.reshape(-1)
                for rb, nw in pot_a8.VARIANTS:
                    name = "pot3a8" if (rb, nw) == pot_a8.DEFAULT else f"pot3a8 rb{rb} nw{nw}"
                    fn = lambda i, v=(rb, nw): pot_a8.gemv_pot_a8(x8.reshape(-1), sx, pa8[i % len(pa8)], out1,  # noqa: E731
                                                                  variant=v)
                    res[name] = (time_calls(fn, reps=args.reps), pa8[0].nbytes())
                    for vname, setting in variants if name == "pot3a8" else ():   # --ab wb.pa8_*: the default
                        with setting():
                            res[f"{name} [{vname}]"] = (time_calls(fn, reps=args.reps), pa8[0].nbytes())
            res["fp16"] = (time_calls(lambda i: cp.matmul(x, w16[i % len(w16)].T, out=out), reps=args.reps),
                           2 * n * k)
            if tiny is not None:                  # tinygemm W4A16 (g128, bf16) through torch: a peer
                t = peers.torch
                xb = t.randn((m, k), device="cuda", dtype=t.bfloat16)
                res["tinygemm-w4"] = (time_calls(lambda i: t._weight_int4pack_mm(
                    xb, tiny[i % len(tiny)][0], GROUP, tiny[i % len(tiny)][1]), reps=args.reps),
                    n * k // 2 + n * (k // GROUP) * 4)
            for name, (ms, nbytes) in res.items():
                row = {"k": k, "n": n, "m": m, "kernel": name, "ms": ms, "weight_gbs": nbytes / ms / 1e6,
                       "pct_copy_bw": 100 * nbytes / ms / 1e6 / bw, "bits_per_weight": 8 * nbytes / (n * k),
                       "vs_int_same_bits": (res["int" + name[3:]][0] / ms)
                       if name.startswith("pot") and "int" + name[3:] in res else None,
                       "vs_a8w4": res["a8w4"][0] / ms, "vs_fp16": res["fp16"][0] / ms,
                       "vs_tinygemm": (res["tinygemm-w4"][0] / ms) if "tinygemm-w4" in res else None}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    lines = ["| K×N | M | kernel | ms | bits/w | weight GB/s | % copy BW | int-b / this | A8W4 / this | FP16 / this "
             "| tinygemm / this |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vi = f"{r['vs_int_same_bits']:.2f}×" if r["vs_int_same_bits"] else ""
        lines.append(f"| {r['k']}×{r['n']} | {r['m']} | {r['kernel']} | {r['ms']:.4f} | {r['bits_per_weight']:.2f} | "
                     f"{r['weight_gbs']:.0f} | {r['pct_copy_bw']:.0f} | {vi} | {r['vs_a8w4']:.2f}× | {r['vs_fp16']:.2f}× | "
                     + (f"{r['vs_tinygemm']:.2f}× |" if r["vs_tinygemm"] else " |"))
    table = "\n".join(lines) + "\n\n" + summary_table(rows)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"copy bandwidth {bw:.0f} GB/s\n\n{table}\n")
    return 0


# Issue 15's speed targets at M = 1: PoT against our uniform INT GEMV of the same bits (every
# shape), and W3-PoT against our A8W4 GEMV on these shapes
POT_OVER_INT = 1.5
POT3_OVER_A8W4, POT3_A8W4_SHAPES = 1.25, ((4096, 11008), (8192, 8192))


def summary(rows) -> list[dict]:
    """At M = 1, per PoT width: the geometric mean over the shapes of INT-b time / PoT-b time
    and of A8W4 time / PoT-b time, and issue 15's targets (pot3 vs A8W4 on its two shapes)."""
    out = []
    for b in (2, 3, 4):
        sel = [r for r in rows if r["m"] == 1 and r["kernel"] == f"pot{b}"]
        if not sel:
            continue
        rec = {"kernel": f"pot{b}", "rows": len(sel),
               "vs_int": geomean(r["vs_int_same_bits"] for r in sel if r.get("vs_int_same_bits")),
               "vs_a8w4": geomean(r["vs_a8w4"] for r in sel)}
        rec["vs_int_ok"] = None if rec["vs_int"] is None else rec["vs_int"] >= POT_OVER_INT
        if b == 3:
            on = [r["vs_a8w4"] for r in sel if (r["k"], r["n"]) in POT3_A8W4_SHAPES]
            rec["vs_a8w4_target_shapes"] = geomean(on)
            rec["vs_a8w4_ok"] = None if not on else min(on) >= POT3_OVER_A8W4
        out.append(rec)
    sel = [r for r in rows if r["m"] == 1 and r["kernel"] == "pot3a8"]
    if sel:                          # the W3-PoT × INT8 dp4a GEMV against the same bar
        on = [r["vs_a8w4"] for r in sel if (r["k"], r["n"]) in POT3_A8W4_SHAPES]
        out.append({"kernel": "pot3a8", "rows": len(sel), "vs_int": None, "vs_int_ok": None,
                    "vs_a8w4": geomean(r["vs_a8w4"] for r in sel), "vs_a8w4_target_shapes": geomean(on),
                    "vs_a8w4_ok": None if not on else min(on) >= POT3_OVER_A8W4})
    return out


def summary_table(rows) -> str:
    """summary() as markdown (empty when the rows have no M = 1 PoT row)."""
    recs = summary(rows)
    if not recs:
        return ""
    lines = ["| M = 1 | rows | geomean INT-b / PoT-b | geomean A8W4 / PoT-b | issue 15 asks |", "|---|---:|---:|---:|---|"]
    for r in recs:
        ask = f"INT-b / PoT-b ≥ {POT_OVER_INT}: {VERDICT[r['vs_int_ok']]}" if r["kernel"] != "pot3a8" else ""
        if "vs_a8w4_ok" in r:
            ask += (f"{'; ' if ask else ''}A8W4 / PoT3 ≥ {POT3_OVER_A8W4} on 4096×11008 and 8192×8192: {VERDICT[r['vs_a8w4_ok']]}")
        vi = "—" if r["vs_int"] is None else f"{r['vs_int']:.2f}×"
        lines.append(f"| {r['kernel']} | {r['rows']} | {vi} | {r['vs_a8w4']:.2f}× | {ask} |")
    return "\n".join(lines)
