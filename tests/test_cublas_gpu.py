"""cuBLAS past CuPy (engine/gpu/cublas.py): the FP16 path's GEMMs past our GEMV's rows,
captured in a CUDA graph, equal cp.matmul's eager product bit for bit; and the FP16 path's
decode step is graphed at any batch, equal to its eager decoding."""
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
    want = cp.matmul(x, w.T)
    out = cp.full((m, n), cp.nan, cp.float16)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        assert cublas.gemm_f16(cp, x, w, out)
        g = s.end_capture()
    assert bool(cp.isnan(out).all())          # captured, not run
    g.launch(s)
    s.synchronize()
    cp.testing.assert_array_equal(out, want)


def test_strided_rows_and_refusals():
    """A view of every other row runs with its leading dimension; a transposed operand or a
    mismatched shape is refused (False: the caller's cp.matmul runs or raises)."""
    import cupy as cp
    from engine.gpu import cublas
    rng = np.random.default_rng(0)
    big = cp.asarray(rng.standard_normal((40, 64)).astype(np.float16))
    w = cp.asarray(rng.standard_normal((48, 64)).astype(np.float16))
    x = big[::2]
    out = cp.empty((20, 48), cp.float16)
    assert cublas.gemm_f16(cp, x, w, out)
    cp.testing.assert_array_equal(out, cp.matmul(x, w.T))
    assert not cublas.gemm_f16(cp, big.T[:20], w[:, :40], cp.empty((20, 48), cp.float16))
    assert not cublas.gemm_f16(cp, big, w, cp.empty((40, 47), cp.float16))
    assert not cublas.gemm_f16(cp, big.astype(cp.float32), w, cp.empty((40, 48), cp.float16))


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
