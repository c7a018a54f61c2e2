"""The converter on CuPy (dgq-quantize --device cuda: calibration forwards, H and the weight
searches) equals the NumPy path up to float rounding of the searched objectives: a row may differ
only where two candidates tie to ~1e-5 relative, and the summed objective agrees to 1e-5."""
import numpy as np
import pytest

from converters import dgq
from converters.quantize import quantize_checkpoint
from engine.gpu.backend import has_gpu
from engine.model import LINEAR_NAMES

from test_quantize import gram, tiny_ckpt, tiny_seqs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")]

if has_gpu():
    import cupy as cp


@pytest.mark.parametrize("n,k,group,spread", [(96, 256, 64, 1.0), (40, 200, 32, 6.0), (130, 384, 128, 0.0)])
def test_dgq_linear_on_cupy_equals_numpy(n, k, group, spread):
    rng = np.random.default_rng(n + k)
    W = rng.standard_normal((n, k)) * (1 + spread * (rng.random((1, k)) < 0.1))
    _, H = gram(rng, 3 * k, k)
    ref = dgq.dgq_linear(W, H, group, "dynamic")
    got = dgq.dgq_linear(cp.asarray(W), cp.asarray(H), group, "dynamic")
    f_ref, f_got = dgq.layer_objective(ref, W, H), dgq.layer_objective(got, W, H)
    np.testing.assert_allclose(f_got, f_ref, rtol=1e-5)                 # per row: ties only
    same = np.all(ref.int8_weight() == got.int8_weight(), axis=1) & (ref.cscale == got.cscale)
    assert same.mean() > 0.9, same.mean()
    assert isinstance(got.qweight, np.ndarray) and got.meta["obj"] <= got.meta["obj_rtn"]


@pytest.mark.parametrize("mode", ["grid", "regroup"])
def test_dgq_linear_compensated_on_cupy(mode):
    """The default "grid" compensation runs on CuPy (Cholesky, triangular inverse, column walk)
    and equals NumPy up to ties; the other modes' group searches run on NumPy, bit for bit."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((48, 256)) * (1 + 4.0 * (rng.random((1, 256)) < 0.05))
    _, H = gram(rng, 800, 256)
    ref = dgq.dgq_linear(W, H, 32, "dynamic", compensate=True, compensate_mode=mode)
    got = dgq.dgq_linear(cp.asarray(W), cp.asarray(H), 32, "dynamic", compensate=True, compensate_mode=mode)
    if mode != "grid":
        np.testing.assert_array_equal(got.int8_weight(), ref.int8_weight())
        return
    np.testing.assert_allclose(dgq.layer_objective(got, W, H), dgq.layer_objective(ref, W, H), rtol=1e-5)
    same = np.all(ref.int8_weight() == got.int8_weight(), axis=1) & (ref.cscale == got.cscale)
    assert same.mean() > 0.9, same.mean()
    assert got.meta["rows_compensated"] > 0 and got.meta["obj"] < got.meta["obj_uncompensated"]


def test_inverse_cholesky_on_cupy_equals_numpy():
    from converters import gptq
    rng = np.random.default_rng(4)
    _, H = gram(rng, 500, 200)
    H[5, :] = H[:, 5] = 0.0                                            # a dead channel
    ref = gptq.inverse_cholesky(H, 200)
    got = gptq.inverse_cholesky(cp.asarray(H), 200)
    assert isinstance(got, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(got), ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    with pytest.raises(gptq.HessianError, match="positive semi-definite"):
        gptq.inverse_cholesky(cp.asarray(-np.eye(8)), 8)
    with pytest.raises(gptq.HessianError, match="positive semi-definite"):
        gptq.inverse_cholesky(cp.asarray(np.ones((8, 8)) - 0.5 * np.eye(8)), 8, damp=0.0)


@pytest.mark.parametrize("n,k,group", [(300, 256, 128), (77, 200, 32), (64, 192, 64), (50, 192, 48), (40, 160, 16)])
def test_gptq_column_kernel_equals_the_column_walk(n, k, group):
    """On CuPy the default rounding's column walk is one kernel a sub-block; it must give the
    per-column walk's codes, Ŵ and compensated weights exactly (a wrapped rounding takes that
    walk; every group start records the weights it sees, which carry every earlier column's
    error bit for bit), and match NumPy up to the GEMMs' float rounding. Steps of 0.3-0.6 keep
    most codes inside their bounds, so a rounding-level difference would show."""
    from converters import gptq
    rng = np.random.default_rng(n)
    W = rng.standard_normal((n, k))
    _, H = gram(rng, 2 * k, k)
    G = -(-k // group)
    step = 0.3 + 0.3 * rng.random((n, G))
    z = rng.integers(6, 10, (n, G)).astype(np.float64)
    lo, hi = np.maximum(z - 7, 0.0), np.minimum(z + 7, 15.0)

    def at(xp, seen):
        arrs = [xp.asarray(a) for a in (step, z, lo, hi)]

        def params(g, Wg, Ugg):
            seen.append(cp.asnumpy(Wg) if xp is cp else Wg.copy())
            return tuple(a[:, g] for a in arrs)
        return params
    U = gptq.inverse_cholesky(cp.asarray(H), k)
    seen_k, seen_w = [], []
    fused = gptq.gptq(cp.asarray(W), U, group, at(cp, seen_k))
    walk = gptq.gptq(cp.asarray(W), U, group, at(cp, seen_w), rounding=lambda w, p: gptq.uniform_round(w, p))
    np.testing.assert_array_equal(cp.asnumpy(fused[0]), cp.asnumpy(walk[0]))
    np.testing.assert_array_equal(cp.asnumpy(fused[1]), cp.asnumpy(walk[1]))
    assert len(seen_k) == len(seen_w) == G
    for a, b in zip(seen_k, seen_w):
        np.testing.assert_array_equal(a, b)
    inside = (cp.asnumpy(fused[0]) > lo.repeat(group, 1)[:, :k]) & (cp.asnumpy(fused[0]) < hi.repeat(group, 1)[:, :k])
    assert inside.mean() > 0.5, inside.mean()
    ref = gptq.gptq(W, gptq.inverse_cholesky(H, k), group, at(np, []))
    assert (cp.asnumpy(fused[0]) == ref[0]).mean() > 0.99


def _cpu_and_gpu(calibration):
    """quantize_checkpoint of one tiny model on NumPy and on CuPy: (w_cpu, r_cpu, w_gpu, r_gpu)."""
    ck = tiny_ckpt(hidden_size=64, intermediate_size=128, head_dim=8)
    kw = dict(group=16, calib=tiny_seqs(ck.config, n=4, t=32), progress=False, calibration=calibration)
    return (*quantize_checkpoint(ck, "dgq", **kw), *quantize_checkpoint(ck, "dgq", **kw, xp=cp))


def test_quantize_checkpoint_on_gpu_equals_cpu():
    # float calibration: both paths see the same H (sequentially, a tie decided the other way
    # in one layer would move the activations every later layer calibrates on)
    w_cpu, r_cpu, w_gpu, r_gpu = _cpu_and_gpu("float")
    assert r_gpu["search_device"] == "cuda" and r_cpu["search_device"] == "cpu"
    np.testing.assert_allclose(r_gpu["objective"]["final"], r_cpu["objective"]["final"], rtol=1e-4)
    rows = same = 0
    for a, b in zip(w_cpu.layers, w_gpu.layers):
        for name in LINEAR_NAMES:
            qa, qb = getattr(a, name), getattr(b, name)
            assert (qa.ascale is None) == (qb.ascale is None)
            if qa.ascale is not None:                      # absmax from a GPU forward: float rounding
                np.testing.assert_allclose(qb.ascale, qa.ascale, rtol=1e-5)
            eq = np.all(qa.int8_weight() == qb.int8_weight(), axis=1)
            rows, same = rows + eq.size, same + eq.sum()
    assert same / rows > 0.95, same / rows


def test_sequential_calibration_on_gpu_matches_cpu():
    """The quantized-layer forward of sequential calibration (calibrate._DeviceLinear on CuPy)."""
    _, r_cpu, _, r_gpu = _cpu_and_gpu("sequential")
    np.testing.assert_allclose(r_gpu["objective"]["final"], r_cpu["objective"]["final"], rtol=1e-3)
