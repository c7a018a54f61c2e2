"""Tensor-parallel sharding at load: which rank holds what (`plan`), and the slicing of a
ModelWeights into one ModelWeights per rank (`shard`). docs/PARALLEL.md has the design.

Megatron's split of a decoder layer: q|k|v and gate|up are column-parallel (a rank holds whole
heads and a range of FFN channels: output rows of W, with every per-row tensor — codes, zero
points, group and channel scales, biases — sliced with them); o and down are row-parallel (a
rank holds a range of their input channels K, cut only at group starts so that every rank's
slice is an ordinary layer of the same kind and group); the embedding and the lm_head are split
by vocabulary rows. Norms are replicated.

Heads. A rank holds a contiguous range of query heads and the KV heads they read. Besides the
two textbook cases — KV heads divided (num_kv_heads % tp == 0) and KV heads replicated
(tp % num_kv_heads == 0: each rank owns some of the query heads of one KV head) — any range
works in which the rank holds the same number of query heads for each KV head it touches (the
attention reference groups query heads per KV head): `plan` picks the most even such split
(fewest heads on the busiest rank, then fewest KV heads held), so SmolLM2-135M's 9 heads and
3 KV heads split 6|3 over two ranks and 2|2|2|3 over four with group-128 weights (o cut every
2 heads; float weights: 3|3|2|1). A ModelError names what cannot
be split: heads, the group size on o's or down's input, the intermediate size, the vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .. import formats
from ..io.config import ModelConfig
from ..io.layout import LINEAR_NAMES, LayerWeights, ModelError, ModelWeights, layer_norm_names
from ..model.kv_cache import bytes_per_position

COLUMN = ("q", "k", "v", "gate", "up")       # output rows split: whole heads, FFN channels
ROW = ("o", "down")                          # input channels split; all-reduce after


@dataclass(frozen=True)
class RankPlan:
    """What one rank holds; every range is [start, stop)."""
    rank: int
    heads: tuple[int, int]        # query heads
    kv_heads: tuple[int, int]     # KV heads (a neighbour may hold the same one: replicated)
    ffn: tuple[int, int]          # intermediate channels (gate/up rows, down's input)
    vocab: tuple[int, int]        # embedding and lm_head rows

    def config(self, c: ModelConfig) -> ModelConfig:
        """The rank's view of the model: its heads, KV heads, FFN channels and vocabulary slice.
        The per-layer code runs unchanged on it (engine/model/llama.py layer_forward)."""
        return replace(c, num_attention_heads=_n(self.heads), num_key_value_heads=_n(self.kv_heads),
                       intermediate_size=_n(self.ffn), vocab_size=_n(self.vocab))


@dataclass(frozen=True)
class Plan:
    tp: int
    ranks: tuple[RankPlan, ...]
    o_align: int = 1              # o's input is cut at multiples of this (its group)
    down_align: int = 1           # down's input likewise

    def describe(self) -> str:
        """One line a rank: what it holds."""
        def rng(a, what):
            return f"{what} {a[0]}..{a[1] - 1} ({_n(a)})"
        return "\n".join(f"rank {p.rank}: {rng(p.heads, 'heads')}, {rng(p.kv_heads, 'KV heads')}, "
                         f"{rng(p.ffn, 'FFN channels')}, {rng(p.vocab, 'vocab rows')}" for p in self.ranks)


def _n(r: tuple[int, int]) -> int:
    return r[1] - r[0]


# ----------------------------------------------------------------------------- the plan

def k_align(w) -> int:
    """Input channels a K-split of linear `w` must start at: its group starts, and whole bytes
    (two UINT4 codes) or whole bit-plane words (32 codes). Float and i8 weights cut anywhere."""
    if not isinstance(w, formats.QuantLinear) or w.kind == "i8":
        return 1
    return math.lcm(w.group, formats.KINDS[w.kind].CODES_PER_COLUMN)


def plan_for(weights: ModelWeights, tp: int) -> Plan:
    """plan() with the alignments the weights need (every layer's o and down)."""
    return plan(weights.config, tp, o_align=math.lcm(*(k_align(L.o) for L in weights.layers)),
                down_align=math.lcm(*(k_align(L.down) for L in weights.layers)))


def plan(config: ModelConfig, tp: int, o_align: int = 1, down_align: int = 1) -> Plan:
    """Which heads, KV heads, FFN channels and vocabulary rows each of `tp` ranks holds.
    o_align / down_align: the K-split granularity of o's and down's input (k_align; 1 for float
    weights). ModelError naming what cannot be split."""
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
        raise ModelError(f"tensor parallelism needs a positive whole number of ranks, got tp={tp!r}")
    tp = int(tp)
    c = config
    heads = _split_heads(c, tp, o_align)
    ffn = _split_aligned(c.intermediate_size, tp, down_align, lambda blocks: (
        f"cannot split the MLP's intermediate size {c.intermediate_size} over {tp} ranks: "
        + (f"down_proj's input may only be cut at multiples of {down_align} channels (its quantization "
           f"group), which gives {blocks} piece{'s' * (blocks != 1)}" if down_align > 1
           else "each rank needs at least one channel")))
    if c.vocab_size < tp:
        raise ModelError(f"cannot split the vocabulary of {c.vocab_size} tokens over {tp} ranks")
    vocab = _split_aligned(c.vocab_size, tp, 1, None)
    ranks = tuple(RankPlan(r, heads[r][0], heads[r][1], ffn[r], vocab[r]) for r in range(tp))
    return Plan(tp, ranks, o_align, down_align)


def _split_aligned(n: int, tp: int, align: int, error) -> list[tuple[int, int]]:
    """[start, stop) of each rank over n items cut at multiples of `align`, as even as the
    blocks allow (the first ranks take the extra block, as np.array_split)."""
    blocks = -(-n // align)
    if blocks < tp:
        raise ModelError(error(blocks))
    cuts = np.cumsum([0] + [len(b) for b in np.array_split(np.arange(blocks), tp)]) * align
    return [(int(cuts[r]), int(min(cuts[r + 1], n))) for r in range(tp)]


def _kv_of(a: int, b: int, rep: int) -> tuple[int, int] | None:
    """KV heads [start, stop) read by query heads [a, b) when each KV head serves `rep` query
    heads; None unless the range holds the same number of query heads for each of them."""
    k0, k1 = a // rep, (b - 1) // rep
    if k0 != k1:
        first, last = rep - a % rep, (b - 1) % rep + 1
        if first != last or (k1 - k0 > 1 and first != rep):
            return None
    return (k0, k1 + 1)


def _split_heads(c: ModelConfig, tp: int, align: int) -> list[tuple]:
    """Per rank ((q0, q1), (kv0, kv1)): the most even valid split of the query heads (fewest on
    the busiest rank, then fewest KV heads held in all, then the larger share first)."""
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    rep = hq // hkv
    if tp > hq:
        raise ModelError(f"cannot split {hq} attention heads over {tp} ranks: each rank needs at least one "
                         "whole head")
    step = align // math.gcd(align, d)            # a cut after head b needs b·d % align == 0

    def best(most: int):
        """(KV heads held, [(q range, kv range)] per rank) or None, with at most `most` heads a rank."""
        memo = {}

        def go(a: int, ranks: int):
            if ranks == 0:
                return (0, []) if a == hq else None
            if (a, ranks) not in memo:
                found = None
                for b in range(min(hq, a + most), a, -1):
                    if b != hq and b % step:
                        continue
                    kv = _kv_of(a, b, rep)
                    rest = go(b, ranks - 1) if kv else None
                    if rest is not None and (found is None or rest[0] + _n(kv) < found[0]):
                        found = (rest[0] + _n(kv), [((a, b), kv)] + rest[1])
                memo[a, ranks] = found
            return memo[a, ranks]
        return go(0, tp)

    if best(hq) is None:
        raise ModelError(
            f"cannot split the {hq} attention heads ({hkv} KV heads of {rep} query heads) over {tp} ranks: o_proj's "
            f"input may only be cut at multiples of {align} channels (its quantization group: every {step} heads "
            f"of {d}), and a rank must hold the same number of query heads for each KV head it holds")
    for most in range(-(-hq // tp), hq + 1):
        found = best(most)
        if found is not None:
            return found[1]
    raise AssertionError("unreachable: the unbounded split exists")


# ----------------------------------------------------------------------------- slicing

def _qkv_rows(p: RankPlan, d: int) -> dict:
    h, kv = p.heads, p.kv_heads
    return {"q": (h[0] * d, h[1] * d), "k": (kv[0] * d, kv[1] * d), "v": (kv[0] * d, kv[1] * d),
            "gate": p.ffn, "up": p.ffn}


def slice_rows(w, r0: int, r1: int):
    """Output rows [r0, r1) of a linear (float (N, K) or QuantLinear): every per-row tensor
    with them; the activation mode and ascale (per input tensor) unchanged."""
    if not isinstance(w, formats.QuantLinear):
        return np.ascontiguousarray(w[r0:r1])
    return w.take_rows(slice(r0, r1))


def slice_cols(w, k0: int, k1: int):
    """Input channels [k0, k1) of a linear, k0 at a group start (k_align): the group tensors
    keep the groups [k0/group, ceil(k1/group)), so a short last group stays the last rank's;
    the per-row channel scale (cscale) is whole on every rank."""
    k = w.shape[1] if not isinstance(w, formats.QuantLinear) else w.in_features
    a = k_align(w)
    if k0 % a or (k1 % a and k1 != k):
        raise ModelError(f"a {getattr(w, 'kind', 'float')} linear's input can only be cut at multiples of {a}, "
                         f"not at [{k0}, {k1})")
    if not isinstance(w, formats.QuantLinear):
        return np.ascontiguousarray(w[:, k0:k1])
    per_col = {"qweight": formats.KINDS[w.kind].CODES_PER_COLUMN,           # channels per column
               "qzeros": w.group, "gscale": w.group, "wscale": w.group}
    arrays = {}
    for f in formats.ARRAY_FIELDS:
        t = getattr(w, f)
        if t is not None:
            u = per_col.get(f)
            arrays[f] = t if u is None else np.ascontiguousarray(t[:, k0 // u:-(-k1 // u)])
    return formats.QuantLinear(w.kind, w.act, k1 - k0, w.out_features, w.group, ascale=w.ascale,
                               meta=dict(w.meta), **arrays)


def shard_layer(L: LayerWeights, p: RankPlan, c: ModelConfig) -> LayerWeights:
    """Rank p's share of one layer: column slices of q, k, v, gate, up (and their biases), row
    slices of o and down (their biases whole: added once, after the all-reduce); norms shared."""
    rows = _qkv_rows(p, c.head_dim)
    cols = {"o": (p.heads[0] * c.head_dim, p.heads[1] * c.head_dim), "down": p.ffn}
    lin = {n: slice_rows(getattr(L, n), *rows[n]) for n in COLUMN}
    lin.update({n: slice_cols(getattr(L, n), *cols[n]) for n in ROW})
    kw = L.floats()
    kw["bias"] = {n: (np.ascontiguousarray(b[rows[n][0]:rows[n][1]]) if n in COLUMN else b)
                  for n, b in L.bias.items()}
    assert set(lin) == set(LINEAR_NAMES)
    return LayerWeights(**kw, **lin)


def shard(weights: ModelWeights, tp: int, the_plan: Plan | None = None) -> tuple[Plan, list[ModelWeights]]:
    """(plan, one ModelWeights per rank). A rank's record is an ordinary ModelWeights of its
    view of the model (RankPlan.config): its vocabulary rows of the embedding and the head (a
    tied head stays the rank's embedding slice; an INT8 head's codes and scales are sliced
    together), its shard of every layer, the final norm whole."""
    pl = the_plan or plan_for(weights, tp)
    if pl.tp != tp:
        raise ModelError(f"the plan is for {pl.tp} ranks, not tp={tp}")
    c = weights.config
    tied = weights.lm_head is weights.embed
    out = []
    for p in pl.ranks:
        v0, v1 = p.vocab
        embed = np.ascontiguousarray(weights.embed[v0:v1])
        head = embed if tied else np.ascontiguousarray(weights.lm_head[v0:v1])
        head_q = None if weights.lm_head_q is None else tuple(a[v0:v1] for a in weights.lm_head_q)
        out.append(ModelWeights(config=p.config(c), embed=embed, norm=weights.norm, lm_head=head,
                                lm_head_q=head_q, layers=[shard_layer(L, p, c) for L in weights.layers]))
    return pl, out


# ----------------------------------------------------------------------------- sizes without weights

def planned_bytes(c: ModelConfig, p: RankPlan, kind: str = "dg", group: int = formats.DEFAULT_GROUP,
                  embed_itemsize: int = 2) -> int:
    """Bytes of rank p's weights computed from the config alone, as shard() would slice a model
    whose every linear is of `kind` and group (formats' tensor sizes), norms and biases float32,
    the embedding and an untied head of `embed_itemsize` bytes a value (a q file's fp16: 2), dynamic
    activations (a static scale adds 4 bytes a linear). Equals rank_bytes of the real shard
    (tests/test_tp_cli.py)."""
    d, h = c.head_dim, c.hidden_size
    rows = _qkv_rows(p, d)
    nq, nf = _n(p.heads) * d, _n(p.ffn)
    shapes = {n: (rows[n][1] - rows[n][0], h) for n in COLUMN} | {"o": (h, nq), "down": (h, nf)}

    def linear(n: int, k: int) -> int:
        return sum(int(np.dtype(dt).itemsize) * math.prod(shape)
                   for dt, shape in formats.kind_tensors(kind, n, k, group).values())
    per_layer = sum(linear(*shapes[n]) for n in LINEAR_NAMES)
    per_layer += sum(4 * shapes[n][0] for n in c.linear_bias)           # column slices; o/down: whole
    per_layer += sum(4 * (d if role in ("q_norm", "k_norm") else h) for role in layer_norm_names(c))
    vocab = _n(p.vocab) * h * embed_itemsize
    return c.num_hidden_layers * per_layer + 4 * h + vocab * (1 if c.tie_word_embeddings else 2)


def kv_bytes(c: ModelConfig, p: RankPlan, positions: int, kv8: bool = False) -> int:
    """Rank p's KV cache for `positions` cached positions (batch × context): its KV heads' K and
    V, fp16, or INT8 with one float32 scale per position and KV head."""
    return c.num_hidden_layers * positions * bytes_per_position(c, kv8, _n(p.kv_heads))
