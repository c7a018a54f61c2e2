"""Launchers of cuda/attention.cu: rope_qkv_cache and attn_prefill (prefill), attn_decode.

Name triplets (reference ↔ kernel ↔ launcher): engine/model/llama.py's RoPE + cache write ↔ rope_qkv_cache;
its causal GQA ↔ attn_prefill (flash attention, prefill) and attn_decode (RoPE, cache
write, flash-decoding and the merge of the splits in one launch). The cache is fp16, or
int8 with one float32 scale per token and kv head (kv8). The launchers take the kernel's
parameters as keywords (gpu/kargs.py checks the names).

Wide heads (D = 256, Gemma 3) run every attention kernel from a third module, ATTN_WIDE (RoPE
with four pairs a lane; decode on attn_decode_gqa whatever DECODE_KERNEL says).

The families' attention (compiled on first use: ATTN_FAMILY, a second module of attention.cu):
qk_norm_bias (q|k|v biases and per-head q/k RMSNorm, in place on the qkv output before RoPE);
the sliding-window layers' attn_prefill_sw, attn_decode_sw, attn_decode_gqa_sw (the same
kernels with a window: `window=` of the attn_prefill and attn_decode launchers, 0 for none).
A layer's RoPE tables and the attention scale are arguments already (cos_t, sin_t; scale).

Decode has two kernels with one parameter list, chosen by DECODE_KERNEL (flags.ATTN_DECODE,
DGQ_ATTN_DECODE): "gqa", attn_decode_gqa (a block per split of the sequence, kv head and
group of ≤ 8 query heads: each K/V row loaded once per kv head, tensor-core scores, the grid
sized by gqa_splits), or "heads", attn_decode (a block per query head and 64-key split);
"auto" (the default): by the cache's capacity, decode_kernel() (measured faster).
"""
from __future__ import annotations

import numpy as np

from . import flags, kargs, kernels
from .backend import BackendError
from .tuning import ATTENTION, DECODE


def _attention_exprs(sw: str) -> list[str]:
    """The decode and prefill kernels at the narrow head sizes: sw "" the plain ones, "_sw" their
    sliding-window twins."""
    kv, dims = ATTENTION.kv_types, ATTENTION.head_dims
    return ([f"attn_decode{sw}<{t}, {cl}>" for t in kv for cl in (0,) + ATTENTION.decode_clusters]
            + [f"attn_decode_gqa{sw}<{t}, {d}>" for t in kv for d in dims]
            + [f"attn_prefill{sw}<{d}, {t}>" for d in dims for t in kv])


ATTN_EXPRS = tuple([f"rope_qkv_cache<{t}>" for t in ATTENTION.kv_types] + _attention_exprs(""))
ATTN = kargs.KernelFile("attention.cu", ATTN_EXPRS)
ATTN_FAMILY_EXPRS = tuple([f"qk_norm_bias<{d}>" for d in ATTENTION.head_dims] + _attention_exprs("_sw"))
ATTN_FAMILY = kargs.KernelFile("attention.cu", ATTN_FAMILY_EXPRS)
# Wide heads (ATTENTION.wide_head_dims, Gemma 3's 256): every attention kernel a model of that head
# size launches, in one more module (decode: attn_decode_gqa only).
_W = ATTENTION.wide_head_dims
ATTN_WIDE_EXPRS = tuple([f"rope_qkv_cache<{t}, {d}>" for t in ATTENTION.kv_types for d in _W]
                        + [f"qk_norm_bias<{d}>" for d in _W]
                        + [f"attn_decode_gqa{sw}<{t}, {d}>" for sw in ("", "_sw") for t in ATTENTION.kv_types
                           for d in _W]
                        + [f"attn_prefill{sw}<{d}, {t}>" for sw in ("", "_sw") for d in _W
                           for t in ATTENTION.kv_types])
ATTN_WIDE = kargs.KernelFile("attention.cu", ATTN_WIDE_EXPRS)


def _wide(d: int) -> bool:
    return d in ATTENTION.wide_head_dims


DECODE_KERNELS = ("auto", "gqa", "heads")
if flags.ATTN_DECODE not in DECODE_KERNELS:
    raise BackendError(f"DGQ_ATTN_DECODE must be one of {', '.join(DECODE_KERNELS)}, got {flags.ATTN_DECODE!r}")
DECODE_KERNEL = flags.ATTN_DECODE      # read at each launch: a benchmark or test may switch it


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


def prefill_scale(d: int, scalar: float | None = None) -> float:
    """attn_prefill's scale_log2: the softmax scale 1/√d (1/√scalar: Gemma's query_pre_attn_scalar)
    times log2(e) (the kernel uses exp2)."""
    return np.log2(np.e) / np.sqrt(d if scalar is None else scalar)


def decode_scale(d: int, scalar: float | None = None) -> float:
    """attn_decode's scale: 1/√d, or 1/√scalar (config.query_pre_attn_scalar)."""
    return 1.0 / np.sqrt(d if scalar is None else scalar)


def qk_norm_bias(rows: int, qkv, Hq: int, Hkv: int, D: int, bias, qw, kw, eps: float):
    """In place on qkv (rows, (Hq + 2·Hkv)·D) fp16: + bias (None: no bias), then RMSNorm of each q
    head times qw and each k head times kw (None: no norm), before RoPE (cuda/attention.cu)."""
    kargs.launch(ATTN_WIDE if _wide(D) else ATTN_FAMILY, f"qk_norm_bias<{D}>",
                 (rows, -(-(Hq + 2 * Hkv) // ATTENTION.rope_heads)), (ATTENTION.threads,), qkv=qkv, Hq=Hq,
                 Hkv=Hkv, bias=bias, qw=qw, kw=kw, eps=eps)


@kargs.launcher("rope_qkv_cache")
def rope_qkv_cache(rows: int, **args):
    """RoPE of the q and k heads of qkv (rows, (Hq + 2·Hkv)·D) at positions pos: q into q_out,
    k and v into the cache rows (seq, pos) of kc, vc (kv8: quantized, scales into ks, vs)."""
    grid = (rows, -(-(args["Hq"] + args["Hkv"]) // ATTENTION.rope_heads))
    if _wide(args["D"]):
        kargs.launch(ATTN_WIDE, f"rope_qkv_cache<{kv_type(args['kc'])}, {args['D']}>", grid, (ATTENTION.threads,),
                     **args)
        return
    kargs.launch(ATTN, f"rope_qkv_cache<{kv_type(args['kc'])}>", grid, (ATTENTION.threads,), **args)


@kargs.launcher("attn_prefill")
def attn_prefill(window: int = 0, **args):
    """out[:t] (t, Hq·D) fp16 = causal GQA of q[:t] (t, Hq, D) at positions start..start+t-1
    against the first start+t positions of sequence seq in one layer's cache kc, vc
    (B, cap, Hkv, D) — fp16, or int8 with scales ks, vs (B, cap, Hkv) (read only then).
    window > 0: a sliding-window layer (attn_prefill_sw), query i sees the keys after
    start + i − window only."""
    if window > 0:
        return _prefill_sw("attn_prefill", window, args)
    kc = args["kc"]
    d = kc.shape[-1]
    expr = f"attn_prefill<{d}, {kv_type(kc)}>"
    kf = ATTN_WIDE if _wide(d) else ATTN
    smem = prefill_smem(d, kc.dtype.itemsize == 1)
    fn = kargs.function(kf, expr)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    kargs.launch(kf, expr, (-(-args["t"] // ATTENTION.prefill_bm), args["Hq"]), (ATTENTION.threads,),
                 shared_mem=smem, **args)
    return args["out"]


def _prefill_sw(kernel: str, window: int, args: dict):
    """attn_prefill_sw for the launcher of `kernel` (attn_prefill): its parameters and `window`."""
    kc = args["kc"]
    d = kc.shape[-1]
    kf = ATTN_WIDE if _wide(d) else ATTN_FAMILY
    smem = prefill_smem(d, kc.dtype.itemsize == 1)
    fn = kargs.function(kf, f"attn_prefill_sw<{d}, {kv_type(kc)}>")
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    kargs.launch(kf, f"attn_prefill_sw<{d}, {kv_type(kc)}>", (-(-args["t"] // ATTENTION.prefill_bm), args["Hq"]),
                 (ATTENTION.threads,), shared_mem=smem, window=window, **args)
    return args["out"]


def decode_kernel(nsplit: int, d: int = 128, batch: int = 1) -> str:
    """The decode attention kernel a step of `batch` sequences runs: DECODE_KERNEL, where "auto"
    is "gqa" for a cache of at least ATTENTION.gqa_min_keys positions (nsplit splits of
    decode_chunk keys), or gqa_min_keys_batch from gqa_batch sequences, and "heads" below
    (docs/KERNELS.md has the measurements); wide heads always "gqa". Fixed for a cache's capacity
    and batch, as the captured step graph needs."""
    if DECODE_KERNEL == "gqa" or _wide(d):
        return "gqa"
    if DECODE_KERNEL == "auto":
        least = ATTENTION.gqa_min_keys_batch if batch >= ATTENTION.gqa_batch else ATTENTION.gqa_min_keys
        return "gqa" if nsplit * ATTENTION.decode_chunk >= least else "heads"
    return "heads"


@kargs.launcher("attn_decode")
def attn_decode(batch: int, nsplit: int, cl: int, window: int = 0, **args):
    """One decode step's attention for `batch` sequences (cuda/attention.cu): RoPE, cache
    write, flash-decoding and the merge of the splits. DECODE_KERNEL "heads": attn_decode over
    nsplit splits of DEC_CHUNK keys a query head, merged through a cluster of cl CTAs (sm_90) or
    global memory (cl = 0: part_ml, part_acc, counters); "gqa": attn_decode_gqa over
    gqa_splits(...) ≤ nsplit splits a kv head group (cl unused), in the same scratch (sized for
    nsplit by the caller: (B·Hq·nsplit·2,), (B·Hq·nsplit·D,) and (B·Hq,)). window > 0: a
    sliding-window layer (attn_decode_sw, attn_decode_gqa_sw): the new token at p sees the keys
    after p − window only."""
    if decode_kernel(nsplit, args["D"], batch) == "gqa":
        _decode_gqa("attn_decode", batch, nsplit, args, window)
        return
    if window > 0:
        _decode_heads_sw("attn_decode", batch, nsplit, cl, window, args)
        return
    kargs.launch(ATTN, f"attn_decode<{kv_type(args['kc'])}, {cl}>", (batch, args["Hq"], cl or nsplit),
                 (ATTENTION.threads,), **args)


def _decode_heads_sw(kernel: str, batch: int, nsplit: int, cl: int, window: int, args: dict):
    """attn_decode_sw for the launcher of `kernel` (attn_decode): its grid, and `window`."""
    kargs.launch(ATTN_FAMILY, f"attn_decode_sw<{kv_type(args['kc'])}, {cl}>", (batch, args["Hq"], cl or nsplit),
                 (ATTENTION.threads,), window=window, **args)


def gqa_smem(d: int, kv8: bool) -> int:
    """Dynamic shared memory of attn_decode_gqa<KV, d> (cuda/attention.cu GqLayout::BYTES)."""
    es, w = (1 if kv8 else 2), ATTENTION.threads // 32
    kb, vb = d * es // 4, d * es // 8
    stage = 32 * (2 * kb + 4 * vb) + (2 * ATTENTION.gqa_step * 4 if kv8 else 0)     # kv8: + the step's scales
    stages = 3 if w * stage * 4 > 100 * 1024 else 4
    return max(w * stages * stage, w * ATTENTION.gqa_heads * (d + 2) * 4)


# attn_decode_gqa's static shared memory, bytes (sq, snk, snv, snew, wts, last) at D ≤ 256 (8236 at
# 256), rounded up; the blocks an SM of every narrow and wide instantiation are those of 8 KB
GQA_STATIC_SMEM = 9 * 1024


def gqa_groups(hq: int, hkv: int) -> int:
    """Blocks of attn_decode_gqa per kv head and split: groups of ≤ gqa_heads query heads."""
    return -(-(hq // hkv) // ATTENTION.gqa_heads)


def gqa_splits(batch: int, hq: int, hkv: int, d: int, kv8: bool, nsplit: int, sms: int, smem_sm: int,
               regs_per_thread: int = 0) -> int:
    """attn_decode_gqa's grid x (splits of the sequence) for a step of `batch` sequences on `sms`
    SMs of `smem_sm` bytes of shared memory each: as many as fill gqa_waves waves of the blocks
    the SMs hold (one sequence at batch 1 then covers the GPU), at most gqa_max_splits and nsplit
    (attn_decode's splits of the capacity, DEC_CHUNK keys each: the scratch is sized for them).
    Fixed for the capacity and batch (the graph of the step is captured once); the kernel divides
    the keys it finds among them, so a short sequence leaves the later splits empty.
    regs_per_thread (the compiled kernel's, when known) caps the blocks an SM holds by its 64 K
    registers as well as by its shared memory. With tuning.DECODE.gqa_wave_fit
    (off), two splits where one split a unit leaves more waves per unit of work."""
    per_sm = max(1, smem_sm // (gqa_smem(d, kv8) + GQA_STATIC_SMEM))
    if regs_per_thread:
        per_sm = max(1, min(per_sm, 65536 // (-(-regs_per_thread // 8) * 8 * ATTENTION.threads)))   # 8-register units
    units = batch * hkv * gqa_groups(hq, hkv)
    slots = ATTENTION.gqa_waves * sms * per_sm
    ns = slots // units
    if ns <= 1 and DECODE.gqa_wave_fit and min(ATTENTION.gqa_max_splits, nsplit) >= 2 \
            and -(-2 * units // slots) < 2 * -(-units // slots):
        ns = 2      # more units than slots: two splits a unit where that leaves fewer waves a unit's work
    return int(max(1, min(ns, ATTENTION.gqa_max_splits, nsplit)))


def _decode_gqa(kernel: str, batch: int, nsplit: int, args: dict, window: int = 0):
    """attn_decode_gqa for the launcher of `kernel` (attn_decode): the same parameters
    (tests/test_decode_attention.py holds the two lists equal), its own grid and shared memory;
    window > 0: attn_decode_gqa_sw."""
    kc, d = args["kc"], args["D"]
    kv8 = kc.dtype.itemsize == 1
    sw = window > 0
    key = (batch, args["Hq"], args["Hkv"], d, kv8, nsplit, sw, kernels.EDITS,   # EDITS: kargs.patched
           DECODE.gqa_wave_fit, ATTENTION.gqa_waves)
    hit = _GQA_LAUNCH.get(key)
    if hit is None:
        info = kernels.device_info()
        kvt, smem = kv_type(kc), gqa_smem(d, kv8)
        fn = (kargs.function(_gqa_file(d, sw), f"attn_decode_gqa_sw<{kvt}, {d}>") if sw
              else kargs.function(_gqa_file(d, sw), f"attn_decode_gqa<{kvt}, {d}>"))
        ns = gqa_splits(batch, args["Hq"], args["Hkv"], d, kv8, nsplit, info["sm_count"], info["smem_optin"] + 1024,
                        fn.num_regs)
        if fn.max_dynamic_shared_size_bytes < smem:      # > 48 KB: opt in (before any capture)
            fn.max_dynamic_shared_size_bytes = smem
        hit = _GQA_LAUNCH[key] = (kvt, (ns, args["Hkv"] * gqa_groups(args["Hq"], args["Hkv"]), batch), smem)
    kvt, grid, smem = hit
    if sw:
        kargs.launch(_gqa_file(d, sw), f"attn_decode_gqa_sw<{kvt}, {d}>", grid, (ATTENTION.threads,),
                     shared_mem=smem, window=window, **args)
        return
    kargs.launch(_gqa_file(d, sw), f"attn_decode_gqa<{kvt}, {d}>", grid, (ATTENTION.threads,),
                 shared_mem=smem, **args)


def _gqa_file(d: int, sw: bool) -> kargs.KernelFile:
    """The module attn_decode_gqa(_sw)<KV, d> lives in."""
    return ATTN_WIDE if _wide(d) else ATTN_FAMILY if sw else ATTN


_GQA_LAUNCH: dict = {}      # (batch, Hq, Hkv, D, kv8, nsplit, windowed, edits, wave_fit, gqa_waves)
                            # -> (cache type, grid, shared memory)
