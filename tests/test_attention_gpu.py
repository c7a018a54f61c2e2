"""cuda/attention.cu attn_prefill (flash-attention prefill) against a float64 NumPy causal GQA.

Tolerance: the kernel writes fp16 (≤ 2^-11·|o|); kv8 adds the fp16 rounding of the
dequantized k, v. P enters P·V as fp16 hi + lo (≈ 2^-22 relative); when it entered as plain
fp16 (≤ 2^-11·max|v| more) the bound below was twice the sum of those terms, and it is kept:
max|got − ref| ≤ 2^-9·max|v|.
Outputs are poisoned (NaN) first, rows past t included, so an unwritten or stray element fails.
"""
import numpy as np
import pytest

from engine.model.kv_cache import quantize_kv_ref
from engine.gpu.backend import has_gpu

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)

CASES = [(0, 1), (0, 64), (0, 100), (37, 1), (37, 91), (130, 190), (1, 127)]   # (start, t)
CAP, B, SEQ, HKV = 336, 2, 1, 2


def causal_gqa_f64(q, k, v, start):
    """q (t, Hq, D), k/v (n, Hkv, D) float64; query i sees keys 0..start+i. Returns (t, Hq·D)."""
    t, hq, d = q.shape
    n, hkv, _ = k.shape
    rep = hq // hkv
    kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)          # (n, Hq, D)
    s = np.einsum("thd,nhd->htn", q, kk) / np.sqrt(d)                      # (Hq, t, n)
    s[:, np.arange(n)[None, :] > start + np.arange(t)[:, None]] = -np.inf
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("htn,nhd->thd", p, vv).reshape(t, hq * d)


@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("rep", [1, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_attn_prefill_matches_float64(d, rep, kv8):
    import cupy as cp

    from engine.gpu.attention import attn_prefill, prefill_scale
    rng = np.random.default_rng(d * 10 + rep)
    hq = HKV * rep
    for start, t in CASES:
        n = start + t
        q = (2 * rng.standard_normal((t, hq, d))).astype(np.float16)
        k = rng.standard_normal((B, CAP, HKV, d)).astype(np.float16)
        v = rng.standard_normal((B, CAP, HKV, d)).astype(np.float16)
        if kv8:
            k8, ks = quantize_kv_ref(k)
            v8, vs = quantize_kv_ref(v)
            ks[:, n:], vs[:, n:] = np.nan, np.nan                          # never read
            kc, vc = cp.asarray(k8), cp.asarray(v8)
            kref = k8[SEQ, :n].astype(np.float64) * ks[SEQ, :n, :, None]
            vref = v8[SEQ, :n].astype(np.float64) * vs[SEQ, :n, :, None]
        else:
            k[:, n:], v[:, n:] = np.nan, np.nan                           # never read
            ks = vs = np.ones((1,), np.float32)
            kc, vc = cp.asarray(k), cp.asarray(v)
            kref, vref = k[SEQ, :n].astype(np.float64), v[SEQ, :n].astype(np.float64)
        out = cp.full((t + 5, hq * d), np.nan, dtype=cp.float16)
        attn_prefill(q=cp.asarray(q), kc=kc, vc=vc, ks=cp.asarray(ks), vs=cp.asarray(vs), out=out, t=t, start=start,
                     Hq=hq, Hkv=HKV, cap=CAP, seq=SEQ, scale_log2=prefill_scale(d))
        got = out.get().astype(np.float64)
        ref = causal_gqa_f64(q.astype(np.float64), kref, vref, start)
        err = np.abs(got[:t] - ref).max()
        assert err <= 2.0 ** -9 * np.abs(vref).max(), (start, t, err)
        assert np.isnan(got[t:]).all(), "rows past t were written"


def test_chunked_prefill_equals_one_prefill():
    """start > 0 inside the model: a prompt prefilled in two chunks gives the same last logits."""
    from engine.model import Model
    from engine.gpu.model import CudaModel
    from test_model_cuda import quantized_tiny, rel
    mw = quantized_tiny("dynamic", seed=6, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                        hidden_size=64, intermediate_size=96, max_position_embeddings=512)
    gm = CudaModel(mw)
    tokens = (np.arange(150) * 11) % mw.config.vocab_size
    one = gm.prefill(tokens, gm.new_cache(200)).astype(np.float32).get()
    cache = gm.new_cache(200)
    gm.prefill(tokens[:70], cache)
    two = gm.prefill(tokens[70:], cache).astype(np.float32).get()
    assert rel(two, one) < 1e-2, rel(two, one)
    ref = Model(mw).forward(tokens)[-1:]
    assert rel(one, ref) < 2e-2, rel(one, ref)


def test_gpu_kv8_matches_numpy_kv8_reference():
    """INT8 cache end to end: rope_qkv_cache quantizes, attn_prefill (start 0 and > 0) and
    flash-decoding read int8; logits and greedy tokens against the NumPy kv8 reference."""
    from engine.model import Model
    from engine.gpu.model import CudaModel
    from test_model_cuda import quantized_tiny, rel
    mw = quantized_tiny("dynamic", seed=7, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                        hidden_size=64, intermediate_size=96, max_position_embeddings=512)
    gm, ref = CudaModel(mw), Model(mw)
    tokens = (np.arange(90) * 13) % mw.config.vocab_size
    gc, rc = gm.new_cache(128, kv8=True), ref.new_cache(128, kv8=True)
    assert gc.k.dtype == np.int8 and gc.nbytes() <= 0.55 * 4 * gc.k.nbytes   # vs fp16 K and V
    for chunk in (tokens[:70], tokens[70:]):
        got = gm.prefill(chunk, gc, logits="all").astype(np.float32).get()
        want = ref.forward(chunk, rc)
        assert rel(got, want) < 2e-2, rel(got, want)
    first = int(got[-1].argmax())
    steps = gm.decode_greedy(gc, [first], 12)[:, 0]
    want = ref.forward(np.concatenate([[first], steps[:-1]]), rc).argmax(axis=-1)   # teacher-forced
    assert np.mean(want == steps) >= 0.8, (want, steps)


def rope_f64(x, p, cos_t, sin_t):
    """HF rotate-half RoPE of rows x (..., D) at position p with the engine's float32 tables."""
    hd = x.shape[-1] // 2
    c, s = cos_t[p].astype(np.float64), sin_t[p].astype(np.float64)
    a, b = x[..., :hd].astype(np.float64), x[..., hd:].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_flash_decoding_matches_float64(monkeypatch, d, rep, kv8):
    """attn_decode (RoPE of the new q and k, cache write, flash-decoding, merge of the splits)
    for ragged lengths: one key, a whole 64-key split, one past it, several splits, empty
    splits. The new token's cache row and every row past it start as NaN (kv8: their scales),
    so a read of the row being written, or past the length, fails; the row must come back
    holding the rotated k and the v. A second launch must give the same bits (the merge's
    counters reset themselves), and so must the cluster merges (sm_90). This is the "heads"
    kernel (attn_decode itself); tests/test_decode_attention_gpu.py runs both decode kernels."""
    import cupy as cp

    from engine.gpu import attention
    from engine.gpu.attention import attn_decode
    from engine.gpu.tuning import ATTENTION
    monkeypatch.setattr(attention, "DECODE_KERNEL", "heads")
    rng = np.random.default_rng(7 * d + rep)
    hq, lens = HKV * rep, np.array([1, 64, 65, 200], np.int32)
    b, cap = len(lens), 256
    nsplit = cap // ATTENTION.decode_chunk
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = np.outer(np.arange(cap, dtype=np.float64), inv)
    cos_t, sin_t = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    qkv = rng.standard_normal((b, hq + 2 * HKV, d)).astype(np.float16)
    k = rng.standard_normal((b, cap, HKV, d)).astype(np.float16)
    v = rng.standard_normal((b, cap, HKV, d)).astype(np.float16)
    q = np.stack([rope_f64(qkv[i, :hq], n - 1, cos_t, sin_t) for i, n in enumerate(lens)]).astype(np.float16)
    k_new = np.stack([rope_f64(qkv[i, hq:hq + HKV], n - 1, cos_t, sin_t) for i, n in enumerate(lens)])
    v_new = qkv[:, hq + HKV:].astype(np.float32)
    for i, n in enumerate(lens):
        k[i, n - 1], v[i, n - 1] = k_new[i], v_new[i]
    if kv8:
        (k8, ks), (v8, vs) = quantize_kv_ref(k.astype(np.float32)), quantize_kv_ref(v)
        for i, n in enumerate(lens):
            k8[i, n - 1], ks[i, n - 1] = quantize_kv_ref(k_new[i].astype(np.float32))
        kref, vref = k8.astype(np.float64) * ks[..., None], v8.astype(np.float64) * vs[..., None]
        want_k, want_ks = k8.copy(), ks.copy()
        for i, n in enumerate(lens):
            ks[i, n - 1:], vs[i, n - 1:] = np.nan, np.nan
        kc, vc = cp.asarray(k8), cp.asarray(v8)
    else:
        kref, vref = k.astype(np.float64), v.astype(np.float64)
        want_k = k.copy()
        for i, n in enumerate(lens):
            k[i, n - 1:], v[i, n - 1:] = np.nan, np.nan
        ks = vs = np.ones((1,), np.float32)
        kc, vc = cp.asarray(k), cp.asarray(v)
    ksd, vsd = cp.asarray(ks), cp.asarray(vs)
    ml = cp.zeros((b * hq * nsplit * 2,), cp.float32)
    acc = cp.zeros((b * hq * nsplit * d,), cp.float32)
    counters = cp.zeros((b * hq,), cp.int32)
    ref = np.concatenate([causal_gqa_f64(q[i:i + 1].astype(np.float64), kref[i, :n], vref[i, :n], n - 1)
                          for i, n in enumerate(lens)])                   # (B, Hq·D)
    from engine.gpu.kernels import device_info
    from engine.gpu.attention import decode_cluster
    # the merge through global memory (0), and on sm_90 through clusters: the launcher's size
    # for nsplit, and a larger one (empty splits past nsplit)
    clusters = (0, decode_cluster(nsplit), 8) if device_info()["cc"] >= 90 else (0,)
    outs = []
    for cl in clusters:
        for _ in range(2):
            out = cp.full((b, hq * d), np.nan, cp.float16)
            amax = cp.zeros((b,), cp.uint32)
            attn_decode(b, nsplit, cl, qkv=cp.asarray(qkv), cos_t=cp.asarray(cos_t), sin_t=cp.asarray(sin_t),
                        kc=kc, vc=vc, ks=ksd, vs=vsd, lens=cp.asarray(lens), Hq=hq, Hkv=HKV, D=d, cap=cap,
                        scale=1 / np.sqrt(d), part_ml=ml, part_acc=acc, counters=counters, out=out, amax_out=amax)
            outs.append(out.get())
            # the row's absmax, for the o GEMV that quantizes it (CudaModel._fold_quant)
            np.testing.assert_array_equal(amax.get().view(np.float32),
                                          np.abs(outs[-1].astype(np.float32)).max(axis=1))
    assert not counters.any()
    for got in outs[1:]:                     # repeatable, and the same bits whichever merge ran
        np.testing.assert_array_equal(got, outs[0])
    err = np.abs(outs[0].astype(np.float64) - ref).max(axis=1)
    assert (err <= 2.0 ** -8 * np.abs(vref).max()).all(), err
    rows = [(i, n - 1) for i, n in enumerate(lens)]
    got_k = kc.get()
    for i, p in rows:                                       # the new rows, written once per kv head
        if kv8:
            assert np.abs(got_k[i, p].astype(np.int32) - want_k[i, p]).max() <= 1
            np.testing.assert_allclose(ksd.get()[i, p], want_ks[i, p], rtol=1e-5)
            np.testing.assert_array_equal(vc.get()[i, p], v8[i, p])
            np.testing.assert_array_equal(vsd.get()[i, p], quantize_kv_ref(v_new[i])[1])
        else:
            np.testing.assert_allclose(got_k[i, p].astype(np.float32), want_k[i, p].astype(np.float32),
                                       rtol=2.0 ** -10, atol=2.0 ** -14)
            np.testing.assert_array_equal(vc.get()[i, p], qkv[i, hq + HKV:])
