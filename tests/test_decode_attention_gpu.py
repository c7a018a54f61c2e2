"""Decode attention on the GPU (cuda/attention.cu): both kernels, attn_decode ("heads") and
attn_decode_gqa ("gqa", gpu/attention.py DECODE_KERNEL), against the NumPy reference
(engine/model/ops_ref.py attention in float64; kv8 dequantized as engine/model/kv_cache.py
quantizes) over contexts up to 8192, GQA ratios 1, 3, 4 and 8, fp16 and INT8 KV, batch 1, 8
and 32, the Llama-2-7B and Llama-3-8B attention shapes, and several steps replayed through one
captured CUDA graph with lengths that change in device memory. Every launch goes through the
engine's launcher (gpu/attention.py attn_decode), as the decode step calls it.

Bound: max|got − ref| ≤ 2^-8·max|v| per row (tests/test_attention_gpu.py's decode bound). Rows
at and past the new token start as NaN (kv8: their scales), so a kernel that reads the row it
writes, or past the length, fails.
"""
import contextlib

import numpy as np
import pytest

from engine.gpu.backend import has_gpu
from engine.model.kv_cache import quantize_kv_ref
from engine.model.ops_ref import attention as attention_ref

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)

KERNELS = ("heads", "gqa")
HKV = 2
BATCHES = {                     # name -> (lens, capacity)
    "b1": ([8192], 8192),
    "b8": ([1, 2, 17, 64, 65, 1000, 4097, 8192], 8192),
    "b32": ([1, 64, 65, 700] + list(np.random.default_rng(32).integers(1, 701, 28)), 704),
    # issue 19's batch-32 bar sits at 1024 positions (INT8 K/V): every sequence past 1000
    "b32-1024": ([1024, 1025, 1060] + list(np.random.default_rng(1024).integers(1000, 1061, 29)), 1088),
}


def rope_tables(cap, d, theta=10000.0):
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = np.outer(np.arange(cap, dtype=np.float64), inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope_f64(x, p, cos_t, sin_t):
    """HF rotate-half RoPE of rows x (..., D) at position p with the engine's float32 tables."""
    hd = x.shape[-1] // 2
    c, s = cos_t[p].astype(np.float64), sin_t[p].astype(np.float64)
    a, b = x[..., :hd].astype(np.float64), x[..., hd:].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


_CASES: dict = {}


def cache_case(d, kv8, lens, cap, hkv=HKV):
    """Host data of one (D, cache type, lengths): the cache, the new tokens' k|v part of qkv and
    what the cache must hold for them; kept for every rep and kernel (a launch gets fresh device
    copies)."""
    key = (d, kv8, tuple(lens), cap, hkv)
    if key in _CASES:
        return _CASES[key]
    lens = np.asarray(lens, np.int32)
    b = len(lens)
    rng = np.random.default_rng(d + 2 * kv8 + 7 * b + hkv)
    cos_t, sin_t = rope_tables(cap, d)
    k = rng.standard_normal((b, cap, hkv, d), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((b, cap, hkv, d), dtype=np.float32).astype(np.float16)
    kv_new = rng.standard_normal((b, 2 * hkv, d), dtype=np.float32).astype(np.float16)
    k_new = np.stack([rope_f64(kv_new[i, :hkv], n - 1, cos_t, sin_t) for i, n in enumerate(lens)])
    c = dict(lens=lens, cap=cap, cos_t=cos_t, sin_t=sin_t, kv_new=kv_new)
    if kv8:
        (k8, ks), (v8, vs) = quantize_kv_ref(k.astype(np.float32)), quantize_kv_ref(v)
        for i, n in enumerate(lens):
            k8[i, n - 1], ks[i, n - 1] = quantize_kv_ref(k_new[i].astype(np.float32))
            v8[i, n - 1], vs[i, n - 1] = quantize_kv_ref(kv_new[i, hkv:])
        c["kref"] = k8.astype(np.float32) * ks[..., None]
        c["vref"] = v8.astype(np.float32) * vs[..., None]
        c["want_k"], c["want_ks"], c["want_v"], c["want_vs"] = k8.copy(), ks.copy(), v8.copy(), vs.copy()
        for i, n in enumerate(lens):
            ks[i, n - 1:], vs[i, n - 1:] = np.nan, np.nan
        c["k"], c["v"], c["ks"], c["vs"] = k8, v8, ks, vs
    else:
        for i, n in enumerate(lens):
            k[i, n - 1], v[i, n - 1] = k_new[i], kv_new[i, hkv:]
        c["kref"], c["vref"] = k.astype(np.float32), v.astype(np.float32)
        c["want_k"], c["want_v"] = k.copy(), v.copy()
        for i, n in enumerate(lens):
            k[i, n - 1:], v[i, n - 1:] = np.nan, np.nan
        c["k"], c["v"], c["ks"], c["vs"] = k, v, np.ones((1,), np.float32), np.ones((1,), np.float32)
    _CASES.clear()                  # one data set at a time: the 8192-position ones are large
    _CASES[key] = c
    return c


@contextlib.contextmanager
def decode_kernel(name):
    from engine.gpu import attention
    saved = attention.DECODE_KERNEL
    attention.DECODE_KERNEL = name
    try:
        yield
    finally:
        attention.DECODE_KERNEL = saved


def launch(c, qkv, kc, vc, ksd, vsd, lens_d, hq, hkv, d, out, amax, scratch):
    """The engine's launcher, as gpu/decode.py calls it (no cluster merge: cl = 0)."""
    from engine.gpu.attention import attn_decode
    nsplit, ml, acc, counters = scratch
    attn_decode(len(c["lens"]), nsplit, 0, qkv=qkv, cos_t=c["cos_d"], sin_t=c["sin_d"], kc=kc, vc=vc, ks=ksd, vs=vsd, lens=lens_d, Hq=hq, Hkv=hkv, D=d, cap=c["cap"], scale=1 / np.sqrt(d),
                part_ml=ml, part_acc=acc, counters=counters, out=out, amax_out=amax)


def new_scratch(cp, b, hq, d, cap):
    """The decode step's attention scratch (gpu/decode.py new_state): sized for attn_decode's
    splits of the capacity, which bound attn_decode_gqa's."""
    from engine.gpu.attention import decode_splits
    nsplit = decode_splits(cap)
    return (nsplit, cp.zeros((b * hq * nsplit * 2,), cp.float32), cp.zeros((b * hq * nsplit * d,), cp.float32),
            cp.zeros((b * hq,), cp.int32))


def reference(c, q16):
    """(B, Hq·D) float64: each sequence's new query against its keys 0..n−1 (the reference's
    causal GQA, the query at position n − 1)."""
    outs = []
    for i, n in enumerate(c["lens"]):
        outs.append(attention_ref(q16[i:i + 1].astype(np.float64), c["kref"][i, :n].astype(np.float64),
                                  c["vref"][i, :n].astype(np.float64), int(n) - 1))
    return np.concatenate(outs).astype(np.float64)


def check_case(cp, c, kernel, rep, d, kv8, hkv=HKV, seed=0):
    """One launch of `kernel` on case c, checked (bound, repeatability, amax, the new rows):
    (its output (B, Hq·D) fp16, the float64 reference it was checked against)."""
    lens, cap = c["lens"], c["cap"]
    b, hq = len(lens), hkv * rep
    rng = np.random.default_rng(seed + rep)
    q = (2 * rng.standard_normal((b, hq, d), dtype=np.float32)).astype(np.float16)
    qkv = np.concatenate([q, c["kv_new"]], axis=1)                    # (B, Hq + 2 Hkv, D)
    q16 = np.stack([rope_f64(q[i], n - 1, c["cos_t"], c["sin_t"]) for i, n in enumerate(lens)]).astype(np.float16)
    ref = reference(c, q16)
    c["cos_d"], c["sin_d"] = cp.asarray(c["cos_t"]), cp.asarray(c["sin_t"])
    kc, vc, ksd, vsd = (cp.asarray(c[n]) for n in ("k", "v", "ks", "vs"))
    scratch = new_scratch(cp, b, hq, d, cap)
    outs = []
    with decode_kernel(kernel):
        for _ in range(2):
            out = cp.full((b, hq * d), np.nan, cp.float16)
            amax = cp.zeros((b,), cp.uint32)
            launch(c, cp.asarray(qkv), kc, vc, ksd, vsd, cp.asarray(lens), hq, hkv, d, out, amax, scratch)
            outs.append(out.get())
            want = np.abs(outs[-1].astype(np.float32)).max(axis=1)
            np.testing.assert_array_equal(amax.get().view(np.float32), want)
    assert not scratch[3].any(), "the merge counters must reset themselves"
    np.testing.assert_array_equal(outs[0], outs[1])                   # repeatable, bit for bit
    got = outs[0].astype(np.float64)
    assert np.isfinite(got).all()
    vmax = np.array([np.abs(c["vref"][i, :n]).max() for i, n in enumerate(lens)])
    err = np.abs(got - ref).max(axis=1)
    assert (err <= 2.0 ** -8 * vmax).all(), (kernel, err / vmax)
    # the new rows, written once per kv head; the rows past them untouched
    got_k, got_v = kc.get(), vc.get()
    for i, n in enumerate(lens):
        p = n - 1
        if kv8:
            assert np.abs(got_k[i, p].astype(np.int32) - c["want_k"][i, p]).max() <= 1
            np.testing.assert_allclose(ksd.get()[i, p], c["want_ks"][i, p], rtol=1e-5)
            np.testing.assert_array_equal(got_v[i, p], c["want_v"][i, p])
            np.testing.assert_array_equal(vsd.get()[i, p], c["want_vs"][i, p])
            assert np.isnan(ksd.get()[i, p + 1:]).all()
        else:
            np.testing.assert_allclose(got_k[i, p].astype(np.float32), c["want_k"][i, p].astype(np.float32),
                                       rtol=2.0 ** -10, atol=2.0 ** -14)
            np.testing.assert_array_equal(got_v[i, p], c["want_v"][i, p])
            assert np.isnan(got_k[i, p + 1:]).all() and np.isnan(got_v[i, p + 1:]).all()
    return outs[0], ref


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_kernels_match_reference(d, kv8, batch):
    """Both kernels, GQA ratios 1, 3, 4, 8, ragged lengths (1 key, a split's 64, one past it,
    thousands, 8192) at batch 1, 8 and 32 (and 32 past 1000 positions); the two kernels agree with
    each other too."""
    import cupy as cp
    c = cache_case(d, kv8, *BATCHES[batch])
    for rep in (1, 3, 4, 8):
        outs = [check_case(cp, c, kernel, rep, d, kv8)[0] for kernel in KERNELS]
        vmax = np.abs(c["vref"]).max()
        for other in outs[1:]:
            assert np.abs(outs[0].astype(np.float64) - other).max() <= 2.0 ** -8 * vmax


@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("rep", [1, 4])
def test_decode_kernels_with_a_dominant_key(rep, kv8):
    """A peaked softmax, which random q and k never give: in each sequence two keys a kv head
    (positions 0 and n // 3, like an attention sink) score 12 above the rest for the group's first
    query head, so almost all of its weight sits on two keys and the others' P are tiny, down to
    fp16 subnormals. Bound 2^-10·max|v| (the output's own fp16 rounding is at most half that): a
    kernel whose P·V or bias terms lose 10^-3 of max|v| fails here where the flat cases pass."""
    import cupy as cp
    d, lens, cap = 128, [4096, 1000, 65], 4096
    base = cache_case(d, kv8, lens, cap)
    c = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
    _CASES.clear()
    b, hq = len(lens), HKV * rep
    rng = np.random.default_rng(rep)                                   # check_case's q (seed 0)
    q = (2 * rng.standard_normal((b, hq, d), dtype=np.float32)).astype(np.float16)
    for i, n in enumerate(lens):
        q16 = rope_f64(q[i], n - 1, c["cos_t"], c["sin_t"])             # (Hq, D), as the kernels rotate it
        for j in (0, (n - 1) // 3):
            rows = np.stack([q16[h * rep] * (12.0 * np.sqrt(d) / np.sum(q16[h * rep] ** 2)) for h in range(HKV)])
            if kv8:
                k8, ks = quantize_kv_ref(rows.astype(np.float32))
                c["k"][i, j], c["ks"][i, j] = k8, ks
                c["kref"][i, j] = k8.astype(np.float32) * ks[..., None]
            else:
                c["k"][i, j] = rows.astype(np.float16)
                c["kref"][i, j] = c["k"][i, j].astype(np.float32)
    for kernel in KERNELS:
        got, ref = check_case(cp, c, kernel, rep, d, kv8)
        got = got.astype(np.float64)
        for i, n in enumerate(lens):
            vmax = np.abs(c["vref"][i, :n]).max()
            lead = np.arange(HKV) * rep * d                                # each group's first head
            cols = (lead[:, None] + np.arange(d)).ravel()
            assert np.abs(got[i, cols] - ref[i, cols]).max() <= 2.0 ** -10 * vmax, (kernel, i)


@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("d", [64, 128])
def test_gqa_decode_one_split_over_a_long_sequence(d, kv8, monkeypatch):
    """attn_decode_gqa with every key in one split (as the batched step runs it at long context:
    one split a unit): each warp accumulates O over 512 steps of 32768 keys. A bias carried in O
    drifts there, always one way (INT8 V as 1152 + x: 11 % of the largest output, helper-63), far
    above the exact kernel's error yet below the flat cases' bound of 2^-8·max|v|; so this bounds
    the error by the output itself, max and mean, at 2^-9 and 2^-11 of max|out| (exact V: max
    ~3·10⁻⁴ of it, the output's own fp16 rounding)."""
    import dataclasses

    import cupy as cp
    from engine.gpu import attention
    monkeypatch.setattr(attention, "ATTENTION", dataclasses.replace(attention.ATTENTION, gqa_max_splits=1))
    monkeypatch.setattr(attention, "_GQA_LAUNCH", {})            # its key does not hold gqa_max_splits
    n = 32768
    try:
        c = cache_case(d, kv8, [n], n)
        rep = 4
        got, ref = check_case(cp, c, "gqa", rep, d, kv8)
        got = got.astype(np.float64)
        assert next(iter(attention._GQA_LAUNCH.values()))[1][0] == 1      # one split
        top = np.abs(ref).max()
        assert np.abs(got - ref).max() <= 2.0 ** -9 * top, np.abs(got - ref).max() / top
        assert abs((got - ref).mean()) <= 2.0 ** -11 * top, (got - ref).mean() / top
    finally:
        _CASES.clear()


@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)], ids=["llama2-7b", "llama3-8b"])
def test_decode_kernels_at_7b_shapes(hq, hkv, kv8):
    """The benchmarked shapes themselves: 32 query heads of D 128 on 32 or 8 kv heads, one
    sequence of 8192 positions (batch 1 fills the GPU with splits of one sequence)."""
    import cupy as cp
    try:
        c = cache_case(128, kv8, [8192], 8192, hkv)
        for kernel in KERNELS:
            check_case(cp, c, kernel, hq // hkv, 128, kv8, hkv)
    finally:
        _CASES.clear()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("d,rep", [(64, 3), (128, 4)])
def test_graph_replay_with_lengths_in_device_memory(kernel, kv8, d, rep):
    """One launch captured as a CUDA graph (PDL launches on sm_90, as the decode step), replayed
    for 40 steps while the lengths advance in device memory and each step brings a new token:
    every step equals the reference over the cache as the kernel has filled it, across 64-key
    splits, the gqa kernel's chunk boundaries and from an empty sequence (length 1) on."""
    import cupy as cp

    from engine.gpu import launch as gl
    lens0, cap, steps = np.array([1, 60, 250, 900], np.int32), 1024, 40
    b, hq = len(lens0), HKV * rep
    rng = np.random.default_rng(d + rep + kv8)
    cos_t, sin_t = rope_tables(cap, d)
    k = rng.standard_normal((b, cap, HKV, d), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((b, cap, HKV, d), dtype=np.float32).astype(np.float16)
    if kv8:
        (k8, ks), (v8, vs) = quantize_kv_ref(k.astype(np.float32)), quantize_kv_ref(v)
        kc, vc, ksd, vsd = cp.asarray(k8), cp.asarray(v8), cp.asarray(ks), cp.asarray(vs)
    else:
        kc, vc = cp.asarray(k), cp.asarray(v)
        ksd = vsd = cp.ones((1,), cp.float32)
    c = dict(lens=lens0, cap=cap, cos_d=cp.asarray(cos_t), sin_d=cp.asarray(sin_t))
    scratch = new_scratch(cp, b, hq, d, cap)
    qkv = cp.zeros((b, hq + 2 * HKV, d), cp.float16)
    lens_d = cp.asarray(lens0)
    out = cp.zeros((b, hq * d), cp.float16)
    amax = cp.zeros((b,), cp.uint32)
    args = (c, qkv, kc, vc, ksd, vsd, lens_d, hq, HKV, d, out, amax, scratch)
    stream = cp.cuda.Stream(non_blocking=True)
    with decode_kernel(kernel), stream:
        launch(*args)                                  # eager first: compiles, opts in to its shared memory
        stream.synchronize()
        with gl.capturing():
            stream.begin_capture()
            launch(*args)
            graph = stream.end_capture()
        lens = lens0.copy()
        for step in range(steps):
            new = (rng.standard_normal((b, hq + 2 * HKV, d), dtype=np.float32)).astype(np.float16)
            qkv.set(new, stream=stream)
            lens_d.set(lens, stream=stream)
            amax.fill(0)
            graph.launch(stream)
            stream.synchronize()
            got = out.get().astype(np.float64)
            # the reference reads the cache as the kernel left it (row p just written)
            kh, vh = kc.get().astype(np.float64), vc.get().astype(np.float64)
            if kv8:
                kh, vh = kh * ksd.get()[..., None], vh * vsd.get()[..., None]
            q16 = np.stack([rope_f64(new[i, :hq], n - 1, cos_t, sin_t) for i, n in enumerate(lens)]).astype(np.float16)
            for i, n in enumerate(lens):
                p = n - 1
                want_k = rope_f64(new[i, hq:hq + HKV], p, cos_t, sin_t)
                if kv8:
                    assert np.abs(kh[i, p] - want_k).max() <= 1.01 * ksd.get()[i, p].max()
                else:
                    np.testing.assert_allclose(kh[i, p], want_k, rtol=2.0 ** -10, atol=2.0 ** -13)
                ref = attention_ref(q16[i:i + 1].astype(np.float64), kh[i, :n], vh[i, :n], p)[0]
                err = np.abs(got[i] - ref).max()
                assert err <= 2.0 ** -8 * np.abs(vh[i, :n]).max(), (step, i, n, err)
            np.testing.assert_array_equal(amax.get().view(np.float32), np.abs(out.get().astype(np.float32)).max(axis=1))
            lens += 1
        assert not scratch[3].any()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 6, 2), (128, 8, 2), (64, 8, 1)])
def test_model_graph_decode_with_each_kernel(kernel, head_dim, heads, kv_heads):
    """A tiny GQA model (rep 3, 4, 8) decodes through the captured graph exactly as it decodes
    eagerly, and agrees with the NumPy reference's greedy choices (test_model_cuda's rule), with
    either decode kernel; a longer prompt than several splits of either."""
    from engine.gpu.model import CudaModel
    from engine.model import Model
    from test_model_cuda import quantized_tiny
    mw = quantized_tiny("dynamic", seed=5, head_dim=head_dim, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, hidden_size=64, intermediate_size=96,
                        max_position_embeddings=512)
    prompt = (np.arange(200) * 7) % mw.config.vocab_size
    with decode_kernel(kernel):
        gm = CudaModel(mw)
        outs = []
        for use_graph in (True, False):
            cache = gm.new_cache(256)
            first = int(gm.prefill(prompt, cache).astype(np.float32).argmax())
            outs.append(np.concatenate([[first], gm.decode_greedy(cache, [first], 12, use_graph)[:, 0]]))
            assert (cache.step.graph is not None) == use_graph
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = Model(mw).forward(np.concatenate([prompt, outs[0][:-1]]))[len(prompt) - 1:].argmax(axis=-1)
    assert (ref == outs[0]).mean() >= 0.85, (ref, outs[0])


@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
def test_batched_model_decode_kernels_agree(kv8):
    """Batch 8 and 32 of a GQA model from the same prefills: the two kernels' logits after one
    graphed step agree, and so do most greedy tokens of the next steps."""
    from engine.gpu.model import CudaModel
    from test_model_cuda import quantized_tiny, rel
    mw = quantized_tiny("dynamic", seed=6, head_dim=128, num_attention_heads=8, num_key_value_heads=2,
                        hidden_size=64, intermediate_size=96, max_position_embeddings=512)
    gm = CudaModel(mw)
    for batch in (8, 32):
        runs = []
        for kernel in KERNELS:
            with decode_kernel(kernel):
                cache = gm.new_cache(160, batch=batch, kv8=kv8)
                firsts = [int(gm.prefill((np.arange(20 + 4 * i) * (i + 3)) % mw.config.vocab_size, cache,
                                         seq=i).astype(np.float32).argmax()) for i in range(batch)]
                one = gm.decode_greedy(cache, firsts, 1)
                logits = cache.step.bufs.logits[:batch].get().astype(np.float32)
                more = gm.decode_greedy(cache, one[0], 6)
                runs.append((logits, np.concatenate([one, more])))
        for other in runs[1:]:
            assert rel(other[0], runs[0][0]) < 1e-2, rel(other[0], runs[0][0])
            assert (runs[0][1] == other[1]).mean() >= 0.8


@pytest.mark.parametrize("kernel", KERNELS)
def test_pdl_launches_equal_plain_launches_each_kernel(monkeypatch, kernel):
    """Both kernels read the cache before the PDL wait (cuda/pdl.cuh): a decode step captured
    with PDL launches replays to the same bits as one with plain launches (test_model_cuda's
    check, on a GQA model with a context of several splits)."""
    from engine.gpu import flags, kernels, launch
    from engine.gpu.model import CudaModel
    from test_model_cuda import quantized_tiny
    if kernels.device_info()["cc"] < 90 or not flags.PDL:
        pytest.skip("PDL needs sm_90 and DGQ_PDL unset")
    mw = quantized_tiny("dynamic", seed=8, head_dim=128, num_attention_heads=8, num_key_value_heads=2,
                        hidden_size=256, intermediate_size=512, num_hidden_layers=3, max_position_embeddings=1024)
    prompt = np.arange(1, 700) % mw.config.vocab_size
    runs = []
    with decode_kernel(kernel):
        gm = CudaModel(mw)
        for plain in (False, True):
            with launch.plain_launches() if plain else contextlib.nullcontext():
                cache = gm.new_cache(800, batch=2)
                firsts = [int(gm.prefill(prompt[:600 + 50 * i], cache, seq=i).astype(np.float32).argmax())
                          for i in range(2)]
                toks = gm.decode_greedy(cache, firsts, 24, True)
                runs.append((toks, cache.step.bufs.logits[:2].get()))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("d,cl,lens,cap", [(128, 0, [1, 2, 17, 64, 65, 300, 511, 700], 704),
                                           (128, 2, [1, 64, 65, 128], 128), (128, 4, [3, 100, 200, 256], 256),
                                           (64, 8, [5, 300, 512], 512)],
                         ids=["global", "cluster2", "cluster4", "d64-cluster8"])
@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
def test_heads_kernel_equals_the_kernels_before_session_42(d, cl, lens, cap, kv8):
    """Session 42 changed attn_decode's load order, its merges and where its stores sit against the
    cluster barriers, not its arithmetic: the output, its absmax and the cache after the step equal,
    byte for byte, what the kernels before give (bench/patches/attn-s42-before.json compiled in), for
    the global merge (batch 8, 1 to 11 splits: from registers and the loop) and cluster merges of 2,
    4 and 8 CTAs (at D = 64 and 8 CTAs a warp's threads split between outputs and none). RoPE's
    products are pinned alike on both sides (rot_sub / rot_add): before they were, nvcc contracted
    the q rotation of the two builds differently, and one output in 6000 moved by an fp16 ulp."""
    import cupy as cp

    from pathlib import Path

    from engine.bench.e2e import read_patches
    from engine.gpu import kargs
    from engine.gpu.attention import attn_decode
    from engine.gpu.kernels import device_info
    if cl and device_info()["cc"] < 90:
        pytest.skip("cluster merges are sm_90")
    rep = 3
    c = cache_case(d, kv8, lens, cap)
    hq = HKV * rep
    rng = np.random.default_rng(42)
    q = (2 * rng.standard_normal((len(lens), hq, d), dtype=np.float32)).astype(np.float16)
    qkv = cp.asarray(np.concatenate([q, c["kv_new"]], axis=1))
    cos_d, sin_d = cp.asarray(c["cos_t"]), cp.asarray(c["sin_t"])
    patch = Path(__file__).resolve().parents[1] / "bench" / "patches" / "attn-s42-before.json"
    edits = [e for _, es, _ in read_patches(patch) for e in es]
    got = []
    for ctx in (contextlib.nullcontext(), kargs.patched(edits)):
        with ctx as used, decode_kernel("heads"):
            kc, vc, ksd, vsd = (cp.asarray(c[n]) for n in ("k", "v", "ks", "vs"))
            nsplit, ml, acc, counters = new_scratch(cp, len(lens), hq, d, cap)
            assert cl == 0 or nsplit <= cl
            out = cp.full((len(lens), hq * d), np.nan, cp.float16)
            amax = cp.zeros((len(lens),), cp.uint32)
            attn_decode(len(lens), nsplit, cl, qkv=qkv, cos_t=cos_d, sin_t=sin_d, kc=kc, vc=vc, ks=ksd, vs=vsd,
                        lens=cp.asarray(c["lens"]), Hq=hq, Hkv=HKV, D=d, cap=cap, scale=1 / np.sqrt(d), part_ml=ml,
                        part_acc=acc, counters=counters, out=out, amax_out=amax)   # lens int32, as the kernel reads
            got.append([a.get() for a in (out, amax, kc, vc, ksd, vsd)])
            assert used is None or used == {"attention.cu"}, used       # the patched run ran the kernels before
    assert np.isfinite(got[0][0].astype(np.float32)).all()
    for now, before in zip(*got):
        assert np.array_equal(now.view(np.uint8), before.view(np.uint8))
