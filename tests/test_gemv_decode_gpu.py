"""The dp4a decode GEMV (M = 1, cuda/gemm_a8w4.cu DP: the codes multiplied by dp4a,
S·(Σx·q − z·Σx)) against the NumPy integer reference and against the mma GEMV, bit for bit, in
every epilogue (fp16, int32, residual add, SiLU with absmax); a decode step with it on gives the
tokens and logits of the step with it off."""
from __future__ import annotations

import numpy as np
import pytest

from engine.gpu import backend, tuning
from engine.gpu import ops as ops_cuda

from test_kernels_gpu import _acc_check, extreme_dg, random_dg, random_x8

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not backend.has_gpu(), reason="needs an NVIDIA GPU and CuPy")]


DP_CFGS = [{"dp": True, "rw": rw, "u": u, "nw": nw} for rw, u, nw in tuning.GEMV_DP_CFGS]


@pytest.mark.parametrize("k,n,group", [(4096, 4104, 128), (11008, 200, 128), (576, 24, 64), (2304, 1032, 256),
                                       (128, 8, 128), (700, 200, 128), (2048, 64, 512), (1536, 40, 1024)])
def test_dp4a_gemv_bitexact(k, n, group):
    import cupy as cp
    ql = random_dg(n, k, group, seed=n + k)
    x8 = random_x8(1, k, seed=k)
    sx = np.float32([0.0137])
    for cfg in [{"dp": False}] + DP_CFGS:
        layer, ref = _acc_check(ql, x8, "gemv", cfg=cfg)
    want = ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx), layer, kernel="gemv", cfg={"dp": False}).get()
    np.testing.assert_array_equal(want.view(np.uint16),
                                  formats_f16(ref, sx, ql.cscale).view(np.uint16))
    h0 = np.random.default_rng(k).standard_normal((1, n)).astype(np.float32)
    for cfg in DP_CFGS + [{}]:                    # {}: the default, dp4a at M = 1
        got = ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx), layer, kernel="gemv", cfg=cfg,
                                 out=cp.full((1, n), np.nan, cp.float16))
        np.testing.assert_array_equal(got.get().view(np.uint16), want.view(np.uint16), err_msg=str(cfg))
        h = cp.asarray(h0)
        ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx), layer, kernel="gemv", cfg=cfg, resid=h)
        np.testing.assert_array_equal(h.get(), h0 + want.astype(np.float32), err_msg=str(cfg))


def formats_f16(acc, sx, cscale):
    from engine import formats
    return formats.epilogue_ref(acc, sx, cscale).astype(np.float16)


def test_dp4a_gemv_extremes():
    """Codes 0 and 15 against zero points 15 and 0, S = 127 and 8/9, |x| = 127, K = 16384."""
    k = 16384
    rng = np.random.default_rng(6)
    ql = extreme_dg(64, k, 128, rng)
    for x in (np.where(rng.random((1, k)) < 0.5, -127, 127), np.full((1, k), -127), np.full((1, k), 127)):
        for cfg in DP_CFGS:
            _acc_check(ql, x.astype(np.int8), "gemv", cfg=cfg)


def test_dp4a_rejects_what_it_cannot_run():
    import cupy as cp
    layer = ops_cuda.pack_for_gpu(random_dg(64, 256, 128, seed=1))
    with pytest.raises(ops_cuda.CudaOpError, match="dp4a GEMV takes M = 1"):
        ops_cuda.gemm_a8w4(cp.asarray(random_x8(2, 256)), cp.ones(2, cp.float32), layer, kernel="gemv",
                           cfg={"dp": True})
    with pytest.raises(ops_cuda.CudaOpError, match="not instantiated"):
        ops_cuda.gemm_a8w4(cp.asarray(random_x8(1, 256)), cp.ones(1, cp.float32), layer, kernel="gemv",
                           cfg={"dp": True, "rw": 4, "u": 2})


@pytest.mark.parametrize("inter,k", [(64, 576), (1376, 1024), (5504, 4096)])
def test_dp4a_silu_gemv_equals_mma(inter, k):
    """The SiLU GEMV (gate|up interleaved) with dp4a: the mma path's silu(gate)·up and absmax bits."""
    import cupy as cp
    from engine.gpu.linear import _fuse
    gu = _fuse([random_dg(inter, k, 128, seed=1), random_dg(inter, k, 128, seed=2)])
    layer = ops_cuda.pack_for_gpu(gu.take_rows(ops_cuda.interleave_rows(2 * inter)))
    x8 = cp.asarray(random_x8(1, k, seed=5))
    sx = cp.asarray(np.float32([0.013]))
    outs = []
    for dp in (False, True):
        mf = cp.full((1, inter), np.nan, cp.float32)
        amax = cp.zeros((1,), cp.uint32)
        ops_cuda.gemv_a8w4_silu(x8, sx, layer, mf, amax, dp=dp)
        outs.append((mf.get(), amax.get()))
    assert not np.isnan(outs[0][0]).any() and outs[0][1][0] > 0
    np.testing.assert_array_equal(outs[1][0], outs[0][0])
    np.testing.assert_array_equal(outs[1][1], outs[0][1])


def _step_off_and_on(monkeypatch, field: str, check, batch: int = 1, intermediate: int = 1408) -> None:
    """A tiny model's captured decode step (batch 1: q|k|v, o and down with the residual add, the SiLU
    gate|up) with tuning.GEMM.<field> off, then on: 30 greedy tokens of each sequence and the last
    logits must be equal; check(on, the kernel expressions launched) after each run."""
    from engine.gpu import kargs
    from engine.gpu.model import CudaModel
    from test_model_cuda import quantized_tiny
    mw = quantized_tiny("dynamic", seed=5, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
                        hidden_size=512, intermediate_size=intermediate, num_hidden_layers=3,
                        max_position_embeddings=256)
    gm = CudaModel(mw)
    prompts = [(np.arange(3, 90) * (1 + i)) % mw.config.vocab_size for i in range(batch)]
    runs, seen = [], []
    real = kargs.launch

    def counted(kf, expr, *a, **kw):
        seen.append(expr)
        return real(kf, expr, *a, **kw)
    monkeypatch.setattr(kargs, "launch", counted)
    for on in (False, True):
        seen.clear()
        monkeypatch.setattr(tuning.GEMM, field, on)
        cache = gm.new_cache(256, batch=batch)
        firsts = [int(gm.prefill(p, cache, seq=i).get().astype(np.float32).argmax()) for i, p in enumerate(prompts)]
        toks = gm.decode_greedy(cache, firsts, 30, True)
        runs.append((toks, cache.step.bufs.logits[:batch].get()))
        check(on, list(seen))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_decode_step_with_dp4a_changes_no_bits(monkeypatch):
    """tuning.GEMM.gemv_dp4a on: the captured batch-1 step replays to the tokens and logits it gives
    with the mma GEMV."""
    def check(on, exprs):
        assert _dp4a_launches(exprs) == ({"silu", "plain"} if on else set()), exprs   # SiLU GEMV and others
    _step_off_and_on(monkeypatch, "gemv_dp4a", check)


def _dp4a_launches(exprs) -> set:
    """Which GEMVs ("silu", "plain") of the launched kernel expressions ran the dp4a variant,
    gemm_a8w4_gemv<MT, RW, U, OUT_I32, SILU, NW, DP>."""
    kinds = set()
    for e in exprs:
        name, _, args = e.partition("<")
        a = args.rstrip(">").split(",")
        if name == "gemm_a8w4_gemv" and len(a) == 7 and a[6] == "true":
            kinds.add("silu" if a[4] == "true" else "plain")
    return kinds
