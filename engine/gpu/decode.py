"""The graphed decode step: its device state, the step itself, and the capture and replay loop.

A decode step for a batch of sequences is captured once as a CUDA graph: every buffer is
preallocated (DecodeState, kept with the cache), positions, lengths and the sampling settings
live on the device, and the sampling kernel (cuda/sample.cu: greedy, temperature, top-k, top-p)
advances positions inside the graph, so a replay needs no host work and only the sampled
token ids cross back to the host. The model is any CudaModel (gpu/model.py): this module
runs its layer stack (`_layers`, `_head`, `_lm_head`) with attn_decode as the attention.
"""
from __future__ import annotations

from collections import deque
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
    seq: object          # (B,) int32: row b's random stream (0..B-1 unless decode() is given seq)
    params: object       # uint32[5] sampling settings (ops_cuda.sample_params), read at every replay
    ml: object           # (B·Hq·nsplit·2,) float32: attn_decode's split maxima and sums
    acc: object          # (B·Hq·nsplit·D,) float32: its split outputs
    counters: object     # (B·Hq,) int32: its merge counters, reset by it
    stream: object
    graph: object = None       # the captured step, built on first use
    workspace: object = None   # the split-K workspace the graph points into (kept alive)
    rope: object = None        # the RoPE tables the graph points into (CudaModel.ropes, kept alive)


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
        # RoPE, cache write, flash-decoding and the merge in one launch (cuda/attention.cu), with
        # the layer's RoPE tables, window (0: none) and the model's attention scale
        cos, sin = model.layer_rope[li]
        attention.attn_decode(nb, st.nsplit, cl, window=model.layers[li].window, qkv=bb.qkv, cos_t=cos,
                              sin_t=sin, kc=cache.k[li], vc=cache.v[li], ks=cache.ks[li], vs=cache.vs[li],
                              lens=st.lens, Hq=hq, Hkv=c.num_key_value_heads, D=d, cap=cache.capacity,
                              scale=model._decode_scale, part_ml=st.ml, part_acc=st.acc, counters=st.counters,
                              out=bb.a, amax_out=amax)

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
           top_p: float = 1.0, seed: int = 0, use_graph: bool = True, on_step=None, seq=None):
    """CudaModel.decode: n_steps sampled tokens for every sequence of the cache (see there).
    seq: (B,) the random stream of each row (the Philox counter's second word; default 0..B-1):
    SlotBatch gives each request its own, whatever slot it sits in."""
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
    streams = np.arange(cache.batch) if seq is None else np.asarray(seq)
    if streams.shape != (cache.batch,) or streams.min() < 0 or streams.max() >= 2**31:
        raise ModelError(f"need one stream id in [0, 2^31) per sequence ({cache.batch}), got {seq!r}")
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
    st.seq.set(streams.astype(np.int32))   # the graph reads it at each replay
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
                    st.rope = model.ropes   # the tables it reads, should the model grow them
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


# ----------------------------------------------------------------------------- continuous batching

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # batch sizes a decode step is captured for


def bucket(n: int, slots: int) -> int:
    """The captured batch size that runs n sequences: the next bucket, at most `slots`."""
    return min(next((b for b in BUCKETS if b >= n), slots), slots)


def slots_for_memory(config, capacity: int, kv8: bool, budget_bytes: int) -> int:
    """How many sequences of `capacity` positions a KV budget of budget_bytes holds."""
    return int(budget_bytes // GpuKVCache.bytes_needed(config, capacity, 1, kv8))


class SlotBatch:
    """Continuous batching on one GPU: up to `slots` sequences of up to `capacity` positions
    share one KV cache, allocated once (the scheduler's memory bound); the rest wait, first
    come first served.

    step() admits waiting requests into free slots (a prefill each, then the first token
    sampled by the decode step's kernel), decodes up to `chunk` steps of every running
    sequence, and retires the ended ones. The chunk ends early when a sequence ends or a
    waiting one could join, so requests join and leave between decode steps. Running
    sequences sit in slots 0..n-1 (a leaving one's slot is filled by moving the last running
    one there, GpuKVCache.move), so a step runs the smallest captured bucket ≥ n rows
    (BUCKETS: one CUDA graph each, a GpuKVCache.view of the first rows); rows past n decode
    a dummy token at position 0, which no sequence reads. The decode step samples every row
    with one setting, so a request joins only a batch with its SeqRequest.sampling_key
    (greedy requests always share); one with another key waits until the batch drains.
    Each request draws from its own random stream (submit's `stream`: the Philox counter's
    sequence word, kept with the request through moves), so what it samples depends on its
    seed and stream, not on its slot or on who else runs: a request with stream 0 draws what
    generate() draws for its seed alone.
    Requests are engine.model.generate.SeqRequest; SerialBatch is the CPU counterpart.
    after_step() (if given) runs after each decode step and after admissions. A round admits
    prompts of up to prefill_budget tokens together (at least one), so a crowd arriving at once
    joins over a few steps instead of stalling the running sequences for every prefill.
    pending() (if given) says whether requests not yet submitted are queued (the server's
    incoming queue): with a slot free, the chunk ends for them too.
    """

    def __init__(self, model, slots: int, capacity: int, kv8: bool = False, chunk: int = 32, after_step=None,
                 prefill_budget: int = 2048, pending=None):
        from ..model.generate import GenerationError  # noqa: PLC0415
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise GenerationError(f"the batch needs at least one sequence slot, got {slots!r}")
        self.model, self.slots, self.kv8 = model, int(slots), bool(kv8)
        self.cache = model.new_cache(capacity, batch=self.slots, kv8=self.kv8)
        self.capacity = self.cache.capacity
        self.chunk = max(1, int(chunk))
        self.prefill_budget = int(prefill_budget)
        self.after_step = after_step
        self.pending = pending
        self.views: dict[int, GpuKVCache] = {}
        self.active: list = []          # active[i] decodes in slot i
        self.last: list[int] = []       # the token each feeds next
        self.streams: list[int] = []    # the random stream each draws from
        self.waiting: deque = deque()
        self._stream_of: dict[int, int] = {}   # id(waiting request) -> its stream
        self._submitted = 0

    def submit(self, req, stream: int | None = None) -> None:
        """Queue a request (GenerationError when it cannot run here); its budget is cut to
        what its slot holds, as generate() cuts it to the context. stream: its random stream
        in [0, 2^31) (default: the number of requests submitted before it, so the sequences
        of one LoadedModel.generate call draw differently and reproducibly)."""
        from ..model.generate import GenerationError, check_request  # noqa: PLC0415
        check_request(req, self.capacity)
        stream = self._submitted % 2**31 if stream is None else stream
        if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or not 0 <= stream < 2**31:
            raise GenerationError(f"stream must be an integer in [0, 2^31), got {stream!r}")
        if bool(req.kv8) != self.kv8:
            raise GenerationError(f"this batch's KV cache is {'INT8' if self.kv8 else 'fp16'}; "
                                  f"the request asks for kv8={req.kv8}")
        req.max_new_tokens = min(int(req.max_new_tokens), self.capacity - len(req.prompt_ids))
        self.waiting.append(req)
        self._stream_of[id(req)] = int(stream)
        self._submitted += 1

    def idle(self) -> bool:
        return not self.active and not self.waiting

    def drop_all(self, error: str) -> None:
        """End every request, running or waiting, with finish_reason "error" and free the slots."""
        for req in list(self.active) + list(self.waiting):
            if req.finish_reason is None:
                req.finish_reason, req.error = "error", error
        self.waiting.clear()
        self._stream_of.clear()
        self.active, self.last, self.streams = [], [], []
        self.cache.lens_host[:] = 0

    def step(self) -> None:
        self._admit()
        self._retire()
        if self.active:
            self._decode()
            self._retire()

    # ------------------------------------------------------------------ internals
    def _admissible(self) -> bool:
        if not self.waiting or len(self.active) >= self.slots:
            return False
        head = self.waiting[0]
        return head.cancelled or not self.active or head.sampling_key == self.active[0].sampling_key

    @staticmethod
    def _deliver(req, tok: int) -> None:
        """Record one new token of req and decide whether req ends with it."""
        if req.cancelled:
            req.finish_reason = "cancelled"
            return
        req.tokens.append(tok)
        if tok in req.stop_ids:
            req.finish_reason = "stop"
        elif req.on_token is not None and req.on_token(tok) is True:
            req.finish_reason = "stop"
        elif len(req.tokens) >= req.max_new_tokens:
            req.finish_reason = "length"

    def warm_up(self) -> None:
        """Compile the prefill and decode kernels and capture the decode step of every bucket
        now, not while the first requests wait (each bucket's first decode runs eagerly, then
        captures its graph)."""
        if self.active or self.waiting:
            raise RuntimeError("warm_up runs on an idle batch")
        self.model.prefill(np.zeros(2, np.int64), self.cache, seq=0)
        for nb in sorted({bucket(n, self.slots) for n in range(1, self.slots + 1)}):
            view = self.views.get(nb)
            if view is None:
                view = self.views[nb] = self.cache.view(nb)
            self.cache.lens_host[:] = 0
            decode(self.model, view, np.zeros(nb, np.int64), 2)
        self.cache.lens_host[:] = 0

    def _admit(self) -> None:
        admitted = False
        spent = 0
        while self._admissible():
            n = len(self.waiting[0].prompt_ids)
            if spent and spent + n > self.prefill_budget:
                break
            spent += n
            req = self.waiting.popleft()
            stream = self._stream_of.pop(id(req), 0)
            if req.cancelled:
                req.finish_reason = "cancelled"
                continue
            slot = len(self.active)
            self.cache.lens_host[slot] = 0
            try:
                logits = self.model.prefill(np.asarray(req.prompt_ids), self.cache, seq=slot)   # (1, V)
                first = self.model.sample_logits(logits, stream, len(req.prompt_ids) - 1, **req.sampling)
            except (ValueError, MemoryError) as e:   # ModelError (non-finite logits), CudaOpError,
                self.cache.lens_host[slot] = 0       # CuPy's OutOfMemoryError: this request fails
                msg = " ".join(str(e).split())
                if isinstance(e, MemoryError):
                    cp = getattr(self.model, "cp", None)
                    if cp is not None:           # give the pool's cached blocks back for the next
                        cp.get_default_memory_pool().free_all_blocks()
                    msg = f"out of GPU memory for this prompt's prefill ({msg or type(e).__name__})"
                req.finish_reason, req.error = "error", msg
                continue
            self.active.append(req)
            self.last.append(first)
            self.streams.append(stream)
            self._deliver(req, first)
            admitted = True
        if admitted and self.after_step is not None:
            self.after_step()

    def _decode(self) -> None:
        n = len(self.active)
        nb = bucket(n, self.slots)
        view = self.views.get(nb)
        if view is None:
            view = self.views[nb] = self.cache.view(nb)
        lens = self.cache.lens_host
        lens[n:nb] = 0                                   # idle rows: a dummy token at position 0
        last = np.zeros(nb, np.int64)
        last[:n] = self.last
        seq = np.zeros(nb, np.int64)                     # idle rows draw from stream 0, unread
        seq[:n] = self.streams
        steps = min(self.chunk, self.capacity - int(lens[:nb].max()))
        active = self.active

        def on_step(toks):
            ended = False
            for i, req in enumerate(active):
                if req.finish_reason is None:
                    tok = int(toks[i])
                    self.last[i] = tok
                    self._deliver(req, tok)
                ended = ended or req.finish_reason is not None
            if self.after_step is not None:
                self.after_step()
            return ended or self._admissible() or (
                self.pending is not None and len(active) < self.slots and self.pending())

        try:
            decode(self.model, view, last, steps, use_graph=True, on_step=on_step, seq=seq,
                   **active[0].sampling)
        except ValueError as e:                  # non-finite logits: every running sequence fails
            for req in active:
                if req.finish_reason is None:
                    req.finish_reason, req.error = "error", " ".join(str(e).split())

    def _retire(self) -> None:
        """Drop the ended sequences; the last running one fills each hole (one move a leaver)."""
        for req in self.active:
            if req.finish_reason is None and req.cancelled:
                req.finish_reason = "cancelled"
        i = 0
        while i < len(self.active):
            end = len(self.active) - 1
            if self.active[end].finish_reason is not None:     # the last leaves: no move
                self._pop()
            elif self.active[i].finish_reason is not None:      # the last running one fills slot i
                self.cache.move(end, i)
                self.active[i], self.last[i], self.streams[i] = self.active[end], self.last[end], self.streams[end]
                self._pop()
                i += 1
            else:
                i += 1

    def _pop(self) -> None:
        self.cache.lens_host[len(self.active) - 1] = 0
        self.active.pop()
        self.last.pop()
        self.streams.pop()
