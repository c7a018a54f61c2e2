"""GPTQ error compensation (converters/gptq.py) and dgq_linear(compensate=True): lower output
error than plain rounding, valid "dg" layers, the default unchanged, one clear error for a bad H."""
import numpy as np
import pytest

from converters import dgq, gptq
from converters.quantize import QuantizeError
from engine import formats


def correlated(rng, t, k, outliers=2):
    """X (T, K) with correlated channels and a few outlier channels, and H = XᵀX."""
    A = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((t, k)) @ (np.eye(k) + 0.9 * A)       # (T, K)
    x[:, :outliers] *= 20.0
    return x, x.T @ x


def out_err(X, W, W_hat):
    return float(((X @ (W - W_hat).T) ** 2).sum())                 # ‖X (W − Ŵ)ᵀ‖²


def rtn_grid(W, group):
    """Plain min-max UINT4 groups as gptq params: (step, z, lo, hi) each (N, G), and the codes."""
    codes, z, s, _ = dgq.phase1(W, None, group)
    z, s = z.astype(np.float64), s.astype(np.float64)
    return codes, z, s


@pytest.mark.parametrize("k,group", [(96, 32), (80, 32), (64, 16)])
def test_gptq_on_a_fixed_grid_lowers_the_output_error(k, group):
    rng = np.random.default_rng(k)
    X, H = correlated(rng, 600, k)
    W = rng.standard_normal((12, k))
    codes, z, s = rtn_grid(W, group)
    gi = formats.group_index(k, group)
    W_rtn = (codes - z[:, gi]) * s[:, gi]

    def at(g, Wg, Ugg):
        return s[:, g], z[:, g], np.zeros(len(W)), np.full(len(W), 15.0)

    # Damping matters once codes clamp: undamped, the updates on this ill-conditioned H
    # (cond ~1e5..1e7) push weights far past the group's range (measured 0.46-1.15x RTN).
    U = gptq.inverse_cholesky(H, k)
    q, W_hat, params = gptq.gptq(W, U, group, at)
    assert len(params) == formats.n_groups(k, group)
    np.testing.assert_array_equal(W_hat, (q - z[:, gi]) * s[:, gi])   # codes on the grid
    assert q.min() >= 0 and q.max() <= 15 and np.all(q == np.rint(q))
    assert out_err(X, W, W_hat) < 0.4 * out_err(X, W, W_rtn)             # measured 0.29-0.33


def test_gptq_with_a_diagonal_h_is_plain_rounding():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((5, 48))
    codes, z, s = rtn_grid(W, 16)
    H = np.diag(rng.uniform(0.5, 3.0, 48))
    U = gptq.inverse_cholesky(H, 48, damp=0.0)
    q, _, _ = gptq.gptq(W, U, 16, lambda g, Wg, Ugg: (s[:, g], z[:, g], 0.0, 15.0))
    np.testing.assert_array_equal(q, codes)                          # no coupling: nothing to push


def test_lazy_batches_do_not_change_the_result():
    rng = np.random.default_rng(2)
    _, H = correlated(rng, 400, 72)
    W = rng.standard_normal((6, 72))
    codes, z, s = rtn_grid(W, 8)
    U = gptq.inverse_cholesky(H, 72)
    at = lambda g, Wg, Ugg: (s[:, g], z[:, g], 0.0, 15.0)            # noqa: E731
    q1, w1, _ = gptq.gptq(W, U, 8, at, block=8)
    q2, w2, _ = gptq.gptq(W, U, 8, at, block=128)                    # 16 groups a batch, short last
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_allclose(w1, w2, rtol=0, atol=0)


def test_group_metric_is_the_compensated_loss():
    """‖e Ugg⁻¹‖² = e ((H_FF)⁻¹_gg)⁻¹ eᵀ: the loss left after the later columns F∖g compensate e."""
    rng = np.random.default_rng(3)
    _, H = correlated(rng, 300, 40)
    U = gptq.inverse_cholesky(H, 40, damp=0.0)
    c, ge = 16, 24                                                   # group = columns 16..23
    e = rng.standard_normal((3, ge - c))
    V = gptq.group_metric(U[c:ge, c:ge])
    F = H[c:, c:]
    M = np.linalg.inv(np.linalg.inv(F)[: ge - c, : ge - c])
    np.testing.assert_allclose(np.square(e @ V).sum(axis=1), np.einsum("ni,ij,nj->n", e, M, e), rtol=1e-8)
    # ... and the same by explicit least squares: the best later-column update d_R for e
    dR = -np.linalg.solve(F[ge - c:, ge - c:], F[ge - c:, : ge - c] @ e.T).T
    d = np.concatenate([e, dR], axis=1)
    np.testing.assert_allclose(np.einsum("ni,ij,nj->n", d, F, d), np.einsum("ni,ij,nj->n", e, M, e), rtol=1e-8)


@pytest.mark.parametrize("mode", dgq.COMPENSATE_MODES)
@pytest.mark.parametrize("search", [True, False])
def test_dgq_compensated_is_a_valid_dg_layer_with_lower_output_error(mode, search):
    rng = np.random.default_rng(4)
    k, group = 96, 32
    X, H = correlated(rng, 800, k)
    W = rng.standard_normal((20, k)) * 0.05
    W[3, 7] = 1.5                                                    # an outlier weight: big S elsewhere
    plain = dgq.dgq_linear(W, H, group, "static", 0.05, search=search)
    ql = dgq.dgq_linear(W, H, group, "static", 0.05, search=search, compensate=True, compensate_mode=mode)
    assert ql.kind == "dg"
    formats.validate(ql)
    formats.check_no_overflow(ql)
    e_c, e_p = dgq.layer_objective(ql, W, H), dgq.layer_objective(plain, W, H)
    assert np.all(e_c <= e_p * (1 + 1e-6))        # per row: never worse (to float32 products)
    assert e_c.sum() < 0.85 * e_p.sum()
    np.testing.assert_allclose(out_err(X, W, dgq.dequantize_f64(ql)), e_c.sum(), rtol=1e-8)
    np.testing.assert_allclose(ql.meta["obj"], e_c.sum(), rtol=1e-6)
    assert ql.meta["compensate"] == mode and ql.meta["rows_compensated"] > 0


def test_option_off_is_the_plain_search_bit_for_bit():
    """compensate=False reproduces the pre-compensation dgq_linear: rebuilt here from its parts."""
    rng = np.random.default_rng(5)
    k, group = 64, 16
    _, H = correlated(rng, 300, k)
    W = (rng.standard_normal((9, k)) * 0.1).astype(np.float32)
    ql = dgq.dgq_linear(W, H, group, "dynamic", compensate=False)
    assert ql.meta.keys() == {"search", "obj_rtn", "obj", "rows_rtn", "r1_mean", "r2_mean"}
    c0, z0, sg0, _ = dgq.phase1(W, None, group)
    s80, S0, q0, _, _ = dgq.phase2(W, None, c0, z0, sg0, group)
    c1, z1, sg1, _ = dgq.phase1(W, dgq.h_blocks(H, group), group)
    s81, S1, q1, _, _ = dgq.phase2(W, H, c1, z1, sg1, group)
    deq = lambda q, z, S, s8: np.float32(s8).astype(np.float64)[:, None] * dgq.dg_int8(q, z, S, group)  # noqa: E731
    keep = dgq.row_objective(W, deq(q1, z1, S1, s81), H) <= dgq.row_objective(W, deq(q0, z0, S0, s80), H)
    pick = lambda a, b: np.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
    ref = dgq._dg_linear(pick(q1, q0), pick(z1, z0), pick(S1, S0), pick(s81, s80), "dynamic", None, group, {})
    for name in ("qweight", "qzeros", "gscale", "cscale"):
        assert getattr(ql, name).tobytes() == getattr(ref, name).tobytes(), name
    rtn = dgq.dgq_linear(W, H, group, "dynamic", search=False)
    assert rtn.meta == {"search": False}


@pytest.mark.parametrize("H,msg", [
    (np.eye(5), "shape"),
    (np.where(np.eye(8) > 0, np.nan, 0.0), "NaN or Inf"),
    (np.full((8, 8), np.inf), "NaN or Inf"),
    (-np.eye(8), "positive semi-definite"),
    (np.ones((8, 8)) - 0.5 * np.eye(8), "positive semi-definite"),      # eigenvalues 7.5 and −0.5
    (np.triu(np.ones((8, 8))), "positive semi-definite"),
])
def test_bad_gram_matrix_gives_one_clear_error(H, msg):
    W = np.random.default_rng(6).standard_normal((4, 8))
    with pytest.raises(QuantizeError, match=msg):
        dgq.dgq_linear(W, H, 4, "dynamic", compensate=True)


def test_compensate_option_errors():
    W = np.random.default_rng(7).standard_normal((4, 8))
    with pytest.raises(QuantizeError, match="needs the calibration Gram matrix"):
        dgq.dgq_linear(W, None, 4, "dynamic", compensate=True)
    with pytest.raises(QuantizeError, match="compensate_mode"):
        dgq.dgq_linear(W, np.eye(8), 4, "dynamic", compensate=True, compensate_mode="bogus")
    with pytest.raises(QuantizeError, match="damping"):
        dgq.dgq_linear(W, np.eye(8), 4, "dynamic", compensate=True, damp=-1.0)


def test_dead_channels_and_an_all_zero_row():
    rng = np.random.default_rng(8)
    X, H = correlated(rng, 200, 32)
    H[5, :] = H[:, 5] = 0.0                                          # channel 5 never active
    W = rng.standard_normal((4, 32))
    W[2] = 0.0
    ql = dgq.dgq_linear(W, H, 16, "dynamic", compensate=True)
    formats.validate(ql)
    assert np.all(dgq.dequantize_f64(ql)[2] == 0.0)


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(damp):
    """U is upper triangular with UᵀU = (H + λI)⁻¹ (computed here the direct way), dead
    channels counted as H[j, j] = 1, and an asymmetric matrix refused."""
    rng = np.random.default_rng(11)
    _, H = correlated(rng, 200, 40)
    H[7, :] = H[:, 7] = 0.0                                          # a dead channel
    U = gptq.inverse_cholesky(H, 40, damp)
    assert np.array_equal(U, np.triu(U))
    Hd = H.copy()
    Hd[7, 7] = 1.0
    Hd[np.diag_indices(40)] += damp * np.mean(np.diag(Hd))
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(Hd), rtol=1e-7, atol=1e-9 * np.abs(np.linalg.inv(Hd)).max())
    A = H.copy()
    A[3, 5] += 1e-3 * np.abs(H).max()
    with pytest.raises(gptq.HessianError, match="symmetric"):
        gptq.inverse_cholesky(A, 40, damp)


def test_inverse_cholesky_of_reuses_the_factor_of_the_same_matrix_only():
    rng = np.random.default_rng(12)
    H1, H2 = correlated(rng, 100, 24)[1], correlated(rng, 100, 24)[1]
    U1 = gptq.inverse_cholesky_of(H1, 24)
    assert gptq.inverse_cholesky_of(H1, 24) is U1
    assert gptq.inverse_cholesky_of(H1, 24, 0.05) is not U1                # another damping
    U2 = gptq.inverse_cholesky_of(H2, 24)
    np.testing.assert_array_equal(U2, gptq.inverse_cholesky(H2, 24))
    np.testing.assert_array_equal(gptq.inverse_cholesky_of(H1, 24), U1)   # recomputed, same values
