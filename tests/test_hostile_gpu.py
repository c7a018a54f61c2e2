"""Issue #17 on the GPU: non-finite activations and logits are one clear error (the GPU twins of
tests/test_hostile.py's numeric-hygiene tests), float weights that do not fit float16 are refused
at upload, and a model's declared context costs nothing until a cache asks for it (gpu-marked).

The kernels' rule (cuda/rows.cuh): every absmax propagates NaN, a row holding a NaN or an Inf gets
a NaN scale in both activation modes, so the NaN reaches the logits, which the prefill checks and
the sampling kernel refuses (SAMPLE_NONFINITE). Before that rule a NaN was rounded to code 0 and
the run went on with a finite, wrong answer: each test below fails on such a kernel.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.gpu.backend import has_gpu
from engine.io.layout import ModelError
from engine.model import Model, ModelWeights

from test_kernels_gpu import random_dg, random_x8
from test_model import random_tensors, tiny_config
from test_model_cuda import quantized_tiny

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)

import cupy as cp  # noqa: E402

from engine.gpu import fused  # noqa: E402
from engine.gpu import ops as ops_cuda  # noqa: E402
from engine.gpu.fused import MODE  # noqa: E402
from engine.gpu.model import ROPE_MIN_POSITIONS, CudaModel  # noqa: E402

BAD = [np.nan, np.inf, -np.inf]
SHAPE = dict(head_dim=64, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=96)


def _rows(k=200, bad=np.nan):
    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float16)
    x[1, 77] = bad                                        # one value of row 1
    return x


# ----------------------------------------------------------------------------- the kernels

@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("bad", BAD)
def test_row_kernel_gives_a_nonfinite_row_a_nan_scale(mode, bad):
    x = _rows(bad=bad)
    x8, sx = cp.zeros((3, 256), cp.int8), cp.zeros((3,), cp.float32)
    fused.quant_rows(3, x=cp.asarray(x), K=200, mode=MODE[mode], static_scale=cp.asarray([0.02], cp.float32),
                     x8=x8, ld=256, sx=sx)
    got = sx.get()
    assert np.isnan(got[1])                              # not a finite scale over code 0
    want = [0.02, 0.02] if mode == "static" else np.abs(x[[0, 2]].astype(np.float32)).max(axis=1) / 127
    np.testing.assert_allclose(got[[0, 2]], want, rtol=1e-6)


@pytest.mark.parametrize("bad", BAD)
def test_quantize_act_dynamic_gives_a_nonfinite_row_a_nan_scale(bad):
    _, sx = ops_cuda.quantize_act_dynamic(cp.asarray(_rows(bad=bad)))
    got = sx.get()
    assert np.isnan(got[1]) and np.isfinite(got[[0, 2]]).all()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quant_amax_takes_a_nan_absmax_in_both_modes(mode):
    x = cp.asarray(np.ones((2, 64), np.float32))
    amax = cp.asarray(np.array([1.0, np.nan], np.float32).view(np.uint32))
    x8, sx = cp.zeros((2, 64), cp.int8), cp.zeros((2,), cp.float32)
    fused.quant_amax(2, x=x, K=64, mode=MODE[mode], static_scale=cp.asarray([0.5], cp.float32), amax=amax,
                     x8=x8, ld=64, sx=sx)
    got = sx.get()
    assert got[0] == (0.5 if mode == "static" else np.float32(1.0) / np.float32(127)) and np.isnan(got[1])


def test_silu_gemv_absmax_keeps_a_nan():
    """The SiLU GEMV's atomic absmax (cuda/gemm_a8w4.cu): NaN outputs leave NaN bits, not 0."""
    layer = ops_cuda.pack_for_gpu(random_dg(64, 256, 128, seed=2).take_rows(ops_cuda.interleave_rows(64)))
    out, amax = cp.zeros((1, 32), cp.float32), cp.zeros((1,), cp.uint32)
    ops_cuda.gemv_a8w4_silu(cp.asarray(random_x8(1, 256)), cp.asarray([np.nan], cp.float32), layer, out, amax)
    assert np.isnan(out.get()).all() and np.isnan(amax.get().view(np.float32)[0])


# ----------------------------------------------------------------------------- whole passes

def _poisoned(act, norm):
    """A tiny DGQ model with one NaN in one channel of layer 1's norm weight: a NaN in one value
    of one activation row, which int8 rounding would make 0."""
    mw = quantized_tiny(act, seed=3, **SHAPE)
    getattr(mw.layers[1], norm)[5] = np.nan
    return mw


@pytest.mark.parametrize("act", ["static", "dynamic"])
@pytest.mark.parametrize("norm", ["attn_norm", "mlp_norm"])
def test_nan_activation_in_prefill_is_one_clear_error_on_both_paths(act, norm):
    mw = _poisoned(act, norm)
    tokens = np.array([3, 17, 5, 9])
    with pytest.raises(ModelError, match="non-finite values"):
        Model(mw).forward(tokens)
    gm = CudaModel(mw)
    with pytest.raises(ModelError, match="non-finite values .* logits of the prefill on the GPU"):
        gm.prefill(tokens, gm.new_cache(16))
    with pytest.raises(ModelError, match="non-finite values"):
        gm.prefill(tokens[:1], gm.new_cache(16))                    # one token: the GEMV path


@pytest.mark.parametrize("act", ["static", "dynamic"])
@pytest.mark.parametrize("norm", ["attn_norm", "mlp_norm"])
@pytest.mark.parametrize("use_graph, kv8", [(True, False), (False, False), (True, True)])
def test_nan_activation_in_decode_is_one_clear_error(act, norm, use_graph, kv8):
    """Clean prefill, then the norm weight turns NaN on the device: the decode step (one token:
    the fold of attn_decode's and the SiLU GEMV's absmax into quant_amax) must refuse the step."""
    gm = CudaModel(quantized_tiny(act, seed=3, **SHAPE))
    cache = gm.new_cache(32, kv8=kv8)
    first = int(gm.prefill(np.array([3, 17, 5]), cache)[0].argmax())
    ok = gm.decode_greedy(cache, [first], 2, use_graph=use_graph)        # captures the step graph
    assert (ok >= 0).all()
    getattr(gm.layers[1], norm)[5] = cp.nan
    seen = []
    with pytest.raises(ModelError, match="non-finite values .* logits of decode step 1 on the GPU"):
        gm.decode_greedy(cache, ok[-1], 3, use_graph=use_graph, on_step=lambda t: seen.append(t) and False)
    assert seen == []                                    # the callback never saw the bad token


def test_logits_overflowing_float16_are_an_error_not_a_token():
    mw = quantized_tiny("dynamic", seed=3, **SHAPE)
    mw = ModelWeights(config=mw.config, embed=mw.embed, layers=mw.layers, norm=mw.norm,
                      lm_head=60000.0 * np.sign(np.random.default_rng(1).standard_normal(mw.lm_head.shape)))
    gm = CudaModel(mw)
    cache = gm.new_cache(16)
    with pytest.raises(ModelError, match="non-finite values"):
        gm.prefill(np.array([1, 2, 3]), cache)


def test_sampler_refuses_nonfinite_logits_given_by_the_api():
    gm = CudaModel(quantized_tiny("dynamic", seed=3, **SHAPE))
    logits = cp.zeros((1, gm.config.vocab_size), cp.float16)
    logits[0, 4] = cp.nan
    with pytest.raises(ModelError, match="logits given to the sampler"):
        gm.sample_logits(logits, 0, 0)
    logits[0, 4] = 2.0
    assert gm.sample_logits(logits, 0, 0) == 4


# ----------------------------------------------------------------------------- upload and sizes

@pytest.mark.parametrize("name, where", [("model.layers.0.self_attn.k_proj.weight", "layer 0 q|k|v_proj"),
                                         ("model.layers.1.mlp.down_proj.weight", "layer 1 down_proj"),
                                         ("model.embed_tokens.weight", "the token embedding"),
                                         ("lm_head.weight", "the lm_head")])
def test_float_weights_past_float16_are_refused_at_upload(name, where):
    c = tiny_config(**SHAPE)
    t = random_tensors(c)
    t[name][1, 2] = -1e5
    mw = ModelWeights.from_hf(c, t)
    Model(mw).forward(np.array([1, 2]))                   # float32 on the CPU: fine
    with pytest.raises(ModelError, match=f"{where.replace('|', '[|]')}: weights up to .*1e[+]05 do not fit float16"):
        CudaModel(mw)


def test_a_huge_declared_context_costs_nothing_until_a_cache_asks():
    c = tiny_config(max_position_embeddings=1 << 24, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                    hidden_size=64, intermediate_size=96)
    mw = ModelWeights.from_hf(c, random_tensors(c))
    gm = CudaModel(mw)
    assert gm.cos.shape[0] == ROPE_MIN_POSITIONS
    tokens = np.array([5, 9, 2])
    small = gm.new_cache(16)
    want = gm.prefill(tokens, small).get()
    steps = gm.decode_greedy(small, [int(want[0].argmax())], 2)      # captures a graph on these tables
    cache = gm.new_cache(ROPE_MIN_POSITIONS + 1000)       # grows the tables, geometrically
    assert gm.cos.shape[0] == gm.sin.shape[0] == 2 * ROPE_MIN_POSITIONS
    inv = 1.0 / (c.rope_theta ** (np.arange(0, 64, 2) / 64))
    np.testing.assert_allclose(gm.cos[-1].get(), np.cos((2 * ROPE_MIN_POSITIONS - 1) * inv), atol=1e-6)
    np.testing.assert_array_equal(gm.prefill(tokens, cache).get(), want)
    assert (gm.decode_greedy(small, steps[-1], 3) >= 0).all()       # the graph's old tables stay alive
    with pytest.raises(ModelError, match=r"KV cache of 16777216 positions x 4096 sequences needs .* GiB"):
        gm.new_cache(1 << 24, batch=4096)
