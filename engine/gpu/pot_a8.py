"""Launcher of cuda/gemv_pot_a8.cu: W3-PoT weights × INT8 tokens (dp4a GEMV, up to 4 tokens a block). The
model runs pot3 layers of act "dynamic" with it (`dgq-quantize --method pot --wbits 3 --act dynamic`,
gpu/linear.py); `python -m engine.bench gemv-wb --kinds pot3,pot3a8 --ms 1` times it alone.

Name triplet: formats.pot_a8.gemv_pot_a8_ref ↔ gemv_pot3_a8<RB, NW, SILU, MT> ↔ gemv_pot_a8. The layout
(three words a 32-channel chunk; the full warp steps of 1024 channels and a compact tail) is made
on the host by formats.pot_a8.pack_pot_a8 and pack_scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import pot_a8 as fmt
from . import cublas, kargs
from .backend import require_cupy
from .ops import CudaOpError
from .tuning import WB_TUNE
from .wb import scratch

# (RB rows a block, NW warps a block): the instantiations; DEFAULT until a GPU has timed them
VARIANTS = ((4, 4), (8, 4), (4, 8), (8, 8))
DEFAULT = (8, 4)
# the fused gate|up layer of the batch-1 step. Its NW is DEFAULT's, as gemv_pot_a8's default: the
# warp count fixes the order of a row's sums, so the folded step (this) and the unfolded one (the
# plain kernel, then silu_mul_quant) agree bit for bit only while both run DEFAULT[1] warps
SILU_EXPR = f"gemv_pot3_a8<8, {DEFAULT[1]}, true>"
MAX_GRID_Y = 65535
# above WB_TUNE.pa8_gemv_max_m tokens: Ŵ in fp16 and cuBLAS (gemm_pot_a8)
GEMM_EXPRS = ("dequant_pot3_a8", "rows_i8_to_f16", "scale_rows_pa8")
# several tokens a block (WB_TUNE.pa8_mt): each chunk's weights decoded once for MT tokens
MTS = (2, 4)
MT_VARIANTS = ((4, 4), (8, 4))
MT_EXPRS = tuple(f"gemv_pot3_a8<{rb}, {nw}, false, {mt}>" for rb, nw in MT_VARIANTS for mt in MTS)
POT_A8_EXPRS = tuple(f"gemv_pot3_a8<{rb}, {nw}, false>" for rb, nw in VARIANTS) + (SILU_EXPR,) + GEMM_EXPRS + MT_EXPRS
POT_A8_FILE = kargs.KernelFile("gemv_pot_a8.cu", POT_A8_EXPRS)


@dataclass
class PackedPotA8:
    """A pot3 layer on the GPU in the pot3-a8 layout (formats.pot_a8.pack_pot_a8, pack_scales), T =
    ceil(N / 8), S = Kc // 32 full warp steps, L = Kc % 32 chunks past them: words (T, S, 3, 8, 32)
    uint32, scale (T, S, 8, 8) fp16, tail (T, 3, 8, L) uint32, stail (8T, ceil(L / 4)) fp16."""
    n: int
    k: int
    words: object
    scale: object
    tail: object
    stail: object
    f16_exact: bool = False      # formats.pot_a8.fp16_exact of its scales: gemm_pot_a8 may run it

    def nbytes(self) -> int:
        return int(self.words.nbytes + self.scale.nbytes + self.tail.nbytes + self.stail.nbytes)


def upload(words: tuple, scale: tuple, n: int, k: int) -> PackedPotA8:
    """Host arrays -> the GPU: words = (words, tail) as formats.pot_a8.pack_pot_a8 makes them,
    scale = (scales, stail) as pack_scales does (or both from from_pot3)."""
    cp = require_cupy()
    want = tuple(sh for pair in fmt.shapes(n, k) for sh in pair)
    got = tuple(a.shape for a in (*words, *scale)) if len(words) == 2 and len(scale) == 2 else None
    if got != want:
        raise CudaOpError(f"pot3-a8 words, tail, scales and stail of shapes {got} do not make a {n}×{k} layer "
                          f"(that takes {want})")
    w, wt = (cp.ascontiguousarray(cp.asarray(a, dtype=cp.uint32)) for a in words)
    sc, st = (cp.ascontiguousarray(cp.asarray(a, dtype=cp.float16)) for a in scale)
    return PackedPotA8(n, k, w, sc, wt, st, fmt.fp16_exact(scale))


def default_variant(k: int) -> tuple[int, int]:
    """(RB, NW) of a plain launch for K channels: DEFAULT, or RB = 4 up to WB_TUNE.pa8_rb4_max_k
    (the same NW: the same bits)."""
    return (4, DEFAULT[1]) if 0 < k <= WB_TUNE.pa8_rb4_max_k else DEFAULT


def token_block(m: int, variant: tuple[int, int]) -> int:
    """Tokens a block of an m-token launch of `variant`: the largest of 1 and MTS up to
    min(m, WB_TUNE.pa8_mt) where the variant has those instantiations (MT_VARIANTS), else 1. At
    the default 4: 2 tokens take one block of 2, 3 one of 2 and one of 1, 8 two of 4."""
    cap = WB_TUNE.pa8_mt
    if cap != 1 and cap not in MTS:
        raise CudaOpError(f"WB_TUNE.pa8_mt must be 1 or one of {MTS}, got {cap!r}")
    if variant not in MT_VARIANTS:
        return 1
    return max(t for t in (1, *MTS) if t <= min(m, cap))


def gemv_pot_a8(x8, sx, p: PackedPotA8, out=None, variant: tuple[int, int] | None = None, resid=None):
    """out (M, N) fp16 = sx[m] · (x8[m] · Ŵᵀ) for M tokens, or (N,) for one: x8 (M, ldx) or (ldx,)
    int8, C-contiguous and 16-byte aligned, ldx ≥ 32·Kc and a multiple of 16 (its bytes past K meet
    code 0); sx (≥ M,) float32 on the GPU; variant (RB, NW) one of VARIANTS (default
    default_variant(K)). Each block takes token_block(M) tokens (the last M % MT one each), and
    every block reads its row block's weights again: with WB_TUNE.pa8_tok_x the blocks of a row
    block are launched next to each other (tokens along the grid's x), so that the later ones may
    find the weights in L2. With resid (a C-contiguous float32 array of out's shape, the residual stream), resid +=
    float(fp16(out)) instead of storing out (the add the next norm would make); resid is returned
    and out is not written."""
    cp = require_cupy()
    rb, nw = variant or default_variant(p.k)
    if (rb, nw) not in VARIANTS:
        raise CudaOpError(f"gemv_pot_a8 variant {(rb, nw)} is not among {VARIANTS}")
    kc = fmt.n_chunks(p.k)
    one = x8.ndim == 1
    m, ldx = (1, x8.size) if one else (x8.shape if x8.ndim == 2 else (0, 0))
    if x8.dtype != np.int8 or not x8.flags.c_contiguous or ldx < 32 * kc or ldx % 16 or x8.data.ptr % 16 \
            or x8.ndim not in (1, 2):
        raise CudaOpError(f"gemv_pot_a8 needs x8 as C-contiguous 16-byte aligned int8 rows of at least "
                          f"{32 * kc} bytes (K = {p.k} padded to 32), a multiple of 16, got {x8.dtype} {x8.shape}")
    if sx.dtype != np.float32 or sx.size < max(m, 1):
        raise CudaOpError(f"gemv_pot_a8 needs sx as a float32 array of at least {max(m, 1)} elements, "
                          f"got {sx.dtype} {sx.shape}")
    shape = (p.n,) if one else (m, p.n)
    if resid is not None:
        if out is not None:
            raise CudaOpError("gemv_pot_a8 writes out or adds into resid, not both")
        if not (isinstance(resid, cp.ndarray) and resid.dtype == np.float32 and resid.shape == shape
                and resid.flags.c_contiguous):
            raise CudaOpError(f"gemv_pot_a8 adds into a C-contiguous float32 {shape} resid, got "
                              f"{getattr(resid, 'dtype', type(resid).__name__)} {getattr(resid, 'shape', '')}")
    else:
        out = cp.empty(shape, dtype=cp.float16) if out is None else out
        if out.dtype != np.float16 or out.shape != shape or not out.flags.c_contiguous:
            raise CudaOpError(f"gemv_pot_a8 writes a C-contiguous float16 {shape} array, got {out.dtype} {out.shape}")
    res = out if resid is None else resid
    if m == 0:
        return res
    if p.n == 0 or p.k == 0:            # y = 0: out holds zeros, resid stays as it is
        if resid is None:
            out.fill(0)
        return res
    units = -(-p.n // rb)
    # several tokens (WB_TUNE.pa8_tok_x): tokens along x, so a row block's blocks run together and
    # share its weights through L2 (the kernel's tok_x); its row blocks along y then, which holds 65535
    tok_x = int(WB_TUNE.pa8_tok_x and m > 1 and units <= MAX_GRID_Y)
    mt = token_block(m, (rb, nw))
    whole = m - m % mt
    for lo, hi, t in ((0, whole, mt), (whole, m, 1)):  # MT tokens a block, then the rest one a block
        for m0 in range(lo, hi, MAX_GRID_Y * t):        # 65535 token blocks a launch (y's limit; x's is 2^31 - 1)
            mc = min(MAX_GRID_Y * t, hi - m0) // t
            kargs.launch(POT_A8_FILE,
                         f"gemv_pot3_a8<{rb}, {nw}, false, {t}>" if t > 1 else f"gemv_pot3_a8<{rb}, {nw}, false>",
                         (mc, units) if tok_x else (units, mc), (32 * nw,), words=p.words, scale=p.scale,
                         tail=p.tail, stail=p.stail, x8=x8[m0:] if m0 else x8, sx=sx[m0:] if m0 else sx,
                         out=out[m0:] if m0 and out is not None else out, N=p.n, KC=kc, ldx=ldx, ldo=p.n, mf=None,
                         amax=None, resid=resid[m0:] if m0 and resid is not None else resid, tok_x=tok_x)
    return res


def gemv_pot_a8_silu(x8, sx, p: PackedPotA8, mf, amax):
    """The fused gate|up layer (N = 2I rows, gate then up, I % 8 == 0) for one token: mf (1, I)
    float32 = silu(gate)·up from the fp16-rounded gate and up (the values gemv_pot_a8 would write),
    amax (≥ 1,) uint32 = max(amax, max |mf|) as float bits (zero it first). x8 and sx as for
    gemv_pot_a8, one token."""
    cp = require_cupy()
    kc, i = fmt.n_chunks(p.k), p.n // 2
    ldx = x8.shape[-1] if x8.ndim in (1, 2) else 0
    if x8.dtype != np.int8 or not x8.flags.c_contiguous or x8.size != ldx or ldx < 32 * kc or ldx % 16 \
            or x8.data.ptr % 16:
        raise CudaOpError(f"the pot3-a8 SiLU GEMV takes one token: x8 as one C-contiguous 16-byte aligned int8 row "
                          f"of at least {32 * kc} bytes, a multiple of 16, got {x8.dtype} {x8.shape}")
    if p.n % 16 or p.k == 0:
        raise CudaOpError(f"the pot3-a8 SiLU GEMV takes gate|up rows with I % 8 == 0 and K > 0, got N = {p.n}, "
                          f"K = {p.k}")
    if not (isinstance(mf, cp.ndarray) and mf.dtype == np.float32 and mf.size == i and mf.flags.c_contiguous):
        raise CudaOpError(f"mf must be a C-contiguous float32 array of {i} elements, got {mf.dtype} {mf.shape}")
    if not (isinstance(amax, cp.ndarray) and amax.dtype == np.uint32 and amax.size >= 1):
        raise CudaOpError("amax must be a uint32 array of at least one element")
    if sx.dtype != np.float32 or sx.size < 1:
        raise CudaOpError(f"gemv_pot_a8 needs sx as a float32 array of at least 1 element, got {sx.dtype} {sx.shape}")
    kargs.launch(POT_A8_FILE, f"gemv_pot3_a8<8, {DEFAULT[1]}, true>", (i // 4, 1), (32 * DEFAULT[1],),   # SILU_EXPR
                 words=p.words, scale=p.scale, tail=p.tail, stail=p.stail, x8=x8, sx=sx, out=None, N=p.n, KC=kc,
                 ldx=ldx, ldo=0, mf=mf, amax=amax, resid=None, tok_x=0)
    return mf


_BLOCK = 256                     # threads a block of the fp16-Ŵ path's elementwise kernels


def dequantize_pa8(p: PackedPotA8, out=None):
    """Ŵ (N, K) fp16 = fp16(s/4 · VALUES[code]) (formats.pot_a8.dequantized_f16, bit for bit), into
    gpu/wb.py's scratch unless out is given."""
    cp = require_cupy()
    w16 = scratch(cp, p.n * p.k).reshape(p.n, p.k) if out is None else out
    if w16.dtype != np.float16 or w16.shape != (p.n, p.k) or not w16.flags.c_contiguous or w16.data.ptr % 16:
        raise CudaOpError(f"dequantize_pa8 writes a C-contiguous, 16-byte aligned float16 ({p.n}, {p.k}) array, "
                          f"got {w16.dtype} {w16.shape}")
    kc = fmt.n_chunks(p.k)
    kargs.launch(POT_A8_FILE, "dequant_pot3_a8", (-(-kc // 128), p.n), (128,), words=p.words, scale=p.scale,
                 tail=p.tail, stail=p.stail, w16=w16, N=p.n, KC=kc, K=p.k)
    return w16


def gemm_pot_a8(x8, sx, p: PackedPotA8, out, resid=None) -> bool:
    """out (M, N) fp16 = fp16(sx[m] · (x8[m] · Ŵᵀ)) for many tokens without reading the weights once
    a token: Ŵ in fp16 (dequantize_pa8), x8's first K columns in fp16 (exact), cuBLAS in fp32
    (gpu/cublas.py, capturable), then the GEMV's epilogue. The GEMV's function up to the order of
    fp32 sums where p.f16_exact. With resid (float32 (M, N)), resid += float(fp16(that)) instead
    (out is then None). False (nothing run) without cuBLAS or p.f16_exact, or for operands
    gemv_pot_a8 would refuse: the caller runs the GEMV then."""
    cp = require_cupy()
    if not p.f16_exact or x8.ndim != 2 or 0 in (p.n, p.k) or not 0 < x8.shape[0] <= MAX_GRID_Y \
            or p.n > MAX_GRID_Y or not cublas.available():
        return False
    m, ldx = x8.shape
    dst, dtype = (out, np.float16) if resid is None else (resid, np.float32)
    if (x8.dtype != np.int8 or not x8.flags.c_contiguous or ldx < p.k or sx.dtype != np.float32 or sx.size < m
            or (out is not None and resid is not None) or dst is None or dst.dtype != dtype
            or dst.shape != (m, p.n) or not dst.flags.c_contiguous):
        return False
    xh = scratch(cp, m * p.k, name="pa8_x16").reshape(m, p.k)
    c32 = scratch(cp, m * p.n, np.float32, "pa8_c32").reshape(m, p.n)
    # eight columns a thread, four rows' outputs: vector loads where the widths and addresses allow
    vec_x = p.k % 8 == 0 and ldx % 8 == 0 and x8.data.ptr % 8 == 0 and xh.data.ptr % 16 == 0
    vec_y = p.n % 4 == 0 and c32.data.ptr % 16 == 0 and dst.data.ptr % (16 if resid is not None else 8) == 0
    kargs.launch(POT_A8_FILE, "rows_i8_to_f16", (-(-p.k // (8 * _BLOCK)), m), (_BLOCK,), x8=x8, xh=xh, K=p.k,
                 ldx=ldx, vec=int(vec_x))
    if not cublas.gemm_f16(cp, xh, dequantize_pa8(p), c32):
        return False
    kargs.launch(POT_A8_FILE, "scale_rows_pa8", (-(-p.n // (4 * _BLOCK)), m), (_BLOCK,), c32=c32, sx=sx, out=out,
                 resid=resid, N=p.n, vec=int(vec_y))
    return True
