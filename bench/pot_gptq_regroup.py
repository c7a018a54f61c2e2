"""Experiment (issue 15): PoT + GPTQ with each group's scale re-picked on the compensated weights.

    python bench/pot_gptq_regroup.py --set weight-only --gptq --only pot --bits 4,3 --groups 128 \
        --windows 20 --n-seq 16 --seq-len 512

bench/quality.py's rows, with converters/pot.py `_compensate` replaced in this process: when
GPTQ reaches a group, the group's scale is picked again on its current, already compensated
weights Wg, over the searched scale and step 2's multipliers (1 + γ, pot.GAMMAS), by the error
the later columns cannot compensate, ‖(Wg − Ŵg) V‖² with V = gptq.group_metric(Ugg) (the "regroup"
mode of converters/dgq.py, for power-of-two codes). Each row still keeps the lower d H dᵀ of
{searched, compensated}. Measured worse than GPTQ on the fixed grid (docs/QUALITY.md), so the
converter does not offer it; this script keeps the measurement reproducible.
"""
from __future__ import annotations

import sys

import numpy as np

import converters.pot as P
from converters import gptq
from converters.dgq import row_objective


def _compensate(fam, W, H, group, codes, W_hat, scales, zeros, damp, meta):
    if zeros is not None:
        return ORIG(fam, W, H, group, codes, W_hat, scales, zeros, damp, meta)
    k = W.shape[1]
    U = gptq.inverse_cholesky_of(H, k, damp)
    s_searched = scales.astype(np.float64)
    rounding = fam.round_column

    def params_at(g, Wg, Ugg):
        V = gptq.group_metric(Ugg)
        W3 = np.ascontiguousarray(Wg)[:, None, :]                  # (N, 1, len)
        fam.start(W3)
        base = s_searched[:, g].astype(np.float32)
        best_s, best = None, None
        for s in [base] + [fam.scale(base * np.float32(1.0 + gm)) for gm in P.GAMMAS]:
            s = np.asarray(s, dtype=np.float32)
            e = (W3 - fam.dequant(W3, s[:, None]))[:, 0, :]          # (N, len)
            err = np.square(e @ V).sum(axis=1)
            if best is None:
                best_s, best = s, err
            else:
                better = err < best
                best_s, best = np.where(better, s, best_s), np.where(better, err, best)
        return (best_s.astype(np.float64),)
    qc, W_hat_c, params = gptq.gptq(W, U, group, params_at, rounding=rounding)
    s_new = np.stack([p[0] for p in params], axis=1).astype(np.float32)   # (N, G)
    err_s = row_objective(W, W_hat, H)
    err_c = row_objective(W, W_hat_c, H)
    keep = err_c <= err_s
    codes = np.where(keep[:, None], qc.astype(np.uint8), codes)
    scales[:] = np.where(keep[:, None], s_new, scales)
    return codes, dict(meta, compensate="regroup", rows_compensated=int(keep.sum()),
                       obj_uncompensated=float(err_s.sum()), obj=float(np.where(keep, err_c, err_s).sum()))


ORIG = P._compensate
P._compensate = _compensate       # for this process only: the experiment
if __name__ == "__main__":
    import quality  # noqa: PLC0415  (bench/quality.py beside this file)
    sys.exit(quality.main(sys.argv[1:]))
