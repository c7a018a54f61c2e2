"""cuda/gemv_pot_a8.cu (W3-PoT × INT8 dp4a GEMV) against formats/pot_a8.py's reference, bit for bit,
and a model of pot3 layers with INT8 activations (act "dynamic") against the CPU model (gpu-marked).

First run on an H100 in session 37; the compact tail (the last Kc % 32 chunks stored unpadded, read by
one warp after its full steps) passed on an H100 in session 38: the shapes below with K % 1024 != 0
run it, the tail as a warp's first step (K < 1024, 1536, 2080), second (9300 at NW = 8) and later
(9300 and 13412 at NW = 4, 17000).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from engine.formats import pot_a8 as P
from engine.gpu.backend import has_gpu

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)


def layer(rng, n, k):
    """((words, tail), (scales, stail)) of a random n×k layer, as pack_pot_a8 and pack_scales make them."""
    codes = rng.integers(0, 8, (n, k)).astype(np.uint8)
    s = (rng.uniform(0.005, 0.05, (n, -(-k // 128))) * rng.choice([-1, 1], (n, -(-k // 128)))).astype(np.float16)
    return P.pack_pot_a8(codes), P.pack_scales(s, k)


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192),
                                 (1, 32), (7, 77), (13, 1000), (40, 3100), (9, 2080), (100, 5000),
                                 (960, 576), (3072, 576), (576, 1536), (40, 9300), (13, 13412), (24, 17000)])
def test_gemv_pot_a8_matches_reference(n, k):
    import cupy as cp

    from engine.gpu import pot_a8
    rng = np.random.default_rng(n * 131 + k)
    words, scale = layer(rng, n, k)
    p = pot_a8.upload(words, scale, n, k)
    kp = 32 * P.n_chunks(k)
    x8 = rng.integers(-127, 128, kp).astype(np.int8)
    x8[k:] = rng.integers(-127, 128, kp - k)            # bytes past K meet code 0: any value
    sx = np.float32(0.0123)
    for rb, nw in pot_a8.VARIANTS:
        want = P.gemv_pot_a8_ref(words, scale, x8, sx, n, k, nw)
        got = pot_a8.gemv_pot_a8(cp.asarray(x8), cp.asarray([sx], dtype=cp.float32), p, variant=(rb, nw)).get()
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (rb, nw)


@functools.lru_cache(maxsize=None)
def _tokens_case(n, k, m=7):
    """A random n×k layer, m tokens' x8 rows (padded past 32·Kc), their scales, a residual stream
    and the reference's rows (NW = 4), computed once for every test of the shape."""
    rng = np.random.default_rng(n + k)
    words, scale = layer(rng, n, k)
    ldx = 32 * P.n_chunks(k) + 16
    x8 = rng.integers(-127, 128, (m, ldx)).astype(np.int8)
    sx = rng.uniform(0.001, 0.1, m).astype(np.float32)
    h = rng.standard_normal((m, n)).astype(np.float32)
    want = np.stack([P.gemv_pot_a8_ref(words, scale, x8[i], sx[i], n, k, 4) for i in range(m)])
    return words, scale, x8, sx, h, want


@pytest.mark.parametrize("tok_x,mt,rb", [(True, 1, 8), (False, 1, 8), (True, 2, 8), (True, 4, 8), (False, 4, 8),
                                         (True, 2, 4), (True, 4, 4)])
@pytest.mark.parametrize("n,k", [(300, 1000), (4096, 4096), (37, 9300)])
def test_gemv_pot_a8_tokens_are_rows_of_the_grid(tok_x, mt, rb, n, k, monkeypatch):
    """7 tokens (grid x, WB_TUNE.pa8_tok_x, or y; WB_TUNE.pa8_mt tokens a block, the last 7 % MT
    one each): each row bit-equal to the one-token reference, x8 rows padded past 32·Kc (ldx),
    each token its own scale, resid adding the same values."""
    import cupy as cp

    from engine.gpu import kargs, pot_a8
    from engine.gpu.tuning import WB_TUNE
    monkeypatch.setattr(WB_TUNE, "pa8_tok_x", tok_x)
    monkeypatch.setattr(WB_TUNE, "pa8_mt", mt)
    words, scale, x8, sx, h, want = _tokens_case(n, k)
    p = pot_a8.upload(words, scale, n, k)
    seen = []
    with kargs.intercepted(lambda expr, run: (seen.append(expr), run())):
        got = pot_a8.gemv_pot_a8(cp.asarray(x8), cp.asarray(sx), p, variant=(rb, 4)).get()
    resid = cp.asarray(h)
    assert pot_a8.gemv_pot_a8(cp.asarray(x8), cp.asarray(sx), p, variant=(rb, 4), resid=resid) is resid
    assert seen == ([f"gemv_pot3_a8<{rb}, 4, false, {mt}>"] if mt > 1 else []) + [f"gemv_pot3_a8<{rb}, 4, false>"]
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    # with resid: h += float(fp16(y)), the norm's add (CudaModel._fold_resid), in float32
    assert np.array_equal(resid.get(), h + want.astype(np.float32))


def _pot_model(act="dynamic", bits=3, group=128, seed=1):
    """A tiny random model with pot<bits> linears of activation mode `act`."""
    import dataclasses

    from converters.pot import pot_linear
    from engine.model import LINEAR_NAMES, ModelWeights
    from test_model import random_tensors, tiny_config
    c = tiny_config(head_dim=64, hidden_size=256, intermediate_size=384, max_position_embeddings=256)
    mw = ModelWeights.from_hf(c, random_tensors(c, seed))
    for L in mw.layers:
        for name in LINEAR_NAMES:
            setattr(L, name, dataclasses.replace(pot_linear(getattr(L, name), bits, group, search=False), act=act))
    return mw


def test_model_with_pot3_a8_runs_every_linear_on_int8_tokens(monkeypatch):
    """pot3 layers of act "dynamic": a prefill of 20 tokens sends every linear (q|k|v, o, gate|up,
    down of both layers) through gemv_pot_a8 with INT8 rows quantized per token (each nonzero row
    reaches ±127: the dynamic scale max|x| / 127) and gets x8 · Ŵᵀ · sx back within fp16 rounding;
    the logits stay within 10 % of the CPU model of the same file (a coarse check: garbage is far
    off); the captured decode step equals eager decoding.

    Why not a tight bound on the logits: an INT8 quantizer turns any fp16-level difference before
    it into flipped codes, and on this random model that alone moves the logits as much as INT8
    quantization itself does. On the CPU, rounding to fp16 where the GPU stores fp16
    (bench/pruned_compare.py fp16_storage) moves the INT8 model's logits by 3.7 % while INT8 against
    float activations is 5.6 % (both with fp16 storage); weights of a quarter of the size give
    3.0 % and 3.6 %. The GPU measured 4.4 % from the float32 CPU model and 4.2 % from the
    fp16-storage one (H100, session 37), each linear alone matching its host product."""
    import cupy as cp

    from engine.gpu import pot_a8
    from engine.gpu.model import CudaModel
    from engine.model import Model
    mw = _pot_model()
    c = mw.config
    tokens = np.arange(20) % c.vocab_size
    from engine.gpu.tuning import WB_TUNE
    monkeypatch.setattr(WB_TUNE, "pa8_gemv_max_m", 64)  # the 20-token prefill on the GEMV (the fp16-Ŵ path: below)
    from test_pruned_compare import pruned_compare      # bench/pruned_compare.py as a module
    with pruned_compare.fp16_storage():
        ref = Model(mw).forward(tokens)
    gm = CudaModel(mw)
    assert all(g.pa8 is not None for L in gm.layers for g in L.linears())
    calls, real = [], pot_a8.gemv_pot_a8

    def spy(x8, sx, p, out=None, variant=None, resid=None):
        h0 = None if resid is None else resid.get()       # o and down add into h (CudaModel._fold_resid)
        y = real(x8, sx, p, out, variant, resid)
        cp.cuda.runtime.deviceSynchronize()
        calls.append((x8.get(), sx.get(), p, y.get() if h0 is None else y.get() - h0, resid is not None))
        return y
    monkeypatch.setattr(pot_a8, "gemv_pot_a8", spy)
    g = gm.forward(tokens).get().astype(np.float64)
    monkeypatch.undo()
    ns = [c.q_size + 2 * c.num_key_value_heads * c.head_dim, c.hidden_size, 2 * c.intermediate_size,
          c.hidden_size] * c.num_hidden_layers
    assert [p.n for _, _, p, _, _ in calls] == ns
    # a prefill of 20 tokens (past the A8W4 GEMV's rows): o and down still add into h themselves
    assert [r for *_, r in calls] == [False, True, False, True] * c.num_hidden_layers
    for x8, sx, p, y, _ in calls:
        x8, sx = x8.reshape(-1, x8.shape[-1])[:len(tokens), :p.k], sx.reshape(-1)[:len(tokens)]
        assert (np.abs(x8.astype(np.int32)).max(axis=1) == 127).all() and (sx > 0).all()
        w = P.dequantized((p.words.get(), p.tail.get()), (p.scale.get(), p.stail.get()), p.n, p.k)
        want = (x8.astype(np.float64) @ w.T) * sx[:, None].astype(np.float64)
        assert np.linalg.norm(y - want) / np.linalg.norm(want) < 2e-3
    assert np.linalg.norm(g - ref) / np.linalg.norm(ref) < 0.1, np.linalg.norm(g - ref) / np.linalg.norm(ref)
    prompt, outs = np.array([5, 9, 2, 44, 7]) % c.vocab_size, []
    for use_graph in (True, False):
        cache = gm.new_cache(64)
        first = int(gm.prefill(prompt, cache).astype(np.float32).argmax())
        outs.append(gm.decode_greedy(cache, [first], 12, use_graph))
        assert (cache.step.graph is not None) == use_graph
    # the 3-token prefills stay on the GEMV: every call is a decode step's, and each took the GEMM
    assert calls and all(calls), calls
    np.testing.assert_array_equal(outs[0], outs[1])


def test_pot_with_int8_activations_the_gpu_cannot_run_is_refused():
    """act "dynamic" on pot2/pot4 or groups other than 128: one clear error at load, not the A16 GEMV
    computing another function."""
    from engine.gpu.backend import BackendError
    from engine.gpu.model import CudaModel
    for bits, group in ((4, 128), (3, 64)):
        mw = _pot_model(bits=bits, group=group)
        with pytest.raises(BackendError, match="pot3 in groups of 128 only.*--device cpu"):
            CudaModel(mw)


@pytest.mark.parametrize("inter,k", [(64, 576), (1376, 1024), (11008 // 8, 4096), (1536, 576), (40, 9300), (24, 1536)])
def test_silu_variant_then_quant_equals_the_row_kernel_path(inter, k):
    """The batch-1 MLP without silu_mul_quant: the SiLU variant (fp32 silu(gate)·up, atomic absmax)
    then quant_amax gives the int8 row and scale that the plain GEMV then silu_mul_quant give."""
    import cupy as cp

    from engine.gpu import fused, pot_a8
    from engine.gpu.fused import MODE, RowShape
    rng = np.random.default_rng(inter + k)
    words, scale = layer(rng, 2 * inter, k)
    p = pot_a8.upload(words, scale, 2 * inter, k)
    kp = 32 * P.n_chunks(k)
    x8 = cp.asarray(rng.integers(-127, 128, (1, kp)).astype(np.int8))
    sx = cp.asarray([0.0123], dtype=cp.float32)
    ld = -(-inter // 16) * 16
    g = pot_a8.gemv_pot_a8(x8, sx, p)                                       # (1, 2I) fp16, gate then up
    m8, msx = cp.zeros((1, ld), cp.int8), cp.zeros((1,), cp.float32)
    fused.silu_mul_quant(1, RowShape(), gu=g, I=inter, mode=MODE["dynamic"], static_scale=cp.ones(1, cp.float32),
                         x8=m8, ld=ld, sx=msx, mh=cp.zeros((1, inter), cp.float16), il=0)
    mf, amax = cp.full((1, inter), np.nan, cp.float32), cp.zeros((1,), cp.uint32)
    pot_a8.gemv_pot_a8_silu(x8, sx, p, mf, amax)
    gh = g.get().astype(np.float32)
    ref = gh[:, :inter] / (1 + np.exp(-gh[:, :inter])) * gh[:, inter:]
    np.testing.assert_allclose(mf.get(), ref, rtol=1e-5, atol=1e-7)
    assert amax.get().view(np.float32)[0] == np.abs(mf.get()).max()
    q8, qsx = cp.full((1, ld), 9, cp.int8), cp.zeros((1,), cp.float32)
    fused.quant_amax(1, x=mf, K=inter, mode=MODE["dynamic"], static_scale=None, amax=amax, x8=q8, ld=ld, sx=qsx)
    np.testing.assert_array_equal(q8.get(), m8.get())
    np.testing.assert_array_equal(qsx.get(), msx.get())


def test_pot3_a8_fold_quant_equals_row_kernels(monkeypatch):
    """A pot3-a8 model's one-token step with its quantization folded (the SiLU variant, attention's
    absmax, quant_amax) gives the bits of the step with silu_mul_quant and quant_rows, graphed and eager."""
    from engine.gpu.model import CudaModel
    from test_model_cuda import check_fold_quant_bits
    mw = _pot_model(seed=3)
    gm = CudaModel(mw)
    assert gm._fold_quant(1) and all(L.gu.silu_fused and not L.gu.interleaved for L in gm.layers)
    check_fold_quant_bits(gm, monkeypatch, np.arange(5, 60) % mw.config.vocab_size, 128, 16)


@pytest.mark.parametrize("n,k", [(9, 77), (13, 1100), (40, 9300), (4096, 4096), (576, 1536), (5, 2080)])
def test_dequant_pot3_a8_matches_reference(n, k):
    """Ŵ in fp16 for cuBLAS (dequant_pot3_a8): bit for bit formats/pot_a8.py dequantized_f16, full
    steps and tail; also with scales drawn from every finite fp16 (subnormal, tiny and huge: the
    kernel's f16x2 multiply and the reference's float32 product then fp16 are both one rounding of
    s · unit, overflow and underflow included)."""
    from engine.gpu import pot_a8
    rng = np.random.default_rng(n + 3 * k)
    words, scale = layer(rng, n, k)
    got = pot_a8.dequantize_pa8(pot_a8.upload(words, scale, n, k)).get()
    np.testing.assert_array_equal(got.view(np.uint16), P.dequantized_f16(words, scale, n, k).view(np.uint16))
    bits = rng.integers(0, 1 << 16, (n, -(-k // 128))).astype(np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0x83FF          # no inf or NaN: exponent field set to 0 there
    wild = P.pack_scales(bits.view(np.float16), k)
    got = pot_a8.dequantize_pa8(pot_a8.upload(words, wild, n, k)).get()
    with np.errstate(over="ignore"):                    # 2|s| past 65504: inf on both sides
        want = P.dequantized_f16(words, wild, n, k)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("n,k,m", [(300, 1000, 40), (1536, 576, 17), (576, 1536, 64), (13, 1100, 20)])
def test_fp16_weight_gemm_agrees_with_the_gemv(n, k, m):
    """Many tokens through Ŵ in fp16 and cuBLAS (gemm_pot_a8) against the GEMV on the same int8
    rows: the same function up to the order of fp32 sums, so every output within one fp16 ulp of
    the GEMV's and nearly all equal; cuBLAS's fp32 output (gpu/cublas.py) exercised on the way."""
    import cupy as cp

    from engine.gpu import pot_a8
    rng = np.random.default_rng(m)
    words, scale = layer(rng, n, k)
    p = pot_a8.upload(words, scale, n, k)
    assert p.f16_exact
    ldx = 32 * P.n_chunks(k) + 16
    x8 = cp.asarray(rng.integers(-127, 128, (m, ldx)).astype(np.int8))
    sx = cp.asarray(rng.uniform(0.001, 0.1, m).astype(np.float32))
    want = pot_a8.gemv_pot_a8(x8, sx, p).get().astype(np.float64)
    out = cp.empty((m, n), dtype=cp.float16)
    assert pot_a8.gemm_pot_a8(x8, sx, p, out)
    got = out.get().astype(np.float64)
    ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    # two fp32 sums of the same exact products in different orders: apart by at most k·2^-23 of
    # Σ|terms| each (near-cancelling rows can then pass one fp16 ulp of their small result)
    w16 = P.dequantized_f16(words, scale, n, k).astype(np.float64)
    terms = np.abs(x8.get()[:, :k].astype(np.float64)) @ np.abs(w16).T * sx.get()[:, None].astype(np.float64)
    assert (np.abs(got - want) <= ulp + terms * k * 2.0 ** -23).all() and (got == want).mean() > 0.95
    h = rng.standard_normal((m, n)).astype(np.float32)          # resid: h += float(fp16(y)), as the GEMV's
    resid = cp.asarray(h)
    assert pot_a8.gemm_pot_a8(x8, sx, p, None, resid=resid)
    assert np.array_equal(resid.get(), h + out.get().astype(np.float32))


def spy_gemm(monkeypatch) -> list:
    """gpu/pot_a8.gemm_pot_a8 wrapped: the list it returns gets each call's result (True: it ran)."""
    from engine.gpu import pot_a8
    calls, real = [], pot_a8.gemm_pot_a8

    def spy(*a, **kw):
        ran = real(*a, **kw)
        calls.append(ran)
        return ran
    monkeypatch.setattr(pot_a8, "gemm_pot_a8", spy)
    return calls


def test_model_prefill_of_many_tokens_takes_the_fp16_weights(monkeypatch):
    """A 40-token prefill of a pot3 act-"dynamic" model runs its linears through the fp16-Ŵ GEMM
    (above WB_TUNE.pa8_gemv_max_m) and gives the logits the GEMV gives within 10 % (the INT8
    quantizers turn fp32-order differences into flipped codes: test_model_with_pot3_a8... says by how much)."""
    from engine.gpu.model import CudaModel
    from engine.gpu.tuning import WB_TUNE
    mw = _pot_model()
    tokens = np.arange(40) % mw.config.vocab_size
    gm = CudaModel(mw)
    calls = spy_gemm(monkeypatch)
    fast = gm.forward(tokens).get().astype(np.float64)
    assert calls == [True] * 4 * mw.config.num_hidden_layers      # every linear on the fp16 weights
    monkeypatch.setattr(WB_TUNE, "pa8_gemv_max_m", 1 << 20)
    slow = gm.forward(tokens).get().astype(np.float64)
    assert len(calls) == 4 * mw.config.num_hidden_layers
    assert np.linalg.norm(fast - slow) / np.linalg.norm(slow) < 0.1


def test_batched_decode_past_the_gemv_rows_graphs_cublas(monkeypatch):
    """A decode step of 20 sequences (past WB_TUNE.pa8_gemv_max_m) runs its pot3-a8 linears through
    the fp16-Ŵ GEMM, cuBLAS captured in the step's graph: graphed decoding equals eager."""
    from engine.gpu.model import CudaModel
    mw = _pot_model()
    c = mw.config
    gm = CudaModel(mw)
    calls = spy_gemm(monkeypatch)
    outs = []
    for use_graph in (True, False):
        cache = gm.new_cache(64, batch=20)
        firsts = [int(gm.prefill(np.array([3 + i, 9, 2 + i]) % c.vocab_size, cache, seq=i)[0].argmax())
                  for i in range(20)]
        outs.append(np.asarray(gm.decode_greedy(cache, firsts, 6, use_graph)))
        assert (cache.step.graph is not None) == use_graph
    # the 3-token prefills stay on the GEMV: every call is a decode step's, and each took the GEMM
    assert calls and all(calls), calls
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("batch", [2, 5, 8])
def test_batched_decode_with_tokens_a_block_equals_one_a_block(batch, monkeypatch):
    """Batched decode of a pot3 act-"dynamic" model with WB_TUNE.pa8_mt = 4 (the default, a cap: 2
    tokens a block at batch 2; 4 and a remainder launch of one a block at 5; 4 at 8) gives the
    tokens one token a block gives, graphed and eager: MT tokens a block keep each token's sums in
    the order of one alone (cuda/gemv_pot_a8.cu), so the whole step is the same bits."""
    from engine.gpu import kargs
    from engine.gpu.model import CudaModel
    from engine.gpu.tuning import WB_TUNE
    mw = _pot_model()
    c = mw.config
    gm = CudaModel(mw)
    mt = {2: 2, 5: 4, 8: 4}[batch]
    outs = {}
    for cap in (4, 1):
        monkeypatch.setattr(WB_TUNE, "pa8_mt", cap)
        for use_graph in (True, False):
            seen = set()
            cache = gm.new_cache(64, batch=batch)
            firsts = [int(gm.prefill(np.array([3 + i, 9, 2 + i]) % c.vocab_size, cache, seq=i)[0].argmax())
                      for i in range(batch)]
            with kargs.intercepted(lambda expr, run: (seen.add(expr), run())):
                outs[cap, use_graph] = np.asarray(gm.decode_greedy(cache, firsts, 8, use_graph))
            assert (cache.step.graph is not None) == use_graph
            if cap > 1:         # the decode steps' linears took MT tokens a block (and the remainder one)
                assert f"gemv_pot3_a8<8, 4, false, {mt}>" in seen, seen
                assert ("gemv_pot3_a8<8, 4, false>" in seen) == (batch % mt != 0), seen
    ref = outs[1, False]
    assert len({o.shape for o in outs.values()}) == 1 and len(np.unique(ref)) > 1
    for key, o in outs.items():
        np.testing.assert_array_equal(o, ref, err_msg=str(key))
