"""The reference forward pass against an independent, loop-based NumPy computation."""
from dataclasses import replace

import numpy as np
import pytest

from engine import formats
from engine.model import ops_ref
from engine.io.config import ModelConfig
from engine.model import Model, ModelError, ModelWeights, expected_shapes


def tiny_config(**kw):
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def random_tensors(c, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(c).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return out


def independent_forward(c, t, tokens):
    """float64, explicit loops over positions and heads; no code shared with engine.model.ops_ref."""
    def norm(x, w):
        return x / np.sqrt(np.mean(x * x) + c.rms_norm_eps) * w

    def rope(x, p):  # x (D,) one head at position p, HF rotate-half pairs (j, j + D/2)
        d = x.shape[0]
        out = np.empty_like(x)
        for j in range(d // 2):
            ang = p / (c.rope_theta ** (2 * j / d))
            a, b = x[j], x[j + d // 2]
            out[j] = a * np.cos(ang) - b * np.sin(ang)
            out[j + d // 2] = b * np.cos(ang) + a * np.sin(ang)
        return out

    g = {k: v.astype(np.float64) for k, v in t.items()}
    d, hq, hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    hs = [g["model.embed_tokens.weight"][tok] for tok in tokens]
    for li in range(c.num_hidden_layers):
        p = f"model.layers.{li}."
        keys, vals, new = [], [], []
        for pos, h in enumerate(hs):
            x = norm(h, g[p + "input_layernorm.weight"])
            q = g[p + "self_attn.q_proj.weight"] @ x
            k = g[p + "self_attn.k_proj.weight"] @ x
            v = g[p + "self_attn.v_proj.weight"] @ x
            keys.append([rope(k[j * d:(j + 1) * d], pos) for j in range(hkv)])
            vals.append([v[j * d:(j + 1) * d] for j in range(hkv)])
            heads = []
            for hi in range(hq):
                kv = hi // (hq // hkv)
                qh = rope(q[hi * d:(hi + 1) * d], pos)
                s = np.array([qh @ keys[j][kv] for j in range(pos + 1)]) / np.sqrt(d)
                w = np.exp(s - s.max())
                w /= w.sum()
                heads.append(sum(w[j] * vals[j][kv] for j in range(pos + 1)))
            h = h + g[p + "self_attn.o_proj.weight"] @ np.concatenate(heads)
            x = norm(h, g[p + "post_attention_layernorm.weight"])
            gate = g[p + "mlp.gate_proj.weight"] @ x
            up = g[p + "mlp.up_proj.weight"] @ x
            h = h + g[p + "mlp.down_proj.weight"] @ (gate / (1 + np.exp(-gate)) * up)
            new.append(h)
        hs = new
    head = g["model.embed_tokens.weight"] if c.tie_word_embeddings else g["lm_head.weight"]
    return np.stack([head @ norm(h, g["model.norm.weight"]) for h in hs])


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_independent(tie):
    c = tiny_config(tie_word_embeddings=tie)
    t = random_tensors(c)
    tokens = np.array([3, 17, 5, 60, 0, 42, 8, 8, 19])
    got = Model(ModelWeights.from_hf(c, t)).forward(tokens)
    want = independent_forward(c, t, tokens)
    assert got.dtype == np.float32 and got.shape == (len(tokens), c.vocab_size)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_kv_cache_incremental_equals_full():
    c = tiny_config()
    m = Model(ModelWeights.from_hf(c, random_tensors(c, seed=1)))
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 50, 9, 10, 11])
    full = m.forward(tokens)
    cache = m.new_cache(32)
    parts = [m.forward(tokens[:4], cache), m.forward(tokens[4:5], cache)]
    parts += [m.forward(tokens[i:i + 1], cache) for i in range(5, len(tokens))]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-5, atol=1e-5)
    assert cache.length == len(tokens)
    last = m.forward(tokens, m.new_cache(32), last_only=True)
    np.testing.assert_allclose(last[0], full[-1], rtol=1e-5, atol=1e-5)


def test_forward_rejects_bad_input():
    c = tiny_config()
    m = Model(ModelWeights.from_hf(c, random_tensors(c)))
    with pytest.raises(ModelError, match="non-empty"):
        m.forward(np.array([], dtype=np.int64))
    with pytest.raises(ModelError, match="token ids"):
        m.forward(np.array([c.vocab_size]))
    with pytest.raises(ModelError, match="context"):
        m.forward(np.zeros(c.max_position_embeddings + 1, dtype=np.int64))


def test_from_hf_names_missing_and_misshaped_tensors():
    c = tiny_config()
    t = random_tensors(c)
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelError, match="up_proj.weight is missing"):
        ModelWeights.from_hf(c, t)
    t = random_tensors(c)
    t["model.norm.weight"] = np.ones(5, np.float32)
    with pytest.raises(ModelError, match="model.norm.weight has shape"):
        ModelWeights.from_hf(c, t)


def test_exact_f32_gemm_equals_reference():
    rng = np.random.default_rng(0)
    for m, k, n in [(1, 2500, 7), (5, 3000, 16), (3, 128, 4), (4, ops_ref.EXACT_F32_CHUNK, 5),
                    (2, ops_ref.EXACT_F32_CHUNK + 1, 3)]:
        x8 = rng.integers(-127, 128, (m, k)).astype(np.int8)
        w8 = rng.integers(-127, 128, (n, k)).astype(np.int8)
        # worst case too: all ±127 pushes every chunk to its bound
        x8[0] = 127
        w8[0] = 127
        np.testing.assert_array_equal(ops_ref.gemm_int8_exact(x8, w8.astype(np.float32)),
                                      formats.gemm_a8w4_ref(x8, w8))


def _attention_plain(q, k, v, q_start, window=None, scale=None):
    """ops_ref.attention as written before its in-place softmax (a temporary a step)."""
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    qg = q.reshape(t, hkv, hq // hkv, d).transpose(1, 2, 0, 3)
    kt = np.ascontiguousarray(k.transpose(1, 0, 2)).swapaxes(-1, -2)
    scale = 1.0 / np.sqrt(d) if scale is None else np.float64(scale)
    scores = (qg @ kt[:, None]) * scale
    qpos, kpos = q_start + np.arange(t)[:, None], np.arange(s)[None, :]
    seen = kpos <= qpos
    if window is not None:
        seen &= kpos > qpos - window
    scores = np.where(seen, scores, np.float32(-np.inf))
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    out = p @ v.transpose(1, 0, 2)[:, None]
    return out.transpose(2, 0, 1, 3).reshape(t, hq * d).astype(np.float32)


def test_attention_in_place_softmax_keeps_the_bits():
    """The reference attention's softmax runs in place in its float64 scores, a block of
    ATTN_ROW_BLOCK query rows at a time against the keys the block sees: the same values, bit for
    bit, as one temporary a step over all (T, S) scores (prefill, decode, GQA, windows, a given
    scale; one block, several, a short remainder joined to the last, a window that starts past
    the first keys, queries after a cache)."""
    rng = np.random.default_rng(3)
    b = ops_ref.ATTN_ROW_BLOCK
    for t, start, hq, hkv, d, window, scale in [(96, 0, 9, 3, 64, None, None), (1, 700, 32, 8, 128, None, None),
                                                (37, 63, 4, 4, 64, 16, None), (5, 0, 2, 1, 32, None, 0.3),
                                                (20, 10, 8, 2, 16, 1, 2.0), (4 * b, 0, 9, 3, 64, None, None),
                                                (2 * b + 5, 0, 9, 3, 64, None, None),
                                                (2 * b + b // 2 + 3, 40, 8, 2, 32, None, 0.7),
                                                (3 * b + 1, 0, 4, 1, 16, b // 2 + 7, None),
                                                (2 * b + 9, 300, 6, 3, 64, 3 * b, None), (1, 900, 4, 2, 16, 50, None)]:
        q = (rng.standard_normal((t, hq, d)) * 4).astype(np.float32)
        k = rng.standard_normal((start + t, hkv, d)).astype(np.float32)
        v = rng.standard_normal((start + t, hkv, d)).astype(np.float32)
        got = ops_ref.attention(q, k, v, start, window=window, scale=scale)
        assert got.dtype == np.float32 and got.shape == (t, hq * d)
        np.testing.assert_array_equal(got, _attention_plain(q, k, v, start, window, scale))


@pytest.mark.parametrize("core", ["Haswell", "Zen", "Sandybridge"])
def test_attention_keeps_the_bits_on_other_blas_kernels(core):
    """The same test with another of OpenBLAS's kernels (OPENBLAS_CORETYPE picks one in NumPy's
    DYNAMIC_ARCH builds; elsewhere it does nothing and this repeats the test): the Haswell and
    Zen kernels round a block of rows' float32 scores differently from the whole product, which
    is why the scores stay one product."""
    import os
    import subprocess
    import sys
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if core != "Sandybridge" and " avx2" not in flags:
        pytest.skip(f"the {core} kernel needs AVX2")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_attention_in_place_softmax_keeps_the_bits"],
                       env={**os.environ, "OPENBLAS_CORETYPE": core}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("tie", [False, True])
def test_int8_lm_head(tie):
    """with_int8_lm_head: one scale per vocabulary row, codes within ±127, each weight within
    half a step of the float head, a tied embedding left as it was; the NumPy forward then uses
    exactly W8·s, and its logits stay close to the float head's."""
    c = tiny_config(tie_word_embeddings=tie)
    mw = ModelWeights.from_hf(c, random_tensors(c, seed=3))
    embed0 = mw.embed.copy()
    q = mw.with_int8_lm_head()
    w8, s = q.lm_head_q
    assert w8.dtype == np.int8 and w8.shape == (c.vocab_size, c.hidden_size) and s.shape == (c.vocab_size,)
    assert np.abs(w8.astype(np.int32)).max() <= 127 and (np.abs(w8).max(axis=1) == 127).all()
    np.testing.assert_array_equal(q.lm_head, w8.astype(np.float32) * s[:, None])
    assert (np.abs(q.lm_head - mw.lm_head) <= s[:, None] / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(q.embed, embed0)
    assert mw.lm_head_q is None and q.with_int8_lm_head() is q
    tokens = np.array([3, 17, 5, 60, 0, 42])
    ref, got = Model(mw).forward(tokens), Model(q).forward(tokens)
    np.testing.assert_array_equal(got, Model(replace(mw, lm_head=q.lm_head)).forward(tokens))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2
