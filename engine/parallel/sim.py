"""The sharded forward pass simulated in NumPy: the CPU proof of the tensor-parallel design.

Each rank is a thread that runs engine/model/llama.py's layer_forward on its shard (shard.py)
and its view of the config: the same per-layer code as the unsharded Model, with o and down
swapped for RowParallelLinear, which ends in the all-reduce. The collectives (Comm) meet at a
barrier and reduce in rank order, so every rank gets the same bits, as NCCL gives every rank
the same result. Per layer:

  all-reduce MAX  of each token's max|x| on o's and on down's input — only for a dynamic
                  (per-token) activation scale: the rank holds part of the row, and the INT8
                  codes equal the unsharded ones only with the row's global scale ((T,) floats)
  all-reduce SUM  after o and after down: the int32 accumulators of an integer kind (exact,
                  so the epilogue after it gives the unsharded output bit for bit), else the
                  float partial outputs (equal within float rounding)

and around the layers: an all-reduce SUM of the vocabulary-split embedding lookup (one rank
holds each row, the others add zeros: exact), an all-gather of the (T, V/tp) logits, and one
of each row's local (max, index) so that every rank samples the same greedy token.
"""
from __future__ import annotations

import threading

import numpy as np

from .. import formats
from ..io.layout import ModelWeights
from ..model import ops_ref
from ..model.kv_cache import KVCache
from ..model.llama import check_finite, check_tokens, embed_tokens, layer_forward, layer_rope, norm, prepare_linears
from .shard import Plan, shard

BARRIER_TIMEOUT_S = 300.0      # a rank that never reaches a collective is a bug: fail, do not hang


class Comm:
    """The collectives of `tp` ranks running as threads. Every rank calls the same collectives
    in the same order; each call returns once all have arrived, with a result equal on all."""

    def __init__(self, tp: int):
        self.tp = tp
        self._parts: list = [None] * tp
        self._ops: list = [None] * tp
        self._out = None
        self._barrier = threading.Barrier(tp, action=self._reduce, timeout=BARRIER_TIMEOUT_S)

    def _reduce(self):                     # runs once, in the last thread to arrive
        parts, op = self._parts, self._ops[0]
        if any(o != op for o in self._ops) or op not in ("sum", "max", "gather"):
            raise RuntimeError(f"the ranks called different collectives at once: {self._ops}")   # breaks the barrier
        if op == "gather":
            self._out = list(parts)
        else:                              # a fixed order, rank 0 first: the same bits every call
            out = parts[0].copy()
            for p in parts[1:]:
                out = out + p if op == "sum" else np.maximum(out, p)
            self._out = out

    def _call(self, rank: int, x, op: str):
        self._parts[rank] = x
        self._ops[rank] = op
        self._barrier.wait()
        out = self._out                    # read before this rank can enter the next collective
        return list(out) if op == "gather" else out.copy()

    def all_reduce(self, rank: int, x: np.ndarray, op: str = "sum") -> np.ndarray:
        """Σ over ranks (op "sum") or the elementwise max ("max") of x, the same shape on all."""
        return self._call(rank, np.asarray(x), op)

    def all_gather(self, rank: int, x: np.ndarray) -> list:
        """Every rank's x, in rank order."""
        return self._call(rank, np.asarray(x), "gather")

    def abort(self):
        """Release the ranks waiting in a collective (BrokenBarrierError) after one has failed."""
        self._barrier.abort()

    def reset(self):
        self._barrier.reset()


class RowParallelLinear:
    """A rank's share of o or down: called with its slice of the input channels (T, K_r), it
    returns the whole output (T, N), the same on every rank (a bias is added after it, once,
    by layer_forward). `acc` keeps this rank's last int32 partial accumulator (integer kinds)."""

    def __init__(self, prepared, rank: int, comm: Comm):
        self.w = prepared                  # ops_ref.PreparedLinear, or a float (N, K_r) array
        self.rank = rank
        self.comm = comm
        self.acc = None

    def scales(self, x: np.ndarray) -> np.ndarray:
        """(T,) activation scales of the whole row: the static scale, or the dynamic one from
        the all-reduced max|x| (formats.act_scale_dynamic on the global max is the unsharded rule)."""
        ql = self.w.ql
        if ql.act == "static":
            return formats.activation_scales(ql, x)
        amax = self.comm.all_reduce(self.rank, np.abs(x).max(axis=-1), "max")        # (T,)
        return formats.act_scale_dynamic(amax[:, None])

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float32)                                          # (T, K_r)
        w, comm, r = self.w, self.comm, self.rank
        if not callable(w) or w.ql.act == "none":                 # float or weight-only
            wf = w if not callable(w) else w.wdeq
            return comm.all_reduce(r, x @ wf.T)                                      # (T, N)
        sx = self.scales(x)                                                          # (T,)
        x8 = formats.quantize_act_ref(x, sx)                                         # (T, K_r) int8
        if w.w8f is None:                  # "g": formats.linear_ref's float64 simulation, summed
            part = x8.astype(np.float64) @ w.wdeq.astype(np.float64).T               # (T, N)
            return (comm.all_reduce(r, part) * sx[:, None]).astype(np.float32)
        self.acc = ops_ref.gemm_int8_exact(x8, w.w8f)                                # (T, N) int32
        acc = comm.all_reduce(r, self.acc)                 # integers: exact in any order
        return formats.epilogue_ref(acc, sx, w.ql.cscale)                            # (T, N)


class TPCache:
    """One KVCache a rank, each holding that rank's KV heads (a replicated KV head on each rank
    that reads it)."""

    def __init__(self, caches: list[KVCache]):
        self.ranks = caches

    @property
    def length(self) -> int:
        return self.ranks[0].length


class TPModel:
    """Runs ModelWeights split over `tp` simulated ranks; forward() has Model.forward's contract
    (logits (T, V) float32) and greedy() gives each rank's agreed next token."""

    def __init__(self, weights: ModelWeights, tp: int, the_plan: Plan | None = None):
        self.config = weights.config
        self.plan, self.shards = shard(weights, tp, the_plan)
        self.tp = self.plan.tp
        self.comm = Comm(self.tp)
        for w in self.shards:
            for li, L in enumerate(w.layers):
                L.check(w.config, li)
        # rank -> layer -> linears ready for layer_forward, o and down ending in the all-reduce
        self.linears = []
        for r, w in enumerate(self.shards):
            per_layer = []
            for L in w.layers:
                lin = prepare_linears(L)
                lin.update({n: RowParallelLinear(lin[n], r, self.comm) for n in ("o", "down")})
                per_layer.append(lin)
            self.linears.append(per_layer)

    def new_cache(self, capacity: int | None = None, kv8: bool = False) -> TPCache:
        cap = capacity or self.config.max_position_embeddings
        return TPCache([KVCache(w.config, cap, np, kv8=kv8) for w in self.shards])

    def forward(self, tokens, cache: TPCache | None = None, last_only: bool = False) -> np.ndarray:
        """Logits (T, V) — or (1, V) with last_only — gathered from the ranks' vocabulary slices."""
        return self._run(tokens, cache, last_only)[0][0]

    def greedy(self, tokens, cache: TPCache | None = None) -> list[int]:
        """The next token after `tokens` as each rank decides it (one entry a rank: they agree)."""
        return [int(tok[-1]) for _, tok in self._run(tokens, cache, True)]

    def forward_greedy(self, tokens, cache: TPCache | None = None) -> tuple[np.ndarray, list[int]]:
        """forward() and greedy() from one run: (logits (T, V), each rank's next token)."""
        out = self._run(tokens, cache, False)
        return out[0][0], [int(tok[-1]) for _, tok in out]

    def _run(self, tokens, cache, last_only):
        c = self.config
        start = cache.length if cache is not None else 0
        tokens = check_tokens(tokens, c, start).astype(np.int64)    # `tokens - v0` below: no narrow-int wrap
        t = tokens.shape[0]
        kinds = {}                                                      # one table pair per RoPE kind
        for li in range(c.num_hidden_layers):
            if c.rope_params(li) not in kinds:
                kinds[c.rope_params(li)] = layer_rope(c, li, np, np.arange(start, start + t))   # (T, D) each
        ropes = [kinds[c.rope_params(li)] for li in range(c.num_hidden_layers)]

        def rank_main(r):
            with np.errstate(over="ignore", invalid="ignore"):         # checked: one clear error
                kv = cache.ranks[r] if cache is not None else None
                return self._rank_forward(r, tokens, ropes, start, kv, last_only)
        return run_ranks(self.comm, rank_main)

    def _rank_forward(self, r: int, tokens, ropes, start: int, kv, last_only: bool):
        """Rank r's whole forward: (logits (T, V), greedy token per row (T,))."""
        w, comm, p = self.shards[r], self.comm, self.plan.ranks[r]
        c = w.config
        v0, v1 = p.vocab
        mine = (tokens >= v0) & (tokens < v1)
        rows = np.concatenate([w.embed, np.zeros((1, w.embed.shape[1]), w.embed.dtype)])   # (V_r + 1, H)
        h = comm.all_reduce(r, embed_tokens(c, rows, np.where(mine, tokens - v0, v1 - v0)))  # (T, H)
        for li, L in enumerate(w.layers):
            cos, sin = ropes[li]
            h = layer_forward(c, li, L, self.linears[r][li], h, cos, sin, start, kv)       # (T, H)
        if kv is not None:
            kv.commit(tokens.shape[0])
        if last_only:
            h = h[-1:]
        h = check_finite(norm(h, w.norm, c.rms_norm_eps, "final norm"), "final norm")       # (T, H)
        logits = check_finite((h @ w.lm_head.T).astype(np.float32), "logits")               # (T, V_r)
        return np.concatenate(comm.all_gather(r, logits), axis=-1), agree_argmax(comm, r, logits, v0)


def run_ranks(comm: Comm, fn) -> list:
    """fn(rank) for every rank of `comm`, each on its own thread; their results in rank order.
    A rank's exception releases the others from their collective and is raised here."""
    comm.reset()
    out, errs = [None] * comm.tp, [None] * comm.tp

    def main(r):
        try:
            out[r] = fn(r)
        except BaseException as e:     # noqa: BLE001  (re-raised below, in the caller)
            errs[r] = e
            comm.abort()

    threads = [threading.Thread(target=main, args=(r,), name=f"tp-rank-{r}", daemon=True) for r in range(comm.tp)]
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join()
    finally:              # interrupted (Ctrl-C): release the ranks waiting in a collective
        if any(th.is_alive() for th in threads):
            comm.abort()
    failed = [e for e in errs if e is not None]
    if not failed:
        return out
    real = [e for e in failed if not isinstance(e, threading.BrokenBarrierError)]
    if real:              # the rank that failed, not the ranks it released from a barrier
        raise real[0]
    raise RuntimeError(f"the ranks did not all reach a collective within {BARRIER_TIMEOUT_S:g} s "
                       "(a rank skipped one, or the collectives' action failed)") from failed[0]


def agree_argmax(comm: Comm, rank: int, logits: np.ndarray, v0: int) -> np.ndarray:
    """(T,) greedy token ids from this rank's vocabulary slice (T, V_r) starting at row v0: one
    all-gather of each row's local (max, id), 2·T numbers a rank instead of the (T, V) logits.
    Ties go to the lowest id, as np.argmax over the whole row (ranks hold the vocabulary in order)."""
    i = logits.argmax(axis=-1)                                                   # (T,)
    best = logits[np.arange(i.shape[0]), i]                                      # (T,)
    parts = comm.all_gather(rank, np.stack([best.astype(np.float64), (i + v0).astype(np.float64)]))
    vals = np.stack([q[0] for q in parts])                                       # (tp, T)
    ids = np.stack([q[1] for q in parts])                                        # (tp, T)
    return ids[vals.argmax(axis=0), np.arange(i.shape[0])].astype(np.int64)     # first rank with the max
