"""One (possibly fused) linear of the CuPy model: packed A8W4, b-bit weight-only (pot, int), pot3
with INT8 activations (act "dynamic": the W3-PoT × INT8 GEMV), or a float16 weight."""
from __future__ import annotations

import numpy as np

from .. import formats
from ..formats import pot_a8
from ..io.layout import ModelError
from . import fused, wb
from . import ops as ops_cuda
from . import pot_a8 as gpu_pot_a8
from .backend import BackendError
from .fused import MODE
from .tuning import WB_TUNE


def _fuse(qls):
    """Concatenate QuantLinears that read one input along N (q|k|v, gate|up)."""
    a = qls[0]
    for q in qls[1:]:
        if (q.kind, q.act, q.group, q.in_features) != (a.kind, a.act, a.group, a.in_features):
            raise ModelError("layers fused into one GEMM must share kind, act mode, group and K")
        if a.act == "static" and q.ascale != a.ascale:
            raise ModelError("q/k/v (and gate/up) read one input and must share one static act scale")
    arrays = {f: np.concatenate([getattr(q, f) for q in qls], axis=0)            # every per-row array
              for f in formats.ARRAY_FIELDS if getattr(a, f) is not None}
    return formats.QuantLinear(kind=a.kind, act=a.act, in_features=a.in_features,
                               out_features=sum(q.out_features for q in qls), group=a.group,
                               ascale=a.ascale, **arrays)


F16_MAX = 65504.0


def to_f16(cp, w, what: str):
    """w uploaded as float16, or ModelError naming `what` when a value does not fit (it would
    become ±Inf on the GPU; the CPU path computes in float32)."""
    w = np.asarray(w)
    if w.size:
        hi = max(float(w.max()), -float(w.min()))        # no |w| temporary of the whole table
        if not hi <= F16_MAX:
            raise ModelError(f"{what}: weights up to |w| = {hi:.4g} do not fit float16 (at most {F16_MAX:g}), "
                             "which the GPU engine computes in: run this model with --device cpu")
    return cp.asarray(w, dtype=cp.float16)


WB_KINDS = tuple(k for k in formats.KINDS if k[:3] in ("pot", "int"))       # run by gpu/wb.py


def _pot_int8(w) -> bool:
    """A power-of-two layer with INT8 activations (act "dynamic"): the pot3-a8 GEMV's layers."""
    return isinstance(w, formats.QuantLinear) and w.kind.startswith("pot") and w.act != "none"


class GpuLinear:
    """One (possibly fused) linear on the GPU: packed A8W4, b-bit weight-only (gemv_wb, fp16
    activations), pot3 with INT8 activations (gemv_pot_a8), or a float16 weight (matmul_f16)."""

    def __init__(self, cp, ws, host_cache: dict | None = None, interleave: bool = False, name: str = "a linear"):
        self.cp = cp
        self.interleaved = False     # gate|up rows in the SiLU GEMV's order (ops_cuda.interleave_rows)
        self.silu_fused = False      # silu_gemv runs (an interleaved A8W4 or a pot3-a8 gate|up layer)
        self.wb = None               # a PackedWB for the weight-only kinds
        self.pa8 = None              # a PackedPotA8 for pot3 layers run with INT8 activations
        # gate and up of one width, rows a multiple of 8: the layer the SiLU GEMVs can take
        rows = [w.shape[0] if isinstance(w, np.ndarray) else w.out_features for w in ws]
        silu_pair = interleave and len(ws) == 2 and rows[0] == rows[1] and rows[0] % 8 == 0
        if any(_pot_int8(w) for w in ws):
            # every layer of the group pot3, groups of 128, INT8 tokens; anything else (another
            # width or group, or a group mixing modes or kinds, which dgq-quantize never writes)
            # is a BackendError, so --device auto runs the file on the CPU
            odd = [w for w in ws if not (_pot_int8(w) and pot_a8.takes(formats.KINDS[w.kind].bits, w.group))]
            if odd:
                what = (f"{odd[0].kind} in groups of {odd[0].group}, act '{odd[0].act}'"
                        if isinstance(odd[0], formats.QuantLinear) else "a float weight")
                raise BackendError(f"{name}: the GPU runs power-of-two weights with INT8 activations (act "
                                   f"'dynamic') as pot3 in groups of {pot_a8.GROUP} only, every layer of a fused "
                                   f"group alike; this one holds {what}: use --device cpu")
            self.n, k = sum(w.out_features for w in ws), ws[0].in_features
            key = ("pot3-a8",) + tuple(id(w) for w in ws)       # layers that share arrays fuse and pack once
            host = (host_cache or {}).get(key)
            if host is None:
                ql = ws[0] if len(ws) == 1 else _fuse(ws)
                host = pot_a8.from_pot3(ql.qweight, ql.wscale, k, ql.group)
                if host_cache is not None:
                    host_cache[key] = host
            self.pa8 = gpu_pot_a8.upload(*host, self.n, k)
            self.packed, self.w16, self.mode = None, None, MODE["dynamic"]    # int8 rows, a scale a token
            self.scale = cp.ones(1, cp.float32)
            self.kp = pot_a8.CHUNK * pot_a8.n_chunks(k)
            self.silu_fused = silu_pair                   # gate then up, in place (gpu_pot_a8.gemv_pot_a8_silu)
        elif all(isinstance(w, formats.QuantLinear) and w.kind in WB_KINDS for w in ws):
            self.wb = wb.pack_wb(ws[0] if len(ws) == 1 else _fuse(ws))
            self.packed, self.w16, self.mode = None, None, MODE["fp16"]       # reads the fp16 activations
            self.scale = cp.ones(1, cp.float32)
            self.n, self.kp = self.wb.n, self.wb.k
        elif all(isinstance(w, formats.QuantLinear) for w in ws):
            if any(w.kind != "dg" for w in ws):
                kinds = sorted({w.kind for w in ws})
                raise BackendError(f"the GPU engine runs dual-grained ('dg'), pot2..4 and int2..4 layers; "
                                   f"this file holds {kinds} (one fused group may not mix kinds): use --device cpu")
            self.interleaved = self.silu_fused = silu_pair
            # Host repacking is the slow part of loading; layers that share arrays (the
            # random bench models) repack once and upload once per layer.
            key = tuple(id(w) for w in ws) + (self.interleaved,)
            ph, ql = (host_cache or {}).get(key, (None, None))
            if ph is None:
                ql = ws[0] if len(ws) == 1 else _fuse(ws)
                if self.interleaved:
                    ql = ql.take_rows(ops_cuda.interleave_rows(ql.out_features))
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
            self.w16 = to_f16(cp, w, name)                                  # (N, K)
            self.packed, self.mode, self.scale = None, MODE["fp16"], cp.ones(1, cp.float32)
            self.n, self.kp = w.shape
        else:
            raise ModelError("a fused group mixes float and quantized weights")

    def __call__(self, x8, sx, xh, out, resid=None):
        """out (M, N) fp16 = x · Wᵀ from int8 x8 with scales sx, or from fp16 xh; with resid
        (A8W4 GEMV sizes only, or pot3-a8 at any M), resid += that instead (ops_cuda.gemm_a8w4,
        gpu_pot_a8.gemv_pot_a8 and gemm_pot_a8)."""
        if self.packed is None and self.pa8 is None and resid is not None:
            raise BackendError("the residual add runs in the A8W4 and pot3-a8 GEMVs only")
        if self.pa8 is not None:
            # many tokens: Ŵ in fp16 and cuBLAS where the layer allows it; else the GEMV, any M
            # (launches of ≤ 65535 tokens), reading M × the weight bytes
            o = out if resid is None else None
            if x8.ndim == 2 and x8.shape[0] > WB_TUNE.pa8_gemv_max_m and gpu_pot_a8.gemm_pot_a8(x8, sx, self.pa8, o,
                                                                                                  resid=resid):
                return out if resid is None else resid
            return gpu_pot_a8.gemv_pot_a8(x8, sx, self.pa8, o, resid=resid)
        elif self.wb is not None:
            wb.gemv_wb(xh, self.wb, out)                   # any M; in a capture, 16-row GEMV slices
        elif self.w16 is not None:
            fused.matmul_f16(self.cp, xh, self.w16, out)    # the FP16 baseline: cuBLAS or our GEMV
        else:
            ops_cuda.gemm_a8w4(x8, sx, self.packed, out=out, resid=resid)
        return out if resid is None else resid

    def accumulate(self, x8, out):
        """out (M, N) int32 = Σ_k x8·W8 of this A8W4 layer, without the epilogue (ops_cuda.gemm_a8w4_acc)."""
        return ops_cuda.gemm_a8w4_acc(x8, self.packed, out=out)

    def silu_gemv(self, x8, sx, out, amax):
        """out (1, N/2) float32 = silu(gate)·up of this gate|up layer (silu_fused), amax = its
        max |·| (ops_cuda.gemv_a8w4_silu, gpu_pot_a8.gemv_pot_a8_silu)."""
        if self.pa8 is not None:
            return gpu_pot_a8.gemv_pot_a8_silu(x8, sx, self.pa8, out, amax)
        return ops_cuda.gemv_a8w4_silu(x8, sx, self.packed, out, amax)

    def nbytes(self) -> int:
        if self.pa8 is not None:
            return self.pa8.nbytes()
        if self.wb is not None:
            return self.wb.nbytes()
        if self.w16 is not None:
            return self.w16.nbytes
        return self.packed.nbytes()
