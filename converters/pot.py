"""Weight-only b-bit quantizers (b = 2, 3, 4): power-of-two ("pot<b>") and uniform ("int<b>").

PoTPTQ's two steps (arXiv 2507.11959), applied per group of `group` input channels:
  1. data-free: s = β·S0 over the grid β ∈ {0.01, 0.02, …, 2.00} (S0 = the group's largest
     magnitude for PoT, (max - min)/(2^b - 1) for uniform), keeping the β with the least
     weight error ‖w - ŵ‖². We visit it coarse to fine (every 5th β, then the eight 0.01
     steps around each group's coarse best: 48 evaluations instead of 200). That approximates
     the full grid: on heavy-tailed test weights it kept a worse β in 60 of 256 groups for
     pot4 (up to +1 % weight error) and 11 of 256 for int3 (up to +6.8 %);
  2. calibration: s ← s·(1 + γ), γ ∈ GAMMAS (−0.75 … +1.5, 0 included, so never worse than step 1 on this
     objective), and S0 itself (never worse than RTN either), keeping the scale with the least
     output error of the group, e H_gg eᵀ with
     e = w - ŵ and H_gg the group's diagonal block of the calibration Gram matrix XᵀX (the
     objective DGQ's phase 1 uses; cross-group terms are left out).
Both steps evaluate the float16 scale actually stored (rounded, floored for PoT: see
engine/formats/pot.py), so the error measured is the error of the file.

Choices of ours where the paper is vague: PoT codes round to the nearest level in the linear
domain (the least squared error; the paper rounds log2|w|); a zero code exists (see
formats/pot.py); uniform kinds include 0 in each group's range (as the A8W4 kinds do), so a
zero weight stays exact. Baselines: "int-rtn" = min-max uniform (no search), "int-search" =
uniform with the same two-step scale search.

Optional GPTQ rounding (compensate=True, `--gptq` for pot / int-search): once the search has
fixed every group's scale (and zero point), the codes are rounded again column by column on
that same grid with GPTQ's error propagation (converters/gptq.py; PoT: the nearest level of
the group's scale, zero included; uniform: the nearest code in 0..2^b-1). Each row then keeps
whichever of {searched, compensated} codes has the lower output error d H dᵀ (full H), as
DGQ's compensation does, so no row gets worse on that objective. NumPy only (the searches
here are NumPy too; --device cuda runs them on the host).

Last, with H and the search (REFIT, on by default): the codes fixed, each row's group scales are
refit jointly by least squares on the full-H output error (_refit_scales): the search chose each
group's scale alone on its diagonal block of H, and GPTQ then moved the codes, so the scales no
longer fit the codes they multiply. A row keeps the refit scales (stored float16) only where its
d H dᵀ falls. SmolLM2, 20 windows, same machine: PoT W3 g128 41.60 → 41.05, int-search W3
38.24 → 37.12, PoT W4 30.88 → 30.79, int-search W4 25.47 → 25.28 (docs/QUALITY.md). Cost: one
(N, K)·(K, K) product a layer, about a GPTQ pass.
"""
from __future__ import annotations

import numpy as np

from engine import formats
from engine.formats import planes
from engine.formats.pot import FP16_EXP_BIAS

from engine.util.arrays import to_numpy

from . import gptq
from .dgq import (QuantizeError, _check_gram, _check_weight, from_groups, group_range, h_blocks, row_objective,
                  to_groups)

BETAS = np.arange(1, 201) / 100.0                      # step 1: 0.01 … 2.00 × S0 (the paper's grid)
BETA_COARSE = 5                                        # ... visited coarse to fine: every 5th point,
                                                       # then the 0.01 steps around each group's best
# step 2: s·(1 + γ), γ ∈ −0.75 … +1.50 in steps of 0.05. Wide on purpose: the output error
# prefers much larger scales than the weight error does (SmolLM2 PoT-3 g128, 4 windows:
# ±0.2 57.17, ±0.5 48.16, −0.75..+1.5 40.95; a log-spaced 2^(−1..1.5) grid 44.72)
GAMMAS = np.round(np.arange(-15, 31) * 0.05, 2)
ROWS_PER_CHUNK = 4096                                  # bounds the (rows, G, group) temporaries
REFIT = True                                           # the joint least-squares scale refit (_refit_scales) by default
REFIT_ROUNDS = 1                                       # GPTQ + refit again this many times in all (QUALITY.md: 2 and 3 measured)
BITS = planes.PLANE_BITS


def fp16_scale(s: np.ndarray, min_exp: int = 1) -> np.ndarray:
    """s rounded to float16 and floored at 2^(min_exp - 15) (a normal float16 with exponent
    field ≥ min_exp); returned as float32 holding exactly the stored values."""
    floor = np.float32(2.0 ** (min_exp - FP16_EXP_BIAS))      # a power of two: rounding keeps it
    return np.maximum(np.asarray(s, dtype=np.float32), floor).astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------- the two families

class _Pot:
    """Power-of-two codes: sign bit on top, magnitude field m (0 = zero, else 2^-(m-1)), and
    where the kind has one (pot2, pot3) the spare code (sign set, m = 0) for the level +2 (engine/formats/pot.py).

    Nearest level in the linear domain, in closed form: with u = log2(s / |w|), the
    candidates 2^-j and 2^-(j+1) around |w|/s meet at 0.75·2^-j, i.e. at frac(u) = log2(4/3),
    so j = floor(u + 1 - log2(4/3)) clipped to 0..levels-1; below half the smallest level
    (u > levels) the weight rounds to zero; with the spare level, at or above 1.5 s on its side
    the weight takes 2s. The spare level's side is each group's choice, carried by the sign of its
    stored scale: start() mirrors every group so that its largest-magnitude weight is positive
    (σ = the sign of that weight), the search runs on the mirrored weights and scale() returns
    σ·|s| (σ = 1 without a spare code, as before).
    """
    SHIFT = 1.0 - np.log2(4.0 / 3.0)

    def __init__(self, bits: int):
        self.kind = formats.KINDS[f"pot{bits}"]
        self.bits, self.levels = bits, self.kind.levels
        self.spare = self.kind.spare

    def start(self, Wg):
        self.sigma = np.ones(Wg.shape[:-1], dtype=np.float32)                     # (R, G)
        if self.spare:
            top = np.take_along_axis(Wg, np.abs(Wg).argmax(axis=-1)[..., None], axis=-1)[..., 0]
            self.sigma = np.where(top < 0, np.float32(-1), np.float32(1))
        self.wm = Wg * self.sigma[..., None]                                     # mirrored (R, G, g)
        self.absw = np.abs(self.wm)
        with np.errstate(divide="ignore"):
            self.log2w = np.log2(self.absw)                                      # -inf for 0
        return self.absw.max(axis=-1)                                            # (R, G): S0

    def store(self, s):
        """|s| as stored: float16, floored so every level is a normal float16."""
        return fp16_scale(np.abs(s), self.kind.min_scale_exp)

    def scale(self, s):
        """The stored scale of the current groups (start()): σ·|s|."""
        return self.sigma * self.store(s)

    def _nearest(self, wm, log2w, a):
        """(codes, ŵ) of mirrored weights wm (log2w = log2|wm|) at |scale| a, broadcast against
        them: the closed-form nearest level above, and the spare level from 1.5a on its side.
        The codes are floats holding small integers (gptq.gptq takes them so)."""
        u, j = self._level(log2w, a)
        nz = u <= self.levels
        neg = (wm < 0) & nz
        code = np.where(nz, j + 1, 0) + np.where(neg, self.kind.spare_code, 0)
        if self.spare:
            code = np.where(wm >= 1.5 * a, self.kind.spare_code, code)
        return code, self._value(wm, u, j, a)

    def _level(self, log2w, a):
        """u = log2(a / |w|) (+inf for 0) and j, the exponent of the nearest level 2^-j (0..levels-1)."""
        u = np.log2(a) - log2w
        return u, np.clip(np.floor(u + self.SHIFT), 0, self.levels - 1)

    def _value(self, wm, u, j, a):
        """ŵ at level j (_level): 2^-j·a with wm's sign, zero below half the smallest level
        (u > levels), the spare level from 1.5a. In place on one array: the scale search asks for
        ŵ alone ~95 times a layer (half of `dgq-quantize --method pot`'s time went here when the
        codes were computed alongside)."""
        v = np.negative(j)
        np.exp2(v, out=v)
        v *= a
        np.copysign(v, wm, out=v)
        v[u > self.levels] = 0
        if self.spare:
            v = np.where(wm >= 1.5 * a, self.spare * a, v)
        return v

    def _round(self, s):
        """(codes, ŵ) of the current groups' mirrored weights (start()) at stored scales s (R, G)."""
        return self._nearest(self.wm, self.log2w, np.abs(s)[..., None])

    def _round_value(self, s):
        """_round(s)[1] alone, without the codes."""
        a = np.abs(s)[..., None]
        return self._value(self.wm, *self._level(self.log2w, a), a)

    def dequant(self, Wg, s):
        return self._round_value(s) * np.where(s < 0, np.float32(-1), np.float32(1))[..., None]

    def weight_error(self, Wg, s):
        d = self.wm - self._round_value(s)
        d *= d
        return d.sum(axis=-1)                                                    # (R, G)

    def codes(self, Wg, s):
        return self._round(s)[0].astype(np.uint8)

    def round_column(self, w, p):
        """gptq.gptq's rounding on this grid: w (N,) float64, p = (s,) the groups' stored
        scales (N,). Returns the codes (N,) (as codes() writes them) and ŵ (N,): _nearest on w
        mirrored by the sign of s."""
        s = p[0]
        sg, a = np.where(s < 0, -1.0, 1.0), np.abs(s)
        wm = sg * w
        with np.errstate(divide="ignore"):
            log2w = np.log2(np.abs(wm))
        code, val = self._nearest(wm, log2w, a)
        return code, sg * val

    def grid(self, scales, zeros):
        """(params_at, rounding) for gptq.gptq on the fixed grid of stored scales (N, G)."""
        return (lambda g, Wg, Ugg: (scales[:, g],)), self.round_column


class _Int:
    """Uniform asymmetric codes q ∈ 0..2^b-1 with zero point z: ŵ = (q - z)·s."""

    def __init__(self, bits: int):
        self.bits, self.qmax = bits, (1 << bits) - 1

    def start(self, Wg):
        lo, hi = group_range(Wg)
        self.lo = lo
        return np.where(hi > lo, (hi - lo) / np.float32(self.qmax), np.float32(1))

    def store(self, s):
        return fp16_scale(s)

    scale = store                                        # uniform codes: scales are positive

    def zero(self, s):
        return np.clip(np.rint(-self.lo / s), 0, self.qmax)

    def codes(self, Wg, s):
        z = self.zero(s)[..., None]
        return np.clip(np.rint(Wg / s[..., None]) + z, 0, self.qmax).astype(np.uint8)

    def dequant(self, Wg, s):
        return (self.codes(Wg, s) - self.zero(s)[..., None]) * s[..., None]

    def weight_error(self, Wg, s):
        return ((Wg - self.dequant(Wg, s)) ** 2).sum(axis=-1)                    # (R, G)

    def grid(self, scales, zeros):
        """(params_at, rounding) for gptq.gptq on the fixed grid of stored scales and zero points (N, G)."""
        return (lambda g, Wg, Ugg: (scales[:, g], zeros[:, g], 0.0, float(self.qmax))), gptq.uniform_round


# ----------------------------------------------------------------------------- search

def _keep(best_s, best, best_beta, fam, Wg, s0, beta):
    """Step 1 at multiplier(s) beta (a scalar, or (R, G) per group): keep what lowers the weight error."""
    s = fam.scale(np.float32(beta) * s0 if np.ndim(beta) == 0 else beta.astype(np.float32) * s0)
    err = fam.weight_error(Wg, s)                                                # (R, G)
    beta = np.broadcast_to(np.float32(beta), err.shape) if np.ndim(beta) == 0 else beta
    if best is None:
        return s, err, np.array(beta, dtype=np.float64)
    better = err < best
    return (np.where(better, s, best_s), np.where(better, err, best),
            np.where(better, beta, best_beta))


def _search(fam, Wg, Hb, search: bool):
    """The stored scale per group (R, G) float32: S0 without search, else the two steps."""
    s0 = fam.start(Wg)
    if not search:
        return fam.scale(s0)
    coarse = BETAS[BETA_COARSE - 1::BETA_COARSE]                                 # 0.05, 0.10, … 2.00
    best_s, best, best_beta = None, None, None
    for beta in coarse:
        best_s, best, best_beta = _keep(best_s, best, best_beta, fam, Wg, s0, beta)
    center = best_beta
    for off in range(1 - BETA_COARSE, BETA_COARSE):                              # 0.01 steps around it
        if off:
            beta = np.clip(center + off * BETAS[0], BETAS[0], BETAS[-1])
            best_s, best, best_beta = _keep(best_s, best, best_beta, fam, Wg, s0, beta)
    if Hb is None:
        return best_s
    s1, best = best_s, None
    # step 2: e H_gg eᵀ over s1·(1 + γ), and the start scale S0 itself (min-max for uniform codes),
    # so the result is never worse than RTN on this objective
    for s in [fam.scale(s0)] + [fam.scale(s1 * np.float32(1.0 + g)) for g in GAMMAS]:
        e = (Wg - fam.dequant(Wg, s)).transpose(1, 0, 2)                         # (G, R, g)
        err = ((e @ Hb) * e).sum(axis=-1).T                                      # (R, G)
        if best is None:
            best_s, best = s, err
        else:
            better = err < best
            best_s, best = np.where(better, s, best_s), np.where(better, err, best)
    return best_s


def check_bits_group(bits: int, group: int) -> None:
    if bits not in BITS:
        raise QuantizeError(f"b-bit weight-only kinds take 2, 3 or 4 bits, got {bits!r}")
    if group not in planes.GROUPS:                     # the format's rule (formats/planes.py)
        raise QuantizeError(f"{bits}-bit weights take groups of {planes.groups_text()}, got {group!r}")


def _quantize(fam, kind: str, W, H, group: int, search: bool, compensate: bool = False,
              damp: float = gptq.DEFAULT_DAMP, refit: bool | None = None) -> formats.QuantLinear:
    """The QuantLinear of `kind` for W: codes and scales (and zero points) row chunk by row chunk;
    compensate: then the GPTQ-rounded codes on the same grid where a row's d H dᵀ is lower."""
    check_bits_group(fam.bits, group)
    W = _check_weight(to_numpy(W))
    n, k = W.shape
    if compensate and (H is None or not search):
        raise QuantizeError("GPTQ rounding (--gptq) needs the scale search and the calibration Gram matrix H")
    H = None if H is None else _check_gram(to_numpy(H), k).astype(np.float64, copy=False)
    Hb = None if H is None else h_blocks(H, group).astype(np.float32)
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, formats.n_groups(k, group)), dtype=np.float32)
    zeros = np.empty(scales.shape, dtype=np.uint8) if isinstance(fam, _Int) else None
    W_hat = np.empty((n, k)) if compensate else None                            # the searched Ŵ, float64
    for a in range(0, n, ROWS_PER_CHUNK):
        b = min(n, a + ROWS_PER_CHUNK)
        # float32 halves the cost of the grids; the scales are stored in float16 anyway
        Wg = to_groups(W[a:b], group).astype(np.float32)                         # (R, G, g)
        s = _search(fam, Wg, Hb, search)
        scales[a:b] = s
        codes[a:b] = from_groups(fam.codes(Wg, s), k)
        if zeros is not None:
            zeros[a:b] = fam.zero(s)                                             # of this chunk's lo
        if W_hat is not None:
            W_hat[a:b] = from_groups(fam.dequant(Wg, s), k)                      # exact: fp16 scale × level
    meta = {"search": bool(search), "gram": H is not None}
    if compensate:
        codes, meta = _compensate(fam, W, H, group, codes, W_hat, scales, zeros, damp, meta)
    if (REFIT if refit is None else refit) and H is not None and search:
        scales, meta = _refit_scales(fam, W, H, group, codes, scales, zeros, meta)
        for _ in range(REFIT_ROUNDS - 1 if compensate else 0):   # GPTQ again on the refit grid, then refit again
            W_cur = formats.expand_groups(scales, k, group).astype(np.float64) * unit_levels(fam, codes, zeros, group)
            codes, meta = _compensate(fam, W, H, group, codes, W_cur, scales, zeros, damp, meta)
            scales, meta = _refit_scales(fam, W, H, group, codes, scales, zeros, meta)
    extra = {} if zeros is None else {"qzeros": zeros}
    return formats.QuantLinear(kind=f"{kind}{fam.bits}", act="none", in_features=k, out_features=n, group=group,
                               qweight=planes.pack_planes(codes, fam.bits), wscale=scales.astype(np.float16),
                               meta=meta, **extra)


def _compensate(fam, W, H, group, codes, W_hat, scales, zeros, damp, meta):
    """GPTQ codes on the searched grid (scales, zeros fixed); per row the lower d H dᵀ of
    {searched, compensated}, ties to the compensated (as dgq_linear). Returns (codes, meta)."""
    n, k = W.shape
    try:
        U = gptq.inverse_cholesky_of(H, k, damp)                                 # (K, K), cached per site
    except gptq.HessianError as e:
        raise QuantizeError(str(e)) from None
    params_at, rounding = fam.grid(scales.astype(np.float64), None if zeros is None else zeros.astype(np.float64))
    qc, W_hat_c, _ = gptq.gptq(W, U, group, params_at, rounding=rounding)      # (N, K), (N, K)
    err_s = row_objective(W, W_hat, H)                                           # (N,)
    err_c = row_objective(W, W_hat_c, H)
    keep = err_c <= err_s                                                        # (N,) compensated rows
    codes = np.where(keep[:, None], qc.astype(np.uint8), codes)
    meta = dict(meta, compensate="grid", damp=float(damp), obj_uncompensated=float(err_s.sum()),
                obj=float(np.where(keep, err_c, err_s).sum()), rows_compensated=int(keep.sum()))
    return codes, meta


def unit_levels(fam, codes: np.ndarray, zeros, group: int) -> np.ndarray:
    """(N, K) float64: each weight's level at scale 1 (PoT: ±2^-j or 0; uniform: q - z), so that
    Ŵ[n, k] = scale[n, group of k] · level[n, k]."""
    if isinstance(fam, _Int):
        return codes.astype(np.float64) - formats.expand_groups(zeros, codes.shape[1], group).astype(np.float64)
    return fam.kind.units().astype(np.float64)[codes]                            # the spare code included


def _refit_scales(fam, W, H, group, codes, scales, zeros, meta, ridge: float = 1e-6):
    """The codes fixed, every row's G group scales jointly by least squares on the output error
    (W[n] − Σ_g s_g·L_g)·H·(…)ᵀ with the full H (the search and GPTQ fix each scale before the
    codes that follow it), stored as float16 (fp16_scale); a row keeps its new scales only where
    its d H dᵀ, with the stored values, is lower; groups without a nonzero level keep theirs."""
    n, k = W.shape
    G = scales.shape[1]
    # signed PoT scales (the spare level's mirror): Ŵ = s·L = |s|·(sign(s)·L), so fit |s|
    sg = np.where(scales < 0, np.float32(-1), np.float32(1))                     # (N, G)
    scales = np.abs(scales)
    L = unit_levels(fam, codes, zeros, group) * formats.expand_groups(sg, k, group)   # (N, K)
    pad = G * group - k
    Lg = np.pad(L, ((0, 0), (0, pad))).reshape(n, G, group)                      # (N, G, g)
    Hp = np.pad(H, ((0, pad), (0, pad)))
    Wp = np.pad(W.astype(np.float64), ((0, 0), (0, pad)))
    A = np.empty((n, G, G))
    b = np.empty((n, G))
    for g in range(G):
        T = Lg[:, g, :] @ Hp[g * group:(g + 1) * group, :]                        # (N, K'): L_g H_g·
        A[:, g, :] = np.einsum("nhj,nhj->nh", T.reshape(n, G, group), Lg)
        b[:, g] = np.einsum("nk,nk->n", T, Wp)
    diag = np.einsum("ngg->ng", A)                                               # (N, G)
    live = diag > 0
    old = scales.astype(np.float64)
    # a relative ridge toward the old scales; a dead group (all levels 0: its row and column of A
    # and its b are 0) gets weight 1 on its old scale alone, which pins it there
    reg = np.where(live, ridge * diag, 1.0)
    A = A + reg[:, :, None] * np.eye(G)[None]
    b = b + reg * old
    try:
        s_new = np.linalg.solve(A, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return scales * sg, dict(meta, refit_rows=0)
    ok = np.isfinite(s_new).all(axis=1) & (np.where(live, s_new, 1.0) > 0).all(axis=1)
    s_new = fam.store(np.where(ok[:, None] & live, s_new, old).astype(np.float32))   # as stored
    err_old = row_objective(W, formats.expand_groups(scales, k, group).astype(np.float64) * L, H)
    err_new = row_objective(W, formats.expand_groups(s_new, k, group).astype(np.float64) * L, H)
    keep = ok & (err_new < err_old)
    out = (np.where(keep[:, None], s_new, scales) * sg).astype(np.float32)
    return out, dict(meta, refit_rows=int(keep.sum()), obj_before_refit=float(err_old.sum()),
                     obj=float(np.where(keep, err_new, err_old).sum()))


def pot_linear(W, bits: int, group: int = formats.DEFAULT_GROUP, H=None,
               search: bool = True, compensate: bool = False, damp: float = gptq.DEFAULT_DAMP,
               refit: bool | None = None) -> formats.QuantLinear:
    """Power-of-two b-bit weights, float activations: QuantLinear(kind="pot<b>").
    search=False: S0 (the group's largest magnitude) as the scale; H adds step 2;
    compensate=True (needs search and H): GPTQ rounding on the searched scales (module docstring)."""
    check_bits_group(bits, group)
    return _quantize(_Pot(bits), "pot", W, H, group, search, compensate, damp, refit)


def int_linear(W, bits: int, group: int = formats.DEFAULT_GROUP, H=None,
               search: bool = False, compensate: bool = False, damp: float = gptq.DEFAULT_DAMP,
               refit: bool | None = None) -> formats.QuantLinear:
    """Uniform asymmetric b-bit weights, float activations: QuantLinear(kind="int<b>").
    search=False is min-max RTN ("int-rtn"); search=True the same two steps as PoT;
    compensate=True (needs search and H): GPTQ rounding on the searched scales and zero points."""
    check_bits_group(bits, group)
    return _quantize(_Int(bits), "int", W, H, group, search, compensate, damp, refit)


def as_dual_grained(ql: formats.QuantLinear, act: str = "dynamic") -> formats.QuantLinear:
    """The same b-bit codes as a dual-grained A8W4 layer ("dg", INT8 activations): the stretch
    question of issue 15, whether PoT weights can ride the INT8 tensor-core kernels.

    Every code becomes an exact small integer q - z of INT4: PoT units ±2^-(m-1) times
    c = 2^(levels-1) (pot2: {0, ±1}, pot3: {0, ±1, ±2, ±4} and the spare level 8, mirrored by the
    sign of the group's scale, so the zero point is 7 where the spare level is positive and 8
    where it is negative), uniform q - z as they are. What
    changes is the group scale: s[n, g] / c ≈ s8[n] · S[n, g] with S an integer in 1 .. Smax,
    Smax = ⌊127 / max|q - z|⌋ of the row (the INT8 overflow guard), s8 the row's largest step
    over Smax. pot4 reaches 2^-6 and does not fit INT4."""
    kind, bits = ql.kind[:3], int(ql.kind[3:]) if ql.kind[3:].isdigit() else 0
    if kind not in ("pot", "int") or (kind == "pot" and bits > 3):
        raise QuantizeError(f"as_dual_grained takes pot2, pot3 and int2..4 layers, not {ql.kind!r}")
    k, group = ql.in_features, ql.group
    if k % 2:
        raise QuantizeError(f"dual-grained layers pack two 4-bit codes a byte: in_features must be even, got {k}")
    codes = planes.unpack_planes(ql.qweight, bits, k).astype(np.int32)              # (N, K)
    if kind == "pot":
        pk = formats.KINDS[ql.kind]
        c = 1 << (pk.levels - 1)
        sg = np.where(ql.wscale.astype(np.float32) < 0, -1, 1).astype(np.int32)     # (N, G): the mirror
        unit = np.rint(pk.units()[codes] * c).astype(np.int32) * formats.expand_groups(sg, k, group)
        z = np.where(sg > 0, 7 if pk.spare else 8, 8).astype(np.int32)             # units -c..c (and ±2c)
        q = unit + formats.expand_groups(z, k, group)                                # in 0..15
        step = np.abs(ql.wscale.astype(np.float64)) / c
    else:
        z = ql.qzeros.astype(np.int32)
        q = codes
        step = ql.wscale.astype(np.float64)
    dev = np.abs(q - formats.expand_groups(z, k, group)).max(axis=1)                # (N,)
    smax = np.minimum(127 // np.maximum(dev, 1), formats.S_MAX)
    s8 = step.max(axis=1) / smax                                                      # (N,)
    s8 = np.where(s8 > 0, s8, 1.0)                     # a row of zero scales (not ours: floored) stays zero
    S = np.clip(np.rint(step / s8[:, None]), 1, smax[:, None]).astype(np.uint8)
    return formats.QuantLinear(kind="dg", act=act, in_features=k, out_features=ql.out_features, group=group,
                               qweight=formats.pack_uint4(q), qzeros=z.astype(np.uint8), gscale=S,
                               cscale=s8.astype(np.float32), meta={"from": ql.kind})
