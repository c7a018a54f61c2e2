"""Launcher of cuda/gemv_pot_a8.cu: W3-PoT weights × one INT8 token (dp4a GEMV, M = 1). Standalone:
the model does not use it yet; `python -m engine.bench gemv-wb --kinds pot3,pot3a8 --ms 1` times it.

Name triplet: formats.pot_a8.gemv_pot_a8_ref ↔ gemv_pot3_a8<RB, NW> ↔ gemv_pot_a8. The layout
(three word planes a 32-channel chunk) is made on the host by formats.pot_a8.pack_pot_a8.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import pot_a8 as fmt
from . import kargs
from .backend import require_cupy
from .ops import CudaOpError

# (RB rows a block, NW warps a block): the instantiations; DEFAULT until a GPU has timed them
VARIANTS = ((4, 4), (8, 4), (4, 8), (8, 8))
DEFAULT = (8, 4)
POT_A8_EXPRS = tuple(f"gemv_pot3_a8<{rb}, {nw}>" for rb, nw in VARIANTS)
POT_A8_FILE = kargs.KernelFile("gemv_pot_a8.cu", POT_A8_EXPRS)


@dataclass
class PackedPotA8:
    """A pot3 layer on the GPU in the pot3-a8 layout: words (T, S, 3, 8, 32) uint32, scale (T, S, 8, 8)
    fp16, T = ceil(N / 8) (formats.pot_a8.pack_pot_a8, pack_scales)."""
    n: int
    k: int
    words: object
    scale: object

    def nbytes(self) -> int:
        return int(self.words.nbytes + self.scale.nbytes)


def upload(words: np.ndarray, scale: np.ndarray, n: int, k: int) -> PackedPotA8:
    """Host arrays (formats.pot_a8.pack_pot_a8 and pack_scales, or from_pot3) -> the GPU."""
    cp = require_cupy()
    t, s = fmt.n_tiles(n), fmt.n_steps(k)
    if words.shape != (t, s, fmt.WORDS, fmt.TILE_ROWS, fmt.STEP) or scale.shape != (t, s, fmt.TILE_ROWS, 8):
        raise CudaOpError(f"pot3-a8 words {words.shape} and scales {scale.shape} do not make a {n}×{k} layer")
    return PackedPotA8(n, k, cp.ascontiguousarray(cp.asarray(words, dtype=cp.uint32)),
                       cp.ascontiguousarray(cp.asarray(scale, dtype=cp.float16)))


def gemv_pot_a8(x8, sx, p: PackedPotA8, out=None, variant: tuple[int, int] | None = None):
    """out (N,) fp16 = sx · (x8 · Ŵᵀ) for one token: x8 int8 with at least 32·Kc bytes (its
    bytes past K meet code 0), 16-byte aligned; sx (≥ 1,) float32 on the GPU; variant (RB, NW)
    one of VARIANTS (default DEFAULT)."""
    cp = require_cupy()
    rb, nw = variant or DEFAULT
    if (rb, nw) not in VARIANTS:
        raise CudaOpError(f"gemv_pot_a8 variant {(rb, nw)} is not among {VARIANTS}")
    kc = fmt.n_chunks(p.k)
    if x8.dtype != np.int8 or not x8.flags.c_contiguous or x8.size < 32 * kc or x8.data.ptr % 16:
        raise CudaOpError(f"gemv_pot_a8 needs x8 as a C-contiguous 16-byte aligned int8 array of at least "
                          f"{32 * kc} bytes (K = {p.k} padded to 32), got {x8.dtype} {x8.shape}")
    if sx.dtype != np.float32 or sx.size < 1:
        raise CudaOpError(f"gemv_pot_a8 needs sx as a float32 array of at least one element, got {sx.dtype} {sx.shape}")
    out = cp.empty((p.n,), dtype=cp.float16) if out is None else out
    if out.dtype != np.float16 or out.shape != (p.n,) or not out.flags.c_contiguous:
        raise CudaOpError(f"gemv_pot_a8 writes a C-contiguous float16 ({p.n},) array, got {out.dtype} {out.shape}")
    if p.n == 0 or p.k == 0:
        out.fill(0)
        return out
    kargs.launch(POT_A8_FILE, f"gemv_pot3_a8<{rb}, {nw}>", (-(-p.n // rb),), (32 * nw,), words=p.words,
                 scale=p.scale, x8=x8, sx=sx, out=out, N=p.n, KC=kc)
    return out
