"""The GPU engine against the NumPy reference on tiny random models (gpu-marked)."""
import contextlib

import numpy as np
import pytest

from engine.gpu.backend import has_gpu
from engine.bench.e2e import random_dg_layer
from engine.model import LINEAR_NAMES, Model, ModelWeights

from test_model import random_tensors, tiny_config

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)


def quantized_tiny(act, seed=0, group=64, **kw):
    c = tiny_config(**kw)
    mw = ModelWeights.from_hf(c, random_tensors(c, seed))
    rng = np.random.default_rng(seed)
    for L in mw.layers:
        for name in LINEAR_NAMES:
            n, k = getattr(L, name).shape
            site_scale = {"q": 0.02, "k": 0.02, "v": 0.02, "gate": 0.03, "up": 0.03}.get(name, 0.01)
            cscale = rng.uniform(0.5, 1.5, n) / (60 * np.sqrt(k))
            setattr(L, name, random_dg_layer(rng, n, k, group, act, site_scale, cscale))
    return mw


def wide_tiny(seed: int):
    """A 3-layer dynamic DGQ model wide enough for kernels to overlap (GQA 8 / 2, 256 positions)."""
    return quantized_tiny("dynamic", seed=seed, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
                          hidden_size=512, intermediate_size=1408, num_hidden_layers=3, max_position_embeddings=256)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("n_tokens", [11, 1])
def test_gpu_logits_match_reference(act, n_tokens):
    """Prefill logits against the NumPy integer reference; one token too (the GEMV path, where
    the decode step folds the row kernels away and a prefill must not)."""
    from engine.gpu.model import CudaModel
    mw = quantized_tiny(act, head_dim=64, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                        intermediate_size=96)
    tokens = np.array([3, 17, 5, 60, 0, 42, 8, 8, 19, 33, 1])[:n_tokens]
    ref = Model(mw).forward(tokens)
    got = CudaModel(mw).forward(tokens).get()
    assert got.shape == ref.shape
    assert rel(got, ref) < 2e-2, rel(got, ref)


def test_two_layers_of_7b_widths_match_reference():
    """The benchmarked configuration itself (issue 19): Llama-2-7B widths (hidden 4096, 32 heads
    of 128, intermediate 11008, groups of 128), two layers. The prefill's logits and the graphed
    batch-1 decode step's (the dp4a GEMVs with their residual and SiLU epilogues, the folded row
    kernels, PDL on sm_90) against the NumPy integer reference of the same token sequence, run
    with the GPU's fp16 storage points (bench/pruned_compare.py fp16_storage: linear outputs and
    attention's q, k, v and output rounded to fp16). At these widths that rounding alone moves
    the float32 reference's last logits by 1.9 % (relative norm, on the CPU), and the GPU's
    prefill measured 2.2 % from the float32 reference (H200): a bound of 2 % against float32 would
    test the storage format, not the kernels."""
    from engine.gpu.model import CudaModel
    from test_pruned_compare import pruned_compare      # bench/pruned_compare.py as a module
    mw = quantized_tiny("dynamic", seed=7, group=128, head_dim=128, num_attention_heads=32,
                        num_key_value_heads=32, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=2, max_position_embeddings=256)
    gm = CudaModel(mw)
    prompt = (np.arange(40) * 7 + 3) % mw.config.vocab_size
    cache = gm.new_cache(64)
    pre = gm.prefill(prompt, cache).get().astype(np.float32).reshape(-1)
    first = int(pre.argmax())
    steps = 6
    toks = gm.decode_greedy(cache, [first], steps, True)[:, 0]
    last = cache.step.bufs.logits[:1].get().astype(np.float32).reshape(-1)
    with pruned_compare.fp16_storage():
        ref = Model(mw).forward(np.concatenate([prompt, [first], toks[:steps - 1]]))   # (T, V)
    assert rel(pre, ref[len(prompt) - 1]) < 2e-2, rel(pre, ref[len(prompt) - 1])
    assert rel(last, ref[-1]) < 2e-2, rel(last, ref[-1])
    assert int(last.argmax()) == int(toks[-1])


@pytest.fixture(scope="module")
def two_7b_layers():
    """Two layers of Llama-2-7B widths with 8192 positions, and their CudaModel."""
    from engine.gpu.model import CudaModel
    mw = quantized_tiny("dynamic", seed=11, group=128, head_dim=128, num_attention_heads=32,
                        num_key_value_heads=32, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=2, max_position_embeddings=8192)
    return mw, CudaModel(mw)


@pytest.mark.parametrize("batch,kv8,context", [(1, False, 2048), (1, True, 8192), (32, True, 1024),
                                               (8, False, 128)])
def test_7b_widths_decode_at_benchmarked_contexts(two_7b_layers, batch, kv8, context):
    """Issue 19's benchmarked decode settings on two layers of Llama-2-7B widths: the graphed
    step's logits at every step against the NumPy integer reference (fp16 storage points, as
    above), with the first context − 4 positions of every sequence seeded with the same random
    K/V on both sides (fp16 values, or INT8 codes with their scales) instead of a prefill, so the
    reference runs only the 4 decoded tokens of each sequence."""
    from test_pruned_compare import pruned_compare
    steps = 4
    seeded = context - steps
    mw, gm = two_7b_layers
    c = mw.config
    cache = gm.new_cache(context, batch=batch, kv8=kv8)
    rng = np.random.default_rng(context + batch)
    shape = (c.num_hidden_layers, batch, seeded, c.num_key_value_heads, c.head_dim)
    if kv8:
        kv = [rng.integers(-127, 128, shape, dtype=np.int8) for _ in range(2)]
        scales = [rng.uniform(0.5, 2.0, shape[:-1]).astype(np.float32) / 127 for _ in range(2)]
        cache.ks[:, :, :seeded] = gm.cp.asarray(scales[0])
        cache.vs[:, :, :seeded] = gm.cp.asarray(scales[1])
    else:
        kv = [rng.standard_normal(shape).astype(np.float16) for _ in range(2)]
    cache.k[:, :, :seeded] = gm.cp.asarray(kv[0])
    cache.v[:, :, :seeded] = gm.cp.asarray(kv[1])
    cache.lens_host[:] = seeded
    first = rng.integers(0, c.vocab_size, batch)
    logits = []
    toks = gm.decode_greedy(cache, first, steps, True, on_step=lambda ids: logits.append(
        cache.step.bufs.logits[:batch].get().astype(np.float32).reshape(batch, -1)))
    assert toks.shape == (steps, batch) and len(logits) == steps
    model = Model(mw)
    errs = []
    for b in range(batch):
        ref_cache = model.new_cache(context, kv8=kv8)
        ref_cache.k[:, :seeded] = kv[0][:, b]
        ref_cache.v[:, :seeded] = kv[1][:, b]
        if kv8:
            ref_cache.ks[:, :seeded] = scales[0][:, b]
            ref_cache.vs[:, :seeded] = scales[1][:, b]
        ref_cache.length = seeded
        with pruned_compare.fp16_storage():
            ref = model.forward(np.concatenate([[first[b]], toks[:steps - 1, b]]), ref_cache)
        errs.extend((b, i, rel(logits[i][b], ref[i])) for i in range(steps))
    # one fp16 ulp of attention output flips some of o's INT8 codes: about 1 % on the logits (the
    # CPU reference so perturbed: 1.0-1.3 % mean, 1.9 % max over these 4·B tokens; float32 against
    # the fp16 storage points 1.0-1.4 %, 1.8 %); wrong keys, positions or scales move them by far more
    worst = max(errs, key=lambda e: e[2])
    assert worst[2] < 4e-2, f"sequence {worst[0]}, step {worst[1]}: {worst[2]}"
    assert np.mean([e[2] for e in errs]) < 2e-2, np.mean([e[2] for e in errs])


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_gpu_prefill_with_wide_row_accesses_matches_reference(monkeypatch, act):
    """A prefill of more rows than SMs: the row kernels run one CTA a row with 8- and 4-element
    accesses (tuning.ROWS.vec; 32 threads a row here, so that tiny rows hold 4 and 8 values a
    thread), against the NumPy integer reference."""
    from engine.gpu import kargs, tuning
    from engine.gpu.kernels import device_info
    from engine.gpu.model import CudaModel
    monkeypatch.setattr(tuning.ROWS, "threads_many", 32)
    mw = quantized_tiny(act, head_dim=64, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                        intermediate_size=256, max_position_embeddings=512)
    tokens = (np.arange(device_info()["sm_count"] + 5) * 13) % mw.config.vocab_size
    gm = CudaModel(mw)
    seen = []
    with kargs.intercepted(lambda expr, run: (seen.append(expr), run())):
        got = gm.forward(tokens).get()
    assert {"add_rmsnorm_quant<4, 1, 4>", "silu_mul_quant<8, 1, 8>", "quant_rows<8, 1, 8>"} <= set(seen)
    ref = Model(mw).forward(tokens)
    assert rel(got, ref) < 2e-2, rel(got, ref)


def test_gpu_fp16_path_matches_float_reference():
    from engine.gpu.model import CudaModel
    c = tiny_config(head_dim=64, hidden_size=64, intermediate_size=96)
    mw = ModelWeights.from_hf(c, random_tensors(c, 3))
    tokens = np.arange(20) % c.vocab_size
    assert rel(CudaModel(mw).forward(tokens).get(), Model(mw).forward(tokens)) < 1e-2


def check_graph_decode(mw):
    """Greedy decoding through the captured step equals eager decoding, and agrees with the
    NumPy reference's greedy choices over the produced sequence (≥ 90 % of steps)."""
    from engine.gpu.model import CudaModel
    gm = CudaModel(mw)
    assert gm.graphable(1) == (True, True)
    prompt = np.array([5, 9, 2, 44, 7])
    outs = []
    for use_graph in (True, False):
        cache = gm.new_cache(64)
        first = int(gm.prefill(prompt, cache).astype(np.float32).argmax())
        outs.append(np.concatenate([[first], gm.decode_greedy(cache, [first], 12, use_graph)[:, 0]]))
        assert (cache.step.graph is not None) == use_graph
    np.testing.assert_array_equal(outs[0], outs[1])
    # the decode kernels agree with a full forward over the produced sequence
    seq = np.concatenate([prompt, outs[0][:-1]])
    full = Model(mw).forward(seq)
    greedy_ref = full[len(prompt) - 1:].argmax(axis=-1)
    agree = (greedy_ref == outs[0]).mean()
    assert agree >= 0.9, (greedy_ref, outs[0])


@pytest.mark.parametrize("weights", ["a8w4", "fp16"])
def test_graph_decode_equals_eager_and_incremental_reference(weights):
    if weights == "a8w4":
        mw = quantized_tiny("dynamic", seed=1, head_dim=64, hidden_size=64, intermediate_size=96)
    else:            # the FP16 path: cuBLAS for prefill, our fp16 GEMV inside the graph
        c = tiny_config(head_dim=64, hidden_size=64, intermediate_size=96)
        mw = ModelWeights.from_hf(c, random_tensors(c, 1))
    check_graph_decode(mw)


@pytest.mark.parametrize("batch", [3, 10, 24, 48])
def test_batched_decode_equals_single_sequences(batch):
    """Batch 10 is past the fp16 GEMV: cuBLAS runs the lm_head inside the graph (gpu/cublas.py).
    Batch 24: M = 17-32, the wgmma GEMM's 32-token tiles' range (tuning.wgmma_cfg, the table's
    pick; the learned policy may pick another candidate); 48: the one-warpgroup 64-token
    tile ("small"). On sm_90 the step is captured with PDL, where the wgmma GEMM streams its first
    weights before its wait."""
    from engine.gpu.model import CudaModel
    mw = quantized_tiny("dynamic", seed=2, head_dim=64, hidden_size=64, intermediate_size=96)
    gm = CudaModel(mw)
    assert gm.graphable(batch) == (True, True)
    prompts = [np.array([1, 2, 3]), np.array([9, 8, 7, 6, 5]), np.array([40])]
    prompts = [prompts[i % 3] * (1 + i // 3) % mw.config.vocab_size for i in range(batch)]
    singles = []
    for p in prompts:
        cache = gm.new_cache(32)
        first = int(gm.prefill(p, cache).astype(np.float32).argmax())
        singles.append(gm.decode_greedy(cache, [first], 8)[:, 0])
    cache = gm.new_cache(32, batch=batch)
    firsts = [int(gm.prefill(p, cache, seq=i).astype(np.float32).argmax()) for i, p in enumerate(prompts)]
    batched = gm.decode_greedy(cache, firsts, 8)
    assert cache.step.graph is not None
    for i in range(batch):
        np.testing.assert_array_equal(batched[:, i], singles[i])


@pytest.mark.parametrize("head_dim,act", [(64, "dynamic"), (128, "static")])
def test_decode_over_many_attention_splits(head_dim, act):
    """A context longer than several flash-decoding chunks (64 keys) and a ragged last chunk."""
    from engine.gpu.model import CudaModel
    from engine.gpu.tuning import ATTENTION
    mw = quantized_tiny(act, seed=4, head_dim=head_dim, hidden_size=64, intermediate_size=96,
                        max_position_embeddings=512)
    gm = CudaModel(mw)
    prompt = (np.arange(3 * ATTENTION.decode_chunk + 11) * 7) % mw.config.vocab_size
    cache = gm.new_cache(len(prompt) + 8)
    first = int(gm.prefill(prompt, cache).astype(np.float32).argmax())
    got = np.concatenate([[first], gm.decode_greedy(cache, [first], 6)[:, 0]])
    ref = Model(mw).forward(np.concatenate([prompt, got[:-1]]))[len(prompt) - 1:].argmax(axis=-1)
    assert (ref == got).mean() >= 0.85, (ref, got)


def test_generate_uses_graphed_greedy_and_agrees_with_reference():
    from engine.model.generate import GenerationStats, generate
    from engine.gpu.model import CudaModel
    mw = quantized_tiny("dynamic", seed=5, head_dim=64, hidden_size=64, intermediate_size=96)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want, _ = generate(Model(mw), prompt, 10)
    got, st = generate(CudaModel(mw), prompt, 10)
    assert isinstance(st, GenerationStats) and st.new_tokens == len(got) == 10
    assert np.mean(np.array(want) == np.array(got)) >= 0.8, (want, got)
    # a stop id ends generation early and is returned, not streamed
    seen = []
    out, _ = generate(CudaModel(mw), prompt, 10, stop={got[3]}, on_token=seen.append)
    assert out[-1] == got[3] and seen == out[:-1]


@pytest.mark.parametrize("blas_from", [2, 9])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9, 33])
def test_fp16_gemv_buckets_match_float64(m, blas_from, monkeypatch):
    """The lm_head product against a float64 one: our GEMV (one kernel per M bucket, all of
    them with blas_from = 9) or cuBLAS past it."""
    import dataclasses
    import cupy as cp
    from engine.gpu import fused
    from engine.gpu.fused import matmul_f16
    monkeypatch.setattr(fused, "GEMV_F16", dataclasses.replace(fused.GEMV_F16, blas_from=blas_from))
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 1000)).astype(np.float16)
    w = rng.standard_normal((777, 1000)).astype(np.float16)
    out = cp.zeros((m, 777), cp.float16)
    matmul_f16(cp, cp.asarray(x), cp.asarray(w), out)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert rel(out.get().astype(np.float64), ref) < 2e-3


@pytest.mark.parametrize("width", [64, 576, 4096, 4100, 5000, 11008, 20000])
@pytest.mark.parametrize("mode", ["static", "dynamic", "fp16"])
@pytest.mark.parametrize("cl,cap,vec", [(1, 1024, False), (1, 256, False), (1, 1024, True), (1, 256, True),
                                        (2, 1024, False), (8, 1024, False)])
def test_row_kernels_match_numpy(width, mode, cl, cap, vec):
    """add_rmsnorm_quant (with and without the residual add), silu_mul_quant and quant_rows at
    block sizes from one warp to 1024 threads, one CTA a row or a cluster of cl (sm_90; CTAs
    whose part of a narrow row is empty included), with the many-rows launch (cap 256
    threads, up to 16 values a thread), and with 8- or 4-element accesses (vec: 576 at cap 256
    takes 4; 4100 and narrow rows fall back to 1), against NumPy float32."""
    import cupy as cp
    from engine.gpu import fused
    from engine.gpu.fused import MODE, RowShape, row_launch
    from engine.gpu.kernels import device_info
    from engine.gpu.tuning import ROW_VARIANTS
    if cl > 1 and device_info()["cc"] < 90:
        pytest.skip("thread block clusters need sm_90")
    if cl > 1 and width > ROW_VARIANTS.cluster_pers[-1] * 1024 * cl:
        pytest.skip("not instantiated: the engine never sends so wide a row to so small a cluster")
    rng = np.random.default_rng(width)
    m, eps, scale = 3, 1e-5, 0.02
    h = rng.standard_normal((m, width)).astype(np.float32)
    y = rng.standard_normal((m, width)).astype(np.float16)
    w = rng.uniform(0.5, 1.5, width).astype(np.float32)
    gu = (rng.standard_normal((m, 2 * width)) * 2).astype(np.float16)
    ld = width + 64
    sc = cp.asarray([scale], cp.float32)

    zero = cp.full((m,), 5, cp.uint32)
    shape, md = RowShape(cl, cap, vec), MODE[mode]

    def run(name, launch):
        """launch(x8, sx, xh) runs kernel `name` with the shape under test (its expression:
        row_launch(name, width, cl, cap, vec))."""
        x8 = cp.full((m, ld), 7, cp.int8)
        sx = cp.zeros((m,), cp.float32)
        xh = cp.zeros((m, width), cp.float16)
        expr, threads = row_launch(name, width, cl, cap, vec)
        narrow = width in (64, 4100) or (width, cap) == (576, 1024)   # PER < 4, or 8 ∤ width
        assert expr.endswith(", 1>") != (vec and cl == 1 and not narrow)  # wide accesses where they can be
        launch(x8, sx, xh)
        return x8.get(), sx.get(), xh.get()

    def check(got, want, rtol):
        x8, sx, xh = got
        if mode == "fp16":
            np.testing.assert_allclose(xh.astype(np.float32), want, rtol=rtol, atol=1e-3)
            return
        s = np.full(m, scale, np.float32) if mode == "static" else np.abs(want).max(1) / 127
        np.testing.assert_allclose(sx, s, rtol=1e-5)
        ref = np.clip(np.rint(want / s[:, None]), -127, 127)       # formats.quantize_act_ref's rule
        assert np.abs(x8[:, :width].astype(np.int32) - ref).max() <= 1
        assert (x8[:, width:] == 0).all()                       # the pad columns are zeroed

    for with_y in (False, True):
        hd = cp.asarray(h)
        got = run("add_rmsnorm_quant", lambda x8, sx, xh: fused.add_rmsnorm_quant(
            m, shape, h=hd, y=cp.asarray(y) if with_y else None, w=cp.asarray(w), H=width, eps=eps, mode=md,
            static_scale=sc, x8=x8, ld=ld, sx=sx, xh=xh, zero=zero if with_y else None, emb=None, tok=None))
        if with_y:
            assert not zero.any()                                 # the amax slots of _fold_quant
        hh = h + y.astype(np.float32) if with_y else h
        np.testing.assert_allclose(hd.get(), hh, rtol=1e-6)      # the add is written back
        want = hh / np.sqrt((hh * hh).mean(1, keepdims=True) + eps) * w
        check(got, want, 2e-3)
    # the first layer's norm gathers the tokens' embeddings (fp16 table) into h itself
    emb = (rng.standard_normal((7, width)) * 3).astype(np.float16)
    tok = np.array([4, 0, 4], np.int32)
    hd = cp.full((m, width), np.nan, cp.float32)
    got = run("add_rmsnorm_quant", lambda x8, sx, xh: fused.add_rmsnorm_quant(
        m, shape, h=hd, y=None, w=cp.asarray(w), H=width, eps=eps, mode=md, static_scale=sc, x8=x8, ld=ld,
        sx=sx, xh=xh, zero=None, emb=cp.asarray(emb), tok=cp.asarray(tok)))
    hh = emb[tok].astype(np.float32)
    np.testing.assert_array_equal(hd.get(), hh)
    check(got, hh / np.sqrt((hh * hh).mean(1, keepdims=True) + eps) * w, 2e-3)
    g, u = gu[:, :width].astype(np.float32), gu[:, width:].astype(np.float32)
    check(run("silu_mul_quant", lambda x8, sx, xh: fused.silu_mul_quant(
        m, shape, gu=cp.asarray(gu), I=width, mode=md, static_scale=sc, x8=x8, ld=ld, sx=sx, mh=xh, il=0)),
        g / (1 + np.exp(-g)) * u, 2e-3)
    if width % 8 == 0:              # gate|up interleaved per 16 columns (ops_cuda.interleave_rows)
        from engine.gpu.ops import interleave_rows
        gi = cp.asarray(np.ascontiguousarray(gu[:, interleave_rows(2 * width)]))
        check(run("silu_mul_quant", lambda x8, sx, xh: fused.silu_mul_quant(
            m, shape, gu=gi, I=width, mode=md, static_scale=sc, x8=x8, ld=ld, sx=sx, mh=xh, il=1)),
            g / (1 + np.exp(-g)) * u, 2e-3)
    if mode != "fp16":
        check(run("quant_rows", lambda x8, sx, xh: fused.quant_rows(
            m, shape, x=cp.asarray(y), K=width, mode=md, static_scale=sc, x8=x8, ld=ld, sx=sx)),
            y.astype(np.float32), 1e-6)


@pytest.mark.parametrize("il", [0, 1])
@pytest.mark.parametrize("mode", ["dynamic", "static", "fp16"])
def test_act_per_rows_equal_the_rules(monkeypatch, mode, il):
    """silu_mul_quant on the 7B's 11008-wide prefill rows with tuning.ROWS.act_per = 32 (352
    threads) writes exactly what the rule's PER 16 (704 threads) writes: the max is exact in any
    order."""
    import cupy as cp
    from engine.gpu import fused, kargs, tuning
    from engine.gpu.fused import MODE
    rng = np.random.default_rng(il)
    m, width = 300, 11008                         # ≥ the SMs: one CTA a row, 16-byte accesses
    gu = cp.asarray((rng.standard_normal((m, 2 * width)) * 2).astype(np.float16))
    outs = []
    for per in (0, 32):
        monkeypatch.setattr(tuning.ROWS, "act_per", per)
        x8, sx = cp.full((m, width + 64), 7, cp.int8), cp.zeros((m,), cp.float32)
        mh = cp.zeros((m, width), cp.float16)
        seen = []
        with kargs.intercepted(lambda expr, run: (seen.append(expr), run())):
            fused.silu_mul_quant(m, gu=gu, I=width, mode=MODE[mode], static_scale=cp.asarray([0.02], cp.float32),
                                 x8=x8, ld=width + 64, sx=sx, mh=mh, il=il)
        assert seen == [f"silu_mul_quant<{per or 16}, 1, 8>"]
        outs.append((x8.get(), sx.get(), mh.get()))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("merge", ["cluster", "memory"])
def test_pdl_launches_equal_plain_launches(monkeypatch, merge):
    """Programmatic dependent launch (engine/gpu/launch.py, cuda/pdl.cuh) changes when kernels
    start, never what they compute: a decode step captured with PDL launches (counted, so the
    test fails if capture stopped using them) replays to bit-identical logits and tokens as one
    captured with plain stream-ordered launches, on a model wide enough for kernels to overlap
    and with the row kernels on clusters (tuning.ROWS.cta_width lowered to 256); attn_decode merging
    its splits through a cluster, and through global memory (its reads before the PDL wait
    then race nothing either)."""
    from engine.gpu import attention, flags, kernels, launch, tuning
    from engine.gpu.model import CudaModel
    if kernels.device_info()["cc"] < 90 or not flags.PDL:
        pytest.skip("PDL needs sm_90 and DGQ_PDL unset")
    assert launch.pdl_enabled()
    monkeypatch.setattr(tuning.ROWS, "cta_width", 256)
    monkeypatch.setattr(tuning.ROWS, "cta_width_by_kernel", {})
    if merge == "memory":
        monkeypatch.setattr(attention, "decode_cluster", lambda *args: 0)
    mw = quantized_tiny("dynamic", seed=4, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
                        hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        max_position_embeddings=512)
    gm = CudaModel(mw)
    prompt = np.arange(1, 300) % mw.config.vocab_size
    real, calls = launch._driver(), []

    def counted(*args):
        calls.append(1)
        return real(*args)
    runs = []
    for plain in (False, True):
        ctx = launch.plain_launches() if plain else contextlib.nullcontext()
        with ctx:
            if not plain:
                monkeypatch.setitem(launch._STATE, "fn", counted)
            cache = gm.new_cache(512)
            pre = gm.prefill(prompt, cache).get()          # eager: plain launches either way
            toks = gm.decode_greedy(cache, [int(pre.astype(np.float32).argmax())], 40, True)[:, 0]
            runs.append((pre, toks, cache.step.bufs.logits[:1].get()))
            if not plain:
                monkeypatch.setitem(launch._STATE, "fn", real)
                assert len(calls) >= 6 * mw.config.num_hidden_layers, len(calls)   # 4 GEMVs, attention, silu a layer
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_fold_quant_equals_row_kernels(monkeypatch, act):
    """A one-token decode step without silu_mul_quant and quant_rows (CudaModel._fold_quant:
    the SiLU GEMV and attn_decode max-reduce their rows, quant_amax quantizes them) gives the
    bits of the step with the row kernels, graphed and eager (gate|up interleaved in both).
    Prefills never fold, a one-token one included (checked against NumPy in
    test_gpu_logits_match_reference)."""
    from engine.gpu.model import CudaModel
    mw = quantized_tiny(act, seed=6, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
                        hidden_size=512, intermediate_size=1408, num_hidden_layers=3,
                        max_position_embeddings=256)
    gm = CudaModel(mw)
    assert all(L.gu.interleaved for L in gm.layers) and gm._fold_quant(1) and not gm._fold_quant(2)
    check_fold_quant_bits(gm, monkeypatch, np.arange(5, 120) % mw.config.vocab_size, 256, 24)


def check_fold_quant_bits(gm, monkeypatch, prompt, capacity: int, steps: int):
    """Prefill, then greedy decoding with tuning.DECODE.fold_quant on and off, graphed and eager:
    the prefill logits, tokens, last step's logits and K cache are the same bits in all four."""
    from engine.gpu import tuning
    runs = []
    for fold in (True, False):
        monkeypatch.setattr(tuning.DECODE, "fold_quant", fold)
        for graph in (True, False):
            cache = gm.new_cache(capacity)
            pre = gm.prefill(prompt, cache).get()
            toks = gm.decode_greedy(cache, [int(pre.astype(np.float32).argmax())], steps, graph)[:, 0]
            runs.append((pre, toks, cache.step.bufs.logits[:1].get(), cache.k.get()))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tie", [False, True])
def test_int8_lm_head_gpu(tie):
    """The INT8 output head (ModelWeights.with_int8_lm_head) on the GPU: prefill logits of every
    position (11 rows: GEMV slices of 8 and 3) match the NumPy path with the same head, and a
    graphed decode step (its head inside the graph, at batch 1 and at batch 10, past the fp16
    GEMV's 8 rows) equals the eager one."""
    from engine.gpu.model import CudaModel
    mw = quantized_tiny("dynamic", seed=7, head_dim=64, hidden_size=64, intermediate_size=96,
                        tie_word_embeddings=tie).with_int8_lm_head()
    gm = CudaModel(mw)
    assert gm.lm_scale is not None and gm.graphable(10) == (True, True)
    tokens = np.array([3, 17, 5, 60, 0, 42, 8, 8, 19, 33, 1])
    ref = Model(mw).forward(tokens)
    got = gm.forward(tokens).get()
    assert rel(got, ref) < 2e-2, rel(got, ref)
    for batch in (1, 10):
        outs = []
        for use_graph in (True, False):
            cache = gm.new_cache(48, batch=batch)
            firsts = [int(gm.prefill(tokens[:3 + i % 5], cache, seq=i).astype(np.float32).argmax())
                      for i in range(batch)]
            outs.append(gm.decode_greedy(cache, firsts, 10, use_graph))
            assert (cache.step.graph is not None) == use_graph
        np.testing.assert_array_equal(outs[0], outs[1])


def _prefill_model(weights):
    """A tiny model of 256 positions: A8W4, its FP16 twin, or every linear 3-bit PoT (weight-only)."""
    kw = dict(head_dim=64, hidden_size=64, intermediate_size=96, max_position_embeddings=256)
    if weights in ("a8w4", "a8w4-kv8"):
        return quantized_tiny("dynamic", seed=2, **kw)
    c = tiny_config(**kw)
    mw = ModelWeights.from_hf(c, random_tensors(c, 3))
    if weights == "pot":
        from converters.pot import pot_linear
        for L in mw.layers:
            for n in LINEAR_NAMES:
                setattr(L, n, pot_linear(getattr(L, n), 3, 32, search=False))
    return mw


@pytest.mark.parametrize("weights", ["a8w4", "fp16", "a8w4-kv8", "pot"])
@pytest.mark.parametrize("logits", ["last", "all"])
@pytest.mark.parametrize("t", [7, 80])
def test_captured_prefill_equals_eager(weights, logits, t, monkeypatch):
    """A prefill shape seen before replays a CUDA graph (tuning.PREFILL): the first sighting
    runs eagerly, the second captures and launches, the third on replay. Each with new tokens,
    a start past 0 and a second sequence, at t = 7 (the GEMVs) and 80 (the GEMMs with split-K
    workspaces, two attn_prefill query tiles): the same logits bits and cache contents as eager
    prefills (PREFILL.graphs = 0) of the same tokens. A b-bit weight-only model past 16 rows is
    never captured (gemv_wb would slice it into GEMVs), a settings change is another key, and
    a longer prefill, which regrows the scratch, drops the graphs that point into the old."""
    from engine.gpu import tuning
    from engine.gpu.model import CudaModel
    mw = _prefill_model(weights)
    gm = CudaModel(mw)
    kv8 = weights.endswith("kv8")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, mw.config.vocab_size, t) for _ in range(4)]
    capturable = not (weights == "pot" and t > 16)

    def run(graphs):
        monkeypatch.setattr(tuning.PREFILL, "graphs", graphs)
        gm._prefill_graphs.clear()
        cache = gm.new_cache(t + 40, batch=2, kv8=kv8)
        got = []
        for i, p in enumerate(prompts):                  # the same shape each time: t tokens at 2
            cache.lens_host[:] = 2
            got.append(gm.prefill(p, cache, seq=1, logits=logits).get())
            captured = sum(g.graph is not None for g in gm._prefill_graphs.values())
            assert captured == (graphs > 0 and capturable and i >= 1)
        return got, cache.k.get(), cache.v.get(), cache.ks.get(), cache

    eager, graphed = run(0), run(4)
    for a, b in zip(eager[0], graphed[0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(eager[1:4], graphed[1:4]):
        np.testing.assert_array_equal(a, b)
    if not capturable:
        return
    # a setting that picks other kernels makes another key: the old settings' graph is not replayed
    cache = graphed[4]
    with monkeypatch.context() as mp:
        mp.setattr(tuning.ROWS, "vec", 1 if tuning.ROWS.vec == 8 else 8)
        cache.lens_host[:] = 2
        gm.prefill(prompts[0], cache, seq=1, logits=logits)
        newest = list(gm._prefill_graphs.values())[-1]
        assert newest.graph is None and newest.tok is None      # a first sighting: eager
        assert sum(g.graph is not None for g in gm._prefill_graphs.values()) == 1
    # a longer prefill regrows the scratch: the graphs pointing into the old set are dropped
    cache.lens_host[:] = 0
    gm.prefill(rng.integers(0, mw.config.vocab_size, t + 30), cache, seq=0, logits="all")
    assert not any(g.graph is not None for g in gm._prefill_graphs.values())


def test_packed_launches_equal_cupy_launches():
    """Eager keyword launches through one packed parameter buffer (launch.Kernel.launch_bound,
    cuLaunchKernel) compute what CuPy's launches do: an eager prefill and decode steps give
    bit-identical logits and tokens either way, and the packed path did launch (counted), its
    layouts the driver's (cuFuncGetParamInfo) for every kernel the prefill used."""
    from engine.gpu import kernels, launch
    from engine.gpu.model import CudaModel
    if not launch.packed_enabled() or launch._param_info() is None:
        pytest.skip("DGQ_PACKED=0, or a driver without cuFuncGetParamInfo (before CUDA 12.4): CuPy's launches")
    mw = wide_tiny(seed=6)
    gm = CudaModel(mw)
    prompt = np.arange(3, 200) % mw.config.vocab_size
    fn = launch._cu_launch()
    assert fn is not None
    calls = []

    def counted(*args):
        calls.append(1)
        return fn(*args)

    def forget():                    # each Kernel looks the launch function up again
        for k in kernels._FUNCS.values():
            k._packed.clear()
    runs = []
    try:
        for packed in (True, False):
            launch._STATE["drv:cuLaunchKernel"] = counted
            forget()
            with contextlib.nullcontext() if packed else launch.unpacked_launches():
                cache = gm.new_cache(256)
                pre = gm.prefill(prompt, cache).get()
                toks = gm.decode_greedy(cache, [int(pre.astype(np.float32).argmax())], 12, True)[:, 0]
            runs.append((pre, toks))
            if packed:
                assert len(calls) >= 8 * mw.config.num_hidden_layers, len(calls)
                bad = [k.raw.name for k in kernels._FUNCS.values() for v in k._packed.values() if v[1] is None]
                assert not bad, bad                      # every kernel's layout was the driver's
                calls.clear()
            else:
                assert not calls
    finally:
        launch._STATE["drv:cuLaunchKernel"] = fn
        forget()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
