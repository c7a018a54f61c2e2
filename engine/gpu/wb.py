"""Launchers of cuda/gemv_wb.cu: weight-only b-bit GEMV (M ≤ 16) and GEMM for "pot<b>" and "int<b>".

Name triplets (reference ↔ kernel ↔ launcher): formats.linear_ref of a pot/int layer (act
"none") ↔ gemv_pot / gemv_int (M ≤ WB.gemv_max_m), gemm_pot / gemm_int (larger M) ↔ gemv_wb.
The file's bit planes (formats/planes.py) become the kernels' tiles (formats/tiles.py) on the
GPU at upload, with the same array code run by CuPy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import formats
from ..formats import planes, tiles
from . import kargs, launch
from .backend import require_cupy
from .ops import CudaOpError, set_smem
from .tuning import WB, WB_TUNE

WB_EXPRS = tuple([f"gemv_{kind}<{b}, {nt}, {xs}>" for kind in ("pot", "int") for b in WB.bits for nt in WB.nts
                  for xs in (0, 1)]
                 + [f"{f}_{kind}<{b}>" for f in ("gemm", "dequant") for kind in ("pot", "int") for b in WB.bits])
WB_FILE = kargs.KernelFile("gemv_wb.cu", WB_EXPRS)
GROUPS = planes.GROUPS       # groups a tile holds whole (tiles.TILE_K is a multiple)


@dataclass
class PackedWB:
    """A pot/int layer on the GPU in the tile layout: tiles (flat uint32), scale (NT, KT, G/tile, 8)
    uint32 = half2 (row g, row g + 8), zero the same as uint16 = 2 bytes ("int" only)."""
    kind: str            # "pot" | "int"
    bits: int
    n: int
    k: int
    group: int
    tiles: object
    scale: object
    zero: object | None

    def nbytes(self) -> int:
        return int(self.tiles.nbytes + self.scale.nbytes + (0 if self.zero is None else self.zero.nbytes))


def _check_kind(kind: str, bits: int, group: int) -> None:
    if kind not in ("pot", "int") or bits not in WB.bits:
        raise CudaOpError(f"gemv_wb runs pot2..4 and int2..4 layers, not {kind}{bits}")
    if group not in GROUPS:
        raise CudaOpError(f"gemv_wb needs groups of {', '.join(map(str, GROUPS))} channels, got {group}")


def pack_tiles(kind: str, bits: int, n: int, k: int, group: int, codes, scale, zero=None, words=None) -> PackedWB:
    """A layer from arrays: codes (N, K) integers, scale (N, G) fp16, zero (N, G) uint8 ("int");
    words: tile words made already (tiles.tile_codes; the benchmarks' random ones), instead of codes."""
    cp = require_cupy()
    _check_kind(kind, bits, group)
    t = tiles.tile_codes(codes, bits, xp=cp) if words is None else words
    s = tiles.tile_groups(cp.asarray(scale, dtype=cp.float16), n, k, group, xp=cp).view(cp.uint32)[..., 0]
    z = None
    if kind == "int":
        z = tiles.tile_groups(cp.asarray(zero, dtype=cp.uint8), n, k, group, xp=cp).view(cp.uint16)[..., 0]
    return PackedWB(kind, bits, n, k, group, t, cp.ascontiguousarray(s),
                    None if z is None else cp.ascontiguousarray(z))


def pack_wb(ql: formats.QuantLinear) -> PackedWB:
    """Upload a "pot<b>" / "int<b>" layer (weight-only, act "none"), planes -> tiles on the GPU."""
    cp = require_cupy()
    kind, bits = ql.kind[:3], int(ql.kind[3:]) if ql.kind[3:].isdigit() else 0
    _check_kind(kind, bits, ql.group)
    codes = planes.unpack_planes(ql.qweight, bits, ql.in_features, xp=cp)
    return pack_tiles(kind, bits, ql.out_features, ql.in_features, ql.group, codes, ql.wscale,
                      None if kind == "pot" else ql.qzeros)


_SCRATCH: dict = {}          # (device id, name) -> a buffer the products before cuBLAS write (grows, never shrinks)
_RETIRED: list = []          # buffers a larger one replaced: captured graphs may still point at them


def scratch(cp, size: int, dtype=np.float16, name: str = "w16"):
    """The first `size` elements of this device's scratch buffer `name` ("w16": the Ŵ that
    dequantize_wb and pot_a8.dequantize_pa8 write for cuBLAS; the pot3-a8 GEMM's operands have
    their own): one stream's products use it in turn."""
    key = (cp.cuda.Device().id, name)
    buf = _SCRATCH.get(key)
    if buf is None or buf.size < size or buf.dtype != dtype:
        grow = size if buf is None or buf.dtype != dtype else max(size, 2 * buf.size)   # the retired stay < 2×
        if buf is not None:
            _RETIRED.append(buf)             # never freed: a graph captured with it would read freed memory
        buf = _SCRATCH[key] = cp.empty(grow, dtype=dtype)
    return buf[:size]


def dequantize_wb(p: PackedWB, out=None):
    """Ŵ (N, K) fp16 = unit · s of every weight (exact for pot; int rounds (q - z)·s once)."""
    cp = require_cupy()
    w16 = scratch(cp, p.n * p.k).reshape(p.n, p.k) if out is None else out
    nt_rows, kt = tiles.tile_dims(p.n, p.k)
    grid, block, gpt = (nt_rows, -(-kt // WB.warps)), (32 * WB.warps,), tiles.TILE_K // p.group
    if p.kind == "pot":
        kargs.launch(WB_FILE, f"dequant_pot<{p.bits}>", grid, block, tiles=p.tiles, scale=p.scale, w16=w16,
                     N=p.n, K=p.k, KT=kt, gpt=gpt)
    else:
        kargs.launch(WB_FILE, f"dequant_int<{p.bits}>", grid, block, tiles=p.tiles, scale=p.scale, zero=p.zero,
                     w16=w16, N=p.n, K=p.k, KT=kt, gpt=gpt)
    return w16


def gemv_grid(fn, row_tiles: int, smem: int) -> int:
    """The GEMV's grid: one block a row tile, or (WB_TUNE.resident) no more blocks than the GPU
    holds at once, each taking every gridDim-th row tile (cuda/gemv_wb.cu gemv_wb_body;
    kargs.resident_grid)."""
    if not WB_TUNE.resident:
        return row_tiles
    return kargs.resident_grid(fn, row_tiles, 32 * WB.warps, smem, WB_TUNE.max_blocks)


def gemv_variant(p: PackedWB, m: int) -> tuple[int, int, int]:
    """(NT, XS, dynamic shared memory) of the GEMV gemv_<kind><BITS, NT, XS> for m ≤
    WB.gemv_max_m rows of x: NT 8-row tiles of x, and XS = 1 (x staged in shared memory,
    m·KT·128·2 bytes) where WB_TUNE allows it."""
    nt = next(t for t in WB.nts if 8 * t >= m)
    xs = m * tiles.tile_dims(p.n, p.k)[1] * tiles.TILE_K * 2
    xsmem = int(m <= WB_TUNE.xs_max_rows and xs <= WB_TUNE.xs_max_bytes)
    return nt, xsmem, xs if xsmem else 0


LARGE_M = ("dequant", "mma", "slices")


def gemv_wb(x, p: PackedWB, out=None, large_m: str | None = None):
    """out (M, N) fp16 = x (M, K) fp16 · Ŵᵀ, any M: the GEMV up to WB.gemv_max_m rows; above,
    `large_m` (default WB_TUNE.large_m): "dequant" (Ŵ in fp16, then cuBLAS), "mma" (gemm_*) or
    "slices" (the GEMV on WB.gemv_max_m rows at a time). Inside a stream capture (the decode
    graphs) "dequant" becomes "slices": CuPy cannot capture cuBLAS."""
    cp = require_cupy()
    m, k = x.shape
    if k != p.k or x.dtype != np.float16 or not x.flags.c_contiguous:
        raise CudaOpError(f"gemv_wb needs x as a C-contiguous fp16 (M, {p.k}) array, got {x.dtype} {x.shape}")
    out = cp.empty((m, p.n), dtype=cp.float16) if out is None else out
    if m == 0:
        return out
    if k == 0:                                           # an empty sum (the kernels divide by K's tiles)
        out.fill(0)
        return out
    large_m = large_m or WB_TUNE.large_m
    if large_m not in LARGE_M:
        raise CudaOpError(f"large_m is one of {', '.join(LARGE_M)}, not {large_m!r}")
    if m > WB.gemv_max_m and (large_m == "slices" or (large_m == "dequant" and launch.is_capturing())):
        for r0 in range(0, m, WB.gemv_max_m):
            r1 = min(m, r0 + WB.gemv_max_m)
            gemv_wb(x[r0:r1], p, out[r0:r1])
        return out
    nt_rows, kt = tiles.tile_dims(p.n, p.k)
    vec = int(k % 4 == 0 and x.data.ptr % 8 == 0)
    gpt = tiles.TILE_K // p.group
    if m <= WB.gemv_max_m:
        nt, xs, smem = gemv_variant(p, m)
        fn = kargs.function(WB_FILE, f"gemv_{p.kind}<{p.bits}, {nt}, {xs}>")
        set_smem(fn, smem)
        grid, block = (gemv_grid(fn, nt_rows, smem),), (32 * WB.warps,)
        if p.kind == "pot":
            kargs.launch(WB_FILE, f"gemv_pot<{p.bits}, {nt}, {xs}>", grid, block, shared_mem=smem, x=x, tiles=p.tiles,
                         scale=p.scale, out=out, M=m, N=p.n, K=k, KT=kt, gpt=gpt, vec=vec)
        else:
            kargs.launch(WB_FILE, f"gemv_int<{p.bits}, {nt}, {xs}>", grid, block, shared_mem=smem, x=x, tiles=p.tiles,
                         scale=p.scale, zero=p.zero, out=out, M=m, N=p.n, K=k, KT=kt, gpt=gpt, vec=vec)
    elif large_m == "dequant":
        cp.matmul(x, dequantize_wb(p).T, out=out)          # cuBLAS (eager: see the capture case above)
    else:
        grid, block = (-(-nt_rows // WB.gemm_warps), -(-m // (8 * WB.gemm_nt))), (32 * WB.gemm_warps,)
        if p.kind == "pot":
            kargs.launch(WB_FILE, f"gemm_pot<{p.bits}>", grid, block, x=x, tiles=p.tiles, scale=p.scale,
                         out=out, M=m, N=p.n, K=k, KT=kt, gpt=gpt, vec=vec)
        else:
            kargs.launch(WB_FILE, f"gemm_int<{p.bits}>", grid, block, x=x, tiles=p.tiles, scale=p.scale,
                         zero=p.zero, out=out, M=m, N=p.n, K=k, KT=kt, gpt=gpt, vec=vec)
    return out
