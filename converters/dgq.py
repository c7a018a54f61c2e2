"""Per-layer weight quantizers: RTN UINT4 groups and the DGQ dual-grained search.

Notation (the DGQ paper's; layout in engine/formats/dg.py): a linear is y = x · Wᵀ,
W (N out, K in), groups of `group` consecutive input channels, G = ceil(K/group)
groups (the last one may be short). H = XᵀX (K, K) float64 is the Gram matrix of
the layer's calibration inputs X (T tokens, K): for any weight error d (N, K),
the output error is ‖X dᵀ‖² = Σ_n d[n] H d[n]ᵀ, so the searches below need H,
never X (the "Gram trick"; H is accumulated once per site by calibrate.py).

Choices the paper leaves open (documented in docs/FORMAT.md as well):
- The min/max of a group always include 0 (lo = min(w, 0), hi = max(w, 0)), so 0
  is exactly representable and a short last group can be zero-padded to `group`
  channels without changing its range (padded channels get code z, error 0, and
  their rows/cols of H are zero).
- Rounding is round-half-to-even (np.rint) everywhere.
- Phase 2 keeps the phase-1 codes (only clamped by the overflow guard), as the
  paper does; it does not re-round them at the effective scale S·s8.
- Both grids also contain r = 1 exactly (the RTN start), and the final choice per
  row is whichever of {searched, RTN start (r=1, r=1)} has the lower full-row
  objective (the float64 difference W − Ŵ times H in float32 products, ~1e-6 relative) — so
  the search is never worse than RTN on the objective.
- Both grids are evaluated with float32 products (2× faster BLAS; every product is of
  the size of the error, so the objectives agree with float64 to ~1e-6 relative); phase 2
  never forms one K x K product per ratio (_phase2_search: about 3 + the number of clamp
  levels a group passes, ~6 for Gaussian rows, instead of 81); on a GPU the direct 81
  products are faster (_phase2_dense).
"""
from __future__ import annotations

import numpy as np

from engine import formats
from engine.util.arrays import to_numpy, xp_of
from engine.formats import QMAX_I8, QMAX_U4, S_MAX, S_MIN

from . import gptq

# Clipping-ratio grids of the DGQ paper's two phases (r = 1.02 − 0.22·i/20, i = 1..20, and
# r = 1.02 − 0.82·i/80, i = 1..80), plus r = 1 (RTN).
PHASE1_RATIOS = np.concatenate([[1.0], 1.02 - 0.22 * np.arange(1, 21) / 20])   # (21,)
PHASE2_RATIOS = np.concatenate([[1.0], 1.02 - 0.82 * np.arange(1, 81) / 80])   # (81,)

# Rows per chunk are chosen so that one (rows, K) float64 temporary stays near
# this many elements (8 MiB·4): bounds memory for 7B-size layers, and is large
# enough that the BLAS calls run at full speed.
CHUNK_ELEMS = 1 << 22


class QuantizeError(ValueError):
    """A weight, Gram matrix or option that the quantizers cannot work with."""


# On a GPU the chunks are as large as memory allows: each one costs a Python loop over ratios
# and groups, whose launches would otherwise dominate (7B: ~200 s a layer with CPU-sized chunks).
GPU_CHUNK_ELEMS = 1 << 27


def _row_chunks(n: int, per_row: int, xp=np):
    step = max(1, (CHUNK_ELEMS if xp is np else GPU_CHUNK_ELEMS) // max(1, per_row))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _check_weight(W) -> np.ndarray:
    xp = xp_of(W)
    W = xp.asarray(W)
    if W.ndim != 2 or W.size == 0:
        raise QuantizeError(f"a weight must be a non-empty 2-D (N, K) array, got shape {W.shape}")
    if not xp.isfinite(W).all():
        raise QuantizeError("the weight holds NaN or Inf values")
    return W


def _check_gram(H, k: int) -> np.ndarray:
    xp = xp_of(H)
    H = xp.asarray(H)
    if H.shape != (k, k):
        raise QuantizeError(f"Gram matrix has shape {H.shape}, expected ({k}, {k})")
    if not xp.isfinite(H).all():
        raise QuantizeError("the Gram matrix holds NaN or Inf values")
    return H


# ----------------------------------------------------------------------------- groups

def to_groups(W: np.ndarray, group: int) -> np.ndarray:
    """(N, K) -> (N, G, group) float64, the short last group zero-padded."""
    xp = xp_of(W)
    n, k = W.shape
    G = formats.n_groups(k, group)
    Wp = xp.zeros((n, G * group), dtype=xp.float64)
    Wp[:, :k] = W
    return Wp.reshape(n, G, group)


def from_groups(a: np.ndarray, k: int) -> np.ndarray:
    """(N, G, group) -> (N, K), dropping the padding."""
    return a.reshape(a.shape[0], -1)[:, :k]


def h_blocks(H: np.ndarray, group: int) -> np.ndarray:
    """The diagonal (group, group) blocks of H, zero-padded: (G, group, group) float64."""
    xp = xp_of(H)
    k = H.shape[0]
    G = formats.n_groups(k, group)
    Hp = xp.zeros((G * group, G * group), dtype=xp.float64)
    Hp[:k, :k] = H
    idx = xp.arange(G)
    return Hp.reshape(G, group, G, group)[idx, :, idx, :]       # (G, g, g)


def group_range(Wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lo = min(w, 0), hi = max(w, 0) per group: two (N, G) arrays."""
    xp = xp_of(Wg)
    return xp.minimum(Wg.min(axis=-1), 0.0), xp.maximum(Wg.max(axis=-1), 0.0)


def group_params(lo: np.ndarray, hi: np.ndarray, r) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric UINT4 scale and zero point at clipping ratio r: s (N, G) f64, z (N, G) f64.

    s = r·(hi − lo)/15, z = clamp(round(−r·lo/s), 0, 15). An all-zero group gets
    s = 1 (any positive value works: its codes are all z and dequantize to 0).
    """
    xp = xp_of(lo)
    r = xp.asarray(r, dtype=xp.float64)
    if r.ndim == 1:
        r = r[:, None]                                                   # per-row ratio
    s = r * (hi - lo) / QMAX_U4                                          # (N, G)
    s = xp.where(s > 0, s, 1.0)
    z = xp.clip(xp.rint(-r * lo / s), 0, QMAX_U4)                        # (N, G)
    return s, z


def group_codes(Wg: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """q = clamp(round(w / s) + z, 0, 15): (N, G, group) float64 holding integers."""
    xp = xp_of(Wg)
    return xp.clip(xp.rint(Wg / s[..., None]) + z[..., None], 0, QMAX_U4)


def rtn_w4(W, group: int = formats.DEFAULT_GROUP):
    """Round-to-nearest asymmetric per-group min-max UINT4.

    Returns codes (N, K) uint8, zeros (N, G) uint8, scales (N, G) float32 with
    W ≈ (codes − zeros[:, k//group]) · scales[:, k//group]. Handles K % group ≠ 0.
    """
    W = _check_weight(W)
    n, k = W.shape
    codes = np.empty((n, k), dtype=np.uint8)
    G = formats.n_groups(k, group)
    zeros = np.empty((n, G), dtype=np.uint8)
    scales = np.empty((n, G), dtype=np.float32)
    for a, b in _row_chunks(n, G * group):
        Wg = to_groups(W[a:b], group)                                    # (n, G, g)
        s, z = group_params(*group_range(Wg), 1.0)
        codes[a:b] = from_groups(group_codes(Wg, s, z), k)
        zeros[a:b] = z
        scales[a:b] = s
    return codes, zeros, scales


# ----------------------------------------------------------------------------- DGQ phase 1

def phase1(W, Hb: np.ndarray | None, group: int, ratios=PHASE1_RATIOS):
    """Fine grain: per (row, group) the clipping ratio minimising the group's output error.

    W (N, K); Hb (G, g, g) from h_blocks(H) — or None for plain RTN (r = 1).
    Returns codes (N, K) f64, z (N, G) f64, s (N, G) f64, r (N, G) f64.
    The objective of group g in row n is (w − ŵ) H_g (w − ŵ)ᵀ = ‖X_g (w − ŵ)ᵀ‖²
    over ALL calibration tokens (the reference code's last-batch-only H is a bug).
    """
    xp = xp_of(W)
    W = _check_weight(W)
    n, k = W.shape
    G = formats.n_groups(k, group)
    if Hb is None:
        ratios = np.array([1.0])
    elif Hb.shape != (G, group, group):
        raise QuantizeError(f"Gram blocks have shape {Hb.shape}, expected ({G}, {group}, {group})")
    Hb32 = None if Hb is None else Hb.astype(xp.float32)
    codes = xp.empty((G, n, group))
    z_out = xp.empty((G, n))
    s_out = xp.empty((G, n))
    r_out = xp.empty((G, n))
    for a, b in _row_chunks(n, G * group * 4, xp):
        # Group-major (G, n, g) so that each group's (n, g) @ (g, g) product is one contiguous GEMM.
        Wg = xp.ascontiguousarray(to_groups(W[a:b], group).transpose(1, 0, 2))   # (G, n, g)
        lo, hi = group_range(Wg)                                                   # (G, n)
        best = None
        for r in ratios:
            s, z = group_params(lo, hi, r)                                         # (G, n)
            q = group_codes(Wg, s, z)                                              # (G, n, g)
            if Hb is None:
                codes[:, a:b], z_out[:, a:b], s_out[:, a:b], r_out[:, a:b] = q, z, s, r
                break
            D = (Wg - (q - z[..., None]) * s[..., None]).astype(xp.float32)        # (G, n, g)
            err = xp.einsum("gni,gni->gn", D @ Hb32, D)                            # (G, n)
            if best is None:
                best = err
                codes[:, a:b], z_out[:, a:b], s_out[:, a:b], r_out[:, a:b] = q, z, s, r
                continue
            better = err < best                                                    # (G, n)
            best = xp.where(better, err, best)
            codes[:, a:b] = xp.where(better[..., None], q, codes[:, a:b])
            z_out[:, a:b] = xp.where(better, z, z_out[:, a:b])
            s_out[:, a:b] = xp.where(better, s, s_out[:, a:b])
            r_out[:, a:b] = xp.where(better, r, r_out[:, a:b])
    return from_groups(codes.transpose(1, 0, 2), k), z_out.T.copy(), s_out.T.copy(), r_out.T.copy()


# ----------------------------------------------------------------------------- DGQ phase 2

def phase2_params(w_absmax, s_g, z, codes, r, group: int):
    """Coarse grain at per-row ratio r (N,): s8 (N,) f64, S (N, G) f64, clamped codes (N, K) f64.

    s8 = r·max|W[n,:]|/127, S = clamp(round(s_g/s8), 1, 127); overflow guard
    m = floor(127/S): codes clamped to [max(0, z−m), min(15, z+m)] so that
    |q − z|·S ≤ 127 always (formats.check_no_overflow).
    """
    xp = xp_of(codes)
    k = codes.shape[1]
    gi = xp.asarray(formats.group_index(k, group))
    s8, S = _steps(w_absmax, s_g, xp.asarray(r, dtype=xp.float64))      # (N,), (N, G)
    m = xp.floor(QMAX_I8 / S)                                           # (N, G)
    lo = xp.maximum(z - m, 0)[:, gi]                                    # (N, K)
    hi = xp.minimum(z + m, QMAX_U4)[:, gi]                              # (N, K)
    return s8, S, xp.clip(codes, lo, hi)


def _steps(w_absmax, s_g, r):
    """s8 = r·max|W[n,:]|/127 (N,) and S = clamp(round(s_g/s8), 1, 127) (N, G) at ratio r (a
    scalar or one per row): the one definition phase2_params and the phase-2 grid share."""
    xp = xp_of(s_g)
    amax = xp.where(w_absmax > 0, w_absmax, float(QMAX_I8))             # all-zero row: any s8
    s8 = r * amax / QMAX_I8                                             # (N,)
    return s8, xp.clip(xp.rint(s_g / s8[:, None]), S_MIN, S_MAX)


def dg_int8(codes, z, S, group: int) -> np.ndarray:
    """W8 = (q − z)·S: (N, K) float array holding integers in [−127, 127]."""
    xp = xp_of(codes)
    gi = xp.asarray(formats.group_index(codes.shape[1], group))
    return (codes - z[:, gi]) * S[:, gi]


def row_objective(W, W_hat, H, dtype=np.float64) -> np.ndarray:
    """‖X (W[n] − Ŵ[n])ᵀ‖² per row = d H dᵀ: (N,) float64."""
    xp = xp_of(W_hat)
    d = (xp.asarray(W, dtype=xp.float64) - W_hat).astype(dtype, copy=False)  # (N, K)
    return xp.einsum("nk,nk->n", d @ H.astype(dtype, copy=False), d).astype(xp.float64)


def phase2(W, H: np.ndarray | None, codes, z, s_g, group: int, ratios=PHASE2_RATIOS):
    """Coarse grain: per row the ratio minimising ‖X (W[n] − s8·W8[n])ᵀ‖² with the full H.

    Returns s8 (N,) f64, S (N, G) f64, clamped codes (N, K) f64, r (N,), err (N,)
    (err is the searched objective, _phase2_search; NaN when H is None, i.e. r = 1 only).
    """
    xp = xp_of(W)
    W = _check_weight(W)
    n, k = W.shape
    amax = xp.abs(W).max(axis=1).astype(xp.float64)                      # (N,)
    r_out = xp.ones(n)
    e_out = xp.full(n, xp.nan)
    if H is not None:
        G = formats.n_groups(k, group)
        Hp = xp.zeros((G * group, G * group), dtype=xp.float32)
        Hp[:k, :k] = H
        gi = xp.asarray(formats.group_index(k, group))
        search = _phase2_search if xp is np else _phase2_dense
        for a, b in _row_chunks(n, G * group, xp):
            w = to_groups(W[a:b], group).reshape(b - a, -1)              # (n, Kp) f64, zero-padded
            qz = to_groups(codes[a:b] - z[a:b][:, gi], group)            # (n, G, g)
            r_out[a:b], e_out[a:b] = search(w, qz, amax[a:b], s_g[a:b], Hp, ratios)
    s8, S, qc = phase2_params(amax, s_g, z, codes, r_out, group)
    return s8, S, qc, r_out, e_out


def _grid(amax, s_g, ratios):
    """(r, s8 (n,), S (n, G)) at each ratio of the phase-2 grid (_steps)."""
    for r in ratios:
        yield (r, *_steps(amax, s_g, r))


def _phase2_search(w, qz, amax, s_g, Hp, ratios):
    """The phase-2 grid search of one chunk of rows, exact without one K x K product per ratio.

    w (n, Kp) f64 and H (Kp, Kp) float32 zero-padded to whole groups; qz = q − z (n, G, g).
    At ratio r a group's step is a_g = s8·S_g and its codes c_g = clamp(qz_g, ±m_g), m = floor(127/S).
    With d0 = w − s_g·qz (phase 1's error), β = s_g − a and the clamp residual e = qz − c, the row's
    error is d0 + Σ_g (β_g qz_g + a_g e_g), so

        f(r) = d0 H d0ᵀ + 2 β·Lq + 2 a·Le + βᵀ P β + 2 βᵀ R a + aᵀ E a

    with per-group products Lq_g = qz_g·(H d0)_g, Le_g = e_g·(H d0)_g, P_gh = qz_g H_gh qz_hᵀ,
    R_gh = qz_g H_gh e_hᵀ, E_gh = e_g H_gh e_hᵀ (n, G, G; kept only up to
    transposition, which aᵀEa cannot see). Only e depends on r, and only through
    min(m_g, max|qz_g|), which changes a few times a group over the grid: R, E and Le are updated
    for those (row, group) pairs alone, with one (rows, g) x (g, Kp) product per group. The cost is
    about 3 + (level changes a group) products of the rows with H, instead of one per ratio
    (81); every term is of the size of the error, so float32 products lose nothing that matters
    (the objective agrees with a float64 dense d H dᵀ to ~1e-6 relative, tests/test_quantize.py).
    Ties keep the earlier ratio. Returns r (n,) and the objective at it (n,).
    """
    xp = xp_of(w)
    n, G, g = qz.shape
    Kp = G * g
    f64, f32 = xp.float64, xp.float32
    d0 = w - (s_g[:, :, None] * qz).reshape(n, Kp)                        # (n, Kp)
    v = (d0.astype(f32) @ Hp).astype(f64)                                 # (n, Kp) H d0
    f0 = xp.einsum("nk,nk->n", d0, v)
    Lq = xp.einsum("ngi,ngi->ng", qz, v.reshape(n, G, g))
    qz32 = qz.astype(f32)
    P = xp.empty((n, G, G))
    for h in range(G):
        Y = (qz32[:, h] @ Hp[h * g:(h + 1) * g]).reshape(n, G, g)         # qz_h H_h,:
        P[:, h] = xp.einsum("ngi,ngi->ng", Y, qz32)
    R, E, Le = xp.zeros((n, G, G)), xp.zeros((n, G, G)), xp.zeros((n, G))
    mag, sign = xp.abs(qz32), xp.sign(qz32)                               # (n, G, g)
    top = mag.max(axis=2).astype(f64)                                     # (n, G) max|qz|
    level = top.copy()                                                    # no clamp yet
    e = xp.zeros((n, G, g), dtype=f32)
    vg = v.reshape(n, G, g)
    best = xp.full(n, xp.inf)
    r_best = xp.ones(n)
    for r, s8, S in _grid(amax, s_g, ratios):
        new_level = xp.minimum(xp.floor(QMAX_I8 / S), top)
        changed = new_level != level
        if changed.any():
            e_new = e.copy()
            e_new[changed] = sign[changed] * xp.maximum(mag[changed] - new_level[changed][:, None].astype(f32), 0)
            for h in to_numpy(xp.flatnonzero(changed.any(axis=0))).tolist():
                rows = xp.flatnonzero(changed[:, h])
                Z = ((e_new[rows, h] - e[rows, h]) @ Hp[h * g:(h + 1) * g]).reshape(-1, G, g)
                R[rows, :, h] += xp.einsum("rgi,rgi->rg", Z, qz32[rows])
                # E' − E = Δe_h H e'ᵀ (row h) + e H Δe_hᵀ (column h); aᵀEa only needs E up to
                # transposition, so both go into row h: one pass over Z instead of two.
                E[rows, h, :] += xp.einsum("rgi,rgi->rg", Z, e_new[rows] + e[rows])
            Le[changed] = xp.einsum("pi,pi->p", e_new[changed], vg[changed])
            e, level = e_new, new_level
        a = s8[:, None] * S                                               # (n, G) steps
        beta = s_g - a
        # βᵀPβ + 2βᵀRa + aᵀEa as two-operand contractions (5x faster than three-operand ones)
        t = 2 * Lq + xp.einsum("ngh,nh->ng", P, beta) + 2 * xp.einsum("ngh,nh->ng", R, a)
        f = f0 + xp.einsum("ng,ng->n", beta, t) + xp.einsum("ng,ng->n", a, 2 * Le + xp.einsum("ngh,nh->ng", E, a))
        better = f < best
        best = xp.where(better, f, best)
        r_best = xp.where(better, r, r_best)
    return r_best, best


def _phase2_dense(w, qz, amax, s_g, Hp, ratios):
    """_phase2_search's grid the direct way, for the GPU: one (n, Kp) x (Kp, Kp) float32 product
    per ratio. On a GPU these 81 large products (~3 s for a 7B layer on an H200) cost less than
    the incremental search's thousands of small launches; on a CPU the incremental one wins."""
    xp = xp_of(w)
    n, G, g = qz.shape
    f32 = xp.float32
    w32, qz32 = w.astype(f32), qz.astype(f32)
    best = xp.full(n, xp.inf)
    r_best = xp.ones(n)
    for r, s8, S in _grid(amax, s_g, ratios):
        m = xp.floor(QMAX_I8 / S).astype(f32)[..., None]                  # (n, G, 1)
        w8 = xp.minimum(xp.maximum(qz32, -m), m) * S.astype(f32)[..., None]   # (n, G, g)
        d = w32 - s8.astype(f32)[:, None] * w8.reshape(n, G * g)          # (n, Kp)
        f = xp.einsum("nk,nk->n", d @ Hp, d).astype(xp.float64)
        better = f < best
        best = xp.where(better, f, best)
        r_best = xp.where(better, r, r_best)
    return r_best, best


# ----------------------------------------------------------------------------- the layer record

def _dg_linear(codes, z, S, s8, act, ascale, group, meta) -> formats.QuantLinear:
    codes, z, S, s8 = (to_numpy(a) for a in (codes, z, S, s8))
    n, k = codes.shape
    ql = formats.QuantLinear(
        kind="dg", act=act, in_features=k, out_features=n, group=group,
        qweight=formats.pack_uint4(codes.astype(np.uint8)),
        qzeros=z.astype(np.uint8), gscale=S.astype(np.uint8),
        cscale=np.asarray(s8, dtype=np.float32), ascale=ascale, meta=meta)
    formats.check_no_overflow(ql)
    return ql


# ----------------------------------------------------------------------------- compensation

# SmolLM2-135M, A8W4 g128 static, wiki eval 20x512 (bench/results/2026-12-02-quality-gptq-smollm2-cpu.jsonl):
# plain 27.78, grid 27.00, regroup 27.26 (regroup has the lowest objective, 24.6M against grid's 31.0M
# and plain 74.6M, yet not the lowest perplexity: the objective is dominated by the sink token).
COMPENSATE_MODES = ("grid", "regroup", "phase2")


def _group_search_at(s8, ratios):
    """params_at for gptq.gptq: each group's clipping ratio picked on its current weights.

    s8 (N,) given: the step is an integer multiple S·s8 (S ∈ 1..127) with the overflow guard's
    code bounds, so the codes are final "dg" codes. s8 None: a float step s_g (phase 2 comes
    later). The objective is the group's compensated loss ‖e Ugg⁻¹‖² (gptq.group_metric).
    Extra results: S (N,) and s_g (N,).
    """
    def at(g, Wg, Ugg):
        V = gptq.group_metric(Ugg)                                           # (len, len)
        lo_w = np.minimum(Wg.min(axis=1), 0.0)                               # (N,)
        hi_w = np.maximum(Wg.max(axis=1), 0.0)
        best = None
        for r in ratios:
            sg = r * (hi_w - lo_w) / QMAX_U4                                 # (N,)
            if s8 is None:
                sg = np.where(sg > 0, sg, 1.0)
                S, step, m = np.ones_like(sg), sg, np.full_like(sg, QMAX_U4)
            else:
                S = np.clip(np.rint(sg / s8), S_MIN, S_MAX)                  # (N,)
                step, m = S * s8, np.floor(QMAX_I8 / S)
            z = np.clip(np.rint(-r * lo_w / step), 0, QMAX_U4)               # (N,)
            lo, hi = np.maximum(z - m, 0), np.minimum(z + m, QMAX_U4)
            q = np.clip(np.rint(Wg / step[:, None]) + z[:, None], lo[:, None], hi[:, None])  # (N, len)
            err = np.square((Wg - (q - z[:, None]) * step[:, None]) @ V).sum(axis=1)       # (N,)
            cand = (step, z, lo, hi, S, sg)
            if best is None:
                best, out = err, cand
                continue
            better = err < best
            best = np.where(better, err, best)
            out = tuple(np.where(better, a, b) for a, b in zip(cand, out))
        return out
    return at


def _compensated(W, H, U, group, mode, base, ratios):
    """GPTQ-rounded "dg" parameters: codes (N, K), z (N, G), S (N, G), s8 (N,), all float64.

    base = (codes, z, S, s8) of the uncompensated result (the search's or the RTN start's):
    "grid" keeps its z, S, s8 and code bounds and only re-rounds the codes; "regroup" keeps
    its s8 and re-picks each group's S and z on the compensated weights; "phase2" picks float
    group steps on the compensated weights, then runs phase 2 (s8, S, guard) on the codes.
    """
    xp = xp_of(W)
    n, k = W.shape
    _, z0, S0, s80 = base
    s8f = s80.astype(xp.float32).astype(xp.float64)                        # as stored
    if mode == "grid":                                                      # NumPy or CuPy
        m = xp.floor(QMAX_I8 / S0)
        lo, hi = xp.maximum(z0 - m, 0), xp.minimum(z0 + m, QMAX_U4)          # (N, G)
        step = S0 * s8f[:, None]

        def at(g, Wg, Ugg):
            return step[:, g], z0[:, g], lo[:, g], hi[:, g]
        codes, _, _ = gptq.gptq(W, U, group, at)
        return codes, z0, S0, s80
    if mode == "regroup":
        codes, _, params = gptq.gptq(W, U, group, _group_search_at(s8f, ratios))
        z = np.stack([p[1] for p in params], axis=1)                         # (N, G)
        S = np.stack([p[4] for p in params], axis=1)
        return codes, z, S, s80
    codes, _, params = gptq.gptq(W, U, group, _group_search_at(None, ratios))
    z = np.stack([p[1] for p in params], axis=1)
    sg = np.stack([p[0] for p in params], axis=1)
    s8, S, qc, _, _ = phase2(W, H, codes, z, sg, group)
    return qc, z, S, s8


# ----------------------------------------------------------------------------- the layer

def dgq_linear(W, H=None, group: int = formats.DEFAULT_GROUP, act: str = "static",
               ascale: float | None = None, search: bool = True, compensate: bool = False,
               compensate_mode: str = "grid", damp: float = gptq.DEFAULT_DAMP) -> formats.QuantLinear:
    """DGQ A8W4: W (N, K) float -> QuantLinear(kind="dg").

    search=False (or H None) gives the RTN start: phase 1 and phase 2 at r = 1.
    With the search, each row ends at whichever of {searched, RTN start} has the
    lower objective d H dᵀ, so it is never worse than RTN. `meta` records
    the summed objectives (obj_rtn, obj) and how many rows kept the RTN start.

    compensate=True (needs H) adds a GPTQ-rounded candidate (converters/gptq.py, damping
    `damp`) built on the search's result (or the RTN start when search=False) as
    `compensate_mode` says (_compensated); each row still keeps the lowest objective.
    """
    xp = xp_of(W)
    if compensate and compensate_mode != "grid" and xp is not np:   # their group searches: NumPy
        return dgq_linear(to_numpy(W), None if H is None else to_numpy(H), group, act, ascale, search,
                          compensate, compensate_mode, damp)
    W = _check_weight(W)
    n, k = W.shape
    if k % 2:
        raise QuantizeError(f"UINT4 packing needs an even in_features, got {k}")
    if compensate:
        if H is None:
            raise QuantizeError("compensate=True needs the calibration Gram matrix H")
        if compensate_mode not in COMPENSATE_MODES:
            raise QuantizeError(f"compensate_mode must be one of {', '.join(COMPENSATE_MODES)}, "
                                f"got {compensate_mode!r}")
    codes0, z0, sg0, _ = phase1(W, None, group)
    s80, S0, q0, _, _ = phase2(W, None, codes0, z0, sg0, group)
    if not compensate and (not search or H is None):
        return _dg_linear(q0, z0, S0, s80, act, ascale, group, {"search": False})
    H = _check_gram(H, k).astype(xp.float64, copy=False)
    cands = [(q0, z0, S0, s80)]
    if search:
        codes1, z1, sg1, r1 = phase1(W, h_blocks(H, group), group)
        s81, S1, q1, r2, _ = phase2(W, H, codes1, z1, sg1, group)
        cands.append((q1, z1, S1, s81))
    if compensate:
        try:
            U = gptq.inverse_cholesky_of(H, k, damp)
        except gptq.HessianError as e:
            raise QuantizeError(str(e)) from None
        ratios = PHASE1_RATIOS if search else np.array([1.0])
        cands.append(_compensated(W, H, U, group, compensate_mode, cands[-1], ratios))
    # Final choice per row, with s8 rounded to the float32 that is stored: d = W − Ŵ in float64,
    # its products with H in float32 (half the time of float64; the objectives agree to ~1e-6).
    H32 = H.astype(xp.float32)
    errs = xp.empty((len(cands), n))
    for a, b in _row_chunks(n, k, xp):
        for i, (q, z, S, s8) in enumerate(cands):
            w_hat = s8[a:b].astype(xp.float32).astype(xp.float64)[:, None] * dg_int8(q[a:b], z[a:b], S[a:b], group)
            errs[i, a:b] = row_objective(W[a:b], w_hat, H32, dtype=xp.float32)
    if len(cands) == 2 and not compensate:
        keep = errs[1] <= errs[0]                                        # (N,) searched rows
        pick = lambda x1, x0: xp.where(keep.reshape((-1,) + (1,) * (x1.ndim - 1)), x1, x0)  # noqa: E731
        meta = {"search": True, "obj_rtn": float(errs[0].sum()), "obj": float(xp.where(keep, errs[1], errs[0]).sum()),
                "rows_rtn": int((~keep).sum()), "r1_mean": float(r1.mean()), "r2_mean": float(r2.mean())}
        return _dg_linear(pick(q1, q0), pick(z1, z0), pick(S1, S0), pick(s81, s80), act, ascale, group, meta)
    # Ties go to the later candidate (searched over RTN, compensated over both), as above.
    best = len(cands) - 1 - xp.argmin(errs[::-1], axis=0)                # (N,)
    out = []
    for j in range(4):
        x = cands[0][j].copy()
        for i in range(1, len(cands)):
            sel = best == i
            x[sel] = cands[i][j][sel]
        out.append(x)
    meta = {"search": bool(search), "compensate": compensate_mode, "damp": float(damp),
            "obj_rtn": float(errs[0].sum()), "obj": float(errs[best, xp.arange(n)].sum()),
            "obj_uncompensated": float(errs[:-1].min(axis=0).sum()),
            "rows_rtn": int((best == 0).sum()), "rows_compensated": int((best == len(cands) - 1).sum())}
    if search:
        meta.update(r1_mean=float(r1.mean()), r2_mean=float(r2.mean()))
    return _dg_linear(*out, act, ascale, group, meta)


def dequantize_f64(ql: formats.QuantLinear) -> np.ndarray:
    """(N, K) float64 weight of a stored layer, without float32 rounding of the products."""
    if ql.kind in ("dg", "i8"):
        return ql.int8_weight().astype(np.float64) * ql.cscale.astype(np.float64)[:, None]
    k, g = ql.in_features, ql.group
    q = ql.codes().astype(np.float64)
    z = formats.expand_groups(ql.qzeros, k, g).astype(np.float64)
    return (q - z) * formats.expand_groups(ql.wscale, k, g).astype(np.float64)


def layer_objective(ql: formats.QuantLinear, W, H) -> np.ndarray:
    """Per-row output error d H dᵀ of a stored layer against the float weight W: (N,) float64."""
    return row_objective(W, dequantize_f64(ql), np.asarray(H, dtype=np.float64))
