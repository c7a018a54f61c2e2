"""Launchers of cuda/gemv_wb.cu: weight-only b-bit GEMVs (tensor cores) for "pot<b>" and "int<b>".

Name triplets (reference ↔ kernel ↔ launcher): formats.linear_ref of a pot/int layer (act
"none") ↔ gemv_pot / gemv_int ↔ gemv_wb. The canonical bit-plane layout of the file is the
kernels' layout too (engine/formats/planes.py), so uploading is a copy, no repacking.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import formats
from . import kargs
from .backend import require_cupy
from .ops import CudaOpError
from .tuning import WB

WB_EXPRS = tuple(f"gemv_{kind}<{b}, {nt}>" for kind in ("pot", "int") for b in WB.bits for nt in WB.nts)
MAX_M = 8 * WB.nts[-1]       # rows of x one launch takes
WB_FILE = kargs.KernelFile("gemv_wb.cu", WB_EXPRS)


@dataclass
class PackedWB:
    """A pot/int layer on the GPU: planes (N, Kc, bits) uint32, scale (N, G) fp16, zero (N, G) u8."""
    kind: str            # "pot" | "int"
    bits: int
    n: int
    k: int
    group: int
    qw: object
    scale: object
    zero: object | None

    def nbytes(self) -> int:
        return int(self.qw.nbytes + self.scale.nbytes + (0 if self.zero is None else self.zero.nbytes))


def pack_wb(ql: formats.QuantLinear) -> PackedWB:
    """Upload a "pot<b>" / "int<b>" layer (weight-only, act "none")."""
    cp = require_cupy()
    kind, bits = ql.kind[:3], int(ql.kind[3:]) if ql.kind[3:].isdigit() else 0
    if kind not in ("pot", "int") or bits not in WB.bits:
        raise CudaOpError(f"gemv_wb runs pot2..4 and int2..4 layers, not {ql.kind!r}")
    if ql.group % WB.chunk:
        raise CudaOpError(f"gemv_wb needs groups that are a multiple of {WB.chunk}, got {ql.group}")
    return PackedWB(kind, bits, ql.out_features, ql.in_features, ql.group, cp.asarray(ql.qweight),
                    cp.asarray(ql.wscale), None if kind == "pot" else cp.asarray(ql.qzeros))


def gemv_wb(x, p: PackedWB, out=None):
    """out (M, N) fp16 = x (M, K) fp16 · Ŵᵀ; M of any size, in slices of at most MAX_M rows."""
    cp = require_cupy()
    m, k = x.shape
    if k != p.k or x.dtype != np.float16 or not x.flags.c_contiguous:
        raise CudaOpError(f"gemv_wb needs x as a C-contiguous fp16 (M, {p.k}) array, got {x.dtype} {x.shape}")
    out = cp.empty((m, p.n), dtype=cp.float16) if out is None else out
    grid = (-(-p.n // WB.rows),)
    for r0 in range(0, m, MAX_M):
        r = min(MAX_M, m - r0)
        nt = next(t for t in WB.nts if 8 * t >= r)
        if p.kind == "pot":
            kargs.launch(WB_FILE, f"gemv_pot<{p.bits}, {nt}>", grid, (32 * WB.warps,), x=x[r0:], qw=p.qw,
                         scale=p.scale, out=out[r0:], M=r, N=p.n, K=k, group=p.group)
        else:
            kargs.launch(WB_FILE, f"gemv_int<{p.bits}, {nt}>", grid, (32 * WB.warps,), x=x[r0:], qw=p.qw,
                         scale=p.scale, zero=p.zero, out=out[r0:], M=r, N=p.n, K=k, group=p.group)
    return out
