"""cuBLAS past CuPy (engine/gpu/cublas.py): the FP16 path's GEMMs past our GEMV's rows,
captured in a CUDA graph, replay the eager call's product bit for bit and agree with a float64
product; strided operands run with their leading dimensions, and what cuBLAS cannot take is
refused; the FP16 path's decode step is graphed at any batch, equal to its eager decoding (its
prefill, through the same calls, is checked against the NumPy model in test_model_cuda.py)."""
import numpy as np
import pytest

from engine.gpu.backend import has_gpu
from engine.model import ModelWeights

from test_model import random_tensors, tiny_config

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)


@pytest.mark.parametrize("m,k,n", [(9, 64, 96), (32, 4096, 4096), (33, 1000, 777), (100, 576, 49152), (5, 7, 3)])
def test_captured_gemm_equals_cupy_matmul(m, k, n):
    import cupy as cp
    from engine.gpu import cublas
    assert cublas.available()
    rng = np.random.default_rng(m + k + n)
    x = cp.asarray(rng.standard_normal((m, k)).astype(np.float16))
    w = cp.asarray((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16))
    eager = cp.empty((m, n), cp.float16)
    out = cp.full((m, n), cp.nan, cp.float16)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        assert cublas.gemm_f16(cp, x, w, eager)   # eagerly first, as the decode step's first run
        s.begin_capture()
        assert cublas.gemm_f16(cp, x, w, out)
        g = s.end_capture()
    s.synchronize()
    assert bool(cp.isnan(out).all())          # captured, not run
    g.launch(s)
    s.synchronize()
    cp.testing.assert_array_equal(out, eager)
    ref = x.get().astype(np.float64) @ w.get().astype(np.float64).T
    err = np.abs(out.get().astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err < 2e-3, err


@pytest.mark.parametrize("m,k,n", [(40, 1000, 300), (17, 576, 1536)])
def test_fp32_output(m, k, n):
    """fp16 operands into a float32 out (the pot3-a8 fp16-Ŵ GEMM's product, gpu/pot_a8.py): the
    fp32 sums unrounded, within fp32 summation error of a float64 product; an fp32 out that
    overlaps an input is refused as an fp16 one is."""
    import cupy as cp
    from engine.gpu import cublas
    rng = np.random.default_rng(m + n)
    x = cp.asarray(rng.integers(-127, 128, (m, k)).astype(np.float16))          # exact in fp16
    w = cp.asarray((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16))
    out = cp.empty((m, n), cp.float32)
    assert cublas.gemm_f16(cp, x, w, out)
    xf, wf = x.get().astype(np.float64), w.get().astype(np.float64)
    ref, mag = xf @ wf.T, np.abs(xf) @ np.abs(wf).T
    assert (np.abs(out.get().astype(np.float64) - ref) <= mag * k * 2.0 ** -23).all()
    buf = cp.zeros(m * max(k, n), cp.float32)
    assert not cublas.gemm_f16(cp, buf.view(cp.float16)[:2 * m * k].reshape(m, 2 * k)[:, :k], w, buf[:m * n].reshape(m, n))


def test_strided_rows_and_refusals():
    """Views with a leading dimension past their width (every other row of x, the first columns
    of w, a column block of out) run as such; a transposed operand, a mismatched shape, another
    dtype or an out overlapping an input are refused (False: the caller's cp.matmul runs or
    raises)."""
    import cupy as cp
    from engine.gpu import cublas
    rng = np.random.default_rng(0)
    big = cp.asarray(rng.standard_normal((40, 64)).astype(np.float16))
    wide = cp.asarray((rng.standard_normal((48, 64)) / 8).astype(np.float16))
    x, w = big[::2, :40], wide[:, :40]                   # ld 128 and 64 for K = 40
    canvas = cp.zeros((20, 100), cp.float16)
    out = canvas[:, 10:58]                               # ld 100 for N = 48
    assert cublas.gemm_f16(cp, x, w, out)
    ref = x.get().astype(np.float64) @ w.get().astype(np.float64).T
    np.testing.assert_allclose(out.get().astype(np.float64), ref, rtol=2e-3, atol=2e-3)
    assert not canvas[:, :10].any() and not canvas[:, 58:].any()       # nothing outside out
    assert not cublas.gemm_f16(cp, big.T[:20], w, cp.empty((20, 48), cp.float16))       # columns of stride 64
    assert not cublas.gemm_f16(cp, big, wide, cp.empty((40, 47), cp.float16))
    assert not cublas.gemm_f16(cp, big.astype(cp.float32), wide, cp.empty((40, 48), cp.float16))
    square = cp.asarray(rng.standard_normal((64, 64)).astype(np.float16))
    assert not cublas.gemm_f16(cp, square, wide[:, :64][:48], square[:, :48])           # out overlaps x


@pytest.mark.parametrize("batch", [10, 33])
def test_fp16_path_graphed_past_the_gemv(batch):
    """The FP16 path at batch 10 and 33 (cuBLAS for every linear and the lm_head): its decode
    step is captured whole, and graphed greedy decoding equals eager."""
    from engine.gpu.model import CudaModel
    c = tiny_config(head_dim=64, hidden_size=64, intermediate_size=96)
    mw = ModelWeights.from_hf(c, random_tensors(c, 3))
    gm = CudaModel(mw)
    assert gm.graphable(batch) == (True, True)
    tokens = np.array([3, 17, 5, 60, 0, 42, 8, 8, 19, 33, 1]) % c.vocab_size
    outs = []
    for use_graph in (True, False):
        cache = gm.new_cache(32, batch=batch)
        firsts = [int(gm.prefill(tokens[:2 + i % 7], cache, seq=i).astype(np.float32).argmax()) for i in range(batch)]
        outs.append(gm.decode_greedy(cache, firsts, 6, use_graph))
        assert (cache.step.graph is not None) == use_graph
    np.testing.assert_array_equal(outs[0], outs[1])
