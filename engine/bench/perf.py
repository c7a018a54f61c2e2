"""`python -m engine.bench perf collect | fit | report`: the learned performance model of the A8W4
GEMM kernels (docs/PERFMODEL.md; ALGORITHMS.md §4).

  collect  (GPU) times every shipped configuration (gpu/choice.py candidates) over a designed
           problem set through ops.gemm_a8w4(kernel=, cfg=) with the bench harness (CUDA events,
           median, rotating weight buffers), measures board power and energy per call with NVML
           on a subset while the kernel loops in a CUDA graph for >= 0.3 s, records features,
           and writes bench/data/<device>-<date>-perf.csv (`#` lines on top say how).
  fit      (CPU, scikit-learn) random forests on held-out shapes (GroupKFold by (M, N, K))
           against an analytical roofline and the paper's feature set; writes the markdown
           table (and a PNG when matplotlib imports) to bench/results/ and the exported model
           (engine/gpu/perfmodel.py format) to engine/gpu/perf_models/<device>.npz.
  report   (CPU) the model file's picks on a CSV (another `collect --seed`: new shapes) against
           the table's and the measured best.

scikit-learn, scipy, pynvml and matplotlib are imported inside the functions that need them.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..gpu import choice, perfmodel
from ..gpu.perfmodel import FAMILIES, FEATURES, PAPER_FEATURES, config_key, parse_key
from ..util.files import atomic_file
from ..util.progress import progress_bar
from .common import BenchError

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO / "bench" / "data"
RESULTS_DIR = REPO / "bench" / "results"
GROUP = 128
LLM_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824), (8192, 8192), (8192, 28672),
              (28672, 8192)]                           # (K, N): engine/bench/gemm.py SHAPES
LLM_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]  # engine/bench/gemm.py MS
TUNED = [(1, 8192, 8192), (1, 4096, 4096), (16, 8192, 8192), (16, 4096, 4096), (32, 8192, 8192),
         (64, 8192, 8192), (128, 8192, 8192), (256, 8192, 8192), (256, 4096, 4096), (256, 8192, 28672),
         (1024, 8192, 8192), (4096, 8192, 8192), (4096, 4096, 11008),
         (4096, 28672, 8192)]                          # engine/bench/gemm.py TUNE_CASES (M, K, N)
META_COLS = ("device", "kernel", "config", "m", "n", "k", "group", "source", "runtime_ms", "reps", "power_w",
             "energy_mj", "loop_ms", "power_s", "power_calls", "power_src", "expr", "grid_x", "grid_y", "block",
             "smem_launch")
COLUMNS = META_COLS + tuple(f for f in FEATURES if f not in ("m", "n", "k", "group"))
TARGETS_TIME = ("log_runtime_rel",)                                 # perfmodel.REL_TARGETS: / t_roof
TARGETS_POWER = ("log_runtime_rel", "power_w", "log_energy_rel")
PAPER_REF = {"runtime_ms": "R² 0.98, mean error 15.6 %", "power_w": "R² 0.78, median error 5.4 %"}


# ----------------------------------------------------------------------------- the problem set

def _log_uniform_int(rng, lo: int, hi: int, step: int = 1) -> int:
    v = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return int(min(hi, max(lo, step * round(v / step))))


def problems(seed: int = 0, n_random: int = 400, ms_per_shape: int = 6) -> list[tuple]:
    """(m, k, n, source) in measuring order: the LLM shapes × M of engine/bench/gemm.py, then
    random (K, N) multiples of 128 in [512, 32768] (log-uniform) with ms_per_shape log-uniform
    M in [1, 8192] each. Deterministic in seed."""
    out = [(m, k, n, "llm") for k, n in LLM_SHAPES for m in LLM_MS]
    rng = np.random.default_rng(seed)
    seen = {(k, n) for k, n in LLM_SHAPES}
    while len(seen) < len(LLM_SHAPES) + n_random:
        k, n = _log_uniform_int(rng, 512, 32768, 128), _log_uniform_int(rng, 512, 32768, 128)
        ms = sorted({_log_uniform_int(rng, 1, 8192) for _ in range(ms_per_shape)})
        if (k, n) in seen:
            continue
        seen.add((k, n))
        out += [(m, k, n, "random") for m in ms]
    return out


def _est_kernel_ms(m, k, n) -> float:
    """A rough H100/H200-class roofline for planning only (3 TB/s, 600 TOP/s, 5 µs floor)."""
    nbytes = n * k / 2 + m * k + 2 * m * n
    return 1e3 * max(nbytes / 3e12, 2.0 * m * n * k / 6e14) + 0.005


def reps_for(est_ms: float) -> int:
    """Timed calls of one row: 50 (the bench default) down to 5 for the largest calls (~30 ms of kernel)."""
    return int(min(50, max(5, 30.0 / est_ms)))


def row_cost_s(m, k, n) -> float:
    est = _est_kernel_ms(m, k, n)
    reps = reps_for(est)
    host = 0.03                                    # ms of Python per launch
    # time_calls: 5 warm-up calls, a spin of 3x (warm-up time a call) x reps, then the reps
    return 0.004 + (reps + 5) * max(est, host) / 1e3 + min(0.3, max(0.002, 3 * max(est, host) * reps / 1e3))


def power_cost_s(power_s: float) -> float:
    return power_s + 0.08 + 0.02                   # loop, settle + capture, graph upload


def shape_cost_s(k, n) -> float:
    return 0.05 + 3 * (n * k / 2) / 2e11            # random_packed buffers


def plan(budget_s: float, seed: int = 0, quick: bool = False, power_frac: float = 0.5, power_s: float = 0.3,
         wgmma: bool = True) -> dict:
    """The deterministic subsample of problems() that fits the budget: whole (K, N) shapes in
    problems() order (LLM shapes first) while the estimate fits; every timed problem with all
    its candidates; power on a deterministic subset of problems (all candidates) worth
    power_frac of the budget."""
    if quick:
        pool = [(m, k, n, "llm") for k, n in ((4096, 4096), (8192, 8192)) for m in (1, 16, 64, 256, 4096)]
        pool += [(m, k, n, s) for m, k, n, s in problems(seed, n_random=4, ms_per_shape=2) if s == "random"]
    else:
        pool = problems(seed)
    by_shape: dict = {}
    for m, k, n, s in pool:
        by_shape.setdefault((k, n), []).append((m, s))
    t_budget = budget_s * (1 - power_frac)
    chosen, used = [], 0.0
    for (k, n), ms in by_shape.items():
        cost = shape_cost_s(k, n) + sum(len(choice.candidates(m, wgmma)) * row_cost_s(m, k, n) for m, _ in ms)
        if used + cost > t_budget and chosen:
            continue                               # a smaller later shape may still fit
        chosen.append(((k, n), ms))
        used += cost
    # power problems: every 3rd chosen problem first, in a seeded order, while the budget lasts
    flat = [(m, k, n, s) for (k, n), ms in chosen for m, s in ms]
    rng = np.random.default_rng(seed + 1)
    order = list(rng.permutation(len(flat)))
    p_budget, p_used, power = budget_s * power_frac, 0.0, set()
    if quick:      # the smoke run measures power on its first shape (GEMV and tensor-core rows), always
        order = [i for i, p in enumerate(flat) if (p[0], p[1], p[2]) in ((1, 4096, 4096), (64, 4096, 4096))]
        p_budget = float("inf")
    for i in order:
        m, k, n, _ = flat[i]
        cost = len(choice.candidates(m, wgmma)) * (power_cost_s(power_s) + row_cost_s(m, k, n))
        if p_used + cost <= p_budget:
            power.add((m, k, n))
            p_used += cost
    pts = [dict(m=m, k=k, n=n, source=s, power=(m, k, n) in power) for m, k, n, s in flat]
    text = json.dumps([budget_s, seed, quick, power_frac, power_s, wgmma, pts], sort_keys=True)
    return {"points": pts, "est_s": used + p_used, "hash": hashlib.sha256(text.encode()).hexdigest()[:16],
            "pool": len(pool), "seed": seed, "budget_s": budget_s, "power_s": power_s}


# ----------------------------------------------------------------------------- NVML

class PowerMeter:
    """Board power and energy from NVML, sampled by a background thread every ~2 ms.

    The energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since driver load; Volta and
    newer) is preferred: the average power over a loop is the slope between the first and last
    counter *changes* inside it, which removes the counter's update quantisation at both ends.
    Without it (or with < 2 changes) the mean of nvmlDeviceGetPowerUsage samples is used.
    `update_interval_s` is measured at start: the time between counter changes."""

    def __init__(self, cp, poll_s: float = 0.002):
        try:
            import pynvml  # noqa: PLC0415  (nvidia-ml-py; only `perf collect` needs it)
        except ImportError as e:
            raise BenchError("perf collect measures power with NVML: pip install nvidia-ml-py") from e
        self.nv = pynvml
        pynvml.nvmlInit()
        dev = cp.cuda.Device().id
        try:      # NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES): match the PCI bus id
            bus = cp.cuda.runtime.deviceGetPCIBusId(dev)
            self.h = pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode() if isinstance(bus, str) else bus)
        except Exception:
            self.h = pynvml.nvmlDeviceGetHandleByIndex(dev)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.h)
            self.has_energy = True
        except pynvml.NVMLError:
            self.has_energy = False
        self.poll_s = poll_s
        self.samples: list = []          # (t, energy_mj or None, power_w)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(1.0)
        self.update_interval_s = self._interval(time.perf_counter() - 1.0, time.perf_counter())

    def _run(self):
        nv, last = self.nv, None
        while not self._stop.is_set():
            t = time.perf_counter()
            e = nv.nvmlDeviceGetTotalEnergyConsumption(self.h) if self.has_energy else None
            p = nv.nvmlDeviceGetPowerUsage(self.h) / 1e3
            if e != last or not self.has_energy:
                self.samples.append((t, e, p))
                last = e
            time.sleep(self.poll_s)

    def _changes(self, t0, t1):
        return [(t, e) for t, e, _ in list(self.samples) if t0 <= t <= t1 and e is not None]

    def _interval(self, t0, t1):
        ch = self._changes(t0, t1)
        return float(np.median(np.diff([t for t, _ in ch]))) if len(ch) >= 3 else float("nan")

    def average_w(self, t0: float, t1: float) -> tuple[float, str]:
        ch = self._changes(t0, t1)
        if len(ch) >= 2 and ch[-1][0] - ch[0][0] > 0.05:
            return (ch[-1][1] - ch[0][1]) / (ch[-1][0] - ch[0][0]) / 1e3, "energy"
        ps = [p for t, _, p in list(self.samples) if t0 <= t <= t1]
        return (float(np.mean(ps)) if ps else float("nan")), "power"

    def trim(self):
        keep = time.perf_counter() - 5.0
        self.samples = [s for s in self.samples if s[0] >= keep]

    def close(self):
        self._stop.set()
        self._thread.join(timeout=1)
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass


# ----------------------------------------------------------------------------- collect (GPU)

def _launch_recorder(kargs, record: dict):
    orig = kargs.launch

    def rec(kf, expr, grid, block, shared_mem=0, **args):
        g2 = (tuple(grid) + (1, 1))[:2]                            # (x,) -> (x, 1)
        record.update(kf=kf, expr=expr, grid=g2, block=tuple(block), smem=shared_mem)
        return orig(kf, expr, grid, block, shared_mem=shared_mem, **args)
    return orig, rec


def _recorded_tail(kern: str, cfg: dict, r: dict, sm: int) -> list:
    """[tail_from, splits] of the split tail a wgmma row ran with, read off its recorded grid:
    the tiles past the last whole wave, split (grid_x − tail_from) / tail ways; none where the
    grid is the tiles (rows collected before the split tail, or with it off)."""
    p = perfmodel.launch_plan(kern, {**cfg, "tail": 1}, r["m"], r["n"], r["k"], r["group"], sm)
    tiles, gx = p["tiles"], int(r["grid_x"])
    if gx == tiles or p["splits"] != 1 or int(r.get("grid_y") or 1) != 1:
        return [tiles, 1]
    slots = sm * max(int(r["occ"]), 1)
    tail_from = tiles - tiles % slots if tiles > slots else 0
    tail = tiles - tail_from
    if tail <= 0 or (gx - tail_from) % tail:
        raise perfmodel.PerfModelError(f"grid {gx} of {tiles} tiles is no split tail of {slots} slots")
    return [tail_from, (gx - tail_from) // tail]


def _refeature(r: dict, sm: int) -> dict:
    """perfmodel.features of a CSV row. A row with automatic split-K keeps the split count it ran
    with (its `splits` column), not the one today's rule (perfmodel.auto_splits) would choose; a
    wgmma row whose recorded grid has no split tail (collected before perfmodel.tail_split, or
    under a setting without one) keeps none."""
    kern, cfg = parse_key(r["config"])
    auto = kern != "gemv" and not cfg.get("splits") and int(r.get("splits") or 0) > 0
    if auto:
        cfg = {**cfg, "splits": int(r["splits"])}
    if kern == "wgmma" and r.get("grid_x"):
        cfg = {**cfg, "tail": _recorded_tail(kern, cfg, r, sm)}
    f = perfmodel.features(kern, cfg, r["m"], r["n"], r["k"], r["group"], sm, {"regs": r["regs"], "occ": r["occ"]})
    if auto:
        f["split_auto"] = 1
    return f


def _attrs(cp, kargs, kf, expr, threads, smem, info) -> dict:
    """Registers a thread and resident blocks per SM of a compiled kernel (driver occupancy query;
    the register/shared-memory/thread limits as a fallback)."""
    fn = kargs.function(kf, expr)
    regs = int(fn.num_regs)
    try:
        occ = int(cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.raw.kernel.ptr, threads, smem))
    except Exception as e:
        occ = min(2048 // threads, 65536 // max(regs * threads, 1),
                  (info.get("smem_optin", 232448) // smem) if smem else 32)
        print(f"perf collect: occupancy query failed for {expr} ({type(e).__name__}: {e}); "
              f"estimated {occ} blocks/SM from registers and shared memory", file=sys.stderr)
    return {"regs": regs, "occ": max(occ, 0)}


def _power_loop(cp, meter, call, est_ms: float, power_s: float, settle_s: float = 0.05):
    """Capture `g` calls in a CUDA graph, replay it for >= power_s, return (loop_ms per call,
    power_w, method, calls)."""
    from ..gpu import launch  # noqa: PLC0415
    g = int(min(256, max(1, math.ceil(10.0 / est_ms))))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        call(0)
        stream.synchronize()
        with launch.capturing():
            stream.begin_capture()
            try:
                for i in range(g):
                    call(i)
            finally:
                graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(stream)
        graph.launch(stream)
        e1.record(stream)
        e1.synchronize()
        graph_ms = max(cp.cuda.get_elapsed_time(e0, e1), 1e-3)
        n = int(math.ceil((power_s + settle_s) * 1e3 / graph_ms))
        t0 = time.perf_counter()
        e0.record(stream)
        for _ in range(n):
            graph.launch(stream)
        e1.record(stream)
        e1.synchronize()
        t1 = time.perf_counter()
    loop_ms = cp.cuda.get_elapsed_time(e0, e1) / (n * g)
    time.sleep(max(2 * (meter.poll_s), 0.004))
    w, how = meter.average_w(t0 + settle_s, t1)
    meter.trim()
    return loop_ms, w, how, n * g


def collect(out: str | None = None, budget_s: float = 480.0, quick: bool = False, seed: int = 0,
            power_s: float = 0.3, power_frac: float = 0.5, progress: bool = True) -> str:
    """Run the plan on this GPU and write the CSV (atomically; resumes an interrupted run of the
    same plan from <out>.partial). Returns the CSV path."""
    from ..gpu import kargs, kernels  # noqa: PLC0415
    from ..gpu import ops as ops_cuda  # noqa: PLC0415
    from .common import cp_or_fail, n_buffers, time_calls  # noqa: PLC0415
    cp = cp_or_fail()
    info = kernels.device_info()
    wg = ops_cuda.has_wgmma() and ops_cuda.GEMM.use_wgmma
    if quick:
        budget_s = min(budget_s, 30.0)
    pl = plan(budget_s, seed, quick, power_frac, power_s, wg)
    slug = perfmodel.device_slug(info["name"])
    date = _dt.date.today().isoformat()
    out = Path(out) if out else DATA_DIR / f"{slug}-{date}-perf{'-quick' if quick else ''}.csv"
    partial = out.with_name(out.name + ".partial")
    meter = PowerMeter(cp)
    # compile every module once before the clock (NVRTC, then CuPy's disk cache)
    t_c = time.perf_counter()
    for kern in ("gemv", "mma") + (("wgmma",) if wg else ()):
        lay = ops_cuda.random_packed(256, 256, GROUP)
        m = 1 if kern == "gemv" else 64
        x8 = cp.zeros((m, 256), cp.int8)
        ops_cuda.gemm_a8w4(x8, cp.ones((m,), cp.float32), lay, kernel=kern)
    cp.cuda.Device().synchronize()
    compile_s = time.perf_counter() - t_c
    meta = {"device": {"name": info["name"], "sm_count": info["sm_count"], "cc": info["cc"],
                       "l2_bytes": info["l2_bytes"]},
            "plan_hash": pl["hash"], "seed": seed, "budget_s": budget_s, "quick": quick, "power_s": power_s}
    done: set = set()
    if partial.is_file():
        head = [ln for ln in partial.read_text().splitlines() if ln.startswith("# meta: ")]
        if head and json.loads(head[0][8:]).get("plan_hash") == pl["hash"]:
            for r in _rows(partial.read_text()):
                done.add((r["config"], int(r["m"]), int(r["k"]), int(r["n"])))
            print(f"perf collect: resuming {partial} ({len(done)} rows done)", file=sys.stderr)
        else:
            partial.unlink()
    if not partial.is_file():
        partial.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"# meta: {json.dumps(meta, sort_keys=True)}",
                 f"# `python -m engine.bench perf collect{' --quick' if quick else ''} --budget-s {budget_s:g} "
                 f"--seed {seed}` on {info['name']} ({info['sm_count']} SMs, cc {info['cc']}), {date}; CuPy "
                 f"{cp.__version__}.",
                 "# runtime_ms: median of `reps` CUDA-event-timed calls after 5 warm-up calls (engine/bench/"
                 "common.py time_calls), weights rotating over enough random layers to exceed 3x L2.",
                 f"# power_w, energy_mj (power rows only): the call replayed in a CUDA graph for >= {power_s:g} s "
                 f"(after 0.05 s settling); NVML energy counter {'present' if meter.has_energy else 'ABSENT'}; "
                 f"average power = slope between its first and last change inside the loop (else the mean of "
                 f"nvmlDeviceGetPowerUsage samples), polled every 2 ms by a background thread; measured counter "
                 f"update interval {meter.update_interval_s * 1e3:.1f} ms. energy_mj = power_w x loop_ms "
                 f"(the graph loop's time per call, which includes PDL overlap).",
                 f"# plan {pl['hash']}: {len(pl['points'])} problems of a pool of {pl['pool']} (LLM shapes of "
                 f"engine/bench/gemm.py, then random (K, N) multiples of 128 in [512, 32768] and M in [1, 8192], "
                 f"log-uniform, seed {seed}), {sum(p['power'] for p in pl['points'])} with power; estimated "
                 f"{pl['est_s']:.0f} s; kernel compile/load before the clock {compile_s:.1f} s.",
                 "# features: engine/gpu/perfmodel.py features(); regs and occ (blocks/SM) from the compiled "
                 "kernel (cudaOccupancyMaxActiveBlocksPerMultiprocessor).", ",".join(COLUMNS)]
        with atomic_file(partial, "x", flag="perf collect") as f:
            f.write("\n".join(lines) + "\n")
    attrs_cache: dict = {}
    t_start = time.perf_counter()
    stopped = None
    pts = pl["points"]
    with progress_bar(total=len(pts), desc="perf collect", unit="problem", enabled=progress) as bar, \
            open(partial, "a", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        i = 0
        while i < len(pts):
            k, n = pts[i]["k"], pts[i]["n"]
            same = [p for p in pts[i:] if (p["k"], p["n"]) == (k, n)]
            i += len(same)
            if time.perf_counter() - t_start > budget_s:
                stopped = f"stopped at the budget ({budget_s:g} s) before shape K={k} N={n}"
                break
            layer = ops_cuda.random_packed(n, k, GROUP, seed=1)
            nb = n_buffers(layer.nbytes())
            layers = [layer] + [ops_cuda.random_packed(n, k, GROUP, seed=j) for j in range(2, nb + 1)]
            for p in same:
                m = p["m"]
                x8 = cp.random.randint(-127, 128, (m, layer.k_pad), dtype=cp.int32).astype(cp.int8)
                sx = cp.full((m,), 0.01, dtype=cp.float32)
                y = cp.empty((m, n), dtype=cp.float16)
                est = _est_kernel_ms(m, k, n)
                for kern, cfg in choice.candidates(m, wg):
                    key = config_key(kern, cfg)
                    if (key, m, k, n) in done:
                        continue

                    def call(j, kern=kern, cfg=cfg):
                        return ops_cuda.gemm_a8w4(x8, sx, layers[j % nb], kernel=kern, cfg=dict(cfg), out=y)
                    rec: dict = {}
                    orig, recorder = _launch_recorder(kargs, rec)
                    kargs.launch = recorder
                    try:
                        call(0)
                    finally:
                        kargs.launch = orig
                    plan_ = perfmodel.launch_plan(kern, cfg, m, n, k, GROUP, info["sm_count"])
                    if (rec["expr"], rec["grid"][:2], rec["block"][0], rec["smem"]) != \
                            (plan_["expr"], plan_["grid"], plan_["threads"], plan_["smem"]):
                        raise BenchError(f"engine/gpu/perfmodel.py launch_plan disagrees with gpu/ops.py for "
                                         f"{key} M={m} K={k} N={n}: plan {plan_['expr']} {plan_['grid']} "
                                         f"{plan_['threads']} {plan_['smem']}, launched {rec['expr']} "
                                         f"{rec['grid']} {rec['block']} {rec['smem']}: update launch_plan")
                    if key not in attrs_cache:
                        attrs_cache[key] = _attrs(cp, kargs, rec["kf"], rec["expr"], plan_["threads"],
                                                  plan_["smem"], info)
                    reps = reps_for(est)
                    ms = time_calls(call, reps)
                    row = {"device": info["name"], "kernel": kern, "config": key, "m": m, "n": n, "k": k,
                           "group": GROUP, "source": p["source"], "runtime_ms": ms, "reps": reps,
                           "expr": rec["expr"], "grid_x": rec["grid"][0], "grid_y": rec["grid"][1],
                           "block": rec["block"][0], "smem_launch": rec["smem"]}
                    if p["power"]:
                        loop_ms, pw, how, calls = _power_loop(cp, meter, call, max(ms, 1e-3), power_s)
                        row.update(power_w=pw, energy_mj=pw * loop_ms, loop_ms=loop_ms, power_s=power_s,
                                   power_calls=calls, power_src=how)
                    f = perfmodel.features(kern, cfg, m, n, k, GROUP, info["sm_count"], attrs_cache[key])
                    row.update({c: v for c, v in f.items() if c not in row})
                    w.writerow(["" if row.get(c) is None else row.get(c) for c in COLUMNS])
                fh.flush()
                bar.update(1)
                del x8, sx, y
            del layers, layer
            cp.get_default_memory_pool().free_all_blocks()
    meter.close()
    elapsed = time.perf_counter() - t_start
    text = partial.read_text()
    note = (f"# measured {elapsed:.0f} s" + (f"; {stopped}" if stopped else "; plan complete") + "\n")
    body = text.split("\n")
    hdr_end = next(j for j, ln in enumerate(body) if not ln.startswith("#"))
    final = "\n".join(body[:hdr_end]) + "\n" + note + "\n".join(body[hdr_end:])
    with atomic_file(out, "x", flag="perf collect") as f:
        f.write(final)
    partial.unlink()
    print(f"perf collect: wrote {out} ({elapsed:.0f} s{'; ' + stopped if stopped else ''})", file=sys.stderr)
    return str(out)


# ----------------------------------------------------------------------------- CSV

def read_csv(path, refeature: bool = True) -> tuple[dict, list[dict]]:
    """(meta from the `# meta:` line, rows with numbers as float/int and blanks as None). With
    refeature, each row's features are recomputed from its problem, configuration and measured
    attributes by this engine's perfmodel.features (what the choice computes: no train/serve skew,
    and a CSV from before a new feature still fits)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"perf: no such CSV {path}")
    text = path.read_text()
    meta = next((json.loads(ln[8:]) for ln in text.splitlines() if ln.startswith("# meta: ")), {})
    rows = _rows(text)
    if not rows:
        raise BenchError(f"perf: {path} holds no rows")
    missing = set(META_COLS[:9]) - set(rows[0])
    if missing:
        raise BenchError(f"perf: {path} lacks the columns {sorted(missing)} (not a `perf collect` CSV?)")
    if refeature:
        sm = int((meta.get("device") or {}).get("sm_count") or 0)
        if sm <= 0:
            raise BenchError(f"perf: {path} has no `# meta:` line with the device's sm_count")
        try:
            rows = [{**r, **_refeature(r, sm)} for r in rows]
        except (perfmodel.PerfModelError, KeyError, TypeError, ValueError) as e:
            raise BenchError(f"perf: {path}: a row's configuration or attributes are unusable ({e})") from None
    return meta, rows


def _rows(text: str) -> list[dict]:
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    rows = []
    for line, r in enumerate(csv.DictReader(io.StringIO("\n".join(body))), 2):
        out = {}
        for c, v in r.items():
            if v in ("", None):
                out[c] = None
            elif c in ("device", "kernel", "config", "source", "expr", "power_src"):
                out[c] = v
            else:
                try:
                    x = float(v)
                except ValueError:
                    raise BenchError(f"perf: CSV data row {line - 1}, column {c}: {v!r} is not a number") from None
                out[c] = int(x) if x.is_integer() and c not in ("runtime_ms", "power_w", "energy_mj", "loop_ms") else x
        rows.append(out)
    return rows


def write_csv(path, meta: dict, rows: list[dict], comments=()) -> None:
    lines = [f"# meta: {json.dumps(meta, sort_keys=True)}"] + [f"# {c}" for c in comments]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in COLUMNS])
    with atomic_file(path, "x", flag="perf csv") as f:
        f.write("\n".join(lines) + "\n" + buf.getvalue())


def synthetic(seed: int = 0, n_shapes: int = 12, sm_count: int = 132, name: str = "Synthetic GPU") -> tuple[dict, list]:
    """A deterministic CSV-shaped data set without a GPU (CPU tests of fit/export/choice): the
    planned problems and candidates, fake per-configuration attributes and a roofline-like
    runtime with deterministic noise; power on every other problem."""
    rng = np.random.default_rng(seed)
    pts = [(m, k, n) for m, k, n, s in problems(seed, n_random=n_shapes, ms_per_shape=3) if s == "random"]
    pts += [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096)]
    rows = []
    for pi, (m, k, n) in enumerate(pts):
        for kern, cfg in choice.candidates(m, True):
            key = config_key(kern, cfg)
            h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
            attrs = {"regs": 64 + 8 * (h % 16), "occ": 1 + h % 3}
            f = perfmodel.features(kern, cfg, m, n, k, GROUP, sm_count, attrs)
            eff = 0.55 + 0.4 * ((h >> 4) % 7) / 6
            t = 1e3 * max(f["bytes"] / 3e12, f["flops"] / 7e14 / f["m_util"]) / eff / max(f["wave_eff"], 0.3) + 0.004
            t *= float(np.exp(rng.normal(0, 0.02)))
            r = {"device": name, "kernel": kern, "config": key, "m": m, "n": n, "k": k, "group": GROUP,
                 "source": "synthetic", "runtime_ms": t, "reps": 50, **f}
            if pi % 2 == 0:
                util = min(1.0, f["bytes"] / (t * 1e-3) / 3e12 + f["flops"] / (t * 1e-3) / 7e14)
                pw = 90 + 500 * util * (0.8 + 0.2 * ((h >> 8) % 5) / 4) + float(rng.normal(0, 3))
                r.update(power_w=pw, energy_mj=pw * t, loop_ms=t, power_s=0.3, power_calls=1000, power_src="synthetic")
            rows.append(r)
    meta = {"device": {"name": name, "sm_count": sm_count, "cc": 90, "l2_bytes": 50 << 20}, "seed": seed,
            "synthetic": True}
    return meta, rows


# ----------------------------------------------------------------------------- fit (CPU)

def _sk():
    try:
        import sklearn  # noqa: PLC0415
        from sklearn.ensemble import RandomForestRegressor  # noqa: PLC0415
        from sklearn.model_selection import GroupKFold, KFold  # noqa: PLC0415
        from sklearn.multioutput import MultiOutputRegressor  # noqa: PLC0415
    except ImportError as e:
        raise BenchError("perf fit needs scikit-learn: pip install -e '.[perf]'") from e
    return sklearn, RandomForestRegressor, GroupKFold, KFold, MultiOutputRegressor


def targets(rows: list[dict], names) -> np.ndarray:
    cols = []
    for t in names:
        if t == "log_runtime_ms":
            cols.append([math.log(r["runtime_ms"]) for r in rows])
        elif t == "log_runtime_rel":
            cols.append([math.log(r["runtime_ms"] / r["t_roof"]) for r in rows])
        elif t == "log_energy_rel":
            cols.append([math.log(r["energy_mj"] / r["t_roof"]) for r in rows])
        elif t == "power_w":
            cols.append([r["power_w"] for r in rows])
        elif t == "log_energy_mj":
            cols.append([math.log(r["energy_mj"]) for r in rows])
        else:
            cols.append([r[t] for r in rows])
    return np.array(cols, dtype=np.float64).T.reshape(len(rows), len(names))


def fit_forest(rows, names, feats=FEATURES, n_trees: int = 64, seed: int = 0, min_leaf: int = 3,
               max_features: float = 0.5, n_jobs: int = 1):
    """(sklearn forest, Forest export) fitted on standardised targets; deterministic in seed."""
    _, RF, *_ = _sk()
    Y = targets(rows, names)
    mean, scale = Y.mean(0), Y.std(0)
    scale[scale == 0] = 1.0
    Z = (Y - mean) / scale
    X = perfmodel.feature_matrix(rows, feats)
    rf = RF(n_estimators=n_trees, min_samples_leaf=min_leaf, max_features=max_features, random_state=seed,
            n_jobs=n_jobs)
    rf.fit(X, Z[:, 0] if len(names) == 1 else Z)
    rf.set_params(n_jobs=1)              # predict sums trees in order: the export matches bit for bit
    return rf, export_forest(rf, "power" if "power_w" in names else "time", feats, names, mean, scale)


def export_forest(rf, name, feats, names, mean, scale) -> perfmodel.Forest:
    trees = [e.tree_ for e in rf.estimators_]
    sizes = [t.node_count for t in trees]
    return perfmodel.Forest(
        name, tuple(feats), tuple(names), np.asarray(mean, np.float64), np.asarray(scale, np.float64),
        np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        np.concatenate([t.children_left for t in trees]).astype(np.int32),
        np.concatenate([t.children_right for t in trees]).astype(np.int32),
        np.concatenate([t.feature for t in trees]).astype(np.int32),
        np.concatenate([t.threshold for t in trees]).astype(np.float64),
        np.concatenate([t.value[:, :, 0] for t in trees]).astype(np.float64))


def sk_raw(rf, X) -> np.ndarray:
    """sklearn's prediction as (rows, outputs), in standardised units."""
    y = rf.predict(np.asarray(X, np.float64))
    return y.reshape(len(X), -1)


def problem_groups(rows) -> np.ndarray:
    keys = {}
    return np.array([keys.setdefault((r["m"], r["n"], r["k"]), len(keys)) for r in rows])


def group_folds(rows, n_splits: int = 5):
    """[(train idx, test idx)] with every (M, N, K) problem wholly on one side (GroupKFold)."""
    _, _, GKF, _, _ = _sk()
    g = problem_groups(rows)
    n = min(n_splits, len(set(g)))
    return [(tr, te) for tr, te in GKF(n_splits=n).split(np.zeros(len(rows)), groups=g)]


# baselines ------------------------------------------------------------------

def roofline_fit(rows):
    """Per family: t = max(bytes / bw, flops / peak) + t0 (log-space least squares), power =
    a + b · memory utilisation + c · compute utilisation (linear least squares), energy = P·t."""
    from scipy.optimize import least_squares  # noqa: PLC0415
    params = {}
    for fam in FAMILIES:
        rs = [r for r in rows if r["kernel"] == fam]
        if not rs:
            continue
        b = np.array([r["bytes"] for r in rs])
        f = np.array([r["flops"] for r in rs])
        lt = np.log([r["runtime_ms"] for r in rs])

        def model(th, b=b, f=f):
            return np.log(np.maximum(b / np.exp(th[0]), f / np.exp(th[1])) + np.exp(th[2]))

        x0 = np.array([math.log(3e9), math.log(6e11), math.log(5e-3)])     # bytes/ms, flop/ms, ms
        th = least_squares(lambda th: model(th) - lt, x0, method="trf").x
        p = {"th": th.tolist()}
        pr = [r for r in rs if r.get("power_w") is not None]
        if len(pr) >= 3:
            A = _roof_util(pr, th)
            p["pw"] = np.linalg.lstsq(A, np.array([r["power_w"] for r in pr]), rcond=None)[0].tolist()
        params[fam] = p
    return params


def _roof_time(r, th):
    return max(r["bytes"] / math.exp(th[0]), r["flops"] / math.exp(th[1])) + math.exp(th[2])


def _roof_util(rs, th):
    t = np.array([_roof_time(r, th) for r in rs])
    return np.stack([np.ones(len(rs)), np.array([r["bytes"] for r in rs]) / t / math.exp(th[0]),
                     np.array([r["flops"] for r in rs]) / t / math.exp(th[1])], 1)


def roofline_predict(params, rows) -> dict:
    t, pw = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    for i, r in enumerate(rows):
        p = params.get(r["kernel"])
        if p is None:
            continue
        t[i] = _roof_time(r, p["th"])
        if "pw" in p:
            pw[i] = float(_roof_util([r], p["th"])[0] @ np.array(p["pw"]))
    return {"runtime_ms": t, "power_w": pw, "energy_mj": pw * t}


def paper_models(rows, prow, seed=0, n_jobs=1):
    """GPPerf: MultiOutputRegressor(RandomForestRegressor(100 trees, depth 6)) over the paper's
    features, raw targets (runtime on every row; runtime, power, energy on the power rows)."""
    _, RF, _, _, MOR = _sk()
    mt = RF(n_estimators=100, max_depth=6, random_state=seed, n_jobs=n_jobs).fit(
        perfmodel.feature_matrix(rows, PAPER_FEATURES), [r["runtime_ms"] for r in rows])
    mp = None
    if prow:
        mp = MOR(RF(n_estimators=100, max_depth=6, random_state=seed, n_jobs=n_jobs)).fit(
            perfmodel.feature_matrix(prow, PAPER_FEATURES),
            np.array([[r["runtime_ms"], r["power_w"], r["energy_mj"]] for r in prow]))
    return mt, mp


def paper_predict(models, rows) -> dict:
    mt, mp = models
    X = perfmodel.feature_matrix(rows, PAPER_FEATURES)
    out = {"runtime_ms": mt.predict(X)}
    if mp is not None:
        y = mp.predict(X)
        out.update(power_w=y[:, 1], energy_mj=y[:, 2])
    return out


def ours_predict(tf, pf, rows) -> dict:
    X = perfmodel.feature_matrix(rows, FEATURES)
    out = {"runtime_ms": tf.quantities(X)["runtime_ms"]}
    if pf is not None:
        q = pf.quantities(X)
        out.update(power_w=q["power_w"], energy_mj=q["energy_mj"])
    return out


# metrics --------------------------------------------------------------------

def metrics(y, p, log: bool = False) -> dict:
    y, p = np.asarray(y, float), np.asarray(p, float)
    ok = np.isfinite(p) & np.isfinite(y) & (y > 0)
    y, p = y[ok], p[ok]
    if len(y) < 2:
        return {"n": int(len(y))}

    def r2(a, b):
        ss = ((a - a.mean()) ** 2).sum()
        return float(1 - ((a - b) ** 2).sum() / ss) if ss > 0 else float("nan")
    ape = np.abs(p - y) / y
    out = {"n": int(len(y)), "r2": r2(y, p), "median_ape": float(np.median(ape)), "mean_ape": float(ape.mean())}
    if log:
        out["r2_log"] = r2(np.log(y), np.log(np.maximum(p, 1e-12)))
    return out


def cross_validate(rows, n_splits=5, n_trees=64, seed=0, random_split=False, n_jobs=1, min_leaf=3) -> dict:
    """Held-out predictions of ours, the roofline and the paper's model for every row (power
    targets for power rows), folds by (M, N, K) problem (or random rows: the paper's protocol)."""
    _, _, _, KFold, _ = _sk()
    n = len(rows)
    if random_split:
        folds = list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(n)))
    else:
        folds = group_folds(rows, n_splits)
    pred = {meth: {t: np.full(n, np.nan) for t in ("runtime_ms", "power_w", "energy_mj")}
            for meth in ("ours", "ours-abs", "roofline", "paper")}
    for tr, te in folds:
        trr = [rows[i] for i in tr]
        ter = [rows[i] for i in te]
        trp = [r for r in trr if r.get("power_w") is not None]
        _, tf = fit_forest(trr, TARGETS_TIME, n_trees=n_trees, seed=seed, n_jobs=n_jobs, min_leaf=min_leaf)
        pf = fit_forest(trp, TARGETS_POWER, n_trees=n_trees, seed=seed, n_jobs=n_jobs,
                        min_leaf=min_leaf)[1] if len(trp) >= 4 else None
        _, ta = fit_forest(trr, ("log_runtime_ms",), n_trees=n_trees, seed=seed, n_jobs=n_jobs, min_leaf=min_leaf)
        got = {"ours": ours_predict(tf, pf, ter),
               "ours-abs": {"runtime_ms": ta.quantities(perfmodel.feature_matrix(ter, FEATURES))["runtime_ms"]},
               "roofline": roofline_predict(roofline_fit(trr), ter),
               "paper": paper_predict(paper_models(trr, trp, seed, n_jobs), ter)}
        for meth, d in got.items():
            for t, v in d.items():
                pred[meth][t][te] = v
    return {"pred": pred, "folds": folds}


def choice_eval(rows, pred_t, pred_e=None, sm_count=132, wgmma=True, margin: float = 0.0) -> dict:
    """Per problem with every candidate measured: the measured runtime of the pick by predicted
    runtime, of the table's pick and of the best (oracle); with energy predictions, the energy
    objective's pick (lowest predicted energy within 5 % of the fastest predicted). The table is
    the one among the modeled tiles (choice.table_pick modeled: its WPF = 0 tiles are not
    candidates)."""
    by: dict = {}
    for i, r in enumerate(rows):
        by.setdefault((r["m"], r["n"], r["k"], r["group"]), {})[r["config"]] = i
    out = []
    for (m, n, k, g), idx in by.items():
        cands = [config_key(*c) for c in choice.candidates(m, wgmma)]
        if not set(cands) <= set(idx):
            continue
        ii = [idx[c] for c in cands]
        t = np.array([rows[i]["runtime_ms"] for i in ii])
        table = cands.index(config_key(*choice.table_pick(m, n, g, sm_count, wgmma, modeled=True)))
        # the learned policy's own candidates (choice.learned_candidates; none: the table's pick)
        own = [cands.index(config_key(*c)) for c in choice.learned_candidates(m, wgmma)]
        learned = table
        if own:
            sub = np.asarray(ii)[own]
            learned = own[choice.select(pred_t[sub], None, "time", own.index(table) if table in own else None,
                                        margin)]
        rec = {"m": m, "n": n, "k": k, "oracle": float(t.min()), "learned": float(t[learned]), "table": float(t[table]),
               "tuned": (m, k, n) in TUNED, "llm": rows[ii[0]].get("source") == "llm"}
        e = [rows[i].get("energy_mj") for i in ii]
        if pred_e is not None and all(v is not None for v in e) and np.isfinite(pred_e[ii]).all():
            je = own[choice.select(pred_t[sub], pred_e[sub], "energy")] if own else table
            rec.update(e_time_pick=float(e[learned]), e_energy_pick=float(e[je]), t_energy_pick=float(t[je]),
                       e_oracle=float(min(e)))
        out.append(rec)
    return summarize_choice(out)


def summarize_choice(recs) -> dict:
    if not recs:
        return {"n": 0}

    def gm(x):
        return float(np.exp(np.mean(np.log(x))))
    o = np.array([r["oracle"] for r in recs])
    lt = np.array([r["learned"] for r in recs])
    tb = np.array([r["table"] for r in recs])
    s = {"n": len(recs), "learned_vs_oracle": gm(o / lt), "table_vs_oracle": gm(o / tb),
         "learned_vs_table": gm(tb / lt), "learned_within_3pct": float(np.mean(lt <= 1.03 * o)),
         "worst_learned_vs_oracle": float((o / lt).min())}
    tuned = [r for r in recs if r["tuned"]]
    if tuned:
        s["tuned_n"] = len(tuned)
        s["tuned_worst_slowdown_vs_table"] = float(max(r["learned"] / r["table"] for r in tuned) - 1)
    en = [r for r in recs if "e_energy_pick" in r]
    if en:
        s["energy_n"] = len(en)
        s["energy_saved"] = 1 - gm([r["e_energy_pick"] / r["e_time_pick"] for r in en])
        s["energy_time_cost"] = gm([r["t_energy_pick"] / r["learned"] for r in en]) - 1
        s["energy_oracle_saved"] = 1 - gm([r["e_oracle"] / r["e_time_pick"] for r in en])
    return s


# fit command -----------------------------------------------------------------

def _fmt(v, spec=".3f"):
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _pct(v):
    return "—" if v is None or not np.isfinite(v) else f"{100 * v:.1f} %"


def accuracy_table(rows, pred, by_family=False) -> list[str]:
    lines = ["| method | family | target | n | R² | R² (log) | median abs % err | mean abs % err |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    fams = (None,) + (FAMILIES if by_family else ())
    for meth in pred:
        for fam in fams:
            sel = np.array([fam is None or r["kernel"] == fam for r in rows])
            if not sel.any():
                continue
            for t, col in (("runtime_ms", "runtime_ms"), ("power_w", "power_w"), ("energy_mj", "energy_mj")):
                y = np.array([np.nan if r.get(col) is None else r[col] for r in rows], float)
                mm = metrics(y[sel], pred[meth][t][sel], log=t != "power_w")
                if mm.get("n", 0) < 2:
                    continue
                lines.append(f"| {meth} | {fam or 'all'} | {t} | {mm['n']} | {_fmt(mm['r2'])} | "
                             f"{_fmt(mm.get('r2_log'))} | {_pct(mm['median_ape'])} | {_pct(mm['mean_ape'])} |")
    return lines


def choice_lines(s: dict) -> list[str]:
    if not s.get("n"):
        return ["(no problem in this data has every candidate measured)"]
    lines = ["| held-out problems | learned / best | table / best | learned vs table | learned within 3 % of best "
             "| worst learned / best |", "|---:|---:|---:|---:|---:|---:|",
             f"| {s['n']} | {_fmt(s['learned_vs_oracle'])} | {_fmt(s['table_vs_oracle'])} | "
             f"{_fmt(s['learned_vs_table'])} | {_pct(s['learned_within_3pct'])} | "
             f"{_fmt(s['worst_learned_vs_oracle'])} |"]
    lines.append("")
    lines.append("Throughput ratios are geometric means of measured runtime(best) / runtime(pick) (1 = the "
                 "exhaustive best); learned vs table = runtime(table) / runtime(learned).")
    if "tuned_n" in s:
        lines.append(f"On the {s['tuned_n']} shapes the table was tuned for (engine/bench/gemm.py TUNE_CASES): "
                     f"worst learned slowdown vs the table {_pct(s['tuned_worst_slowdown_vs_table'])} "
                     f"(negative: faster).")
    if "energy_n" in s:
        lines.append(f"Objective energy on {s['energy_n']} held-out power problems: energy saved vs the time pick "
                     f"{_pct(s['energy_saved'])} (geomean), runtime cost {_pct(s['energy_time_cost'])}; the lowest "
                     f"measured energy would save {_pct(s['energy_oracle_saved'])}.")
    return lines


def fit(csv_path, model_out=None, md_out=None, n_trees: int = 64, folds: int = 5, seed: int = 0,
        random_split_too: bool = True, plot: bool = True, n_jobs: int = 1, min_leaf: int = 3) -> dict:
    """Cross-validate by shape, fit the shipped forests on every row, export, write the report."""
    sklearn, *_ = _sk()
    paths = [csv_path] if isinstance(csv_path, (str, Path)) else list(csv_path)
    meta, rows = read_csv(paths[0])
    for extra in paths[1:]:                # further collections of the same device (the check below)
        rows += read_csv(extra)[1]
    csv_path = " ".join(str(p) for p in paths)
    dev = meta.get("device") or {"name": rows[0]["device"], "sm_count": 132, "cc": 90}
    names = {r["device"] for r in rows}
    if len(names) != 1 or dev["name"] not in names:
        raise BenchError(f"perf fit: {csv_path} mixes devices or disagrees with its header: {sorted(names)}")
    prow = [r for r in rows if r.get("power_w") is not None]
    cv = cross_validate(rows, folds, n_trees, seed, n_jobs=n_jobs, min_leaf=min_leaf)
    pred = cv["pred"]
    wg = any(r["kernel"] == "wgmma" for r in rows)
    ch = choice_eval(rows, pred["ours"]["runtime_ms"], pred["ours"]["energy_mj"], dev["sm_count"], wg)
    ch_roof = choice_eval(rows, pred["roofline"]["runtime_ms"], None, dev["sm_count"], wg)
    ch_paper = choice_eval(rows, pred["paper"]["runtime_ms"], None, dev["sm_count"], wg)
    rnd = cross_validate(rows, folds, n_trees, seed, random_split=True, n_jobs=n_jobs,
                         min_leaf=min_leaf)["pred"] if random_split_too else None
    # the shipped model: every row
    rf_t, tf = fit_forest(rows, TARGETS_TIME, n_trees=n_trees, seed=seed, n_jobs=n_jobs, min_leaf=min_leaf)
    forests = {"time": tf}
    if len(prow) >= 4:
        forests["power"] = fit_forest(prow, TARGETS_POWER, n_trees=n_trees, seed=seed, n_jobs=n_jobs,
                                      min_leaf=min_leaf)[1]
    configs = {}
    for r in rows:
        configs.setdefault(r["config"], {"regs": int(r["regs"]), "occ": int(r["occ"])})
    date = _dt.date.today().isoformat()
    slug = perfmodel.device_slug(dev["name"])
    mmeta = {"device": {k: dev[k] for k in ("name", "sm_count", "cc") if k in dev}, "feature_names": list(FEATURES),
             "families": sorted({r["kernel"] for r in rows}), "configs": configs, "date": date,
             "groups": sorted({int(r["group"]) for r in rows}),
             "sklearn": sklearn.__version__, "csv": " ".join(Path(p).name for p in paths), "rows": len(rows), "power_rows": len(prow),
             "n_trees": n_trees, "min_leaf": min_leaf, "seed": seed,
             "cv": {"runtime": metrics([r["runtime_ms"] for r in rows], pred["ours"]["runtime_ms"], True)}}
    model_out = Path(model_out) if model_out else perfmodel.shipped_path(dev["name"])
    model_out.parent.mkdir(parents=True, exist_ok=True)
    perfmodel.save(model_out, mmeta, forests)
    n_prob = len(set(problem_groups(rows)))
    lines = [f"# GEMM performance model, {dev['name']}, {date}", "",
             f"`python -m engine.bench perf fit {csv_path}`: {len(rows)} rows ({len(prow)} with power) over "
             f"{n_prob} (M, N, K) problems; scikit-learn {sklearn.__version__}; {n_trees} trees, >= {min_leaf} rows a "
             f"leaf, half the features a split. Held out: "
             f"{len(cv['folds'])}-fold GroupKFold by (M, N, K) — no problem is in both a fold's training and "
             f"test rows. ours: RandomForestRegressor on {len(FEATURES)} features (log(runtime / t_roof) on every "
             f"row; log(runtime / t_roof), power, log(energy / t_roof) multi-output on the power rows; t_roof a "
             f"fixed nominal roofline, engine/gpu/perfmodel.py); roofline: max(bytes/bw, "
             f"flops/peak) + t0 and power linear in the two utilisations, per family, fitted on the training "
             f"folds; paper: GPPerf's MultiOutputRegressor(RF(100, depth 6)) on {', '.join(PAPER_FEATURES)}; "
             f"ours-abs: ours on log runtime itself instead of its ratio to t_roof (an ablation). "
             f"Model file: {model_out.name} ({model_out.stat().st_size / 1e6:.1f} MB).", "",
             "## Accuracy on held-out shapes", ""]
    lines += accuracy_table(rows, pred)
    lines += ["", "## Ours by kernel family (held-out shapes)", ""]
    lines += accuracy_table(rows, {"ours": pred["ours"]}, by_family=True)[0:2] + \
        [ln for ln in accuracy_table(rows, {"ours": pred["ours"]}, by_family=True)[2:] if "| all |" not in ln]
    if rnd is not None:
        lines += ["", "## For comparison only: a random row split (the paper's protocol; shapes leak)", ""]
        lines += accuracy_table(rows, {"ours": rnd["ours"], "paper": rnd["paper"]})
    lines += ["", f"The paper (random split, CUTLASS SIMT on an RTX 4070): runtime {PAPER_REF['runtime_ms']}; "
              f"power {PAPER_REF['power_w']}.", "", "## Kernel choice on held-out shapes (measured runtimes)", ""]
    lines += [f"ours, plain argmin (margin 0; the engine's rule, choice.TABLE_MARGIN = {choice.TABLE_MARGIN}, is "
              "among the rows below):", ""] + choice_lines(ch) + ["", "roofline picks:", ""] + choice_lines(ch_roof)[:3] + \
        ["", "paper-feature picks:", ""] + choice_lines(ch_paper)[:3]
    for mg in (0.02, 0.05):        # choice.TABLE_MARGIN candidates: keep the table's pick unless beaten by mg
        s2 = choice_eval(rows, pred["ours"]["runtime_ms"], None, dev["sm_count"], wg, margin=mg)
        lines += ["", f"ours, table kept unless another pick is predicted {100 * mg:.0f} % faster "
                  f"(choice.TABLE_MARGIN = {mg}):", ""] + choice_lines(s2)[:3] + [ln for ln in choice_lines(s2)
                                                                                if ln.startswith("On the")]
    md_out = Path(md_out) if md_out else RESULTS_DIR / f"{date}-perf-{slug}.md"
    md_out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(md_out, "x", flag="perf fit report") as f:
        f.write("\n".join(lines) + "\n")
    png = _plot(rows, pred["ours"], md_out.with_suffix(".png")) if plot else None
    print("\n".join(lines))
    print(f"perf fit: wrote {model_out}, {md_out}" + (f", {png}" if png else ""), file=sys.stderr)
    return {"model": str(model_out), "md": str(md_out), "png": png, "choice": ch, "pred": pred, "rf_time": rf_t,
            "forests": forests, "rows": rows, "folds": cv["folds"]}


def _plot(rows, pred, path):
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except Exception:
        return None
    fig, axs = plt.subplots(1, 3, figsize=(13, 4))
    for ax, t, lg in zip(axs, ("runtime_ms", "power_w", "energy_mj"), (True, False, True)):
        y = np.array([np.nan if r.get(t) is None else r[t] for r in rows], float)
        for fam in FAMILIES:
            s = np.array([r["kernel"] == fam for r in rows]) & np.isfinite(y) & np.isfinite(pred[t])
            if s.any():
                ax.scatter(y[s], pred[t][s], s=3, alpha=0.5, label=fam)
        ok = np.isfinite(y) & np.isfinite(pred[t])
        if ok.any():
            lo, hi = np.nanmin(y[ok]), np.nanmax(y[ok])
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.5)
        if lg:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"measured {t}")
        ax.set_ylabel(f"predicted {t} (held-out shapes)")
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- report (CPU)

def report(model_path, csv_path=None, md_out=None) -> dict:
    """The model file's metadata; with a CSV, its picks (NumPy evaluation, as the engine makes
    them) against the table's and the measured best on that CSV's problems."""
    try:
        model = perfmodel.load(model_path)
    except perfmodel.PerfModelError as e:
        raise BenchError(str(e)) from None
    m = model.meta
    lines = [f"# GEMM performance model {Path(model_path).name}", "",
             f"device {m['device']['name']} ({m['device']['sm_count']} SMs), fitted {m['date']} with scikit-learn "
             f"{m['sklearn']} on {m['csv']} ({m['rows']} rows, {m['power_rows']} with power); families "
             f"{', '.join(m['families'])}; {len(m['configs'])} configurations; forests: "
             + ", ".join(f"{k} ({len(f.offsets) - 1} trees, {len(f.left)} nodes)" for k, f in model.forests.items())]
    s = None
    if csv_path:
        meta, rows = read_csv(csv_path)
        rows = [r for r in rows if r["config"] in model.configs]
        if rows and rows[0]["device"] != model.device:
            raise BenchError(f"perf report: {csv_path} was measured on {rows[0]['device']!r}, the model on "
                             f"{model.device!r}")
        feats = [model.features_of(*parse_key(r["config"]), r["m"], r["n"], r["k"], r["group"]) for r in rows]
        p = model.predict(feats) if rows else {"runtime_ms": np.array([])}
        wg = any(r["kernel"] == "wgmma" for r in rows)
        s = choice_eval(rows, p["runtime_ms"], p.get("energy_mj"), m["device"]["sm_count"], wg,
                        margin=choice.TABLE_MARGIN)
        lines += ["", f"## Picks on {Path(csv_path).name} (choice.TABLE_MARGIN = {choice.TABLE_MARGIN})", ""] + \
            choice_lines(s)
        lines += ["", "## Accuracy on that CSV", ""] + accuracy_table(rows, {"model": {
            "runtime_ms": p["runtime_ms"], "power_w": p.get("power_w", np.full(len(rows), np.nan)),
            "energy_mj": p.get("energy_mj", np.full(len(rows), np.nan))}})
    text = "\n".join(lines)
    print(text)
    if md_out:
        with atomic_file(md_out, "x", flag="perf report") as f:
            f.write(text + "\n")
    return {"text": text, "choice": s}


# ----------------------------------------------------------------------------- end to end, A/B

def ab(model_path=None, shape: str = "llama7b", lens=(512, 2048), batches=(1, 8), rounds: int = 5,
       reps: int = 5, md_out=None) -> list[dict]:
    """(GPU) One random model of `shape` prefilled and decoded under the table's and the learned
    choice in one process: each round runs both policies (order alternating), each timing
    `reps` prefills (median) and a 32-step graphed decode; the table gives the median over
    rounds per policy and phase, and learned / table."""
    import time  # noqa: PLC0415

    from ..gpu.backend import cupy_or_none  # noqa: PLC0415
    from ..gpu.model import CudaModel  # noqa: PLC0415
    from .e2e import LLAMA2_7B, SMOLLM2, _timed, random_model  # noqa: PLC0415
    cp = cupy_or_none()
    if cp is None:
        raise BenchError("perf ab needs a GPU (CuPy + CUDA device)")
    c = {"llama7b": LLAMA2_7B, "smollm2": SMOLLM2}[shape]
    gm = CudaModel(random_model(c, True))
    rng = np.random.default_rng(0)
    sync = cp.cuda.Device().synchronize
    saved = (choice.STATE.asked, choice.STATE.objective, choice.STATE.model_path)
    got: dict = {}
    used = model_path

    try:
        for r in range(rounds):
            for policy in (("table", "learned") if r % 2 == 0 else ("learned", "table")):
                choice.configure(policy, "time", model_path=model_path or "")
                if choice.resolve() != policy:
                    raise BenchError(f"perf ab: the learned choice is not usable here ({choice.STATE.note})")
                if policy == "learned":
                    used = choice.STATE.model.path
                for t in lens:
                    toks, cache = rng.integers(0, c.vocab_size, t), gm.new_cache(t)

                    def run(toks=toks, cache=cache):
                        cache.lens_host[:] = 0
                        gm.prefill(toks, cache)
                    s = _timed(cp, run, reps)                         # warm-up (picks, clocks), then the median
                    got.setdefault(("prefill", t, 1), {}).setdefault(policy, []).append(t / s)
                for b in batches:
                    cache = gm.new_cache(128 + 34, batch=b)
                    firsts = [int(gm.prefill(rng.integers(0, c.vocab_size, 128), cache, seq=i)[0].argmax())
                              for i in range(b)]
                    gm.decode_greedy(cache, firsts, 2)                # captures the step graph
                    cache.lens_host[:] = 128
                    sync()
                    t0 = time.perf_counter()
                    gm.decode_greedy(cache, firsts, 32)
                    got.setdefault(("decode", 32, b), {}).setdefault(policy, []).append(
                        32 * b / (time.perf_counter() - t0))
                    del cache
    finally:
        choice.configure(*saved[:2], model_path=saved[2] or "")
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    out, lines = [], [f"perf ab: {shape}-shaped random DGQ model on {name}; {rounds} rounds a policy "
                      f"(median of {reps} prefills each), median tokens/s over rounds; model "
                      f"{used}, TABLE_MARGIN "
                      f"{choice.TABLE_MARGIN}, LEARN_GEMV {choice.LEARN_GEMV}", "",
                      "| phase | tokens | batch | table | learned | learned / table | rounds: learned / table |",
                      "|---|---|---|---|---|---|---|"]
    for (phase, t, b), v in got.items():
        tt, tl = float(np.median(v["table"])), float(np.median(v["learned"]))
        each = " ".join(f"{a / b_:.3f}" for a, b_ in zip(v["learned"], v["table"]))
        out.append(dict(phase=phase, tokens=t, batch=b, table_tok_s=tt, learned_tok_s=tl, ratio=tl / tt,
                        table_all=v["table"], learned_all=v["learned"]))
        lines.append(f"| {phase} | {t} | {b} | {tt:.0f} | {tl:.0f} | {tl / tt:.3f} | {each} |")
    text = "\n".join(lines)
    print(text)
    if md_out:
        with atomic_file(md_out, "x", flag="perf ab --md") as f:
            f.write(text + "\n")
    return out


# ----------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("perf", help="learned runtime/power/energy model of the A8W4 GEMMs: collect | fit | report")
    ps = p.add_subparsers(dest="perf_cmd", required=True)
    c = ps.add_parser("collect", help="(GPU) time every configuration over the problem set; write bench/data CSV")
    c.add_argument("--budget-s", type=float, default=480.0, help="seconds of measurement (default 480)")
    c.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    c.add_argument("--seed", type=int, default=0, help="random shapes' seed (another seed: held-out shapes for report)")
    c.add_argument("--power-s", type=float, default=0.3, help="seconds each power point loops (>= 0.3)")
    c.add_argument("--power-frac", type=float, default=0.5,
                   help="share of the budget spent on power points (default 0.5)")
    c.add_argument("--out", metavar="PATH", help="CSV path (default bench/data/<device>-<date>-perf.csv)")
    c.set_defaults(func=cmd_collect, reps=1, needs_gpu=True)
    f = ps.add_parser("fit", help="(CPU, scikit-learn) fit and evaluate on held-out shapes; export the model")
    f.add_argument("csv", nargs="+", help="one or more `perf collect` CSVs of one device (rows are pooled)")
    f.add_argument("--model", metavar="PATH", help="model file (default engine/gpu/perf_models/<device>.npz)")
    f.add_argument("--md", metavar="PATH", help="report (default bench/results/<date>-perf-<device>.md)")
    f.add_argument("--trees", type=int, default=64, help="trees a forest (default 64)")
    f.add_argument("--min-leaf", type=int, default=3, help="rows a leaf at least (default 3; smaller: larger file)")
    f.add_argument("--folds", type=int, default=5)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--jobs", type=int, default=-1, help="fit in parallel (predictions stay sequential)")
    f.add_argument("--no-random-split", action="store_true", help="skip the random-row comparison")
    f.set_defaults(func=cmd_fit, reps=1, needs_gpu=False)
    r = ps.add_parser("report", help="(CPU) a model file's metadata and its picks on a CSV")
    r.add_argument("model")
    r.add_argument("--csv", metavar="PATH")
    r.add_argument("--md", metavar="PATH")
    r.set_defaults(func=cmd_report, reps=1, needs_gpu=False)
    a = ps.add_parser("ab", help="(GPU) end-to-end tokens/s of a random model, table vs learned choice")
    a.add_argument("--model", metavar="PATH", help="model file (default: the shipped one for this GPU)")
    a.add_argument("--shape", choices=("llama7b", "smollm2"), default="llama7b")
    a.add_argument("--rounds", type=int, default=5, help="alternating rounds a policy (default 5)")
    a.add_argument("--lens", default="512,2048", help="prefill lengths (default 512,2048)")
    a.add_argument("--batches", default="1,8", help="decode batches (default 1,8)")
    a.add_argument("--md", metavar="PATH", help="also write the table here")
    a.set_defaults(func=cmd_ab, reps=1, needs_gpu=True)


def cmd_collect(args) -> int:
    if args.power_s < 0.3:
        raise BenchError("--power-s must be at least 0.3 (the issue's floor for an NVML average)")
    if args.budget_s <= 0 or not 0 <= args.power_frac < 1:
        raise BenchError("--budget-s must be positive and --power-frac in [0, 1)")
    collect(args.out, args.budget_s, args.quick, args.seed, args.power_s, args.power_frac)
    return 0


def cmd_fit(args) -> int:
    if args.trees < 1 or args.folds < 2:
        raise BenchError("--trees must be >= 1 and --folds >= 2")
    fit(args.csv, args.model, args.md, args.trees, args.folds, args.seed, not args.no_random_split,
        n_jobs=args.jobs, min_leaf=args.min_leaf)
    return 0


def cmd_ab(args) -> int:
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    ints = {}
    for flag in ("lens", "batches"):
        try:
            ints[flag] = tuple(int(v) for v in getattr(args, flag).split(",") if v.strip())
        except ValueError:
            raise BenchError(f"--{flag} takes comma-separated integers, got {getattr(args, flag)!r}") from None
        if not ints[flag] or min(ints[flag]) < 1:
            raise BenchError(f"--{flag} takes positive integers, got {getattr(args, flag)!r}")
    ab(args.model, args.shape, ints["lens"], ints["batches"], rounds=args.rounds, md_out=args.md)
    return 0


def cmd_report(args) -> int:
    report(args.model, args.csv, args.md)
    return 0
