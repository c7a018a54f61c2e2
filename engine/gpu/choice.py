"""Which A8W4 GEMM configuration runs a call: the hand-made table, the learned model, or a
measurement of every candidate (docs/PERFMODEL.md).

Policies (flags.KERNEL_CHOICE, DGQ_KERNEL_CHOICE; `configure(...)` from the API):
  table        tuning.GEMM, exactly as before (gpu/ops.py choose_kernel, tuning.gemv_choice)
  learned      the candidate with the lowest predicted runtime (objective "time"), or the lowest
               predicted energy among those predicted within 5 % of the fastest ("energy"), from
               the device's model file (perfmodel.py); the default when that file exists
  exhaustive   time every candidate once per shape on first use (CUDA events) and keep the fastest
A model is used only for the device it names (kernels.device_info()["name"]) and only when it
saw every candidate configuration of a shape; otherwise the table decides, and the reason is
said once (a PerfModelWarning). Picks are memoised per (M, N, K, group).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from . import flags, kernels, perfmodel
from .perfmodel import PerfModelError, config_key
from .tuning import (GEMM, GEMV_CFGS, GEMV_WIDE, MMA_CFGS, WGMMA_CFGS, WGMMA_UNMODELED, gemv_bound, gemv_choice,
                     wgmma_cfg, wsm_tile)

POLICIES = ("table", "learned", "exhaustive")
OBJECTIVES = ("time", "energy")
ENERGY_SLACK = 0.05          # objective energy: within 5 % of the fastest predicted runtime
# objective time: keep the table's pick unless another is predicted this much faster (0: the
# plain argmin; `perf fit` reports the pick's quality at 0, 2 and 5 %). H200, 2026-12-02
# (bench/results/2026-12-02-perf-nvidia-h200.md): at 0 the worst pick on the table's own tuned
# shapes was 7.5 % slower than the table; at 0.02 and 0.05 none was, and the held-out geomean
# was 0.972 of the exhaustive best at both (0.979 when the model also picks GEMVs, LEARN_GEMV). 0.05: at 0.02 the 7B prefill's o_proj at M = 512
# took a pick predicted 4.5 % faster and the prefill measured 0.990 of the table's
# (bench/results/2026-12-02-perf-ab-h200.md), inside the model's median error
TABLE_MARGIN = 0.05
# learned: whether the model also weighs the GEMV family (learned_candidates). Off: on the H200
# the learned GEMV picks decoded the 7B-shaped model 1.5-1.9 % slower than the table's, whose
# GEMV choices were tuned on whole decode steps (PDL overlap, fused variants), and the GEMV is the
# family the model predicts worst (runtime R² 0.925, where configurations differ by a few per
# cent). So the decode (M ≤ tuning.gemv_bound) runs the table's GEMV, and above it the model
# chooses among the mma/wgmma tiles only.
LEARN_GEMV = False


class ChoiceError(ValueError):
    """An unknown policy or objective."""


class PerfModelWarning(UserWarning):
    """The learned choice cannot be used here; the table decides (said once per reason)."""


# ----------------------------------------------------------------------------- candidates

def gemv_mt(m: int) -> int:
    return 1 if m <= 8 else 2 if m <= 16 else 4            # gpu/ops.py gemv_mt


def candidates(m: int, wgmma: bool, gemv_only: bool = False, unmodeled: bool = False) -> list[tuple[str, dict]]:
    """Every configuration the learned and exhaustive choices weigh for M rows (and that
    `perf collect` times): the GEMV variants of M's token-tile bucket up to M = 32, mma.sync
    BM × stages × (auto, no) split-K from M = 16 (on sm_90 from above the table's GEMV range,
    tuning.gemv_bound), and on sm_90 the wgmma tiles (BT = 32 up to
    M = 32, BT = 64 up to M = 128, BT = 256 from M = 256) × (auto, no) split-K, less the tiles the
    shipped model has not timed (tuning.WGMMA_UNMODELED) unless unmodeled (the exhaustive policy
    times them too). Every pick of the table is among them, except a WPF = 0 tile of
    GEMM.wgmma_wsm (those M the learned policy leaves to the table)."""
    out = []
    if m <= 8 * max(GEMV_CFGS):
        mt = gemv_mt(m)
        out += [("gemv", {"mt": mt, "rw": rw, "u": u, "nw": 8}) for rw, u in GEMV_CFGS[mt]]
        out += [("gemv", {"mt": mt, "rw": rw, "u": u, "nw": 16}) for rw, u in GEMV_WIDE.get(mt, ())]
    if m >= 16 or m > gemv_bound(wgmma):
        for bm, st in MMA_CFGS:
            for sp in (None, 1):
                out.append(("mma", {"bm": bm, "stages": st, "splits": sp}))
        if wgmma:
            for bt, st, nwg, wpf, ovl in WGMMA_CFGS:
                if (bt < 64 and m > bt) or (bt == 64 and m > 128) or (bt == 256 and m < 256):
                    continue
                if not unmodeled and (bt, st, nwg, wpf, ovl) in WGMMA_UNMODELED:
                    continue
                for sp in (None, 1):
                    out.append(("wgmma", {"bt": bt, "stages": st, "nwg": nwg, "wpf": wpf, "ovl": ovl, "splits": sp}))
    if gemv_only:                                         # a residual add: the GEMV alone
        out = [c for c in out if c[0] == "gemv"]
    return out


def learned_candidates(m: int, wgmma: bool, gemv_only: bool = False) -> list[tuple[str, dict]]:
    """What the learned policy weighs for M rows; empty: the table decides. candidates(m) (only
    the GEMVs for a residual add, gemv_only), less the GEMV family unless LEARN_GEMV: nothing
    where the table runs the GEMV (M ≤ gemv_bound(wgmma), or gemv_only), no GEMV above it."""
    cands = candidates(m, wgmma, gemv_only)
    if LEARN_GEMV:
        return cands
    if gemv_only or m <= gemv_bound(wgmma):
        return []
    return [c for c in cands if c[0] != "gemv"]


def table_pick(m: int, n: int, group: int, sm_count: int, wgmma: bool, modeled: bool = False) -> tuple[str, dict]:
    """The configuration tuning.GEMM gives (gpu/ops.py choose_kernel, tuning.gemv_choice,
    wgmma_cfg), spelled out as an explicit cfg (at M = 1 it runs the dp4a GEMV, as the default);
    modeled: the table among the tiles the performance model knows (no WPF = 0 tile)."""
    rt = -(-n // 16)
    if m <= gemv_bound(wgmma):
        mt = gemv_mt(m)
        rw, u, nw, _ = gemv_choice(m, mt, rt <= GEMM.gemv_few_tiles_per_sm * sm_count, {})
        return "gemv", {"mt": mt, "rw": rw, "u": u, "nw": nw}
    if GEMM.use_wgmma and wgmma:
        c = wgmma_cfg(m, n, modeled)
        return "wgmma", c.as_cfg()
    return "mma", {"bm": GEMM.mma_bm_small if m <= GEMM.mma_small_max_m else 128, "stages": 4, "splits": None}


def select(t, e=None, objective: str = "time", table: int | None = None, margin: float | None = None) -> int:
    """The rule, on predicted runtimes t (and energies e) of the candidates: the fastest (the
    table's pick `table` while it is predicted within `margin` of it, default TABLE_MARGIN as it
    is at the call); with objective energy, the lowest energy among those predicted within
    ENERGY_SLACK of the fastest."""
    margin = TABLE_MARGIN if margin is None else margin
    best = min(range(len(t)), key=lambda i: t[i])
    if objective == "energy":
        near = [i for i in range(len(t)) if t[i] <= (1 + ENERGY_SLACK) * t[best]]
        return min(near, key=lambda i: (e[i], t[i]))
    if table is not None and margin > 0 and t[table] <= (1 + margin) * t[best]:
        return table
    return best


def learned_pick(model: perfmodel.PerfModel, m: int, n: int, k: int, group: int, cands: list, objective: str = "time",
                 table: int | None = None):
    """(index into cands, predictions) of the model's pick, or (None, reason) when a candidate
    is a configuration the model never saw. table: the index of the table's pick (TABLE_MARGIN)."""
    groups = model.meta.get("groups", [group])
    if group not in groups:
        return None, f"group size {group}: the model saw only {groups}"
    unseen = [config_key(kern, c) for kern, c in cands if config_key(kern, c) not in model.configs]
    if unseen:
        return None, f"configurations the model never saw: {', '.join(unseen[:4])}{' ...' if len(unseen) > 4 else ''}"
    rows = [model.features_of(kern, c, m, n, k, group) for kern, c in cands]
    pred = model.predict(rows)
    if objective == "energy" and "energy_mj" not in pred:
        return None, "the model has no power forest (objective energy)"
    return select(pred["runtime_ms"], pred.get("energy_mj"), objective, table), pred


# ----------------------------------------------------------------------------- the policy

class _State:
    def __init__(self):
        self.asked = flags.KERNEL_CHOICE       # "" = learned when the device's model exists
        self.objective = flags.OBJECTIVE
        self.model_path = flags.PERF_MODEL or None
        self.policy = None                     # resolved on first use (needs the device)
        self.model = None
        self.memo: dict = {}
        self.said: set = set()
        self.note = None                       # the last fallback message


STATE = _State()


def _say(msg: str) -> None:
    STATE.note = msg
    if msg not in STATE.said:
        STATE.said.add(msg)
        warnings.warn(msg, PerfModelWarning, stacklevel=3)


def _check(policy, objective):
    if policy not in ("",) + POLICIES:
        raise ChoiceError(f"kernel choice must be one of {', '.join(POLICIES)}, got {policy!r}")
    if objective not in OBJECTIVES:
        raise ChoiceError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def configure(policy: str | None = None, objective: str | None = None, model_path=None) -> None:
    """Set the policy ("" or None: learned when the device's model exists, else table), the
    objective and optionally a model file; resolved at the next GEMM (or by `resolve()`)."""
    policy = STATE.asked if policy is None else policy
    objective = STATE.objective if objective is None else objective
    _check(policy, objective)
    STATE.asked, STATE.objective = policy, objective
    if model_path is not None:
        STATE.model_path = str(model_path) or None
    STATE.policy, STATE.model, STATE.note = None, None, None
    STATE.memo.clear()


def load_for_device(path, device_name: str) -> perfmodel.PerfModel:
    """The model at path, checked against the device; PerfModelError names what is wrong."""
    model = perfmodel.load(path)
    if model.device != device_name:
        raise PerfModelError(f"performance model {path} was fitted on {model.device!r}, this GPU is "
                             f"{device_name!r}: run `python -m engine.bench perf collect` and `perf fit` here")
    return model


def resolve(device_name: str | None = None) -> str:
    """The effective policy on this device (loads and checks the model once)."""
    if STATE.policy is not None:
        return STATE.policy
    _check(STATE.asked, STATE.objective)       # DGQ_KERNEL_CHOICE / DGQ_OBJECTIVE are read at import
    asked = STATE.asked
    if asked in ("table", "exhaustive"):
        STATE.policy = asked
        return asked
    name = device_name or kernels.device_info()["name"]
    path = Path(STATE.model_path) if STATE.model_path else perfmodel.shipped_path(name)
    if not STATE.model_path and not path.is_file() and asked == "":
        STATE.policy = "table"                  # the default, silently: no model for this device
        return "table"
    try:
        STATE.model = load_for_device(path, name)
        STATE.policy = "learned"
    except PerfModelError as e:
        _say(f"{e}; the kernel table (engine/gpu/tuning.py) decides instead")
        STATE.policy = "table"
    return STATE.policy


def active() -> bool:
    """False when the table decides: gpu/ops.py then takes its old path unchanged."""
    return (STATE.policy or resolve()) != "table"


def wsm_defers(m: int, wgmma: bool, gemv_only: bool = False) -> bool:
    """Whether the learned policy leaves M rows to the table: with GEMM.wgmma_wsm, above the GEMV's
    range, where the table runs a WPF = 0 tile (tuning.wsm_tile). Those tiles are not in
    the shipped model (tuning.WGMMA_UNMODELED) and beat every tile it knows at M = 32 to 4096 on
    the 7B linears and 8192² (H200, same process, bench/results/2026-12-04-gemm-wsm-h200.md and
    2026-12-04-gemm-wsm-mid-h200.md)."""
    return wgmma and not gemv_only and m > gemv_bound(wgmma) and wsm_tile(m) is not None


def pick(m: int, n: int, k: int, group: int, gemv_only: bool = False, timer=None):
    """(kernel, cfg) for an A8W4 GEMM, or None for the table's choice. gemv_only: the call
    needs the GEMV (a residual add). timer(kernel, cfg) -> ms times one candidate (exhaustive)."""
    info = kernels.device_info()
    wgmma = info["cc"] == 90 and GEMM.use_wgmma
    # a change of the WPF = 0 table, of use_wgmma or of the GEMV's row bound (e2e --ab) is a new pick
    key = (m, n, k, group, gemv_only, wsm_tile(m), wgmma, gemv_bound(wgmma))
    hit = STATE.memo.get(key)
    if hit is not None:
        return hit[0]
    if (STATE.policy or resolve()) == "table":
        return None
    if STATE.policy == "learned" and wsm_defers(m, wgmma, gemv_only):
        STATE.memo[key] = (None,)
        return None
    if STATE.policy == "learned":
        cands = learned_candidates(m, wgmma, gemv_only)
    else:
        cands = candidates(m, wgmma, gemv_only, unmodeled=True)
    res = None
    if cands and STATE.policy == "learned":
        tp = table_pick(m, n, group, info["sm_count"], wgmma) if not gemv_only else None
        i, pred = learned_pick(STATE.model, m, n, k, group, cands, STATE.objective,
                               cands.index(tp) if tp in cands else None)
        if i is None:
            _say(f"performance model {STATE.model.path}: {pred}; the kernel table decides for those shapes")
        else:
            res = cands[i]
    elif cands and STATE.policy == "exhaustive":
        if timer is None:
            return None                        # not measurable here (e.g. inside a graph capture)
        times = [timer(kern, c) for kern, c in cands]
        res = cands[min(range(len(cands)), key=times.__getitem__)]
    STATE.memo[key] = (res,)
    return res
