"""The graphed decode step: its device state, the step itself, and the capture and replay loop.

A decode step for a batch of sequences is captured once as a CUDA graph: every buffer is
preallocated (DecodeState, kept with the cache), positions, lengths and the sampling settings
live on the device, and the sampling kernel (cuda/sample.cu: greedy, temperature, top-k, top-p)
advances positions inside the graph, so a replay needs no host work and only the sampled
token ids cross back to the host. The model is any CudaModel (gpu/model.py): this module
runs its layer stack (`_layers`, `_head`, `_lm_head`) with attn_decode as the attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.layout import ModelError
from ..model.llama import check_tokens
from . import attention, kernels, launch
from . import ops as ops_cuda
from .cache import Buffers, GpuKVCache


NONFINITE_LOGITS = ("non-finite values (NaN/Inf) in the {where} on the GPU: the weights are damaged, their "
                    "scales are out of range for this input, or an activation overflowed float16")


def check_finite_logits(cp, logits, what: str):
    """logits, or ModelError when one is NaN or ±Inf: the kernels turn a non-finite activation
    anywhere in the pass into NaN logits (cuda/rows.cuh), so this one check covers the pass."""
    if logits.size and not bool(cp.isfinite(logits).all()):
        raise ModelError(NONFINITE_LOGITS.format(where=f"logits of the {what}"))
    return logits


@dataclass
class DecodeState:
    """Device buffers of a decode step, fixed for the life of the cache (the graph holds them)."""
    bufs: Buffers
    nsplit: int          # flash-decoding splits of the cache (attention.decode_splits)
    tok: object          # (B,) int32: the token each sequence feeds, then the sampled one
    pos: object          # (B,) int32: its position (the sampler's Philox counter)
    lens: object         # (B,) int32: lengths including it; attn_decode reads, sample_rows advances
    seq: object          # (B,) int32: 0..B-1
    params: object       # uint32[5] sampling settings (ops_cuda.sample_params), read at every replay
    ml: object           # (B·Hq·nsplit·2,) float32: attn_decode's split maxima and sums
    acc: object          # (B·Hq·nsplit·D,) float32: its split outputs
    counters: object     # (B·Hq,) int32: its merge counters, reset by it
    stream: object
    graph: object = None       # the captured step, built on first use
    workspace: object = None   # the split-K workspace the graph points into (kept alive)
    rope: object = None        # the RoPE tables the graph points into (kept alive)


def new_state(model, cache: GpuKVCache) -> DecodeState:
    cp, nb, c = model.cp, cache.batch, model.config
    nsplit = attention.decode_splits(cache.capacity)
    d, hq = c.head_dim, c.num_attention_heads
    return DecodeState(bufs=Buffers(cp, c, nb, nb, model._wide), nsplit=nsplit,
                       tok=cp.zeros((nb,), cp.int32), pos=cp.zeros((nb,), cp.int32),
                       lens=cp.zeros((nb,), cp.int32), seq=cp.arange(nb, dtype=cp.int32),
                       params=cp.asarray(ops_cuda.sample_params()),
                       ml=cp.zeros((nb * hq * nsplit * 2,), cp.float32),
                       acc=cp.zeros((nb * hq * nsplit * d,), cp.float32),
                       counters=cp.zeros((nb * hq,), cp.int32),
                       stream=cp.cuda.Stream(non_blocking=True))


def step(model, cache: GpuKVCache, st: DecodeState, with_tail: bool = True):
    """One decode step: embedding, layers, final norm, and (with_tail) lm_head + sampling."""
    c, b, nb = model.config, st.bufs, cache.batch
    hq, d = c.num_attention_heads, c.head_dim
    cl = attention.decode_cluster(st.nsplit, nb * hq, kernels.device_info()["sm_count"]) \
        if model._clusters else 0

    def attend(li, bb, amax=None):
        # RoPE, cache write, flash-decoding and the merge in one launch (cuda/attention.cu)
        attention.attn_decode(nb, st.nsplit, cl, qkv=bb.qkv, cos_t=model.cos, sin_t=model.sin, kc=cache.k[li],
                              vc=cache.v[li], ks=cache.ks[li], vs=cache.vs[li], lens=st.lens, Hq=hq,
                              Hkv=c.num_key_value_heads, D=d, cap=cache.capacity, scale=1.0 / np.sqrt(d),
                              part_ml=st.ml, part_acc=st.acc, counters=st.counters, out=bb.a, amax_out=amax)

    y = model._layers(b, nb, cache, attend, st.tok, decode=True)   # the first norm gathers the embeddings
    model._head(b, y, slice(0, nb), nb, lm_head=False)
    if with_tail:
        tail(model, cache, st)


def tail(model, cache: GpuKVCache, st: DecodeState):
    """lm_head and sampling of a decode step (outside the graph when cuBLAS runs the lm_head)."""
    b, nb = st.bufs, cache.batch
    model._lm_head(b.xh(nb, model.config.hidden_size), b.logits[:nb])
    ops_cuda.sample_rows(b.logits[:nb], st.params, st.seq, st.pos, st.tok, lens=st.lens)


def decode(model, cache: GpuKVCache, last_tokens, n_steps: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, use_graph: bool = True, on_step=None):
    """CudaModel.decode: n_steps sampled tokens for every sequence of the cache (see there)."""
    cp = model.cp
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 0:
        raise ModelError(f"n_steps must be an integer >= 0, got {n_steps!r}")
    if int(cache.lens_host.max()) + n_steps > cache.capacity:
        raise ModelError("the KV cache is too small for that many decode steps")
    last = np.asarray(last_tokens)
    if last.shape != (cache.batch,):
        raise ModelError(f"need one last token per sequence ({cache.batch}), got shape {last.shape}")
    check_tokens(last, model.config)                        # ids in [0, vocab)
    st_params = ops_cuda.sample_params(temperature, top_k, top_p, seed)   # validates the settings
    if cache.step is None:
        cache.step = new_state(model, cache)
    st = cache.step
    # graphs need every call capturable (see CudaModel.graphable): the step up to the final norm,
    # and the lm_head with sampling when our GEMV runs it; else cuBLAS runs it after each replay
    body, with_tail = model.graphable(cache.batch)
    use_graph = use_graph and body
    with_tail = with_tail and use_graph
    lens = cache.lens_host.astype(np.int32)
    st.tok.set(last.astype(np.int32))
    st.pos.set(lens)
    st.lens.set(lens + 1)
    st.params.set(st_params)
    cp.cuda.Device().synchronize()       # prefill and the resets ran on the default stream
    stream = st.stream
    done = 0
    with stream:
        out = cp.empty((n_steps, cache.batch), dtype=cp.int32)
        for i in range(n_steps):
            if use_graph and st.graph is not None:
                st.graph.launch(stream)
                if not with_tail:
                    tail(model, cache, st)
            else:
                step(model, cache, st)
                # the first step runs eagerly (its tail too): it compiles kernels and sizes
                # workspaces, which must not happen during capture; then the step is captured
                # once, for the replays of the following steps (capture runs nothing)
                if use_graph:
                    with launch.capturing():
                        stream.begin_capture()
                        try:
                            step(model, cache, st, with_tail=with_tail)
                        finally:
                            graph = stream.end_capture()
                    st.graph = graph
                    st.rope = (model.cos, model.sin)   # the tables it reads, should the model grow them
                    # the graph holds the split-K workspace's pointers: keep those arrays
                    # alive even if a later, larger GEMM makes ops_cuda allocate new ones
                    st.workspace = ops_cuda._WS.get(cp.cuda.Device().id)
            out[i] = st.tok
            done = i + 1
            if on_step is not None:
                toks = cp.asnumpy(st.tok)
                if (toks == ops_cuda.SAMPLE_NONFINITE).any():
                    break                        # refused below, before on_step sees the token
                if on_step(toks):
                    break
    stream.synchronize()
    cache.lens_host += done
    res = cp.asnumpy(out[:done])
    bad = np.flatnonzero((res == ops_cuda.SAMPLE_NONFINITE).any(axis=1))
    if bad.size:     # cuda/sample.cu wrote SAMPLE_NONFINITE for a row with NaN or Inf logits
        raise ModelError(NONFINITE_LOGITS.format(where=f"logits of decode step {int(bad[0]) + 1}"))
    return res
