"""Bit-plane packing of b-bit codes (b = 2, 3, 4), the layout of the "pot" and "int" kinds.

For every row n and every chunk c of 32 consecutive input channels, b uint32 words:
    planes[n, c, j] bit i  =  bit j of the code of weight (n, 32·c + i)
so planes has shape (N, ceil(K / 32), b) and a weight costs exactly b bits, 3 bits
included (no 10-codes-per-word waste). A GPU lane reads the b words of a chunk and owns
32 codes; a chunk never straddles a group for groups of 32, 64 or 128. Channels past K in
the last chunk hold code 0.
"""
from __future__ import annotations

import numpy as np

from .common import check

CHUNK = 32                   # codes per plane word
PLANE_BITS = (2, 3, 4)       # the code widths this layout is used for
GROUPS = (32, 64, 128)       # the group sizes of the bit-plane kinds: a plane word never straddles two
                             # groups, and a GPU tile (tiles.TILE_K) holds whole groups


def groups_text() -> str:
    return ", ".join(map(str, GROUPS[:-1])) + f" or {GROUPS[-1]}"


def check_group(name: str, group: int) -> None:
    """The one rule on a bit-plane kind's group size (the converter and the GPU launchers reuse GROUPS)."""
    check(group in GROUPS, f"{name} layers take groups of {groups_text()} channels, not {group}")


def n_chunks(k: int) -> int:
    return -(-k // CHUNK)


def pack_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) codes in 0..2^bits-1 -> (N, ceil(K/32), bits) uint32 bit planes."""
    codes = np.asarray(codes)
    check(codes.ndim == 2, f"bit-plane packing needs a 2-D (N, K) array, got shape {codes.shape}")
    check(bits in PLANE_BITS, f"bit planes hold 2-, 3- or 4-bit codes, not {bits}")
    c = codes.astype(np.int64)
    check(c.size == 0 or (int(c.min()) >= 0 and int(c.max()) < (1 << bits)),
          f"{bits}-bit codes must lie in 0..{(1 << bits) - 1}")
    n, k = c.shape
    kc = n_chunks(k)
    padded = np.zeros((n, kc * CHUNK), dtype=np.uint64)
    padded[:, :k] = c
    padded = padded.reshape(n, kc, CHUNK)                                  # (N, Kc, 32)
    weight = np.uint64(1) << np.arange(CHUNK, dtype=np.uint64)             # bit i of a word
    out = np.empty((n, kc, bits), dtype=np.uint32)
    for j in range(bits):
        plane = (padded >> np.uint64(j)) & np.uint64(1)                     # (N, Kc, 32)
        out[:, :, j] = (plane * weight).sum(axis=-1, dtype=np.uint64).astype(np.uint32)
    return out


def unpack_planes(planes: np.ndarray, bits: int, k: int, xp=np) -> np.ndarray:
    """(N, Kc, bits) uint32 -> (N, K) uint8 codes; the inverse of pack_planes. xp: the array
    module (CuPy unpacks on the GPU, engine/gpu/wb.py)."""
    p = xp.asarray(planes, dtype=xp.uint32)
    n, kc, _ = p.shape
    shifts = xp.arange(CHUNK, dtype=xp.uint32)
    codes = xp.zeros((n, kc, CHUNK), dtype=xp.uint8)
    for j in range(bits):
        codes |= (((p[:, :, j, None] >> shifts) & np.uint32(1)).astype(xp.uint8) << np.uint8(j))
    return codes.reshape(n, kc * CHUNK)[:, :k]


def padding_is_zero(planes: np.ndarray, k: int) -> bool:
    """Whether the channels past K in the last chunk hold code 0 (the canonical form)."""
    tail = k % CHUNK
    if tail == 0 or planes.size == 0:
        return True
    mask = np.uint32((0xFFFFFFFF << tail) & 0xFFFFFFFF)
    return not (planes[:, -1, :] & mask).any()
