"""GPTQ-style error compensation: round column by column, push each column's error onto the rest.

Notation as in converters/dgq.py: y = x · Wᵀ, W (N out, K in), H = XᵀX (K, K) the Gram
matrix of the calibration inputs, groups of `group` input channels. The layer's output
error ‖X (W − Ŵ)ᵀ‖² = Σ_n d[n] H d[n]ᵀ couples the columns of a row through H; rounding
each weight to its nearest code ignores that. GPTQ (Frantar et al., arXiv 2210.17323,
Algorithm 1) quantizes columns k = 0..K−1 in order and, after each, updates the columns
not yet quantized so that they compensate its error (the optimal update under H):

    U = chol_upper((H + λI)⁻¹)                 (H⁻¹ = UᵀU; λ = damp · mean diag H)
    e = (w_k − q(w_k)) / U[k, k]               (N,)
    W[:, k+1:] −= e ⊗ U[k, k+1:]

done on "lazy batches" of columns (the updates of later batches are one GEMM per batch).
Rows are independent (all share H), so every row is processed at once in float64.

Group quantizers: each group's parameters (step, zero, code bounds) are fixed when its
first column is reached, from a caller's `params_at(g, Wg, Ugg)` that sees the group's
*current* (already compensated) weights Wg (N, len) and Ugg = U's diagonal block of the
group. The batch size is a multiple of the group size and batches are aligned to groups,
so a group's columns are always up to date when it starts.

A group's parameters are best judged by the loss its rounding error e (N, len) causes
after the later columns compensate it optimally. With F the columns not yet quantized
and g the group (the first columns of F), that loss is e ((H_FF)⁻¹_gg)⁻¹ eᵀ, and
(H_FF)⁻¹_gg = Ugg ᵀ Ugg because U is upper triangular — so it equals ‖e Ugg⁻¹‖²
(`group_metric`): a Schur complement read off U for free. (It still ignores the
compensation inside the group itself; that is what the column loop then adds.)

This module knows nothing of a weight format: converters/dgq.py supplies the
dual-grained quantizers, converters/pot.py the weight-only power-of-two and uniform grids.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import scipy.linalg

from engine.util.arrays import xp_of

DEFAULT_DAMP = 0.01      # λ = 1 % of the mean diagonal of H (the GPTQ paper's default)
DEFAULT_BLOCK = 128      # columns per lazy batch (rounded to a multiple of the group)


class HessianError(ValueError):
    """A Gram matrix H that compensation cannot use (shape, NaN/Inf, not positive semi-definite)."""


def inverse_cholesky(H, k: int, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """U (K, K) float64 upper triangular with UᵀU = (H + λI)⁻¹, after checking H.

    Channels never active in calibration (H[j, j] = 0) get H[j, j] = 1 (their weights are
    rounded plainly and push nothing onto others), as in GPTQ's reference code.

    Without forming (H + λI)⁻¹: with J the reversal of the channel order, the lower Cholesky
    factor L of J H J gives H = Ũ Ũᵀ with Ũ = J L J upper triangular, so U = Ũ⁻¹ (one Cholesky
    and one triangular inverse, 2K³/3 flops, against 8K³/3 for inverse-then-Cholesky).
    """
    xp = xp_of(H)
    if H.shape != (k, k):
        raise HessianError(f"Gram matrix has shape {H.shape}, expected ({k}, {k})")
    if not np.issubdtype(H.dtype, np.number) or not bool(xp.isfinite(H).all()):
        raise HessianError("the Gram matrix holds NaN or Inf values")
    if not (np.isfinite(damp) and damp >= 0):
        raise HessianError(f"damping must be a finite number >= 0, got {damp!r}")
    H = xp.array(H[::-1, ::-1], dtype=xp.float64)                      # (K, K) copy, J H J
    d = xp.diag(H)
    if bool((d < 0).any()) or not _symmetric(H):
        raise HessianError("the Gram matrix is not symmetric positive semi-definite (it must be XᵀX)")
    dead = d == 0
    H[dead, dead] = 1.0
    H[xp.diag_indices(k)] += damp * float(xp.mean(xp.diag(H)))
    not_pd = HessianError(f"the Gram matrix is not positive semi-definite: Cholesky failed with "
                          f"damping {damp} (it must be XᵀX)")
    if xp is np:
        L, info = scipy.linalg.lapack.dpotrf(H, lower=1, overwrite_a=1, clean=1)   # J H J = L Lᵀ
        if info != 0:
            raise not_pd
        Linv, info = scipy.linalg.lapack.dtrtri(L, lower=1, overwrite_c=1)
    else:                                                   # CuPy: cuSOLVER potrf, then getrf/getrs
        try:
            L = xp.linalg.cholesky(H)           # NaN where not positive definite (CuPy raises
        except np.linalg.LinAlgError:           # only under cupyx.errstate(linalg="raise"))
            raise not_pd from None
        if not bool(xp.isfinite(L).all()):
            raise not_pd
        Linv, info = xp.tril(xp.linalg.inv(L)), 0
    U = xp.ascontiguousarray(Linv[::-1, ::-1])                         # (J L J)⁻¹ = J L⁻¹ J
    if info != 0 or not bool(xp.isfinite(U).all()):
        raise HessianError("the Gram matrix is too ill-conditioned to invert; raise the damping")
    return U


def inverse_cholesky_of(H, k: int, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """inverse_cholesky, remembered for the last Gram matrix object: the linears of one site
    (q, k, v; gate, up) share their H, and the factorisation of a 5632-channel H costs seconds.
    The converter never changes an H after calibration; a caller that does must not use this."""
    global _LAST
    ref, key, U = _LAST
    if ref is not None and ref() is H and key == (k, damp):
        return U
    U = inverse_cholesky(H, k, damp)
    try:
        _LAST = (weakref.ref(H), (k, damp), U)
    except TypeError:                                                   # not weak-referenceable
        _LAST = (None, None, None)
    return U


_LAST = (None, None, None)


def _symmetric(H: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether H = Hᵀ to `tol` of its largest entry, from two products with random vectors
    (any asymmetry shows in ‖(H − Hᵀ) v‖ for almost every v; K² work instead of K² temporaries)."""
    xp = xp_of(H)
    v = xp.asarray(np.random.default_rng(0).standard_normal((H.shape[0], 2)))
    diff = float(xp.abs(H @ v - H.T @ v).max())
    scale = max(float(xp.abs(xp.diag(H)).max()), float(xp.abs(H[0]).max()))
    return diff <= tol * max(scale, np.finfo(float).tiny) * np.sqrt(H.shape[0]) * 4


def group_metric(Ugg: np.ndarray) -> np.ndarray:
    """V = Ugg⁻¹ (len, len): a group error e (N, len) costs ‖e V‖² per row after the later
    columns compensate it (module docstring)."""
    return scipy.linalg.solve_triangular(Ugg, np.eye(Ugg.shape[0]), lower=False)


def uniform_round(w, p):
    """The default rounding of gptq(): p = (step, z, lo, hi, *extra), each (N,); the column
    w (N,) becomes q = clamp(rint(w / step) + z, lo, hi), dequantized (q − z)·step."""
    step, z, lo, hi = p[:4]
    xp = xp_of(w)
    q = xp.clip(xp.rint(w / step) + z, lo, hi)                                   # (N,)
    return q, (q - z) * step


def gptq(W, U: np.ndarray, group: int, params_at, block: int = DEFAULT_BLOCK, rounding=uniform_round):
    """Quantize W (N, K) column by column with error compensation.

    U: inverse_cholesky(H, K, damp). params_at(g, Wg, Ugg) -> the parameters p of group g;
    rounding(w, p) -> (q, ŵ): the codes (N,) and dequantized values (N,) of a column w (N,) of
    that group. The default (uniform_round) takes p = (step, z, lo, hi, *extra); other grids
    (converters/pot.py's power-of-two levels) pass their own. Returns codes (N, K) float64
    (integers), Ŵ (N, K) float64 and the list of every group's params_at result (index g).

    The walk keeps the weights transposed (K, N), so that a column is one contiguous row, and
    applies each column's update to the next `sub` columns only (sub = gcd(group, 32), so
    groups start on a sub-block); the rest of the batch gets one product per sub-block. On
    CuPy with the default rounding, a sub-block's column walk is one kernel launch
    (`_column_kernel`) instead of ~15 array operations a column: the same float64 operations
    in the same order, so the codes equal the per-column walk's.
    """
    xp = xp_of(W)
    W = xp.asarray(W, dtype=xp.float64)
    n, k = W.shape
    if U.shape != (k, k):
        raise HessianError(f"U has shape {U.shape}, expected ({k}, {k})")
    bs = group * max(1, block // group)                                  # aligned to groups
    sub = math.gcd(group, 32)
    WT = xp.array(W.T, order="C")                                        # (K, N), updated in place
    codes = xp.empty((k, n))
    W_hat = xp.empty((k, n))
    params = []
    fused = _column_kernel(xp) if xp is not np and rounding is uniform_round else None
    if fused is not None:
        U = xp.ascontiguousarray(U, dtype=xp.float64)

    def start_group(W1, i, c):
        """params_at of the group starting at column c (row i of the batch W1): its current weights."""
        ge = min(c + group, k)
        params.append(params_at(c // group, W1[i:i + ge - c].T, U[c:ge, c:ge]))

    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = WT[i1:i2]                                                   # (b, N) current weights (a view)
        E1 = xp.empty_like(W1)                                           # (b, N) scaled errors
        U1 = U[i1:i2, i1:i2]                                             # (b, b)
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            if fused is None:
                for i in range(j1, j2):
                    c = i1 + i
                    if c % group == 0:
                        start_group(W1, i, c)
                    w = W1[i]                                            # (N,)
                    q, wq = rounding(w, params[-1])                      # (N,), (N,)
                    codes[c] = q
                    W_hat[c] = wq
                    e = (w - wq) / U1[i, i]                              # (N,)
                    W1[i + 1:j2] -= U1[i, i + 1:j2, None] * e            # (j2−i−1, N)
                    E1[i] = e
            else:                                                        # the same walk, one launch
                c = i1 + j1
                if c % group == 0:                                       # groups start on a sub-block
                    start_group(W1, j1, c)
                    p = [xp.ascontiguousarray(xp.broadcast_to(xp.asarray(a, dtype=xp.float64), (n,)))
                         for a in params[-1][:4]]                        # step, z, lo, hi (N,)
                fused(((n + 127) // 128,), (128,), (W1[j1:j2], U, *p, codes[c:c + j2 - j1],
                                                    W_hat[c:c + j2 - j1], E1[j1:j2], np.int32(n),
                                                    np.int32(k), np.int32(c), np.int32(j2 - j1)))
            W1[j2:] -= U1[j1:j2, j2:].T @ E1[j1:j2]                      # rest of the batch
        WT[i2:] -= U[i1:i2, i2:].T @ E1                                  # (K−i2, N) lazy update
    return codes.T, W_hat.T, params


# The column walk of one sub-block on the GPU, a thread a row: uniform_round and the in-block
# updates of gptq() with the same float64 operations in the same order (_rn intrinsics: no
# fused multiply-add the NumPy walk does not do; fmin/fmax clip as np.clip does for step > 0 and
# lo <= hi, which every caller's grid has). W, codes, W_hat, E: (len, N) views at the
# sub-block's first column c0; U: (K, K). Compiled through the array module the caller handed
# in (converters never import the GPU package, docs/ARCHITECTURE.md).
_COLUMN_WALK = r"""
extern "C" __global__ void gptq_columns(double* __restrict__ W, const double* __restrict__ U,
        const double* __restrict__ step, const double* __restrict__ z, const double* __restrict__ lo,
        const double* __restrict__ hi, double* __restrict__ codes, double* __restrict__ what,
        double* __restrict__ E, int n, int k, int c0, int len) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const double st = step[r], zr = z[r], l = lo[r], h = hi[r];
    for (int i = 0; i < len; ++i) {
        const size_t at = (size_t)i * n + r;
        const double w = W[at];
        const double q = fmin(fmax(__dadd_rn(rint(__ddiv_rn(w, st)), zr), l), h);
        const double wq = __dmul_rn(__dsub_rn(q, zr), st);
        const double* u = U + (size_t)(c0 + i) * k + c0;
        const double e = __ddiv_rn(__dsub_rn(w, wq), u[i]);
        codes[at] = q;
        what[at] = wq;
        E[at] = e;
        for (int j = i + 1; j < len; ++j) {
            const size_t aj = (size_t)j * n + r;
            W[aj] = __dsub_rn(W[aj], __dmul_rn(u[j], e));
        }
    }
}
"""
_KERNELS: dict = {}


def _column_kernel(xp):
    """gptq_columns compiled by xp (CuPy), once a process."""
    if xp not in _KERNELS:
        _KERNELS[xp] = xp.RawKernel(_COLUMN_WALK, "gptq_columns")
    return _KERNELS[xp]
