"""The GPU engine: the same Llama forward as engine/model.py on CuPy, with fused kernels.

Per layer and step: add_rmsnorm_quant (the previous sublayer's residual add unless the GEMV
did it, RMSNorm, INT8 quantization) → fused qkv A8W4 GEMM → attention (cuda/attention.cu:
for prefill rope_qkv_cache then flash-attention; for decode one attn_decode launch: RoPE,
cache write, flash-decoding, merge of the splits) → quant_rows → o GEMM → add_rmsnorm_quant →
fused gate|up GEMM → silu_mul_quant → down GEMM. Up to 16 rows of an all-A8W4 model, the o and
down GEMVs add their output into the residual stream themselves (_fold_resid); otherwise the
next norm adds it, and the last layer's add happens in the final norm. In a one-token decode
step (_fold_quant) the gate|up rows are interleaved so its GEMV epilogue writes silu(gate)·up
and max-reduces the row's absmax, attn_decode max-reduces its output's, and quant_amax
launches (no reduction) quantize both rows: silu_mul_quant and quant_rows drop out of the
step. The residual stream is float32; GEMM outputs and q are float16; the KV cache is float16, or INT8 with one float32
scale per token and kv head (kv8). Layers whose weights are float run the same steps with
FP16 linears (cuBLAS for prefill, our fp16 GEMV for up to 8 rows, so their decode step is
graphed too): that is "our FP16 path", the in-run speed baseline.

A decode step for a batch of sequences is captured once as a CUDA graph: every
buffer is preallocated, positions, lengths and the sampling settings live on the
device, and the sampling kernel (cuda/sample.cu: greedy, temperature, top-k, top-p)
advances positions inside the graph, so a replay needs no host work and only the
sampled token ids cross back to the host.
"""
from __future__ import annotations

import numpy as np

from .. import formats
from ..io.config import ModelConfig
from ..io.layout import ModelError, ModelWeights
from ..model.llama import check_tokens
from . import kernels, launch
from . import ops as ops_cuda
from .backend import BackendError, cupy_or_none

MODE = {"static": 0, "dynamic": 1, "fp16": 2}
DECODE_CHUNK = 64           # keys per flash-decoding block (cuda/attention.cu DEC_CHUNK)
GEMV_F16_MT = (1, 4, 8)     # M buckets of the fp16 GEMV (cuda/fused.cu gemv_f16_m*)
GEMV_F16_MAXM = GEMV_F16_MT[-1]
ROW_PERS = (1, 2, 4, 8, 16, 32)  # row elements a thread holds: the row kernels' instantiations
ROW_CLUSTERS = (1, 2, 4, 8)      # CTAs sharing a row (thread block clusters, sm_90)
ROW_CLUSTER_PERS = ROW_PERS[:3]  # PER instantiated with clusters of 2 or more
ROW_CTA_WIDTH = 4096             # on sm_90, a row wider than this is split over a cluster (H100, 7B
                                 # decode: 2048 / 4096 / none = 2.56 / 2.46 / 2.55 ms a step)
ROW_CTA_WIDTH_BY_KERNEL = {"silu_mul_quant": 2048}   # 11008 wide: 8 CTAs 3.4 µs, 4 CTAs 3.8 µs
ROW_THREADS_MANY = 256      # threads a row when the rows fill the GPU (prefill): 4× the rows in flight
ROW_PER_MANY = 16           # ... up to this many values a thread (PER = 32 spills at 64 registers)
ROW_KERNELS = ("add_rmsnorm_quant", "silu_mul_quant", "quant_rows")
ROW_VEC = 8                 # elements a thread moves in one access in the prefill launches (cuda/rows.cuh
                            # Pack; 16-byte fp16 loads), 4 where PER = 4; 8 or 1 (the element stride
                            # everywhere): the values FUSED_EXPRS instantiates
ROW_VEC_FEW = False         # the same for the few-row (decode) launches of one CTA a row: 7B b=1 step
                            # −27 µs on an H100, off until the GPU tests run with it (docs/KERNELS.md)
FUSED_EXPRS = tuple(f"{k}<{p}, {cl}, 1>" for k in ROW_KERNELS for cl in ROW_CLUSTERS
                    for p in (ROW_PERS if cl == 1 else ROW_CLUSTER_PERS)) + tuple(
    f"{k}<{p}, 1, {min(p, 8)}>" for k in ROW_KERNELS for p in ROW_PERS if p >= 4
) + ("quant_amax<float>", "quant_amax<__half>")
FA_BM, FA_BN = 64, 64       # query rows per block, keys per tile of attn_prefill (cuda/attention.cu)
KV_TYPES = ("__half", "signed char")       # the cache element types the attention kernels take
FOLD_QUANT = True           # one-token steps: SiLU in the gate|up GEMV, no absmax reductions (_fold_quant)
DECODE_CLUSTERS = (1, 2, 4, 8)   # attn_decode's splits of a head as one cluster (sm_90, nsplit ≤ 8); 0: atomics
ATTN_EXPRS = tuple([f"rope_qkv_cache<{t}>" for t in KV_TYPES]
                   + [f"attn_decode<{t}, {cl}>" for t in KV_TYPES for cl in (0,) + DECODE_CLUSTERS]
                   + [f"attn_prefill<{d}, {t}>" for d in (64, 128) for t in KV_TYPES])


def _fuse(qls):
    """Concatenate QuantLinears that read one input along N (q|k|v, gate|up)."""
    a = qls[0]
    for q in qls[1:]:
        if (q.kind, q.act, q.group, q.in_features) != (a.kind, a.act, a.group, a.in_features):
            raise ModelError("layers fused into one GEMM must share kind, act mode, group and K")
        if a.act == "static" and q.ascale != a.ascale:
            raise ModelError("q/k/v (and gate/up) read one input and must share one static act scale")
    cat = lambda f: np.concatenate([getattr(q, f) for q in qls], axis=0)  # noqa: E731
    return formats.QuantLinear(kind=a.kind, act=a.act, in_features=a.in_features,
                               out_features=sum(q.out_features for q in qls), group=a.group,
                               qweight=cat("qweight"), qzeros=cat("qzeros"), gscale=cat("gscale"),
                               cscale=cat("cscale"), ascale=a.ascale)


def _permute_rows(ql, rows):
    """The QuantLinear with output rows in the order `rows` (per-row arrays only)."""
    return formats.QuantLinear(kind=ql.kind, act=ql.act, in_features=ql.in_features,
                               out_features=ql.out_features, group=ql.group, qweight=ql.qweight[rows],
                               qzeros=ql.qzeros[rows], gscale=ql.gscale[rows], cscale=ql.cscale[rows],
                               ascale=ql.ascale)


def matmul_f16(cp, x, w, out):
    """out (M, N) fp16 = x (M, K) · w (N, K)ᵀ: our GEMV for M ≤ 8 (graph-capturable), else cuBLAS.

    Used for the lm_head and the FP16 path's linears, which sit inside the captured decode step.
    w must be a weight (no kernel of the step writes it): the GEMV reads its first rows before
    its PDL wait (cuda/pdl.cuh).
    """
    m, k = x.shape
    n = w.shape[0]
    if m <= GEMV_F16_MAXM and k % 8 == 0:
        mt = next(t for t in GEMV_F16_MT if t >= m)
        kernels.function("fused.cu", f"gemv_f16_m{mt}", FUSED_EXPRS)((-(-n // 8),), (256,),
                                                            (x, w, out, np.int32(m), np.int32(n), np.int32(k)))
    else:
        cp.matmul(x, w.T, out=out)
    return out


def matmul_w8(cp, x, w8, scale, out):
    """out (M, N) fp16 = (x (M, K) fp16 · w8 (N, K)ᵀ int8) · scale[n]: the INT8 lm_head
    (ModelWeights.with_int8_lm_head), our GEMV in slices of up to 8 rows (graph-capturable).
    Each slice streams the whole head: past 8 rows the fp16 head through cuBLAS reads fewer
    bytes (a cuBLAS route for large M is not written yet)."""
    m, k = x.shape
    n = w8.shape[0]
    for r0 in range(0, m, GEMV_F16_MAXM):
        r = min(GEMV_F16_MAXM, m - r0)
        mt = next(t for t in GEMV_F16_MT if t >= r)
        kernels.function("fused.cu", f"gemv_w8_m{mt}", FUSED_EXPRS)((-(-n // 8),), (256,),
                                                                   (x[r0:], w8, scale, out[r0:], np.int32(r),
                                                                    np.int32(n), np.int32(k)))
    return out


def row_cluster(width: int, cta_width: int | None = None) -> int:
    """CTAs per row for a row kernel on sm_90: the smallest cluster that leaves each CTA at
    most `cta_width` (default ROW_CTA_WIDTH) values."""
    cta_width = ROW_CTA_WIDTH if cta_width is None else cta_width
    return next((cl for cl in ROW_CLUSTERS if -(-width // cl) <= cta_width), ROW_CLUSTERS[-1])


def row_launch(name: str, width: int, cl: int = 1, cap: int = 1024, vec: bool = False) -> tuple[str, int]:
    """(kernel expression, block size) of a row kernel (cuda/rows.cuh) for rows of `width`
    shared by clusters of `cl` CTAs: the smallest PER with PER · cap ≥ ⌈width / cl⌉, and
    ⌈width / (cl · PER)⌉ threads in whole warps. cap < 1024 (many rows: prefill) takes PER up
    to ROW_PER_MANY, past which the 1024-thread rule applies. vec (one CTA a row, and the
    caller has checked that every row starts 32-byte aligned): VEC = min(PER, ROW_VEC) when
    PER ≥ 4 and VEC divides the width, else 1."""
    if cl not in ROW_CLUSTERS:
        raise BackendError(f"{name} runs on clusters of {ROW_CLUSTERS} CTAs, not {cl}")
    share = -(-width // cl)
    pers = ROW_PERS if cl == 1 else ROW_CLUSTER_PERS
    per = next((p for p in pers if p * cap >= share and p <= ROW_PER_MANY), None) if cap < 1024 else None
    per = per or next((p for p in pers if p * 1024 >= share), None)
    if per is None:
        raise BackendError(f"the GPU row kernels take rows of up to {pers[-1] * 1024 * cl} values on "
                           f"clusters of {cl}, got {width}")
    threads = min(1024, 32 * -(-share // (32 * per)))
    v = min(per, ROW_VEC) if vec and cl == 1 and per >= 4 else 1
    v = v if width % v == 0 else 1
    return f"{name}<{per}, {cl}, {v}>", threads


def decode_cluster(nsplit: int, heads: int = 1, sms: int = 1 << 30) -> int:
    """attn_decode's cluster size for nsplit splits of `heads` (batch × query heads) on a GPU of
    `sms` SMs (sm_90): the smallest cluster that holds the splits, while the heads fit in one
    wave; else 0, the merge through global memory. Measured on the H100, 7B, 7 splits or fewer:
    clusters win at b=1 (2.17 against 2.25 ms a step) and lose at b=8 (3.00 / 2.84) and b=32
    (6.30 / 5.79), where co-scheduling thousands of clustered blocks costs more than the merge."""
    if heads > sms:
        return 0
    return next((cl for cl in DECODE_CLUSTERS if cl >= nsplit), 0)


def kv_type(cache_array) -> str:
    """The attention kernels' template argument for a cache array (fp16 or int8)."""
    return "signed char" if cache_array.dtype.itemsize == 1 else "__half"


def attn_prefill(q, kc, vc, ks, vs, out, seq: int, start: int, t: int):
    """out[:t] (t, Hq·D) fp16 = causal GQA of q[:t] (t, Hq, D) at positions start..start+t-1
    against the first start+t positions of sequence seq in one layer's cache kc, vc
    (B, cap, Hkv, D) — fp16, or int8 with scales ks, vs (B, cap, Hkv) (read only then).
    """
    _, cap, hkv, d = kc.shape
    hq = q.shape[1]
    fn = kernels.function("attention.cu", f"attn_prefill<{d}, {kv_type(kc)}>", ATTN_EXPRS)
    smem = 4 * FA_BN * (d + 8) * 2 + (4 * FA_BN * d if kc.dtype.itemsize == 1 else 0)  # FaSmem::BYTES
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    fn((-(-t // FA_BM), hq), (128,), (q, kc, vc, ks, vs, out, np.int32(t), np.int32(start), np.int32(hq),
                                       np.int32(hkv), np.int32(cap), np.int32(seq),
                                       np.float32(np.log2(np.e) / np.sqrt(d))), shared_mem=smem)
    return out


class GpuLinear:
    """One (possibly fused) linear on the GPU: packed A8W4, or a float16 weight (matmul_f16)."""

    def __init__(self, cp, ws, host_cache: dict | None = None, interleave: bool = False):
        self.cp = cp
        self.interleaved = False     # gate|up rows in the SiLU GEMV's order (ops_cuda.interleave_rows)
        if all(isinstance(w, formats.QuantLinear) for w in ws):
            if any(w.kind != "dg" for w in ws):
                raise BackendError(f"the GPU engine runs dual-grained ('dg') layers; this file holds "
                                   f"'{ws[0].kind}' layers: use --device cpu")
            self.interleaved = interleave and len(ws) == 2 and ws[0].out_features == ws[1].out_features \
                and ws[0].out_features % 8 == 0
            # Host repacking is the slow part of loading; layers that share arrays (the
            # random bench models) repack once and upload once per layer.
            key = tuple(id(w) for w in ws) + (self.interleaved,)
            ph, ql = (host_cache or {}).get(key, (None, None))
            if ph is None:
                ql = ws[0] if len(ws) == 1 else _fuse(ws)
                if self.interleaved:
                    ql = _permute_rows(ql, ops_cuda.interleave_rows(ql.out_features))
                formats.check_no_overflow(ql)
                ph = ops_cuda.pack_host(ql)
                if host_cache is not None:
                    host_cache[key] = (ph, ql)
            self.packed = ops_cuda.PackedA8W4(ph.n, ph.k, ph.group, ph.n_pad, ph.k_pad, cp.asarray(ph.qw),
                                              cp.asarray(ph.meta), cp.asarray(ph.s8), ql.act, ql.ascale)
            self.kp = self.packed.k_pad          # int8 activations are padded to the kernel's K
            self.mode = MODE[ql.act]
            self.scale = cp.asarray([ql.ascale or 1.0], dtype=cp.float32)   # read by static mode only
            self.w16 = None
            self.n = ql.out_features
        elif all(isinstance(w, np.ndarray) for w in ws):
            w = np.concatenate(ws, axis=0) if len(ws) > 1 else ws[0]
            self.w16 = cp.asarray(w, dtype=cp.float16)                      # (N, K)
            self.packed, self.mode, self.scale = None, MODE["fp16"], cp.ones(1, cp.float32)
            self.n, self.kp = w.shape
        else:
            raise ModelError("a fused group mixes float and quantized weights")

    def __call__(self, x8, sx, xh, out, resid=None):
        """out (M, N) fp16 = x · Wᵀ from int8 x8 with scales sx, or from fp16 xh; with resid
        (A8W4 GEMV sizes only), resid += that instead (ops_cuda.gemm_a8w4)."""
        if self.w16 is not None:
            if resid is not None:
                raise BackendError("the residual add runs in the A8W4 GEMV only")
            matmul_f16(self.cp, xh, self.w16, out)          # the FP16 baseline: cuBLAS or our GEMV
        else:
            ops_cuda.gemm_a8w4(x8, sx, self.packed, out=out, resid=resid)
        return out if resid is None else resid

    def silu_gemv(self, x8, sx, out, amax):
        """out (1, N/2) float32 = silu(gate)·up of this interleaved gate|up layer, amax = its
        max |·| (ops_cuda.gemv_a8w4_silu)."""
        return ops_cuda.gemv_a8w4_silu(x8, sx, self.packed, out, amax)

    def nbytes(self) -> int:
        if self.w16 is not None:
            return self.w16.nbytes
        return self.packed.nbytes()


class GpuKVCache:
    """K/V for L layers and B sequences: (L, B, cap, Hkv, D); lengths on host and device.

    float16, or with kv8 int8 plus float32 scales ks, vs (L, B, cap, Hkv): one per token and
    kv head, x8 = clamp(rint(x / s), ±127), s = max|x| / 127 (formats.quantize_act_ref).
    """

    def __init__(self, cp, config: ModelConfig, capacity: int, batch: int = 1, kv8: bool = False):
        shape = (config.num_hidden_layers, batch, capacity, config.num_key_value_heads, config.head_dim)
        self.kv8 = kv8
        self.k = cp.zeros(shape, dtype=cp.int8 if kv8 else cp.float16)
        self.v = cp.zeros(shape, dtype=cp.int8 if kv8 else cp.float16)
        # the fp16 kernels take scale pointers but never read them: one float per layer
        sshape = shape[:-1] if kv8 else (shape[0], 1)
        self.ks = cp.ones(sshape, dtype=cp.float32)
        self.vs = cp.ones(sshape, dtype=cp.float32)
        self.capacity, self.batch = capacity, batch
        self.lens_host = np.zeros(batch, dtype=np.int64)
        self.graph = None          # the captured decode step, built on first use
        self.step = None           # its buffers

    @property
    def length(self) -> int:
        return int(self.lens_host[0])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (self.ks.nbytes + self.vs.nbytes if self.kv8 else 0)


class _Buffers:
    """Preallocated activations for up to M rows (graph capture allows no allocation).

    Scratch that holds operands of different widths is one flat buffer, viewed as a
    contiguous (m, n) matrix on demand: kernels and GEMMs index rows densely.
    """

    def __init__(self, cp, c: ModelConfig, m: int, vocab_rows: int, wide: int):
        h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
        self.m, self.vocab_rows = m, vocab_rows
        f16, f32 = cp.float16, cp.float32
        self.h = cp.zeros((m, h), f32)
        self._x8 = cp.zeros((m * wide,), cp.int8)
        self._xh = cp.zeros((m * wide,), f16)
        self.sx = cp.zeros((m,), f32)
        self.qkv = cp.zeros((m, c.q_size + 2 * c.kv_size), f16)
        self.q = cp.zeros((m, c.num_attention_heads, d), f16)
        self.a = cp.zeros((m, c.q_size), f16)
        self.y = cp.zeros((m, h), f16)
        self.gu = cp.zeros((m, 2 * i), f16)
        self.mf = cp.zeros((m, i), f32)               # silu(gate)·up of the SiLU GEMV (_fold_quant)
        self.amax = cp.zeros((2, m), cp.uint32)       # max|row| of b.a (o's input) and of mf, float bits
        self.logits = cp.zeros((vocab_rows, c.vocab_size), f16)

    def x8(self, m: int, n: int):
        return self._x8[:m * n].reshape(m, n)

    def xh(self, m: int, n: int):
        return self._xh[:m * n].reshape(m, n)


class CudaModel:
    """Runs ModelWeights on the GPU. Same forward() contract as engine.model.Model."""

    def __init__(self, weights: ModelWeights):
        cp = cupy_or_none()
        if cp is None:
            raise BackendError("the GPU engine needs CuPy and a CUDA device")
        self.cp, self.config, c = cp, weights.config, weights.config
        if c.head_dim not in (64, 128):
            raise BackendError(f"the GPU attention kernels take head_dim 64 or 128, got {c.head_dim}")
        for width in (c.hidden_size, c.q_size, c.intermediate_size):
            row_launch("rows", width)                       # raises for rows too wide
        self._clusters = kernels.device_info()["cc"] >= 90   # row kernels split wide rows over clusters
        launch.pdl_enabled()                # load the driver entry point now, not inside a capture
        kernels.module("fused.cu", FUSED_EXPRS)            # compile once, up front
        kernels.module("attention.cu", ATTN_EXPRS)
        self.embed = cp.asarray(weights.embed, dtype=cp.float16)               # (V, H)
        if weights.lm_head_q is not None:            # INT8 head (ModelWeights.with_int8_lm_head)
            if c.hidden_size % 16:
                raise BackendError(f"the INT8 lm_head GEMV takes a hidden size that is a multiple of 16, "
                                   f"got {c.hidden_size}")
            self.lm_head, self.lm_scale = (cp.asarray(a) for a in weights.lm_head_q)
        else:
            self.lm_head = self.embed if c.tie_word_embeddings else cp.asarray(weights.lm_head, cp.float16)
            self.lm_scale = None
        self.norm = cp.asarray(weights.norm, dtype=cp.float32)
        self.layers = []
        hc = {}
        for L in weights.layers:
            self.layers.append(dict(
                attn_norm=cp.asarray(L.attn_norm, cp.float32), mlp_norm=cp.asarray(L.mlp_norm, cp.float32),
                qkv=GpuLinear(cp, [L.q, L.k, L.v], hc), o=GpuLinear(cp, [L.o], hc),
                gu=GpuLinear(cp, [L.gate, L.up], hc, interleave=True), down=GpuLinear(cp, [L.down], hc)))
        del hc
        # widest int8/fp16 activation row: K padded to the GEMM's multiple of the group
        self._wide = max([c.hidden_size, c.intermediate_size, c.q_size] +
                         [g.kp for L in self.layers for g in (L["qkv"], L["o"], L["gu"], L["down"])])
        # CuPy cannot capture cuBLAS calls: float linears are graphed through our fp16 GEMV
        # (M ≤ GEMV_F16_MAXM, K % 8 == 0); otherwise such a model decodes eagerly
        self._f16_ks = [g.w16.shape[1] for L in self.layers for g in (L["qkv"], L["o"], L["gu"], L["down"])
                        if g.w16 is not None]
        inv = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        ang = np.outer(np.arange(c.max_position_embeddings, dtype=np.float64), inv)  # (P, D/2)
        self.cos = cp.asarray(np.cos(ang), dtype=cp.float32)
        self.sin = cp.asarray(np.sin(ang), dtype=cp.float32)
        self._bufs = None

    # ------------------------------------------------------------------ bookkeeping
    def weight_bytes(self) -> dict:
        lin = sum(g.nbytes() for L in self.layers for g in (L["qkv"], L["o"], L["gu"], L["down"]))
        other = self.embed.nbytes + self.norm.nbytes + sum(
            L["attn_norm"].nbytes + L["mlp_norm"].nbytes for L in self.layers)
        if self.lm_head is not self.embed:
            other += self.lm_head.nbytes + (0 if self.lm_scale is None else self.lm_scale.nbytes)
        return {"linears": lin, "other": other}

    def new_cache(self, capacity: int | None = None, batch: int = 1, kv8: bool = False) -> GpuKVCache:
        """A KV cache for `batch` sequences of up to `capacity` positions (default: the context)."""
        c = self.config
        capacity = c.max_position_embeddings if capacity is None else capacity
        if not (isinstance(capacity, (int, np.integer)) and 0 < capacity <= c.max_position_embeddings):
            raise ModelError(f"KV cache capacity must be an integer in 1..{c.max_position_embeddings} "
                             f"(the model's context), got {capacity!r}")
        if not (isinstance(batch, (int, np.integer)) and batch >= 1):
            raise ModelError(f"batch must be a positive integer, got {batch!r}")
        return GpuKVCache(self.cp, c, int(capacity), int(batch), kv8)

    def _buffers(self, m: int, vocab_rows: int):
        """Prefill scratch for m rows: one set, grown geometrically, used through [:m] views."""
        b = self._bufs
        if b is None or b.m < m or b.vocab_rows < vocab_rows:
            self._bufs = None                   # let the old set go before allocating the new
            grow = lambda need, have: max(need, 2 * have) if have else need  # noqa: E731
            b = self._bufs = _Buffers(self.cp, self.config, grow(m, b.m if b else 0),
                                      grow(vocab_rows, b.vocab_rows if b else 0), self._wide)
        return b

    # ------------------------------------------------------------------ the layer stack
    def _launch(self, name, grid, block, args):
        kernels.function("fused.cu", name, FUSED_EXPRS)(grid, block, args)

    def _row(self, name, m, width, args, wide, ld):
        """One row kernel over m rows of `width` (its cluster, PER and VEC instantiation and block
        size). wide: the arrays it reads or writes row by row (VEC > 1 needs each 32-byte
        aligned; the others, such as sx, are read or written one value at a time); ld: the int8
        output's leading dimension, None where the kernel writes fp16 only."""
        # a cluster shares a row while the rows alone leave SMs idle (decode); a prefill's
        # thousands of rows fill the GPU one CTA each (H100, 7B, 2048 tokens: silu_mul_quant on
        # clusters of 8 took 293 µs a launch, 7.7× its bytes at copy bandwidth), with wide
        # accesses where every array starts 32-byte aligned and every int8 row 8-byte aligned
        few = m < kernels.device_info()["sm_count"]
        cl = row_cluster(width, ROW_CTA_WIDTH_BY_KERNEL.get(name)) if self._clusters and few else 1
        vec = (ROW_VEC_FEW or not few) and (ld is None or ld % 8 == 0) and all(
            a.data.ptr % 32 == 0 for a in wide if isinstance(a, self.cp.ndarray))
        expr, threads = row_launch(name, width, cl, 1024 if few else ROW_THREADS_MANY, vec)
        self._launch(expr, (m * cl,), (threads,), args)

    def _attn(self, expr, grid, block, args):
        kernels.function("attention.cu", expr, ATTN_EXPRS)(grid, block, args)

    def _fold_resid(self, m: int) -> bool:
        """Whether the o and down GEMVs add into h themselves for m rows (every linear A8W4 and
        M small enough for the GEMV kernel): the norms after them then skip the add."""
        return m <= ops_cuda.TUNE["gemv_max_m"] and not self._f16_ks

    def _fold_quant(self, m: int) -> bool:
        """Whether a one-token decode step drops silu_mul_quant and the absmax reductions of
        silu_mul_quant and quant_rows: the SiLU GEMV (gate|up rows interleaved) writes
        silu(gate)·up and its absmax, attn_decode the absmax of its output row, and quant_amax
        launches quantize both rows for down and o. Needs _fold_resid and int8 activations
        for o and down."""
        return (FOLD_QUANT and m == 1 and self._fold_resid(m) and all(
            L["gu"].interleaved and L["o"].mode != MODE["fp16"] and L["down"].mode != MODE["fp16"]
            for L in self.layers))

    def _layers(self, b: _Buffers, m: int, cache: GpuKVCache, attend, tok=None, decode: bool = False):
        """Run every layer on b.h[:m]; returns the last sublayer output, not yet added to h
        (None when the GEMVs added it themselves, see _fold_resid).

        attend(layer, b, amax) reads b.qkv[:m] and the cache, writes the new k, v into the cache
        and fills b.a[:m] (M, Hq·D) fp16; with amax (decode, _fold_quant) it also max-reduces
        |b.a[row]| into amax[row] (float bits). tok (M,) int32 on the device: the first norm
        gathers their embeddings into b.h itself (one launch fewer). decode: a decode step,
        whose attend fills amax (only there does _fold_quant apply: a one-token prefill's
        attention writes no absmax).
        """
        c = self.config
        hid, inter = c.hidden_size, c.intermediate_size
        resid = b.h[:m] if self._fold_resid(m) else None
        fq = decode and self._fold_quant(m)
        amax_o, amax_d = (b.amax[0, :m], b.amax[1, :m]) if fq else (None, None)
        y = None                # the previous sublayer's output, added to h by the next norm
        for li, L in enumerate(self.layers):
            qkv, o, gu, down = L["qkv"], L["o"], L["gu"], L["down"]
            x8, xh = b.x8(m, qkv.kp), b.xh(m, hid)
            self._norm(b, m, y, L["attn_norm"], qkv.mode, qkv.scale, x8, qkv.kp, xh, zero=amax_o,
                       tok=tok if li == 0 else None)
            qkv(x8, b.sx[:m], xh, b.qkv[:m])
            attend(li, b, amax_o)
            a8, ah = b.x8(m, o.kp), b.a[:m]
            if fq:
                self._quant_amax(b.a, m, c.q_size, o, amax_o, a8, b.sx)
            elif o.mode != MODE["fp16"]:
                self._row("quant_rows", m, c.q_size, (b.a, np.int32(c.q_size), np.int32(o.mode),
                                                      o.scale, a8, np.int32(o.kp), b.sx), (b.a, a8), o.kp)
            o(a8, b.sx[:m], ah, b.y[:m], resid)
            y = None if resid is not None else b.y
            x8 = b.x8(m, gu.kp)
            self._norm(b, m, y, L["mlp_norm"], gu.mode, gu.scale, x8, gu.kp, xh, zero=amax_d)
            m8, mh = b.x8(m, down.kp), b.xh(m, inter)
            if fq:
                gu.silu_gemv(x8, b.sx[:m], b.mf[:m], amax_d)
                self._quant_amax(b.mf, m, inter, down, amax_d, m8, b.sx)
            else:
                gu(x8, b.sx[:m], xh, b.gu[:m])
                self._row("silu_mul_quant", m, inter, (b.gu, np.int32(inter), np.int32(down.mode),
                                                       down.scale, m8, np.int32(down.kp), b.sx, mh,
                                                       np.int32(gu.interleaved)), (b.gu, m8, mh),
                          None if down.mode == MODE["fp16"] else down.kp)
            down(m8, b.sx[:m], mh, b.y[:m], resid)
            y = None if resid is not None else b.y
        return y

    def _quant_amax(self, x, m: int, k: int, lin: GpuLinear, amax, x8, sx):
        """x8 (m, lin.kp), sx = the rows x[:m, :k] quantized for lin, their absmax known (amax)."""
        kind = "float" if x.dtype == np.float32 else "__half"
        dyn = lin.mode == MODE["dynamic"]
        self._launch(f"quant_amax<{kind}>", (-(-lin.kp // 1024), m), (256,),
                     (x, np.int32(k), np.int32(lin.mode), amax if dyn else lin.scale, x8, np.int32(lin.kp),
                      sx))

    def _norm(self, b: _Buffers, m: int, y, w, mode: int, scale, x8, ld: int, xh, h=None, zero=None,
              tok=None):
        """h += y (y None: no add; tok given: h = the tokens' embeddings), then RMSNorm(h)·w into
        x8/sx (modes 0, 1) or xh (fp16); zero: a (m,) uint32 array the kernel sets to 0 (an amax
        slot of _fold_quant)."""
        c = self.config
        null = np.uint64(0)
        h = b.h if h is None else h
        self._row("add_rmsnorm_quant", m, c.hidden_size,
                  (h, null if y is None else y, w, np.int32(c.hidden_size),
                   np.float32(c.rms_norm_eps), np.int32(mode), scale, x8, np.int32(ld), b.sx, xh,
                   null if zero is None else zero, null if tok is None else self.embed,
                   null if tok is None else tok),
                  (h, y, w, x8, xh, None if tok is None else self.embed), None if mode == MODE["fp16"] else ld)

    def _head(self, b: _Buffers, y, rows: slice, nrows: int, lm_head: bool = True):
        """Last residual add, final norm and lm_head for b.h[rows] into b.logits[:nrows] (fp16).

        Only the head's rows get the last add: the other rows of h are dead once the cache is written.
        lm_head=False stops after the norm (b.xh holds its output).
        """
        c = self.config
        xh = b.xh(nrows, c.hidden_size)
        # fp16 mode writes xh only: the scale pointer (self.norm) and x8 are placeholders, never read
        self._norm(b, nrows, None if y is None else y[rows], self.norm, MODE["fp16"], self.norm,
                   b.x8(nrows, 1), 1, xh, h=b.h[rows])
        if lm_head:
            self._lm_head(xh, b.logits[:nrows])

    def _lm_head(self, x, out):
        """out (M, V) fp16 = the output head applied to x (M, H) fp16: fp16 (cuBLAS or our GEMV)
        or INT8 (our GEMV, any M)."""
        if self.lm_scale is not None:
            return matmul_w8(self.cp, x, self.lm_head, self.lm_scale, out)
        return matmul_f16(self.cp, x, self.lm_head, out)

    def graphable(self, batch: int) -> tuple[bool, bool]:
        """(layers, head): whether a decode step for `batch` sequences can be captured up to the
        final norm, and the lm_head with sampling too. CuPy cannot capture cuBLAS: A8W4 linears
        always can be, float linears and the lm_head through our fp16 GEMV (M ≤ GEMV_F16_MAXM),
        an INT8 lm_head at any batch (8-row slices of its GEMV)."""
        gemv = batch <= GEMV_F16_MAXM
        return (all(gemv and k % 8 == 0 for k in self._f16_ks),
                self.lm_scale is not None or (gemv and self.config.hidden_size % 8 == 0))

    # ------------------------------------------------------------------ prefill / full forward
    def _attend_prefill(self, cache: GpuKVCache, s: int, start: int, t: int, pos, seqs):
        """Causal GQA of t new queries against the first start+t cached keys of sequence s."""
        c = self.config
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def attend(li, b, amax=None):
            self._attn(f"rope_qkv_cache<{kv_type(cache.k)}>", (t, -(-(hq + hkv) // 4)), (128,),
                       (b.qkv, np.int32(hq), np.int32(hkv), np.int32(d), pos, seqs, self.cos, self.sin,
                        b.q, cache.k[li], cache.v[li], cache.ks[li], cache.vs[li], np.int32(cache.capacity)))
            attn_prefill(b.q, cache.k[li], cache.v[li], cache.ks[li], cache.vs[li], b.a, s, start, t)
        return attend

    def prefill(self, tokens, cache: GpuKVCache, seq: int = 0, logits: str = "last"):
        """Append tokens (T,) to sequence `seq` of the cache; fp16 logits (T or 1, V) on the GPU.

        The logits are a view of scratch memory, valid until the next prefill: copy to keep them.
        """
        cp, c = self.cp, self.config
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < cache.batch:
            raise ModelError(f"seq must be a sequence index in 0..{cache.batch - 1}, got {seq!r}")
        start = int(cache.lens_host[seq])
        tokens = check_tokens(tokens, c, start)
        t = int(tokens.shape[0])
        if start + t > cache.capacity:
            raise ModelError(f"cannot add {t} tokens to a sequence of {start}: the cache holds {cache.capacity}")
        rows = t if logits == "all" else 1
        b = self._buffers(t, rows)
        tok = cp.asarray(tokens, dtype=cp.int32)
        pos = cp.arange(start, start + t, dtype=cp.int32)
        seqs = cp.full((t,), seq, dtype=cp.int32)
        y = self._layers(b, t, cache, self._attend_prefill(cache, seq, start, t, pos, seqs), tok)
        cache.lens_host[seq] += t
        self._head(b, y, slice(0, t) if logits == "all" else slice(t - 1, t), rows)
        return b.logits[:rows]

    def forward(self, tokens, cache: GpuKVCache | None = None, observer=None, last_only: bool = False):
        """Same contract as Model.forward: float32 logits (T, V), or (1, V) when last_only (CuPy)."""
        if observer is not None:
            raise ModelError("observers run on the NumPy path (--device cpu)")
        tokens = check_tokens(tokens, self.config, 0 if cache is None else int(cache.lens_host[0]))
        if cache is None:
            cache = self.new_cache(int(tokens.size))
        return self.prefill(tokens, cache, 0, "last" if last_only else "all").astype(self.cp.float32)

    # ------------------------------------------------------------------ graphed decode with sampling
    def sample_logits(self, logits, seq: int, pos: int, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0) -> int:
        """One token from fp16 logits (1, V) by the decode step's kernel and random stream:
        the first token after a prefill, drawn for sequence `seq` after position `pos`."""
        cp = self.cp
        out = cp.zeros((1,), cp.int32)
        ops_cuda.sample_rows(logits[:1], cp.asarray(ops_cuda.sample_params(temperature, top_k, top_p, seed)),
                             cp.asarray([seq], cp.int32), cp.asarray([pos], cp.int32), out)
        return int(out[0])

    def _decode_step(self, cache: GpuKVCache, st: dict, with_tail: bool = True):
        """One decode step: embedding, layers, final norm, and (with_tail) lm_head + sampling."""
        c, b, nb = self.config, st["bufs"], cache.batch
        hq, d = c.num_attention_heads, c.head_dim
        nsplit = st["nsplit"]
        cl = decode_cluster(nsplit, nb * hq, kernels.device_info()["sm_count"]) if self._clusters else 0

        def attend(li, bb, amax=None):
            # RoPE, cache write, flash-decoding and the merge in one launch (cuda/attention.cu)
            self._attn(f"attn_decode<{kv_type(cache.k)}, {cl}>", (nb, hq, cl or nsplit), (128,),
                       (bb.qkv, self.cos, self.sin, cache.k[li], cache.v[li], cache.ks[li], cache.vs[li],
                        st["lens"], np.int32(hq), np.int32(c.num_key_value_heads), np.int32(d),
                        np.int32(cache.capacity), np.float32(1.0 / np.sqrt(d)), st["ml"], st["acc"],
                        st["counters"], bb.a, np.uint64(0) if amax is None else amax))

        y = self._layers(b, nb, cache, attend, st["tok"], decode=True)   # the first norm gathers the embeddings
        self._head(b, y, slice(0, nb), nb, lm_head=False)
        if with_tail:
            self._decode_tail(cache, st)

    def _decode_tail(self, cache: GpuKVCache, st: dict):
        """lm_head and sampling of a decode step (outside the graph when cuBLAS runs the lm_head)."""
        b, nb = st["bufs"], cache.batch
        self._lm_head(b.xh(nb, self.config.hidden_size), b.logits[:nb])
        ops_cuda.sample_rows(b.logits[:nb], st["params"], st["seq"], st["pos"], st["tok"], lens=st["lens"])

    def _decode_state(self, cache: GpuKVCache):
        """Device buffers of a decode step, fixed for the life of the cache (the graph holds them)."""
        cp, nb = self.cp, cache.batch
        nsplit = -(-cache.capacity // DECODE_CHUNK)
        d, hq = self.config.head_dim, self.config.num_attention_heads
        return {"bufs": _Buffers(cp, self.config, nb, nb, self._wide), "nsplit": nsplit,
                "tok": cp.zeros((nb,), cp.int32), "pos": cp.zeros((nb,), cp.int32),
                "lens": cp.zeros((nb,), cp.int32), "seq": cp.arange(nb, dtype=cp.int32),
                "params": cp.asarray(ops_cuda.sample_params()),    # read by the graph at every replay
                "ml": cp.zeros((nb * hq * nsplit * 2,), cp.float32),
                "acc": cp.zeros((nb * hq * nsplit * d,), cp.float32),
                "counters": cp.zeros((nb * hq,), cp.int32),      # attn_decode's merge; reset by it
                "stream": cp.cuda.Stream(non_blocking=True)}

    def decode_greedy(self, cache: GpuKVCache, last_tokens, n_steps: int, use_graph: bool = True,
                      on_step=None):
        """decode() at temperature 0."""
        return self.decode(cache, last_tokens, n_steps, use_graph=use_graph, on_step=on_step)

    def decode(self, cache: GpuKVCache, last_tokens, n_steps: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_graph: bool = True, on_step=None):
        """n_steps sampled tokens for every sequence of the cache, starting from last_tokens (B,).

        Each step feeds the previous token (at position lens) and writes the next into the
        device buffer; on_step(ids (B,)) sees each step's ids (one small device→host copy) and
        stops the loop by returning True. Returns (steps done, B) int32 on the host.
        Sampling follows engine/model/sampling.py; sequence b's draw at position p is fixed by
        (seed, b, p), so a seed replays the same tokens. The captured graph is kept with the
        cache and reads the settings from device memory: later calls, with any settings,
        only reset four small buffers.
        """
        cp = self.cp
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 0:
            raise ModelError(f"n_steps must be an integer >= 0, got {n_steps!r}")
        if int(cache.lens_host.max()) + n_steps > cache.capacity:
            raise ModelError("the KV cache is too small for that many decode steps")
        last = np.asarray(last_tokens)
        if last.shape != (cache.batch,):
            raise ModelError(f"need one last token per sequence ({cache.batch}), got shape {last.shape}")
        check_tokens(last, self.config)                        # ids in [0, vocab)
        st_params = ops_cuda.sample_params(temperature, top_k, top_p, seed)   # validates the settings
        if cache.step is None:
            cache.step = self._decode_state(cache)
        st = cache.step
        # graphs need every call capturable (see graphable): the step up to the final norm, and
        # the lm_head with sampling when our GEMV runs it; else cuBLAS runs it after each replay
        body, tail = self.graphable(cache.batch)
        use_graph = use_graph and body
        tail = tail and use_graph
        lens = cache.lens_host.astype(np.int32)
        st["tok"].set(last.astype(np.int32))
        st["pos"].set(lens)
        st["lens"].set(lens + 1)
        st["params"].set(st_params)
        cp.cuda.Device().synchronize()       # prefill and the resets ran on the default stream
        stream = st["stream"]
        done = 0
        with stream:
            out = cp.empty((n_steps, cache.batch), dtype=cp.int32)
            for i in range(n_steps):
                if use_graph and cache.graph is not None:
                    cache.graph.launch(stream)
                    if not tail:
                        self._decode_tail(cache, st)
                else:
                    self._decode_step(cache, st)
                    # the first step runs eagerly (its tail too): it compiles kernels and sizes
                    # workspaces, which must not happen during capture; then the step is captured
                    # once, for the replays of the following steps (capture runs nothing)
                    if use_graph:
                        with launch.capturing():
                            stream.begin_capture()
                            try:
                                self._decode_step(cache, st, with_tail=tail)
                            finally:
                                graph = stream.end_capture()
                        cache.graph = graph
                        # the graph holds the split-K workspace's pointers: keep those arrays
                        # alive even if a later, larger GEMM makes ops_cuda allocate new ones
                        st["workspace"] = ops_cuda._WS.get(cp.cuda.Device().id)
                out[i] = st["tok"]
                done = i + 1
                if on_step is not None and on_step(cp.asnumpy(st["tok"])):
                    break
        stream.synchronize()
        cache.lens_host += done
        return cp.asnumpy(out[:done])
