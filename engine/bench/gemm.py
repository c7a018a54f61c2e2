"""`python -m engine.bench gemm | gemm-tune | gemm-pick | gemm-one`: the A8W4 GEMM family.

  gemm       the A8W4 GEMM family against cuBLAS FP16 (cupy.matmul), cuBLAS INT8
             W8A8 (torch._int_mm, B column-major) and tinygemm W4A16
             (torch._weight_int4pack_mm, g128) over M x (K x N); ms, TOP/s, weight
             GB/s and % of the device-to-device copy bandwidth measured in the
             same run. torch is used only here, only for the peers, and only
             when it imports.
             Ends with a summary per M range: the geometric mean over the shapes of
             ×fp16, ×int8 and ×tinygemm, against issue 20's targets (SUMMARY_RANGES).
  gemm-summary  that summary of a `gemm --json` log (any run, any device; engine/bench/__main__.py).
  gemm-tune  the same timing over kernel variants (tile sizes, stages, split-K),
             to choose engine.gpu.tuning.GEMM.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys


from ..gpu import choice, kernels, tuning
from ..gpu import ops as ops_cuda
from ..gpu.perfmodel import config_key
from .common import (VERDICT, BenchError, copy_bandwidth, cp_or_fail, geomean, ints, launch_overhead_ms, n_buffers,
                     time_calls)

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824), (8192, 8192), (8192, 28672), (28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK_SHAPES = [(4096, 4096), (8192, 8192)]
QUICK_MS = [1, 16, 64, 256, 4096]
GROUP = 128


# ----------------------------------------------------------------------------- peers

def _torch():
    try:
        import torch  # noqa: PLC0415  (peers only; never imported by engine code paths)
        if torch.cuda.is_available():
            return torch
    except Exception:
        pass
    return None


class Peers:
    """cuBLAS INT8 and tinygemm W4A16 through torch, when it imports."""

    def __init__(self):
        self.torch = _torch()
        self.tiny_error = None

    def int8_setup(self, n, k, nb):
        t = self.torch
        if t is None:
            return None
        w = t.randint(-127, 128, (n, k), dtype=t.int8, device="cuda")
        return [w.clone().t() for _ in range(nb)]          # (K, N) column-major views

    def tiny_setup(self, n, k, nb):
        t = self.torch
        if t is None or self.tiny_error:
            return None
        try:
            w = t.randint(0, 256, (n, k // 2), dtype=t.uint8, device="cuda")
            try:
                wp = t._convert_weight_to_int4pack(w, 8)
            except Exception:
                wp = t._convert_weight_to_int4pack(t.randint(0, 16, (n, k), dtype=t.int32, device="cuda"), 8)
            sz = (t.rand((k // GROUP, n, 2), device="cuda") * 0.01).to(t.bfloat16)
            x = t.randn((1, k), device="cuda", dtype=t.bfloat16)
            t._weight_int4pack_mm(x, wp, GROUP, sz)
            return [(wp.clone(), sz.clone()) for _ in range(nb)]
        except Exception as e:  # API differs across torch versions: report, don't fail
            self.tiny_error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            return None


# ----------------------------------------------------------------------------- gemm

def _gemm_rows(shapes, ms, peers: Peers, copy_gbs: float, reps: int):
    cp = cp_or_fail()
    t = peers.torch
    for k, n in shapes:
        probe = ops_cuda.random_packed(n, k, GROUP, seed=0)
        nb = n_buffers(probe.nbytes())
        ours = [probe] + [ops_cuda.random_packed(n, k, GROUP, seed=i) for i in range(1, nb)]
        wbytes = probe.nbytes()
        w16_0 = (cp.random.random((n, k), dtype=cp.float32) - 0.5).astype(cp.float16)
        nb16 = n_buffers(w16_0.nbytes)
        w16 = [w16_0] + [w16_0.copy() for _ in range(nb16 - 1)]
        w8 = peers.int8_setup(n, k, n_buffers(n * k))
        tiny = peers.tiny_setup(n, k, n_buffers(n * k // 2))
        for m in ms:
            x8 = cp.random.randint(-127, 128, (m, k), dtype=cp.int32).astype(cp.int8)
            sx = cp.full((m,), 0.01, dtype=cp.float32)
            y = cp.empty((m, n), dtype=cp.float16)
            kern = ops_cuda.choose_kernel(m)
            picked = choice.pick(m, n, k, GROUP)            # None: the table's choice (below)
            if picked is not None:
                kern = config_key(*picked)
            elif kern == "wgmma":
                kern = "wgmma {}/{}/{}/{}/{}".format(*tuning.wgmma_cfg(m, n).tile)
            elif kern == "gemv":
                mt = 1 if m <= 8 else 2 if m <= 16 else 4
                g = tuning.GEMM.gemv[mt]
                kern = f"gemv {g.rw}/{g.u}"
            t_ours = time_calls(lambda i: ops_cuda.gemm_a8w4(x8, sx, ours[i % nb], out=y), reps)
            x16 = (cp.random.random((m, k), dtype=cp.float32) - 0.5).astype(cp.float16)
            y16 = cp.empty((m, n), dtype=cp.float16)
            t_f16 = time_calls(lambda i: cp.matmul(x16, w16[i % nb16].T, out=y16), reps)
            t_i8 = t_tiny = None
            if w8 is not None and m > 16:
                a8 = t.randint(-127, 128, (m, k), dtype=t.int8, device="cuda")
                t_i8 = time_calls(lambda i: t._int_mm(a8, w8[i % len(w8)]), reps)
            if tiny is not None:
                xb = t.randn((m, k), device="cuda", dtype=t.bfloat16)
                t_tiny = time_calls(lambda i: t._weight_int4pack_mm(xb, tiny[i % len(tiny)][0], GROUP,
                                                                    tiny[i % len(tiny)][1]),
                                    reps if m < 1024 else 10, warmup=2 if m >= 1024 else 5)
            ops = 2.0 * m * n * k
            yield {
                "m": m, "k": k, "n": n, "kernel": kern,
                "ms": t_ours, "tops": ops / (t_ours * 1e-3) / 1e12,
                "weight_gbs": wbytes / (t_ours * 1e-3) / 1e9,
                "pct_copy": 100.0 * wbytes / (t_ours * 1e-3) / 1e9 / copy_gbs,
                "fp16_ms": t_f16, "x_fp16": t_f16 / t_ours,
                "int8_ms": t_i8, "x_int8": (t_i8 / t_ours) if t_i8 else None,
                "tiny_ms": t_tiny, "x_tiny": (t_tiny / t_ours) if t_tiny else None,
            }
            del x8, sx, y, x16, y16
        del ours, w16, w8, tiny, probe
        cp.get_default_memory_pool().free_all_blocks()
        if t is not None:
            t.cuda.empty_cache()


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _table(rows, header: str) -> str:
    lines = [header, "",
             "| M | K×N | kernel | ms | TOP/s | weight GB/s | % copy BW | cuBLAS fp16 ms | ×fp16 "
             "| cuBLAS int8 ms | ×int8 | tinygemm ms | ×tinygemm |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['m']} | {r['k']}×{r['n']} | {r['kernel']} | {r['ms']:.4f} | {r['tops']:.1f} | "
            f"{r['weight_gbs']:.0f} | {r['pct_copy']:.0f} | {r['fp16_ms']:.4f} | {r['x_fp16']:.2f} | "
            f"{_fmt(r['int8_ms'], '.4f')} | {_fmt(r['x_int8'], '.2f')} | {_fmt(r['tiny_ms'], '.4f')} | "
            f"{_fmt(r['x_tiny'], '.2f')} |")
    return "\n".join(lines)


# M ranges of the summary, and issue 20's targets there: the geometric mean over the shapes of
# peer time / our time must reach these (> 1: we are faster)
SUMMARY_RANGES = ((1, 16), (32, 32), (64, 256), (1024, 4096), (8192, 8192))
SUMMARY_TARGETS = {(64, 256): {"x_fp16": 1.3}, (1024, 4096): {"x_fp16": 1.3, "x_int8": 1.0}}
SUMMARY_PEERS = (("x_fp16", "cuBLAS fp16"), ("x_int8", "cuBLAS int8"), ("x_tiny", "tinygemm"))


def summary(rows) -> list[dict]:
    """Per M range of SUMMARY_RANGES that has rows: the number of rows and, per peer, the
    geometric mean of its ×ratio over the rows that timed it (None where none did), and
    whether issue 20's target there is met (True / False, None where the peer was not timed;
    absent without a target)."""
    out = []
    for lo, hi in SUMMARY_RANGES:
        sel = [r for r in rows if lo <= r["m"] <= hi]
        if not sel:
            continue
        rec = {"m_lo": lo, "m_hi": hi, "rows": len(sel)}
        for key, _ in SUMMARY_PEERS:
            rec[key] = geomean(r[key] for r in sel if r.get(key) is not None)
        for key, want in SUMMARY_TARGETS.get((lo, hi), {}).items():
            rec[f"target_{key}"] = want
            rec[f"{key}_ok"] = None if rec[key] is None else rec[key] >= want         # None: not timed
        out.append(rec)
    return out


def summary_table(rows) -> str:
    """summary() as markdown."""
    lines = ["| M | rows | " + " | ".join(f"geomean ×{name}" for _, name in SUMMARY_PEERS) + " | issue 20 target |",
             "|---|---:|" + "---:|" * len(SUMMARY_PEERS) + "---|"]
    for s in summary(rows):
        m = f"{s['m_lo']}" if s["m_lo"] == s["m_hi"] else f"{s['m_lo']}–{s['m_hi']}"
        target = ", ".join(f"×{dict(SUMMARY_PEERS)[k]} ≥ {s[f'target_{k}']}: "
                           f"{VERDICT[s[f'{k}_ok']]}"
                           for k in SUMMARY_TARGETS.get((s["m_lo"], s["m_hi"]), {}))
        lines.append(f"| {m} | {s['rows']} | " + " | ".join(_fmt(s[k], ".2f") for k, _ in SUMMARY_PEERS)
                     + f" | {target or '—'} |")
    return "\n".join(lines)


def _header(copy_gbs: float, peers: Peers, quick: bool, empty_ms: float, policy: str = "table") -> str:
    info = kernels.device_info()
    cp = cp_or_fail()
    t = peers.torch
    date = _dt.date.today().isoformat()
    lines = [f"# A8W4 GEMM, {info['name']} ({info['sm_count']} SMs, L2 {info['l2_bytes'] >> 20} MiB), {date}",
             "",
             f"`python -m engine.bench gemm{' --quick' if quick else ''}"
             f"{' --policy learned' if policy == 'learned' else ''}`; CuPy {cp.__version__}, "
             f"torch {t.__version__ if t else 'absent'}; device-to-device copy {copy_gbs:.0f} GB/s "
             f"(read + write). Median of ≥ 50 event-timed calls after warm-up (tinygemm at M ≥ 1024: 10), "
             f"rotating weight buffers (> 3× L2). Our weight bytes = packed int4 + meta + s8. "
             f"×peer = peer time / our time (> 1: we are faster). Group 128. "
             f"An empty kernel measures {empty_ms * 1e3:.1f} µs in this harness (launch + events): "
             f"every row pays it, which caps small shapes' % of copy bandwidth."]
    if peers.tiny_error:
        lines.append(f"tinygemm unavailable: {peers.tiny_error}")
    return "\n".join(lines)


def apply_tune(path: str) -> dict:
    """Load dispatch choices written by `gemm-pick` into tuning.GEMM (same session's tuning). The
    picks are over every tile `gemm-tune` timed, WPF = 0 ones included: their buckets leave the
    WPF = 0 table (GEMM.wgmma_wsm_skip), the others keep it."""
    with open(path) as f:
        picks = json.load(f)
    tuning.GEMM.wgmma_wsm_skip = tuning.GEMM.wgmma_wsm_skip | frozenset(picks.get("wgmma", {}))
    for bucket, cfg in picks.get("wgmma", {}).items():
        tuning.GEMM.wgmma[bucket] = tuning.WgmmaCfg(**{k: cfg[k] for k in tuning.WGMMA_KEYS})
    for mt, cfg in picks.get("gemv", {}).items():
        tuning.GEMM.gemv[int(mt)] = tuning.GemvCfg(cfg["rw"], cfg["u"])
    return picks


def cmd_gemm_pick(args) -> int:
    """Choose, per M bucket, the configuration with the smallest summed time in a tune log."""
    rows = [json.loads(line) for line in open(args.tune_log) if line.strip()]
    # not the --ab / --patch rows, nor the --tails ones (the table's tiles run the automatic tail)
    rows = [r for r in rows if "ms" in r and not r.get("setting") and "tail" not in (r.get("cfg") or {})]
    picks: dict = {"wgmma": {}, "gemv": {}}
    buckets = {name: (lambda m, name=name: m > tuning.gemv_bound(True) and tuning.wgmma_bucket(m) == name)
               for name in tuning.WGMMA_BUCKETS}
    for name, inb in buckets.items():
        cases = {(r["m"], r["k"], r["n"]) for r in rows if r["kernel"] == "wgmma" and inb(r["m"])}
        tot: dict = {}
        for r in rows:
            if r["kernel"] == "wgmma" and inb(r["m"]):
                key = json.dumps({k: r["cfg"].get(k) for k in tuning.WGMMA_KEYS})
                tot.setdefault(key, {})[(r["m"], r["k"], r["n"])] = r["ms"]
        full = {k: sum(v.values()) for k, v in tot.items() if len(v) == len(cases)}
        if full:
            picks["wgmma"][name] = json.loads(min(full, key=full.get))
    for mt in ops_cuda.GEMV_CFGS:
        tot = {}
        for r in rows:
            if r["kernel"] == "gemv" and r["cfg"]["mt"] == mt and r["cfg"].get("nw", 8) == 8:
                key = (r["cfg"]["rw"], r["cfg"]["u"])
                tot[key] = tot.get(key, 0.0) + r["ms"]
        if tot:
            rw, u = min(tot, key=tot.get)
            picks["gemv"][str(mt)] = {"rw": rw, "u": u}
    text = json.dumps(picks, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def cmd_gemm(args) -> int:
    policy = args.policy
    if policy == "learned" and args.tune_json:
        raise BenchError("--tune-json sets the table; it does not combine with --policy learned")
    choice.configure(policy)        # the rows name the configurations that policy runs
    if policy == "learned" and choice.resolve() != "learned":
        raise BenchError("--policy learned: no usable performance model for this device (see the warning above)")
    if args.tune_json:
        apply_tune(args.tune_json)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    ms = QUICK_MS if args.quick else MS
    peers = Peers()
    copy_gbs = copy_bandwidth()
    empty_ms = launch_overhead_ms()
    rows = []
    for r in _gemm_rows(shapes, ms, peers, copy_gbs, args.reps):
        rows.append(r)
        if args.json:
            print(json.dumps({**r, "device": kernels.device_info()["name"], "copy_gbs": copy_gbs}), flush=True)
        else:
            print(f"M={r['m']:5d} K={r['k']:5d} N={r['n']:5d} {r['kernel']:5s} {r['ms']:.4f} ms "
                  f"{r['tops']:7.1f} TOP/s {r['pct_copy']:5.1f}% copy  x{r['x_fp16']:.2f} fp16",
                  file=sys.stderr, flush=True)
    text = _table(rows, _header(copy_gbs, peers, args.quick, empty_ms, policy)) + "\n\n" + summary_table(rows)
    if args.json:
        for rec in summary(rows):
            print(json.dumps({"summary": True, **rec}), flush=True)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if not args.json:
        print(text)
    return 0


# ----------------------------------------------------------------------------- tuning

TUNE_CASES = [(1, 8192, 8192), (1, 4096, 4096), (16, 8192, 8192), (16, 4096, 4096), (32, 8192, 8192),
              (64, 8192, 8192), (128, 8192, 8192), (256, 8192, 8192), (256, 4096, 4096), (256, 8192, 28672),
              (1024, 8192, 8192), (4096, 8192, 8192), (4096, 4096, 11008), (4096, 28672, 8192)]
# every row of TUNE_CASES is timed with every variant that applies to its M


def _variants(m, splits=(), tails=(), tiles=None):
    """Every kernel configuration that applies to M rows; splits: explicit split-K counts to time
    beside automatic and none (M <= 512); tails: split counts of the last, partial wave (cfg
    "tail") to time beside the automatic one where K is not split, wgmma only (a shape whose tiles
    fill whole waves, or less than one, runs the same launch for every count); tiles: only these
    wgmma tiles (BT, STAGES, NWG, WPF, OVL) and no GEMV or mma.sync."""
    v = []
    if tails or tiles is not None:
        return [(kern, {**cfg, "tail": t} if t else cfg) for kern, cfg in _variants(m, splits)
                if tiles is None or (kern == "wgmma" and tuple(cfg[x] for x in tuning.WGMMA_KEYS[:5]) in tiles)
                for t in ((0, *tails) if kern == "wgmma" and cfg["splits"] == 1 else (0,))]
    if m <= 32:
        mt = 1 if m <= 8 else 2 if m <= 16 else 4
        v += [("gemv", {"mt": mt, "rw": rw, "u": u}) for rw, u in ops_cuda.GEMV_CFGS[mt]]
        v += [("gemv", {"mt": mt, "rw": rw, "u": u, "nw": 16}) for rw, u in ops_cuda.GEMV_WIDE.get(mt, ())]
    if m >= 16 or m > tuning.gemv_bound(ops_cuda.has_wgmma()):     # above the table's GEMV rows too
        for bm in ((64, 128) if m <= 256 else (128,)):
            for sp in ((1, 0) if m <= 256 else (1,)):
                v.append(("mma", {"bm": bm, "splits": sp or None}))
        if ops_cuda.has_wgmma():
            for bt, st, nwg, wpf, ovl in ops_cuda.WGMMA_CFGS:
                # BT < 64 over choice.candidates' range (M <= BT); BT = 64 up to M = 64 (WPF = 0: 256, the
                # token tile Machete shrinks to where N = 4096 leaves few tiles); the wider tiles above M = 64
                if bt < 64:
                    skip = m > bt
                elif bt == 64:
                    skip = m > (256 if wpf == 0 else 64)
                else:                                # WPF = 0: the 256-token tile from M = 129 (the table's)
                    skip = m <= 64 or (bt == 256 and m < (129 if wpf == 0 else 256))
                if skip:
                    continue
                for sp in ((1, 0, *splits) if m <= 512 else (1,)):
                    v.append(("wgmma", {"bt": bt, "stages": st, "nwg": nwg, "wpf": wpf, "ovl": ovl,
                                        "splits": sp or None}))
    return v


def gemm_case(m: int, k: int, n: int):
    """(layers, x8, sx, y) for timing an (M, K) × (N, K)ᵀ A8W4 GEMM: enough random layers that
    call i, on layers[i % len(layers)], never finds the previous call's weights in L2."""
    cp = cp_or_fail()
    layer = ops_cuda.random_packed(n, k, GROUP, seed=1)
    nb = n_buffers(layer.nbytes())
    layers = [layer] + [ops_cuda.random_packed(n, k, GROUP, seed=i) for i in range(2, nb + 1)]
    x8 = cp.random.randint(-127, 128, (m, k), dtype=cp.int32).astype(cp.int8)
    sx = cp.full((m,), 0.01, dtype=cp.float32)
    return layers, x8, sx, cp.empty((m, n), dtype=cp.float16)


def cmd_gemm_tune(args) -> int:
    cases = [ints(c, "--cases (M:K:N,...)", sep=":") for c in args.cases.split(",")] if args.cases else TUNE_CASES
    if any(len(c) != 3 for c in cases):
        raise BenchError(f"--cases takes M:K:N,... with positive integers, got {args.cases!r}")
    splits = ints(args.splits, "--splits") if args.splits else ()
    tails = ints(args.tails, "--tails") if getattr(args, "tails", "") else ()
    tiles = None
    if getattr(args, "tiles", ""):
        tiles = {tuple(ints(t, "--tiles (BT/STAGES/NWG/WPF/OVL,...)", least=0, sep="/")) for t in args.tiles.split(",")}
        if not tiles <= set(ops_cuda.WGMMA_CFGS):
            raise BenchError(f"--tiles {args.tiles}: not instantiated: {sorted(tiles - set(ops_cuda.WGMMA_CFGS))} "
                             f"(tuning.WGMMA_CFGS)")
    from .e2e import args_variants  # noqa: PLC0415
    settings = args_variants(args)              # each variant again under these, same process and buffers
    cp = cp_or_fail()
    for m, k, n in cases:
        layers, x8, sx, y = gemm_case(m, k, n)
        layer, nb = layers[0], len(layers)
        for kern, cfg in _variants(m, splits, tails, tiles):
            for name, setting in [("", contextlib.nullcontext)] + settings:
                res = {"m": m, "k": k, "n": n, "kernel": kern, "cfg": cfg, **({"setting": name} if name else {})}
                try:
                    with setting() as used:
                        ms = time_calls(lambda i: ops_cuda.gemm_a8w4(x8, sx, layers[i % nb], kernel=kern, cfg=cfg,
                                                                     out=y), args.reps)
                    if isinstance(used, set):           # a patch: did this variant run an edited kernel
                        res["edited"] = bool(used)
                    res.update(ms=ms, tops=2.0 * m * n * k / (ms * 1e-3) / 1e12,
                               weight_gbs=layer.nbytes() / (ms * 1e-3) / 1e9)
                except Exception as e:
                    res["error"] = str(e)[:300]
                print(json.dumps(res), flush=True)
        del layers, layer
        cp.get_default_memory_pool().free_all_blocks()
    return 0


def cmd_gemm_one(args) -> int:
    """Time (or, under ncu, just run) one shape with one kernel configuration."""
    layers, x8, sx, y = gemm_case(args.m, args.k, args.n)
    layer, nb = layers[0], len(layers)
    cfg = json.loads(args.cfg) if args.cfg else None
    ms = time_calls(lambda i: ops_cuda.gemm_a8w4(x8, sx, layers[i % nb], kernel=args.kernel, cfg=cfg, out=y),
                    args.reps)
    print(json.dumps({"m": args.m, "k": args.k, "n": args.n, "kernel": args.kernel, "cfg": cfg, "ms": ms,
                      "tops": 2.0 * args.m * args.n * args.k / (ms * 1e-3) / 1e12,
                      "weight_gbs": layer.nbytes() / (ms * 1e-3) / 1e9}))
    return 0
