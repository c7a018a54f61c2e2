"""Weight-only b-bit GEMV / GEMM (cuda/gemv_wb.cu) against the NumPy reference of their formats (gpu-marked).

The GEMV and the "mma" GEMM build exact unit weights (±2^-(m-1) for PoT, q - z for the uniform
kinds), take the products on the tensor cores in fp32 and apply the group scale to each tile's
fp32 partial sum, so each output is the float64 reference rounded to fp16: within one fp16 ulp,
plus the fp32 summation error (bounded by 2^-20 · Σ|x·w|). The "dequant" path for M > 16 writes
Ŵ = unit · s in fp16 for cuBLAS: exact for PoT; for int it rounds each (q - z)·s once, which adds
at most 2^-11 · Σ|x·w|.
"""
import zlib

import numpy as np
import pytest

from converters.pot import int_linear, pot_linear
from engine.gpu.backend import has_gpu

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)


def fp16_ulp(v):
    return np.spacing(np.abs(v).astype(np.float16)).astype(np.float64)


@pytest.mark.parametrize("kind", ["pot", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group", [(72, 256, 128), (40, 96, 32), (33, 100, 64), (8, 4096, 128), (24, 576, 64),
                                       (19, 33, 32), (40, 257, 64), (24, 4480, 64)])   # 35 k tiles: the ring reloads
@pytest.mark.parametrize("m,large_m,xs", [(1, None, True), (3, None, True), (16, None, True), (1, None, False),
                                          (9, None, False), (17, "mma", True), (40, "mma", True), (300, "mma", True),
                                          (17, "dequant", True), (300, "dequant", True), (17, "slices", False),
                                          (40, "slices", False)])
def test_gemv_wb_matches_reference(kind, bits, n, k, group, m, large_m, xs, monkeypatch):
    """xs: the GEMV with x staged in shared memory (True) or prefetched into registers (False)."""
    import cupy as cp

    from engine.gpu import tuning, wb
    monkeypatch.setattr(tuning.WB_TUNE, "xs_max_rows", 16 if xs else 0)   # both GEMV x paths at every M
    rng = np.random.default_rng(zlib.crc32(repr((kind, bits, n, k, group, m)).encode()))
    W = (rng.standard_normal((n, k)) * rng.uniform(0.01, 0.2, (n, 1))).astype(np.float32)
    ql = (pot_linear if kind == "pot" else int_linear)(W, bits, group, search=False)
    x = rng.standard_normal((m, k)).astype(np.float16)
    wd = ql.dequantize().astype(np.float64)                              # (N, K), exact fp16 values
    ref = x.astype(np.float64) @ wd.T                                     # (M, N)
    mass = np.abs(x.astype(np.float64)) @ np.abs(wd).T
    rounded_w = large_m == "dequant" and kind == "int"
    bound = fp16_ulp(ref) + (2.0 ** -11 if rounded_w else 2.0 ** -20) * mass + 1e-7
    p = wb.pack_wb(ql)
    out = cp.full((m, n), np.nan, dtype=cp.float16)                       # poisoned: every element written
    wb.gemv_wb(cp.asarray(x), p, out, large_m=large_m)
    got = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(got).all()
    err = np.abs(got - ref)
    assert (err <= bound).all(), f"max err {err.max()} at {np.unravel_index(np.argmax(err - bound), err.shape)}"


@pytest.mark.parametrize("kind,bits", [("pot", 2), ("pot", 3), ("pot", 4), ("int", 2), ("int", 3), ("int", 4)])
@pytest.mark.parametrize("n,k,group", [(72, 256, 128), (40, 257, 64), (24, 4480, 64), (200, 1000, 32),
                                       (56, 1408, 128),    # 11 k tiles: warp 5 has one live tile, warps 6-7 none
                                       (40, 96, 32)])      # one k tile: on one block the cursor's jump is 1 tile
@pytest.mark.parametrize("m,xs", [(1, True), (5, True), (16, True), (1, False), (12, False)])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_gemv_wb_blocks_take_several_row_tiles(kind, bits, n, k, group, m, xs, blocks, monkeypatch):
    """The resident grid (WB_TUNE.resident) capped at `blocks` blocks: each block takes every
    blocks-th row tile with its ring of weights running on, and meets its warps once a row tile.
    Bit-equal to a block a row tile (the same sums in the same order)."""
    import cupy as cp

    from engine.gpu import tuning, wb
    monkeypatch.setattr(tuning.WB_TUNE, "xs_max_rows", 16 if xs else 0)
    rng = np.random.default_rng(zlib.crc32(repr((kind, bits, n, k, group, m, "grid")).encode()))
    W = (rng.standard_normal((n, k)) * rng.uniform(0.01, 0.2, (n, 1))).astype(np.float32)
    ql = (pot_linear if kind == "pot" else int_linear)(W, bits, group, search=False)
    x = cp.asarray(rng.standard_normal((m, k)).astype(np.float16))
    p = wb.pack_wb(ql)
    outs = []
    for resident, cap in ((False, 0), (True, blocks)):
        monkeypatch.setattr(tuning.WB_TUNE, "resident", resident)
        monkeypatch.setattr(tuning.WB_TUNE, "max_blocks", cap)
        out = cp.full((m, n), np.nan, dtype=cp.float16)
        wb.gemv_wb(x, p, out)
        outs.append(cp.asnumpy(out))
    assert np.isfinite(outs[0]).all()
    np.testing.assert_array_equal(outs[1], outs[0])
    ref = x.get().astype(np.float64) @ ql.dequantize().astype(np.float64).T      # and both right
    mass = np.abs(x.get().astype(np.float64)) @ np.abs(ql.dequantize().astype(np.float64)).T
    assert (np.abs(outs[0] - ref) <= fp16_ulp(ref) + 2.0 ** -20 * mass + 1e-7).all()
    nt, xsmem, smem = wb.gemv_variant(p, m)
    assert (nt, xsmem) == (1 if m <= 8 else 2, int(xs and m * -(-k // 128) * 256 <= tuning.WB_TUNE.xs_max_bytes))
    fn = wb.kargs.function(wb.WB_FILE, f"gemv_{kind}<{bits}, {nt}, {xsmem}>")
    assert wb.gemv_grid(fn, -(-n // 16), smem) <= blocks       # the cap held (grid of the last call's setting)


@pytest.mark.parametrize("kind,bits", [("pot", 3), ("int", 4)])
@pytest.mark.parametrize("m", [2, 8, 9, 15])
def test_gemv_wb_lanes_past_m_cannot_reach_outputs(kind, bits, m, monkeypatch):
    """x staged in shared memory: the mma columns past M (tokens M..8·NT-1) read token M - 1 instead
    of a predicated zero. Each column is its own dot product and only tokens below M are stored, so
    rows below M - 1 are bit-identical whatever token M - 1 holds (NaN, Inf), and all rows match the
    reference when it is finite. M = 9 and 15 clamp in the second token tile (NT = 2)."""
    import cupy as cp

    from engine.gpu import tuning, wb
    monkeypatch.setattr(tuning.WB_TUNE, "xs_max_rows", 16)
    n, k, group = 40, 576, 64
    rng = np.random.default_rng(zlib.crc32(repr((kind, bits, m, "past-m")).encode()))
    W = (rng.standard_normal((n, k)) * rng.uniform(0.01, 0.2, (n, 1))).astype(np.float32)
    ql = (pot_linear if kind == "pot" else int_linear)(W, bits, group, search=False)
    p = wb.pack_wb(ql)
    x = rng.standard_normal((m, k)).astype(np.float16)
    wd = ql.dequantize().astype(np.float64)
    outs = []
    for last in (x[m - 1], np.where(np.arange(k) % 2 == 0, np.inf, np.nan).astype(np.float16)):
        xi = x.copy()
        xi[m - 1] = last
        out = cp.full((m, n), np.nan, dtype=cp.float16)
        wb.gemv_wb(cp.asarray(xi), p, out)
        outs.append(cp.asnumpy(out))
    ref = x.astype(np.float64) @ wd.T
    bound = fp16_ulp(ref) + 2.0 ** -20 * (np.abs(x.astype(np.float64)) @ np.abs(wd).T) + 1e-7
    assert (np.abs(outs[0].astype(np.float64) - ref) <= bound).all()
    np.testing.assert_array_equal(outs[1][:m - 1], outs[0][:m - 1])


def test_gemv_wb_rejects_other_kinds():
    from engine.bench.e2e import random_dg_layer
    from engine.gpu import wb
    from engine.gpu.ops import CudaOpError
    with pytest.raises(CudaOpError, match="pot2..4"):
        wb.pack_wb(random_dg_layer(np.random.default_rng(0), 16, 128))


def _wb_model(kind, bits, seed=1):
    from engine.model import LINEAR_NAMES, ModelWeights
    from test_model import random_tensors, tiny_config
    c = tiny_config(head_dim=64, hidden_size=64, intermediate_size=96)
    mw = ModelWeights.from_hf(c, random_tensors(c, seed))
    quant = pot_linear if kind == "pot" else int_linear
    for L in mw.layers:
        for n in LINEAR_NAMES:
            setattr(L, n, quant(getattr(L, n), bits, 32, search=False))
    return mw


@pytest.mark.parametrize("kind,bits", [("pot", 3), ("pot", 4), ("int", 3)])
def test_gpu_engine_runs_weight_only_models(kind, bits):
    """CudaModel with every linear pot/int (fused q|k|v, gate|up through gemv_wb, fp16
    activations like the FP16 path): prefill logits against the NumPy reference, and the
    captured decode step against eager decoding and the reference's greedy choices."""
    from engine.gpu.model import CudaModel
    from engine.model import Model
    from test_model_cuda import check_graph_decode
    mw = _wb_model(kind, bits)
    tokens = np.arange(20) % mw.config.vocab_size
    g, r = CudaModel(mw).forward(tokens).get(), Model(mw).forward(tokens)
    assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-2                # as the FP16 path's test
    check_graph_decode(mw)


def test_gpu_engine_rejects_a_mixed_fused_group():
    from engine.gpu.backend import BackendError
    from engine.gpu.model import CudaModel
    mw = _wb_model("pot", 3)
    L = mw.layers[0]
    L.k = int_linear(L.k.dequantize(), 3, 32)                                # q|k|v would mix kinds
    with pytest.raises((BackendError, ValueError), match="kind"):
        CudaModel(mw)


def test_graphed_decode_past_16_sequences():
    """At batch 20 the b-bit linears run M = 20 inside the captured step: there gemv_wb takes
    16-row GEMV slices (cuBLAS, its eager large-M path, cannot be captured). Graphed decoding
    equals eager decoding."""
    from engine.gpu.model import CudaModel
    mw = _wb_model("pot", 3)
    gm = CudaModel(mw)
    assert gm.graphable(20)[0]
    tokens = np.array([3, 17, 5, 60, 0, 42, 8, 8, 19, 33, 1]) % mw.config.vocab_size
    outs = []
    for use_graph in (True, False):
        cache = gm.new_cache(48, batch=20)
        firsts = [int(gm.prefill(tokens[:3 + i % 5], cache, seq=i).astype(np.float32).argmax()) for i in range(20)]
        outs.append(gm.decode_greedy(cache, firsts, 6, use_graph))
        assert (cache.step.graph is not None) == use_graph
    np.testing.assert_array_equal(outs[0], outs[1])
