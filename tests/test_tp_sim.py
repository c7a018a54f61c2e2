"""Tensor parallelism simulated on the CPU (engine/parallel, docs/PARALLEL.md): the plan, the
slicing of every weight kind, and the sharded forward at TP = 2 and 4 against the unsharded
NumPy model (TP = 1) on every family's tiny model and on SmolLM2-135M's shapes.

What "equal" means here: with integer weight kinds (dg, i8) the int32 accumulators of the
row-parallel linears summed over the ranks equal the unsharded ones, and so does the final
hidden state, bit for bit (read through a probe head: identity rows make logits[:, :H] the
hidden state exactly, whatever BLAS does). The logits themselves pass the forward tests'
tolerance (test_arch: rtol 1e-4, atol 1e-4 · max|logit|): a slice of the head is another
BLAS call, and float weights sum their partial outputs in another order.
"""
import time
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest

from converters.quantize import quantize_linear
from engine import formats
from engine.io.config import ModelConfig
from engine.io.layout import LINEAR_NAMES, LayerWeights, ModelError, ModelWeights
from engine.model import Model, ops_ref
from engine.parallel import Comm, TPModel, agree_argmax, plan, plan_for, run_ranks, shard, slice_cols, slice_rows
from test_arch import FAMILIES, PROMPT, as_multipliers, hf_config, hf_tensors
from tiny_model import make_tiny_config, make_tiny_tensors

SITE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
        "down": "down_in"}
# name -> (weight kind, activation mode per linear); "static" takes the calibrated per-site scale
RECIPES = {
    "float": None,
    "dg-dynamic": ("dg", "dynamic"),                     # DGQ's default recipe
    "dg-static": ("dg", "static"),                       # --act static: down stays per token
    "i8-static": ("i8", "static"),                       # w8a8
    "g-dynamic": ("g", "dynamic"),                       # the float-scale baselines' simulation
}
INTEGER = ("dg-dynamic", "dg-static", "i8-static")


def quantized(w: ModelWeights, kind: str, act: str, group: int, bits: int = 4) -> ModelWeights:
    """w with every linear quantized (RTN); static scales from the float model's max|x| per site."""
    amax = {}

    def observe(li, site, x):
        amax[li, site] = max(amax.get((li, site), 0.0), float(np.abs(x).max()))
    if act == "static":
        Model(w).forward(PROMPT, observer=observe)

    def q(L, li, n):
        a = "dynamic" if act == "static" and n == "down" else act
        return quantize_linear(getattr(L, n), kind, a, amax.get((li, SITE[n]), 1.0) / 127 if a == "static" else None,
                               group, bits=bits)
    layers = [LayerWeights(**L.floats(), **{n: q(L, li, n) for n in LINEAR_NAMES}) for li, L in enumerate(w.layers)]
    return replace(w, layers=layers)


# every family of test_arch, and Llama with biases on o and down too (added once, after the all-reduce)
MODELS = {**{f: {} for f in FAMILIES}, "llama3+bias": dict(attention_bias=True, mlp_bias=True)}


@lru_cache(maxsize=None)
def family_model(family: str, recipe: str) -> ModelWeights:
    c = ModelConfig.from_hf(hf_config(family.split("+")[0], **MODELS[family]))
    w = ModelWeights.from_hf(c, as_multipliers(c, hf_tensors(c, 1)))
    return w if RECIPES[recipe] is None else quantized(w, *RECIPES[recipe], group=8)


def probe_head(w: ModelWeights) -> ModelWeights:
    """w with an untied head whose first H rows are the identity: logits[:, :H] is exactly the
    final (normed) hidden state, each an h_i·1 plus zeros, in any summation order."""
    v, h = w.embed.shape
    head = np.zeros((v, h), np.float32)
    head[:h] = np.eye(h, dtype=np.float32)
    return replace(w, lm_head=head)


def assert_logits_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------- the plan

def test_plan_divides_or_replicates_kv_heads():
    c = make_tiny_config()                                    # 4 heads, 2 KV heads, I 48, V 144
    p2 = plan(c, 2)
    assert [p.heads for p in p2.ranks] == [(0, 2), (2, 4)] and [p.kv_heads for p in p2.ranks] == [(0, 1), (1, 2)]
    assert [p.ffn for p in p2.ranks] == [(0, 24), (24, 48)] and [p.vocab for p in p2.ranks] == [(0, 72), (72, 144)]
    p4 = plan(c, 4)                                           # 2 KV heads, 4 ranks: each KV head on two ranks
    assert [p.heads for p in p4.ranks] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [p.kv_heads for p in p4.ranks] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    rc = p4.ranks[3].config(c)
    assert (rc.num_attention_heads, rc.num_key_value_heads, rc.intermediate_size, rc.vocab_size) == (1, 1, 12, 36)
    assert "rank 3: heads 3..3 (1), KV heads 1..1 (1)" in p4.describe()
    mqa = plan(make_tiny_config(num_key_value_heads=1), 2)   # one KV head for all: on every rank
    assert [p.kv_heads for p in mqa.ranks] == [(0, 1), (0, 1)]


def test_plan_odd_splits():
    """Uneven splits, each rank holding whole heads with the same query heads per KV head."""
    def heads(c, tp, **kw):
        p = plan(c, tp, **kw)
        return [p_.heads for p_ in p.ranks], [p_.kv_heads for p_ in p.ranks]
    # 3 KV heads of 2 query heads over 2 ranks: 4|2 (3|3 would split KV head 1's two heads 1 + 1 unevenly
    # against KV head 0's 2)
    assert heads(make_tiny_config(num_attention_heads=6, num_key_value_heads=3), 2) == (
        [(0, 4), (4, 6)], [(0, 2), (2, 3)])
    # 2 KV heads of 3 query heads over 4 ranks: 2|1|2|1 (fewer KV heads held than 2|2|1|1)
    assert heads(make_tiny_config(num_attention_heads=6, num_key_value_heads=2), 4) == (
        [(0, 2), (2, 3), (3, 5), (5, 6)], [(0, 1), (0, 1), (1, 2), (1, 2)])
    # 3 ranks over 4 heads: the extra head first
    assert heads(make_tiny_config(), 3)[0] == [(0, 2), (2, 3), (3, 4)]
    # SmolLM2-135M: 9 heads of 64, 3 KV heads; o's group 128 cuts only every 2 heads
    s = smollm2_config()
    assert heads(s, 2, o_align=128) == ([(0, 6), (6, 9)], [(0, 2), (2, 3)])
    assert heads(s, 4, o_align=128) == ([(0, 2), (2, 4), (4, 6), (6, 9)], [(0, 1), (0, 2), (1, 2), (2, 3)])
    # the intermediate size cut at group starts: 48 = 6 groups of 8 over 4 ranks
    assert [p.ffn for p in plan(make_tiny_config(), 4, down_align=8).ranks] == [(0, 16), (16, 32), (32, 40), (40, 48)]
    assert [p.vocab for p in plan(make_tiny_config(vocab_size=10), 4).ranks] == [(0, 3), (3, 6), (6, 8), (8, 10)]


@pytest.mark.parametrize("tp, kw, msg", [
    (0, {}, "positive whole number of ranks"),
    (True, {}, "positive whole number of ranks"),
    (2.0, {}, "positive whole number of ranks"),
    (5, {}, "cannot split 4 attention heads over 5 ranks"),
    (4, {"o_align": 16}, r"4 attention heads \(2 KV heads of 2 query heads\) over 4 ranks: o_proj's input .* "
                         r"multiples of 16 channels \(its quantization group: every 2 heads of 8\)"),
    (4, {"down_align": 16}, "intermediate size 48 over 4 ranks: .* multiples of 16 channels .* gives 3 pieces"),
])
def test_plan_errors_name_what_cannot_be_split(tp, kw, msg):
    with pytest.raises(ModelError, match=msg):
        plan(make_tiny_config(), tp, **kw)


def test_plan_vocabulary_error_and_the_weights_group():
    with pytest.raises(ModelError, match="vocabulary of 3 tokens over 4 ranks"):
        plan(make_tiny_config(vocab_size=3), 4)
    w = family_model("llama3", "float")
    assert plan_for(w, 4).o_align == 1
    with pytest.raises(ModelError, match="o_proj's input may only be cut at multiples of 16"):
        TPModel(quantized(w, "dg", "dynamic", 16), 4)         # D = 8: a group of 16 spans two heads


# ----------------------------------------------------------------------------- slicing

def kind_linears(n=12, k=80, group=32) -> dict:
    """Every weight kind at K = 80: groups of 32 with a short last one of 16."""
    rng = np.random.default_rng(5)
    W = (0.1 * rng.standard_normal((n, k))).astype(np.float32)
    out = {"float": W}
    for kind, act, bits in [("dg", "dynamic", 4), ("dg", "static", 4), ("g", "dynamic", 4), ("i8", "static", 4),
                            ("pot", "none", 3), ("int", "none", 4), ("int", "none", 2)]:
        ql = quantize_linear(W, kind, act, 0.02 if act == "static" else None, group, bits=bits)
        out[f"{ql.kind}-{act}"] = ql
    return out


def _deq(w):
    return w.dequantize() if isinstance(w, formats.QuantLinear) else w


@pytest.mark.parametrize("name", list(kind_linears()))
def test_slices_are_the_weights_slices(name):
    w = kind_linears()[name]
    full = _deq(w)
    for k0, k1 in [(0, 32), (32, 80), (64, 80), (0, 80)]:          # (64, 80): the short last group alone
        part = slice_cols(w, k0, k1)
        np.testing.assert_array_equal(_deq(part), full[:, k0:k1], err_msg=f"{name} cols {k0}:{k1}")
        if isinstance(w, formats.QuantLinear):
            assert (part.kind, part.act, part.group, part.ascale) == (w.kind, w.act, w.group, w.ascale)
            if w.kind in ("dg", "i8"):
                np.testing.assert_array_equal(part.int8_weight(), w.int8_weight()[:, k0:k1])
    np.testing.assert_array_equal(_deq(slice_rows(w, 3, 7)), full[3:7], err_msg=f"{name} rows")
    if isinstance(w, formats.QuantLinear):        # QuantLinear.take_rows: any order (the GPU's interleave)
        perm = np.random.default_rng(0).permutation(w.out_features)[:9]
        part = w.take_rows(perm)
        np.testing.assert_array_equal(part.dequantize(), full[perm], err_msg=f"{name} take_rows")
        assert part.shape == (9, w.in_features) and part.meta == w.meta and part.meta is not w.meta
        assert all(a.flags.c_contiguous for a in part.tensors().values())
    if isinstance(w, formats.QuantLinear) and w.kind != "i8":
        with pytest.raises(ModelError, match="only be cut at multiples of 32"):
            slice_cols(w, 16, 80)


def test_embeddings_and_heads_split_by_vocabulary():
    tied = family_model("llama3", "float")                   # tie_word_embeddings
    assert tied.lm_head is tied.embed
    _, ranks = shard(tied, 4)
    assert all(r.lm_head is r.embed for r in ranks)
    np.testing.assert_array_equal(np.concatenate([r.embed for r in ranks]), tied.embed)
    untied = family_model("mistral", "float").with_int8_lm_head()
    _, ranks = shard(untied, 3)
    assert not any(r.lm_head is r.embed for r in ranks)
    for a in ("embed", "lm_head"):
        np.testing.assert_array_equal(np.concatenate([getattr(r, a) for r in ranks]), getattr(untied, a))
    for r in ranks:                                          # the INT8 head's codes and scales together
        w8, s = r.lm_head_q
        np.testing.assert_array_equal(w8.astype(np.float32) * s[:, None], r.lm_head)


# ----------------------------------------------------------------------------- the sharded forward

@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_sharded_forward_equals_the_unsharded_model(family, recipe, tp):
    w = family_model(family, recipe)
    assert_logits_close(TPModel(w, tp).forward(PROMPT), Model(w).forward(PROMPT))
    p = probe_head(w)
    h = p.config.hidden_size
    got, want = TPModel(p, tp).forward(PROMPT)[:, :h], Model(p).forward(PROMPT)[:, :h]
    if recipe in INTEGER:
        np.testing.assert_array_equal(got, want)             # integer parts exact: the same bits
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def down_inputs(w: ModelWeights) -> dict:
    seen = {}
    Model(w).forward(PROMPT, observer=lambda li, site, x: seen.__setitem__((li, site), x))
    return seen


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_accumulators_sum_to_the_unsharded_ones(tp):
    """int32 partial sums of o and down over the ranks == the unsharded GEMM's accumulators; with
    each rank's own (local) per-token scale instead of the all-reduced one they would not be."""
    w = family_model("qwen3", "dg-dynamic")
    tpm = TPModel(w, tp)
    tpm.forward(PROMPT)
    x = down_inputs(w)
    d = w.config.head_dim
    for li, L in enumerate(w.layers):
        for n, site in (("o", "o_in"), ("down", "down_in")):
            xs, ql = x[li, site], getattr(L, n)
            want = formats.gemm_a8w4_ref(formats.quantize_act_ref(xs, formats.activation_scales(ql, xs)),
                                         ql.int8_weight())                                   # (T, H) int32
            got = sum(tpm.linears[r][li][n].acc.astype(np.int64) for r in range(tp))
            np.testing.assert_array_equal(got, want, err_msg=f"layer {li} {n}")
            cols = [(p.heads[0] * d, p.heads[1] * d) if n == "o" else p.ffn for p in tpm.plan.ranks]
            local = 0
            for r, (a, b) in enumerate(cols):
                x8 = formats.quantize_act_ref(xs[:, a:b], formats.act_scale_dynamic(xs[:, a:b]))
                local = local + ops_ref.gemm_int8_exact(x8, tpm.linears[r][li][n].w.w8f).astype(np.int64)
            assert not np.array_equal(local, want)


@pytest.mark.parametrize("family, kv8", [("mistral", False), ("gemma3", True), ("qwen2", False)])
@pytest.mark.parametrize("tp", [2, 4])
def test_decode_with_per_rank_kv_caches(family, kv8, tp):
    """Prefill 5, then a token at a time through each rank's cache of its KV heads (replicated at
    TP = 4: 2 KV heads); the sliding windows (4, 5) cut into the cached keys."""
    w = probe_head(family_model(family, "dg-dynamic"))
    m, tpm = Model(w), TPModel(w, tp)
    cache, tcache = m.new_cache(32, kv8=kv8), tpm.new_cache(32, kv8=kv8)
    assert [c.k.shape[2] for c in tcache.ranks] == [1] * tp       # 2 KV heads: divided, then replicated
    for a, b in [(0, 5)] + [(i, i + 1) for i in range(5, len(PROMPT))]:
        want, got = m.forward(PROMPT[a:b], cache), tpm.forward(PROMPT[a:b], tcache)
        np.testing.assert_array_equal(got[:, :32], want[:, :32])
    assert tcache.length == cache.length == len(PROMPT)


def test_ranks_agree_on_the_greedy_token():
    w = family_model("gemma3", "dg-static").with_int8_lm_head()
    want = int(Model(w).forward(PROMPT)[-1].argmax())
    for tp in (2, 3, 4):
        assert TPModel(w, tp).greedy(PROMPT) == [want] * tp

    def pick(row_parts):                      # rank r holds vocabulary rows [3r, 3r + 3)
        comm = Comm(len(row_parts))
        return run_ranks(comm, lambda r: agree_argmax(comm, r, np.array([row_parts[r]], np.float32), 3 * r))
    assert [int(t[0]) for t in pick([[0, 5, 1], [5, 2, 0]])] == [1, 1]           # a tie: the lowest id
    assert [int(t[0]) for t in pick([[0, 5, 1], [6, 2, 0], [0, 0, 7]])] == [8, 8, 8]


def test_a_failing_rank_raises_its_error_instead_of_hanging():
    """NaN in the q rows of the last head: only the last rank sees it, while the others wait in
    the all-reduce after o; they are released and the rank's ModelError reaches the caller."""
    w = family_model("llama3", "float")
    L = w.layers[1]
    q = L.q.copy()
    q[-8:] = np.nan
    bad = replace(w, layers=[w.layers[0], replace(L, q=q), w.layers[2]])
    tpm = TPModel(bad, 2)
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="q of layer 1"):
        tpm.forward(PROMPT)
    assert time.monotonic() - t0 < 10          # released at once, not by the barrier's timeout
    good = TPModel(w, 2)
    assert_logits_close(good.forward(PROMPT), Model(w).forward(PROMPT))


def test_narrow_token_dtypes_and_an_uneven_vocabulary():
    """uint8 / int16 token arrays (Model.forward takes them) on a rank whose vocabulary rows start
    past the dtype's range: `tokens - v0` must not run in that dtype. And vocabularies that do
    not divide by tp (601 over 2 and 3 ranks)."""
    for vocab, dtype, tp in ((601, np.uint8, 2), (601, np.uint8, 3), (66001, np.int16, 2)):
        c = make_tiny_config(vocab_size=vocab)                 # rank 1 starts at row 301, 201, 33001
        w = ModelWeights.from_hf(c, make_tiny_tensors(c, seed=5))
        ids = np.array([0, 7, 250, 255, 200, 3], dtype=dtype)
        assert_logits_close(TPModel(w, tp).forward(ids), Model(w).forward(ids))


def test_collectives_refuse_mismatched_calls_and_say_when_a_rank_never_arrives(monkeypatch):
    comm = Comm(2)
    with pytest.raises(RuntimeError, match="different collectives"):
        run_ranks(comm, lambda r: comm.all_reduce(r, np.ones(2), "sum" if r == 0 else "max"))
    from engine.parallel import sim
    monkeypatch.setattr(sim, "BARRIER_TIMEOUT_S", 0.2)
    comm = Comm(2)                                              # built after the patch: its barrier times out
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not all reach a collective"):
        run_ranks(comm, lambda r: comm.all_reduce(r, np.ones(2)) if r == 0 else None)
    assert time.monotonic() - t0 < 5


def test_weight_only_bit_plane_kinds():
    """pot / int (groups of 32 along o's 128 and down's 256 inputs) at TP = 2 and 4; pot3 with INT8
    activations too (act "dynamic": the row-parallel linears' scale from the all-reduced max)."""
    c = make_tiny_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                         intermediate_size=256, num_hidden_layers=2)
    w = ModelWeights.from_hf(c, make_tiny_tensors(c, seed=2))
    for kind, bits, act in (("pot", 3, "none"), ("int", 4, "none"), ("pot", 3, "dynamic")):
        q = quantized(w, kind, act, 32, bits=bits)
        assert q.layers[0].o.act == act
        want = Model(q).forward(PROMPT)
        for tp in (2, 4):
            assert_logits_close(TPModel(q, tp).forward(PROMPT), want)


def smollm2_config(layers: int = 2) -> ModelConfig:
    """SmolLM2-135M's shapes (engine/bench/e2e.py SMOLLM2), fewer layers."""
    return make_tiny_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                            num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                            max_position_embeddings=8192, tie_word_embeddings=True)


@lru_cache(maxsize=1)
def smollm2_model() -> ModelWeights:
    c = smollm2_config()
    t = make_tiny_tensors(c, seed=7)
    t = {n: a * np.float32(0.5 if a.ndim == 2 and "embed" not in n else 1.0) for n, a in t.items()}
    return quantized(ModelWeights.from_hf(c, t), "dg", "dynamic", 128)       # DGQ's default: dg g128, per token


@pytest.mark.parametrize("tp", [2, 4])
def test_smollm2_shapes(tp):
    w = smollm2_model()
    tpm = TPModel(w, tp)
    assert [p.heads for p in tpm.plan.ranks] == ([(0, 6), (6, 9)] if tp == 2 else [(0, 2), (2, 4), (4, 6), (6, 9)])
    assert all(r.layers[0].o.in_features % 128 == 0 for r in tpm.shards[:-1])
    assert tpm.shards[-1].layers[0].o.in_features == 192                  # 3 heads, 1.5 groups
    ref = Model(w).forward(PROMPT)
    assert_logits_close(tpm.forward(PROMPT), ref)
    assert tpm.greedy(PROMPT) == [int(ref[-1].argmax())] * tp
    p = probe_head(w)
    np.testing.assert_array_equal(TPModel(p, tp).forward(PROMPT)[:, :576], Model(p).forward(PROMPT)[:, :576])
    x = down_inputs(w)
    ql = w.layers[1].down
    want = formats.gemm_a8w4_ref(formats.quantize_act_ref(x[1, "down_in"], formats.act_scale_dynamic(x[1, "down_in"])),
                                 ql.int8_weight())
    np.testing.assert_array_equal(sum(tpm.linears[r][1]["down"].acc.astype(np.int64) for r in range(tp)), want)
