"""The GPU engine: the same forward as engine/model/llama.py (every family) on CuPy, with fused kernels.

Per layer and step: add_rmsnorm_quant (the previous sublayer's residual add unless the GEMV
did it, RMSNorm, INT8 quantization) → fused qkv A8W4 GEMM → attention (gpu/attention.py:
for prefill rope_qkv_cache then flash-attention; for decode one attn_decode launch: RoPE,
cache write, flash-decoding, merge of the splits) → quant_rows → o GEMM → add_rmsnorm_quant →
fused gate|up GEMM → silu_mul_quant → down GEMM. Up to ops.gemv_max_m() rows of an all-A8W4 model (any
rows of an all-pot3-a8 one), the o and down GEMVs add their output into the residual stream
themselves (_fold_resid); otherwise the
next norm adds it, and the last layer's add happens in the final norm. In a one-token decode
step (_fold_quant) the gate|up GEMV's epilogue writes silu(gate)·up and max-reduces the row's
absmax (A8W4: gate|up rows interleaved; pot3 of act "dynamic": gate and up rows
read through two pointers), attn_decode max-reduces its output's, and quant_amax
launches (no reduction) quantize both rows: silu_mul_quant and quant_rows drop out of the
step. The residual stream is float32; GEMM outputs and q are float16; the KV cache is float16,
or INT8 with one float32 scale per token and kv head (kv8). Layers whose weights are float run
the same steps with FP16 linears (our fp16 GEMV for up to 8 rows, cuBLAS past them, called
through gpu/cublas.py so that the decode step is graphed at every batch too): that is "our FP16
path", the in-run speed baseline.

The families (engine/io/config.py features()) add launches only where a config asks for them
(GpuLayer's extras): qk_norm_bias after the qkv GEMM (q|k|v biases, per-head q/k norms, before
RoPE); add_bias after the o, gate|up and down GEMMs that carry biases; gelu_mul_quant for
silu_mul_quant (GeGLU); norm_add_rows for the residual add of a sandwich layer (Gemma 3: the
sublayer output normed first, from the A8W4 o or down GEMM's int32 accumulators in float32, then
add_rmsnorm_quant norms h with no add); embed_rows for a
scaled embedding (the first norm then reads h); the sliding-window attention kernels for a
windowed layer; each layer's RoPE tables (config.rope_params: its base and scaling; one pair
per distinct kind) and the attention scale (query_pre_attn_scalar). A sandwich layer or a bias
on o or down keeps the o and down GEMVs from adding into h (_fold_resid); GeGLU or a gate|up
bias keeps the decode step off the SiLU GEMV (_fold_quant).

The decode step, its device state and its CUDA graph live in gpu/decode.py; the kernels'
launchers in gpu/fused.py, gpu/attention.py and gpu/ops.py; launch choices in gpu/tuning.py.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from ..io.config import rope_inv_freq
from ..io.layout import ModelError, ModelWeights
from ..model.llama import check_tokens
from . import attention, choice, fused, kargs, kernels, launch, tuning
from . import decode as decoding
from .decode import NONFINITE_LOGITS, check_finite_logits
from . import ops as ops_cuda
from .backend import BackendError, require_cupy
from .cache import Buffers, GpuKVCache
from .fused import MODE
from .linear import GpuLinear, to_f16
from .tuning import ATTENTION, DECODE, PREFILL, WB


@dataclass
class GpuLayer:
    """One decoder layer on the GPU: the two norm weights (float32) and the fused linears, and
    the family's extras (engine/io/layout.py LayerWeights; None where the config has none)."""
    attn_norm: object      # (H,) float32
    mlp_norm: object       # (H,) float32
    qkv: GpuLinear         # q|k|v
    o: GpuLinear
    gu: GpuLinear          # gate|up, rows interleaved for the SiLU GEMV where it can run
    down: GpuLinear
    qkv_bias: object = None       # ((Hq + 2·Hkv)·D,) float32, zeros for a linear without one
    q_norm: object = None         # (D,) float32
    k_norm: object = None         # (D,) float32
    o_bias: object = None         # (H,) float32
    gu_bias: object = None        # (2I,) float32 in gu's row order
    down_bias: object = None      # (H,) float32
    attn_out_norm: object = None  # (H,) float32, the sandwich norms
    mlp_out_norm: object = None   # (H,) float32
    window: int = 0               # sliding window (config.window); 0: every earlier key

    def linears(self) -> tuple:
        return (self.qkv, self.o, self.gu, self.down)

    def extras(self) -> tuple:
        """The family's arrays this layer holds."""
        return tuple(a for a in (self.qkv_bias, self.q_norm, self.k_norm, self.o_bias, self.gu_bias,
                                 self.down_bias, self.attn_out_norm, self.mlp_out_norm) if a is not None)


def _f32(cp, a):
    return None if a is None else cp.asarray(a, dtype=cp.float32)


def _bias(cp, L, names, sizes, rows=None):
    """The biases of the linears `names` fused into one GEMM ((Σ sizes,) float32, zeros for a
    linear without one, in the GEMM's row order `rows`), or None when none of them has one."""
    if not any(n in L.bias for n in names):
        return None
    b = np.concatenate([np.asarray(L.bias[n], np.float32) if n in L.bias else np.zeros(k, np.float32)
                        for n, k in zip(names, sizes)])
    return cp.asarray(b if rows is None else b[rows])


def layer_extras(cp, c, L, li: int, gu: GpuLinear) -> dict:
    """GpuLayer's extras of layer li (engine/io/layout.py LayerWeights L) on the device."""
    inter = c.intermediate_size
    return dict(
        qkv_bias=_bias(cp, L, ("q", "k", "v"), (c.q_size, c.kv_size, c.kv_size)),
        q_norm=_f32(cp, L.q_norm), k_norm=_f32(cp, L.k_norm),
        o_bias=_bias(cp, L, ("o",), (c.hidden_size,)),
        gu_bias=_bias(cp, L, ("gate", "up"), (inter, inter),
                      ops_cuda.interleave_rows(2 * inter) if gu.interleaved else None),
        down_bias=_bias(cp, L, ("down",), (c.hidden_size,)),
        attn_out_norm=_f32(cp, L.attn_out_norm), mlp_out_norm=_f32(cp, L.mlp_out_norm),
        window=c.window(li) or 0)


@dataclass
class _Pass:
    """What one pass over the layers folds (see _layers): m rows; resid, the residual stream
    the o and down GEMVs add into (None: the next norm adds); fold, the one-token decode
    step without silu_mul_quant and quant_rows, and its two absmax slots."""
    m: int
    resid: object
    fold: bool
    amax_o: object
    amax_d: object


ROPE_MIN_POSITIONS = 8192   # RoPE positions tabled at load; more when a larger cache is made


def gpu_refusals(c) -> list[str]:
    """What of config c the GPU engine cannot run, in words (empty: it runs). Every feature of
    c.features() runs; the attention kernels take the head sizes of tuning.ATTENTION (64, 128, and
    256 as a wide head)."""
    out = []
    dims = ATTENTION.head_dims + ATTENTION.wide_head_dims
    if c.head_dim not in dims:
        out.append(f"head_dim {c.head_dim} (the GPU attention kernels take head_dim "
                   f"{', '.join(map(str, dims[:-1]))} or {dims[-1]})")
    return out


@dataclass
class _PrefillGraph:
    """A captured prefill shape (CudaModel._graph_for) and what its graph points into."""
    cache: object           # weakref to the GpuKVCache its K/V go to
    kv: tuple               # that cache's K/V pointers when seen (_kv_ptrs)
    bufs: Buffers           # the scratch it runs in
    tok: object = None      # (t,) int32 each replay's tokens are copied into
    pos: object = None      # (t,) int32 positions start..start+t-1
    seqs: object = None     # (t,) int32 the sequence index
    graph: object = None
    failed: bool = False    # a launch refused capture: the shape stays eager
    rope: object = None     # the RoPE tables and split-K workspace the graph reads, kept alive
    workspace: object = None


def _kv_ptrs(cache: GpuKVCache) -> tuple:
    return tuple(a.data.ptr for a in (cache.k, cache.v, cache.ks, cache.vs))


def _settings_key() -> str:
    """What picks a prefill's kernels besides its shape: the tuning tables, the GEMM policy (as
    resolved, its objective and model file) and any kernel source edits (kargs.patched). Part
    of a captured prefill's key."""
    st = choice.STATE
    choice.active()                                   # resolves the policy on first use
    return repr((tuning.GEMM, tuning.ROWS, tuning.ATTENTION, tuning.DECODE, tuning.WB_TUNE, fused.GEMV_F16,
                 st.asked, st.policy, st.objective, st.model_path, kernels.EDITS, launch.pdl_enabled()))


class CudaModel:
    """Runs ModelWeights on the GPU. Same forward() contract as engine.model.Model."""

    def __init__(self, weights: ModelWeights):
        c = weights.config
        missing = gpu_refusals(c)
        if missing:
            raise ModelError(f"the GPU engine does not run this {c.model_type} model: {'; '.join(missing)} "
                             "(run it with --device cpu)")
        cp = require_cupy()
        self.cp, self.config = cp, c
        for li, L in enumerate(weights.layers):
            L.check(c, li)                  # its norms and biases are the ones the config names
        for width in (c.hidden_size, c.q_size, c.intermediate_size):
            fused.row_launch("rows", width)                 # raises for rows too wide
        self._clusters = kernels.device_info()["cc"] >= 90   # row kernels split wide rows over clusters
        if c.head_dim in ATTENTION.wide_head_dims:        # a wide head's attention needs ~200 KB a block
            # (the GQA decode kernel's static arrays are under 16 KB at D = 256)
            need = max(attention.prefill_smem(c.head_dim, True), attention.gqa_smem(c.head_dim, False) + 16384)
            have = kernels.device_info()["smem_optin"]
            if have < need:
                raise BackendError(f"head_dim {c.head_dim}: the attention kernels need {need // 1024} KiB of shared "
                                   f"memory a block, this GPU gives {have // 1024} KiB (run it with --device cpu)")
        launch.pdl_enabled()                # load the driver entry point now, not inside a capture
        kernels.module("fused.cu", fused.FUSED_EXPRS)      # compile once, up front
        if c.head_dim not in ATTENTION.wide_head_dims:     # (a wide head's are all in ATTN_WIDE)
            kernels.module("attention.cu", attention.ATTN_EXPRS)
        self.embed = to_f16(cp, weights.embed, "the token embedding")          # (V, H)
        if weights.lm_head_q is not None:            # INT8 head (ModelWeights.with_int8_lm_head)
            if c.hidden_size % 16:
                raise BackendError(f"the INT8 lm_head GEMV takes a hidden size that is a multiple of 16, "
                                   f"got {c.hidden_size}")
            self.lm_head, self.lm_scale = (cp.asarray(a) for a in weights.lm_head_q)
        else:
            self.lm_head = self.embed if c.tie_word_embeddings else to_f16(cp, weights.lm_head, "the lm_head")
            self.lm_scale = None
        self.norm = cp.asarray(weights.norm, dtype=cp.float32)
        self.layers = []
        hc = {}
        for i, L in enumerate(weights.layers):
            gu = GpuLinear(cp, [L.gate, L.up], hc, interleave=True, name=f"layer {i} gate|up_proj")
            self.layers.append(GpuLayer(
                attn_norm=cp.asarray(L.attn_norm, cp.float32), mlp_norm=cp.asarray(L.mlp_norm, cp.float32),
                qkv=GpuLinear(cp, [L.q, L.k, L.v], hc, name=f"layer {i} q|k|v_proj"),
                o=GpuLinear(cp, [L.o], hc, name=f"layer {i} o_proj"),
                gu=gu, down=GpuLinear(cp, [L.down], hc, name=f"layer {i} down_proj"),
                **layer_extras(cp, c, L, i, gu)))
        del hc
        self._family_plan()
        for name, exprs in self._family_modules:          # the families' kernels, compiled up front too
            kernels.module(name, exprs)
        # widest int8/fp16 activation row: K padded to the GEMM's multiple of the group
        self._wide = max([c.hidden_size, c.intermediate_size, c.q_size] +
                         [g.kp for L in self.layers for g in L.linears()])
        # float linears are graphed through our fp16 GEMV (M ≤ GEMV_F16.max_m, K % 8 == 0) or
        # cuBLAS called past CuPy (gpu/cublas.py); where neither can, such a model decodes eagerly
        self._f16_ks = [g.w16.shape[1] for L in self.layers for g in L.linears() if g.w16 is not None]
        self._has_wb = any(g.wb is not None for L in self.layers for g in L.linears())
        # the residual add folds into the A8W4 and pot3-a8 GEMVs only (not the fp16 or b-bit weight-only ones)
        self._all_a8w4 = all(g.packed is not None for L in self.layers for g in L.linears())
        self._all_pa8 = all(g.pa8 is not None for L in self.layers for g in L.linears())   # pot3 layers of act "dynamic"
        # RoPE tables (P, D/2) for the positions the caches made so far hold (new_cache grows
        # them): sized by max_position_embeddings up front, a config of a 16M context
        # (io/config.py MAX_CONTEXT) would take 8 GiB before the first token. One pair per kind
        # of RoPE the layers use (config.rope_params: Gemma's local layers have their own base).
        self._rope_keys = [c.rope_params(li) for li in range(c.num_hidden_layers)]
        self.ropes = {}              # rope_params -> (cos, sin); a captured decode graph keeps those it read
        self.cos = self.sin = None   # layer 0's pair (DecodeState.rope)
        self.layer_rope = []         # (cos, sin) of each layer
        self._rope(min(c.max_position_embeddings, ROPE_MIN_POSITIONS))
        self._bufs = None
        self._prefill_graphs = {}    # shape key -> _PrefillGraph (tuning.PrefillTuning), oldest first
        self._capture_stream = None  # the stream captured prefills are recorded on

    def _family_plan(self) -> None:
        """What the family adds to the layer stack (module docstring): nothing for a Llama config."""
        c = self.config
        bias = set(c.linear_bias)
        self._qk_prep = [L.qkv_bias is not None or L.q_norm is not None for L in self.layers]
        self._geglu = c.hidden_act == "gelu_tanh"
        self._fold_ok = not c.sandwich_norm and not bias & {"o", "down"}            # _fold_resid
        self._silu_gemv_ok = c.hidden_act == "silu" and not bias & {"gate", "up"}   # _fold_quant
        self._scale_log2 = attention.prefill_scale(c.head_dim, c.query_pre_attn_scalar)
        self._decode_scale = attention.decode_scale(c.head_dim, c.query_pre_attn_scalar)
        rows = self._geglu or c.embed_scale != 1.0 or any(
            a is not None for L in self.layers for a in (L.o_bias, L.gu_bias, L.down_bias, L.attn_out_norm))
        attn = any(self._qk_prep) or any(L.window for L in self.layers)
        wide = c.head_dim in ATTENTION.wide_head_dims          # every attention kernel from ATTN_WIDE
        self._family_modules = ([("fused.cu", fused.FAMILY_EXPRS)] if rows else []) + (
            [("attention.cu", attention.ATTN_WIDE_EXPRS)] if wide else
            [("attention.cu", attention.ATTN_FAMILY_EXPRS)] if attn else [])

    def _rope(self, positions: int) -> None:
        """cos/sin tables covering at least `positions` positions (grown geometrically, up to the
        context), built in float64 on the host as the NumPy model's (config.rope_inv_freq, its
        scaling included); all replaced together or none (an OOM)."""
        have = 0 if self.cos is None else self.cos.shape[0]        # every table has as many rows
        if have >= positions:
            return
        c, cp = self.config, self.cp
        positions = min(max(positions, 2 * have), c.max_position_embeddings)
        ropes = {}
        for key in dict.fromkeys(self._rope_keys):
            theta, rtype, factor, low, high, orig = key
            inv = rope_inv_freq(c.head_dim, theta, rtype, factor, low, high, orig)         # (D/2,)
            ang = np.outer(np.arange(positions, dtype=np.float64), inv)  # (P, D/2)
            ropes[key] = (cp.asarray(np.cos(ang), dtype=cp.float32), cp.asarray(np.sin(ang), dtype=cp.float32))
        self.ropes = ropes
        self.layer_rope = [ropes[k] for k in self._rope_keys]
        self.cos, self.sin = self.layer_rope[0]

    # ------------------------------------------------------------------ bookkeeping
    def weight_bytes(self) -> dict:
        lin = sum(g.nbytes() for L in self.layers for g in L.linears())
        other = self.embed.nbytes + self.norm.nbytes + sum(
            L.attn_norm.nbytes + L.mlp_norm.nbytes + sum(a.nbytes for a in L.extras()) for L in self.layers)
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
        try:
            cache = GpuKVCache(self.cp, c, int(capacity), int(batch), kv8)
            self._rope(int(capacity))
            return cache
        except self.cp.cuda.memory.OutOfMemoryError:
            need = GpuKVCache.bytes_needed(c, int(capacity), int(batch), kv8)
            raise ModelError(f"a KV cache of {capacity} positions x {batch} sequences needs {need / 2**30:.1f} GiB "
                             "of GPU memory, more than is free: ask for fewer tokens or sequences"
                             + ("" if kv8 else ", or use the INT8 cache (kv8)")) from None

    def _buffers(self, m: int, vocab_rows: int):
        """Prefill scratch for m rows: one set, grown geometrically, used through [:m] views."""
        b = self._bufs
        if b is None or b.m < m or b.vocab_rows < vocab_rows:
            self._bufs = None                   # let the old set go before allocating the new
            self._prefill_graphs.clear()        # (the captured prefills hold it)
            grow = lambda need, have: max(need, 2 * have) if have else need  # noqa: E731
            b = self._bufs = Buffers(self.cp, self.config, grow(m, b.m if b else 0),
                                     grow(vocab_rows, b.vocab_rows if b else 0), self._wide)
        return b

    # ------------------------------------------------------------------ the layer stack
    def _fold_resid(self, m: int) -> bool:
        """Whether the o and down GEMVs add into h themselves for m rows (every linear A8W4 and
        M small enough for the GEMV kernel, or every linear pot3-a8, whose GEMV takes any M): the
        norms after them then skip the add. Not for a sandwich layer (its sublayer output is
        normed before the add) or biases on o or down."""
        return self._fold_ok and (self._all_pa8 or m <= ops_cuda.gemv_max_m() and self._all_a8w4)

    def _fold_quant(self, m: int) -> bool:
        """Whether a one-token decode step drops silu_mul_quant and the absmax reductions of
        silu_mul_quant and quant_rows: the SiLU GEMV (gate|up rows interleaved) writes
        silu(gate)·up and its absmax, attn_decode the absmax of its output row, and quant_amax
        launches quantize both rows for down and o. Needs _fold_resid, int8 activations for o and
        down, and SiLU without gate|up biases (the GEMV's epilogue)."""
        return (DECODE.fold_quant and m == 1 and self._fold_resid(m)
                and self._silu_gemv_ok and all(
                    L.gu.silu_fused and L.o.mode != MODE["fp16"] and L.down.mode != MODE["fp16"]
                    for L in self.layers))

    def _layers(self, b: Buffers, m: int, cache: GpuKVCache, attend, tok=None, decode: bool = False):
        """Run every layer on b.h[:m]; returns the last sublayer output, not yet added to h
        (None when the GEMVs added it themselves, see _fold_resid).

        attend(layer, b, amax) reads b.qkv[:m] and the cache, writes the new k, v into the cache
        and fills b.a[:m] (M, Hq·D) fp16; with amax (decode, _fold_quant) it also max-reduces
        |b.a[row]| into amax[row] (float bits). tok (M,) int32 on the device: the first norm
        gathers their embeddings into b.h itself (one launch fewer). decode: a decode step,
        whose attend fills amax (only there does _fold_quant apply: a one-token prefill's
        attention writes no absmax).
        """
        fold = decode and self._fold_quant(m)
        p = _Pass(m, b.h[:m] if self._fold_resid(m) else None, fold,
                  b.amax[0, :m] if fold else None, b.amax[1, :m] if fold else None)
        c = self.config
        if tok is not None and c.embed_scale != 1.0:    # the scaled embedding: the first norm reads h
            fused.embed_rows(m, h=b.h, emb=self.embed, tok=tok, H=c.hidden_size, scale=c.embed_scale)
            tok = None
        y = None                # the previous sublayer's output, added to h by the next norm
        for li, L in enumerate(self.layers):
            y = self._attention_block(b, p, li, L, y, attend, tok if li == 0 else None)
            y = self._mlp_block(b, p, L, y)
        return y

    def _attention_block(self, b: Buffers, p: _Pass, li: int, L: GpuLayer, y, attend, tok):
        """h += y; x = RMSNorm(h) → qkv → attention → o; returns o's output (None: added to h)."""
        c, m = self.config, p.m
        qkv, o = L.qkv, L.o
        x8, xh = b.x8(m, qkv.kp), b.xh(m, c.hidden_size)                   # (M, Kp) int8, (M, H) fp16
        self._norm(b, m, y, L.attn_norm, qkv.mode, qkv.scale, x8, qkv.kp, xh, zero=p.amax_o, tok=tok)
        qkv(x8, b.sx[:m], xh, b.qkv[:m])                                    # (M, (Hq + 2·Hkv)·D)
        if self._qk_prep[li]:                                               # biases, q/k norms
            attention.qk_norm_bias(m, qkv=b.qkv, Hq=c.num_attention_heads, Hkv=c.num_key_value_heads,
                                   D=c.head_dim, bias=L.qkv_bias, qw=L.q_norm, kw=L.k_norm, eps=c.rms_norm_eps)
        attend(li, b, p.amax_o)                                             # b.a (M, Hq·D)
        a8, ah = b.x8(m, o.kp), b.a[:m]
        if p.fold:
            self._quant_amax(b.a, m, c.q_size, o, p.amax_o, a8, b.sx)
        elif o.mode != MODE["fp16"]:
            fused.quant_rows(m, x=b.a, K=c.q_size, mode=o.mode, static_scale=o.scale, x8=a8, ld=o.kp, sx=b.sx)
        return self._sublayer(b, m, o, a8, ah, L.o_bias, L.attn_out_norm, p)    # o: (M, H)

    def _mlp_block(self, b: Buffers, p: _Pass, L: GpuLayer, y):
        """h += y; x = RMSNorm(h) → gate|up → silu(gate)·up → down; returns down's output."""
        c, m = self.config, p.m
        gu, down, inter = L.gu, L.down, c.intermediate_size
        x8, xh = b.x8(m, gu.kp), b.xh(m, c.hidden_size)
        self._norm(b, m, y, L.mlp_norm, gu.mode, gu.scale, x8, gu.kp, xh, zero=p.amax_d)
        m8, mh = b.x8(m, down.kp), b.xh(m, inter)                          # (M, Kp) int8, (M, I) fp16
        if p.fold:
            gu.silu_gemv(x8, b.sx[:m], b.mf[:m], p.amax_d)                  # (M, I) float32
            self._quant_amax(b.mf, m, inter, down, p.amax_d, m8, b.sx)
        else:
            gu(x8, b.sx[:m], xh, b.gu[:m])                                  # (M, 2I)
            if L.gu_bias is not None:
                fused.add_bias(m, y=b.gu, bias=L.gu_bias, N=2 * inter)
            if self._geglu:
                fused.gelu_mul_quant(m, gu=b.gu, I=inter, mode=down.mode, static_scale=down.scale, x8=m8,
                                     ld=down.kp, sx=b.sx, mh=mh, il=int(gu.interleaved))
            else:
                fused.silu_mul_quant(m, gu=b.gu, I=inter, mode=down.mode, static_scale=down.scale, x8=m8,
                                     ld=down.kp, sx=b.sx, mh=mh, il=int(gu.interleaved))
        return self._sublayer(b, m, down, m8, mh, L.down_bias, L.mlp_out_norm, p)   # down: (M, H)

    def _sublayer(self, b: Buffers, m: int, lin: GpuLinear, x8, xh, bias, out_norm, p: _Pass):
        """lin (o or down) on its input, then _sublayer_out. A sandwich layer's A8W4 linear without
        a bias hands its int32 accumulators to norm_add_rows, which applies the epilogue in
        float32: the sublayer output reaches h unrounded, as the NumPy reference's does (Gemma 3's
        GPU/CPU perplexity gap, docs/QUALITY.md)."""
        if out_norm is not None and bias is None and lin.packed is not None and p.resid is None:
            c = self.config
            lin.accumulate(x8, b.yi[:m])
            fused.norm_add_rows(m, h=b.h, y=None, w=out_norm, H=c.hidden_size, eps=c.rms_norm_eps, acc=b.yi,
                                sx=b.sx, s8=lin.packed.s8)
            return None
        lin(x8, b.sx[:m], xh, b.y[:m], p.resid)
        return self._sublayer_out(b, m, bias, out_norm, p)

    def _sublayer_out(self, b: Buffers, m: int, bias, out_norm, p: _Pass):
        """What the next norm adds to h of a sublayer's output b.y[:m] (None: added already):
        + bias where the linear has one; a sandwich layer adds RMSNorm(y)·out_norm here."""
        if p.resid is not None:
            return None                             # the GEMV added it (_fold_resid: no bias, no sandwich)
        if bias is not None:
            fused.add_bias(m, y=b.y, bias=bias, N=self.config.hidden_size)
        if out_norm is not None:
            fused.norm_add_rows(m, h=b.h, y=b.y, w=out_norm, H=self.config.hidden_size, eps=self.config.rms_norm_eps)
            return None
        return b.y

    def _quant_amax(self, x, m: int, k: int, lin: GpuLinear, amax, x8, sx):
        """x8 (m, lin.kp), sx = the rows x[:m, :k] quantized for lin, their absmax known (amax)."""
        fused.quant_amax(m, x=x, K=k, mode=lin.mode, static_scale=lin.scale, amax=amax, x8=x8, ld=lin.kp, sx=sx)

    def _norm(self, b: Buffers, m: int, y, w, mode: int, scale, x8, ld: int, xh, h=None, zero=None,
              tok=None):
        """h += y (y None: no add; tok given: h = the tokens' embeddings), then RMSNorm(h)·w into
        x8/sx (modes 0, 1) or xh (fp16); zero: a (m,) uint32 array the kernel sets to 0 (an amax
        slot of _fold_quant)."""
        c = self.config
        fused.add_rmsnorm_quant(m, h=b.h if h is None else h, y=y, w=w, H=c.hidden_size, eps=c.rms_norm_eps,
                                mode=mode, static_scale=scale, x8=x8, ld=ld, sx=b.sx, xh=xh, zero=zero,
                                emb=None if tok is None else self.embed, tok=tok)

    def _head(self, b: Buffers, y, rows: slice, nrows: int, lm_head: bool = True):
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
            return fused.matmul_w8(self.cp, x, self.lm_head, self.lm_scale, out)
        return fused.matmul_f16(self.cp, x, self.lm_head, out)

    def graphable(self, batch: int) -> tuple[bool, bool]:
        """(layers, head): whether a decode step for `batch` sequences can be captured up to the
        final norm, and the lm_head with sampling too. A8W4 linears always can be, an INT8
        lm_head at any batch (8-row slices of its GEMV); float linears and the fp16 lm_head
        where fused.f16_capturable (our GEMV's rows, or cuBLAS through gpu/cublas.py)."""
        return (all(fused.f16_capturable(batch, k) for k in self._f16_ks),
                self.lm_scale is not None or fused.f16_capturable(batch, self.config.hidden_size))

    # ------------------------------------------------------------------ prefill / full forward
    def _attend_prefill(self, cache: GpuKVCache, s: int, start: int, t: int, pos, seqs):
        """Causal GQA of t new queries against the first start+t cached keys of sequence s."""
        c = self.config
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def attend(li, b, amax=None):
            cos, sin = self.layer_rope[li]
            attention.rope_qkv_cache(t, qkv=b.qkv, Hq=hq, Hkv=hkv, D=d, pos=pos, seq=seqs, cos_t=cos,
                                     sin_t=sin, q_out=b.q, kc=cache.k[li], vc=cache.v[li], ks=cache.ks[li],
                                     vs=cache.vs[li], cap=cache.capacity)
            attention.attn_prefill(q=b.q, kc=cache.k[li], vc=cache.v[li], ks=cache.ks[li], vs=cache.vs[li],
                                   out=b.a, t=t, start=start, Hq=hq, Hkv=hkv, cap=cache.capacity, seq=s,
                                   scale_log2=self._scale_log2, window=self.layers[li].window)
        return attend

    def prefill(self, tokens, cache: GpuKVCache, seq: int = 0, logits: str = "last"):
        """Append tokens (T,) to sequence `seq` of the cache; fp16 logits (T or 1, V) on the GPU.

        The logits are a view of scratch memory, valid until the next prefill: copy to keep them.
        A prefill of a shape seen twice before replays a CUDA graph (tuning.PrefillTuning, _graph_for).
        """
        cp, c = self.cp, self.config
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < cache.batch:
            raise ModelError(f"seq must be a sequence index in 0..{cache.batch - 1}, got {seq!r}")
        seq = int(seq)
        start = int(cache.lens_host[seq])
        tokens = check_tokens(tokens, c, start)
        t = int(tokens.shape[0])
        if start + t > cache.capacity:
            raise ModelError(f"cannot add {t} tokens to a sequence of {start}: the cache holds {cache.capacity}")
        if logits not in ("last", "all"):
            raise ModelError(f"logits must be 'last' or 'all', got {logits!r}")
        rows = t if logits == "all" else 1
        b = self._buffers(t, rows)
        g = self._graph_for((t, start, seq, rows), cache, b)
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        if g is None:
            self._prefill_pass(b, cache, seq, start, t, rows, cp.asarray(toks), cp.arange(start, start + t, dtype=cp.int32),
                               cp.full((t,), seq, dtype=cp.int32))
        else:
            g.tok.set(toks)                              # on the current stream, as the eager launches
            if g.graph is None:
                self._capture(g, b, cache, seq, start, t, rows)
            if g.graph is None:                          # not capturable after all: this shape stays eager
                self._prefill_pass(b, cache, seq, start, t, rows, g.tok, g.pos, g.seqs)
            else:
                g.graph.launch(cp.cuda.get_current_stream())
        cache.lens_host[seq] += t
        return check_finite_logits(cp, b.logits[:rows], "prefill")

    def _prefill_pass(self, b: Buffers, cache: GpuKVCache, seq: int, start: int, t: int, rows: int, tok, pos, seqs):
        """The launches of a prefill: the layers, then the head for the last row or all rows. The
        GEMMs of one shape share one launch plan (ops_cuda.plan_scope)."""
        with ops_cuda.plan_scope():
            y = self._layers(b, t, cache, self._attend_prefill(cache, seq, start, t, pos, seqs), tok)
            self._head(b, y, slice(0, t) if rows == t else slice(t - 1, t), rows)

    def _graph_for(self, shape: tuple, cache: GpuKVCache, b: Buffers):
        """The _PrefillGraph for a prefill of shape (t, start, seq, rows) into this cache, or None
        to launch eagerly: at its first sighting (which compiles kernels and sizes workspaces,
        none of which a capture may do), where PREFILL.graphs is 0, where a float linear or the
        head cannot be captured (CudaModel.graphable), or where launches are intercepted
        (kargs.intercepted: a profiler wants to see them). The second sighting returns an entry
        without a graph, for prefill() to capture; later ones replay it. The key holds the
        settings that pick kernels (tuning, the GEMM policy, kernel source edits), so an A/B of
        a setting never replays the other side's graph; PREFILL.graphs shapes are kept, the
        least recently used dropped first."""
        t, _, _, rows = shape
        graphs = self._prefill_graphs
        if PREFILL.graphs <= 0 or kargs._WRAP or not self._prefill_graphable(t, rows):
            if PREFILL.graphs <= 0:
                graphs.clear()
            return None
        key = (shape, id(cache), _settings_key())
        g = graphs.pop(key, None)
        live = g is not None and g.cache() is cache and g.bufs is b and g.kv == _kv_ptrs(cache)
        if not live:
            graphs[key] = _PrefillGraph(cache=weakref.ref(cache), kv=_kv_ptrs(cache), bufs=b)
            while len(graphs) > PREFILL.graphs:
                graphs.pop(next(iter(graphs)))
            return None                               # first sighting: eager
        graphs[key] = g                               # most recently used last
        if g.tok is None:                             # second: the capture's fixed inputs
            cp, (t, start, seq, _) = self.cp, shape
            g.tok = cp.zeros((t,), cp.int32)
            g.pos = cp.arange(start, start + t, dtype=cp.int32)
            g.seqs = cp.full((t,), seq, dtype=cp.int32)
        return None if g.failed else g

    def _prefill_graphable(self, t: int, rows: int) -> bool:
        """Whether a prefill of t tokens with `rows` logits rows can be captured with the kernels
        it runs eagerly: graphable's rule for the layers at t rows and the head at `rows`, and no
        b-bit weight-only linear past its GEMV's rows (captured, gemv_wb runs 16-row GEMV slices
        instead of dequantizing for cuBLAS: other kernels, other bits)."""
        if self._has_wb and t > WB.gemv_max_m:
            return False
        return self.graphable(t)[0] and self.graphable(rows)[1]

    def _capture(self, g, b: Buffers, cache: GpuKVCache, seq: int, start: int, t: int, rows: int):
        """Capture the prefill into g.graph on the model's capture stream (capture runs nothing:
        prefill() launches it). A launch that cannot be captured, or a capture that does not end
        cleanly, leaves g.failed set and the shape eager."""
        cp = self.cp
        if self._capture_stream is None:
            self._capture_stream = cp.cuda.Stream()
        st, graph, ran = self._capture_stream, None, False
        g.failed = True                                 # until the capture has ended cleanly
        with st, launch.capturing():
            st.begin_capture()
            try:
                self._prefill_pass(b, cache, seq, start, t, rows, g.tok, g.pos, g.seqs)
                ran = True
            except Exception:                           # noqa: BLE001 - a launch refused capture: eager
                pass
            finally:
                try:
                    graph = st.end_capture()
                except Exception:                       # noqa: BLE001 - the capture was invalidated
                    graph = None
        if not ran or graph is None:
            return
        g.graph, g.failed = graph, False
        g.rope = self.ropes                             # the tables it reads, should they grow
        g.workspace = ops_cuda._WS.get(cp.cuda.Device().id)   # its split-K workspace, kept alive

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
        tok = int(out[0])
        if tok == ops_cuda.SAMPLE_NONFINITE:
            raise ModelError(NONFINITE_LOGITS.format(where="logits given to the sampler"))
        return tok

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
        (seed, b, p), so a seed replays the same tokens. The captured graph (gpu/decode.py) is
        kept with the cache and reads the settings from device memory: later calls, with any
        settings, only reset four small buffers.
        """
        return decoding.decode(self, cache, last_tokens, n_steps, temperature, top_k, top_p, seed, use_graph,
                             on_step)
