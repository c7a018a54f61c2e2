"""Launchers of cuda/attention.cu: rope_qkv_cache and attn_prefill (prefill), attn_decode.

Name triplets (reference ↔ kernel ↔ launcher): engine/model/llama.py's RoPE + cache write ↔ rope_qkv_cache;
its causal GQA ↔ attn_prefill (flash attention, prefill) and attn_decode (RoPE, cache
write, flash-decoding and the merge of the splits in one launch). The cache is fp16, or
int8 with one float32 scale per token and kv head (kv8). The launchers take the kernel's
parameters as keywords (gpu/kargs.py checks the names).
"""
from __future__ import annotations

import numpy as np

from . import kargs
from .tuning import ATTENTION

ATTN_EXPRS = tuple([f"rope_qkv_cache<{t}>" for t in ATTENTION.kv_types]
                   + [f"attn_decode<{t}, {cl}>" for t in ATTENTION.kv_types
                      for cl in (0,) + ATTENTION.decode_clusters]
                   + [f"attn_prefill<{d}, {t}>" for d in ATTENTION.head_dims for t in ATTENTION.kv_types])
ATTN = kargs.KernelFile("attention.cu", ATTN_EXPRS)


def kv_type(cache_array) -> str:
    """The attention kernels' template argument for a cache array (fp16 or int8)."""
    return "signed char" if cache_array.dtype.itemsize == 1 else "__half"


def decode_cluster(nsplit: int, heads: int = 1, sms: int = 1 << 30) -> int:
    """attn_decode's cluster size for nsplit splits of `heads` (batch × query heads) on a GPU of
    `sms` SMs (sm_90): the smallest cluster that holds the splits, while the heads fit in one
    wave; else 0, the merge through global memory. Measured on the H100, 7B, 7 splits or fewer:
    clusters win at b=1 (2.17 against 2.25 ms a step) and lose at b=8 (3.00 / 2.84) and b=32
    (6.30 / 5.79), where co-scheduling thousands of clustered blocks costs more than the merge."""
    if heads > sms:
        return 0
    return next((cl for cl in ATTENTION.decode_clusters if cl >= nsplit), 0)


def decode_splits(capacity: int) -> int:
    """Flash-decoding splits of a cache of `capacity` positions (one block of DEC_CHUNK keys each)."""
    return -(-capacity // ATTENTION.decode_chunk)


def prefill_smem(d: int, kv8: bool) -> int:
    """Dynamic shared memory of attn_prefill<d, KV> (cuda/attention.cu FaSmem::BYTES)."""
    bn = ATTENTION.prefill_bn
    return 4 * bn * (d + 8) * 2 + (4 * bn * d if kv8 else 0)


def prefill_scale(d: int) -> float:
    """attn_prefill's scale_log2: the softmax scale 1/√d times log2(e) (the kernel uses exp2)."""
    return np.log2(np.e) / np.sqrt(d)


@kargs.launcher("rope_qkv_cache")
def rope_qkv_cache(rows: int, **args):
    """RoPE of the q and k heads of qkv (rows, (Hq + 2·Hkv)·D) at positions pos: q into q_out,
    k and v into the cache rows (seq, pos) of kc, vc (kv8: quantized, scales into ks, vs)."""
    grid = (rows, -(-(args["Hq"] + args["Hkv"]) // ATTENTION.rope_heads))
    kargs.launch(ATTN, f"rope_qkv_cache<{kv_type(args['kc'])}>", grid, (ATTENTION.threads,), **args)


@kargs.launcher("attn_prefill")
def attn_prefill(**args):
    """out[:t] (t, Hq·D) fp16 = causal GQA of q[:t] (t, Hq, D) at positions start..start+t-1
    against the first start+t positions of sequence seq in one layer's cache kc, vc
    (B, cap, Hkv, D) — fp16, or int8 with scales ks, vs (B, cap, Hkv) (read only then)."""
    kc = args["kc"]
    d = kc.shape[-1]
    expr = f"attn_prefill<{d}, {kv_type(kc)}>"
    smem = prefill_smem(d, kc.dtype.itemsize == 1)
    fn = kargs.function(ATTN, expr)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    kargs.launch(ATTN, expr, (-(-args["t"] // ATTENTION.prefill_bm), args["Hq"]), (ATTENTION.threads,),
                 shared_mem=smem, **args)
    return args["out"]


@kargs.launcher("attn_decode")
def attn_decode(batch: int, nsplit: int, cl: int, **args):
    """One decode step's attention for `batch` sequences (cuda/attention.cu): RoPE, cache
    write, flash-decoding over nsplit splits of DEC_CHUNK keys and their merge, through a
    cluster of cl CTAs (sm_90) or global memory (cl = 0: part_ml, part_acc, counters)."""
    kargs.launch(ATTN, f"attn_decode<{kv_type(args['kc'])}, {cl}>", (batch, args["Hq"], cl or nsplit),
                 (ATTENTION.threads,), **args)
