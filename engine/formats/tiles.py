"""The GPU tile layout of b-bit codes (b = 2, 3, 4): what cuda/gemv_wb.cu reads.

The file keeps bit planes (planes.py: simple, exactly b bits a weight). The kernels read
tiles instead, made from the planes at load time (engine/gpu/wb.py runs this module on CuPy
arrays): one tile is 16 output rows × 128 input channels, 64·b uint32 words, and one warp of an
mma.sync.m16n8k16 loop reads a tile with one or two fully coalesced vector loads (512 + 256 B
at b = 3). Lane l = 4·g + t holds rows g and g + 8 of the tile and, of each row, the channels
    16·s + 4·t + e      (k-step s = 0..7, e = 0..3)
which are exactly the A-fragment elements of that lane in step s, with the MMA's k order
permuted so that a lane's four channels of a step are adjacent (one 8-byte load of x).

A lane's 2·b words: b for row g, then b for row g + 8. Of one row's 32 codes c[s][e]:
    b = 4   word j = 0..3:  nibble e = c[2j][e], nibble 4 + e = c[2j+1][e]
    b = 3   word j = 0..2:  nibble e = c[2j][e], nibble 4 + e = c[2j+1][e] in the low 3 bits;
            the codes of steps 6, 7 are "spare": bit j of spare code i (i = 4·(s-6) + e) is
            bit 3 of nibble i of word j
    b = 2   word j = 0..1:  nibble e, bits 0-1 = c[4j][e], bits 2-3 = c[4j+1][e];
            nibble 4 + e, bits 0-1 = c[4j+2][e], bits 2-3 = c[4j+3][e]
so the four codes of one step sit in the four nibbles of one 16-bit half, and one byte
permute (PRMT) with the selector `half & 0x7777` (0x3333 at b = 2) looks four codes up in an
8-entry table at once. In memory a tile is its 16-byte parts, each [lane][4 words], then an
8-byte part [lane][2 words] at b = 3; tiles are ordered [row tile][k tile].

Scales and zero points are regrouped alike: [row tile][k tile][group of the tile][g][row g,
row g + 8], so a lane reads the pair of its two rows with one load. Rows and channels past
(N, K) hold code 0 and scale 0.
"""
from __future__ import annotations

import numpy as np

TILE_ROWS = 16
TILE_K = 128
STEPS = 8                    # k16 steps of a tile


def tile_dims(n: int, k: int) -> tuple[int, int]:
    """(row tiles, k tiles)."""
    return -(-n // TILE_ROWS), -(-k // TILE_K)


def tile_words(bits: int) -> int:
    return 64 * bits


def _lane_codes(codes, n: int, k: int, xp):
    """(N, K) codes -> (NT, KT, 32 lanes, 2 rows, 8 steps, 4) uint32, zero padded."""
    nt, kt = tile_dims(n, k)
    c = xp.zeros((nt * TILE_ROWS, kt * TILE_K), dtype=xp.uint32)
    c[:n, :k] = codes
    c = c.reshape(nt, 2, 8, kt, STEPS, 4, 4)               # [nt, h, g, kt, s, t, e]
    c = c.transpose(0, 3, 2, 5, 1, 4, 6)                    # [nt, kt, g, t, h, s, e]
    return c.reshape(nt, kt, 32, 2, STEPS, 4)


def _row_words(c, bits: int, xp):
    """(..., 8 steps, 4) codes of one row -> (..., bits) words."""
    e4 = (4 * xp.arange(4, dtype=xp.uint32))
    if bits == 2:
        c = c.reshape(c.shape[:-2] + (2, 2, 2, 4))          # [word j, half, lo/hi pair, e]
        sh = e4 + 16 * xp.arange(2, dtype=xp.uint32)[:, None, None] + 2 * xp.arange(2, dtype=xp.uint32)[:, None]
        return (c << sh).sum(axis=(-3, -2, -1), dtype=xp.uint32)
    direct = 4 if bits == 4 else 3                          # words holding whole nibbles
    d = c[..., : 2 * direct, :].reshape(c.shape[:-2] + (direct, 2, 4))
    sh = e4 + 16 * xp.arange(2, dtype=xp.uint32)[:, None]
    words = (d << sh).sum(axis=(-2, -1), dtype=xp.uint32)   # (..., direct)
    if bits == 3:
        spare = c[..., 6:, :].reshape(c.shape[:-2] + (8,))  # spare code i = 4·(s-6) + e
        i4 = 4 * xp.arange(8, dtype=xp.uint32) + 3
        extra = [(((spare >> j) & 1) << i4).sum(axis=-1, dtype=xp.uint32) for j in range(3)]
        words = words | xp.stack(extra, axis=-1)
    return words


def tile_codes(codes, bits: int, xp=np):
    """(N, K) codes in 0..2^bits-1 -> flat uint32 tile words (tile_dims(N, K) tiles)."""
    n, k = codes.shape
    lanes = _lane_codes(codes, n, k, xp)                     # (NT, KT, 32, 2, 8, 4)
    w = _row_words(lanes, bits, xp).reshape(lanes.shape[:3] + (2 * bits,))    # (NT, KT, 32, 2b)
    parts = [w[..., i: i + 4] for i in range(0, 2 * bits - 3, 4)]
    if (2 * bits) % 4:
        parts.append(w[..., 2 * bits - 2:])
    return xp.concatenate([p.reshape(p.shape[:2] + (-1,)) for p in parts], axis=-1).reshape(-1)


def untile_codes(tiles, bits: int, n: int, k: int, xp=np):
    """The inverse of tile_codes: flat tile words -> (N, K) uint8 codes."""
    nt, kt = tile_dims(n, k)
    t = tiles.reshape(nt, kt, 64 * bits)
    parts, off = [], 0
    for width in [4] * ((2 * bits) // 4) + ([2] if (2 * bits) % 4 else []):
        parts.append(t[..., off: off + 32 * width].reshape(nt, kt, 32, width))
        off += 32 * width
    w = xp.concatenate(parts, axis=-1).reshape(nt, kt, 32, 2, bits)
    e4 = 4 * xp.arange(4, dtype=xp.uint32)
    if bits == 2:
        sh = e4 + 16 * xp.arange(2, dtype=xp.uint32)[:, None, None] + 2 * xp.arange(2, dtype=xp.uint32)[:, None]
        c = (w[..., None, None, None] >> sh) & 3                                 # [.., j, half, lo/hi, e]
    else:
        direct = 4 if bits == 4 else 3
        sh = e4 + 16 * xp.arange(2, dtype=xp.uint32)[:, None]
        c = (w[..., :direct, None, None] >> sh) & (15 if bits == 4 else 7)       # [.., j, half, e]
        if bits == 3:
            i4 = 4 * xp.arange(8, dtype=xp.uint32) + 3
            spare = sum((((w[..., j, None] >> i4) & 1) << j) for j in range(3))  # (.., 8)
            c = xp.concatenate([c, spare.reshape(spare.shape[:-1] + (1, 2, 4))], axis=-3)
    c = c.reshape(nt, kt, 8, 4, 2, STEPS, 4)                                     # [nt, kt, g, t, h, s, e]
    c = c.transpose(0, 4, 2, 1, 5, 3, 6).reshape(nt * TILE_ROWS, kt * TILE_K)
    return c[:n, :k].astype(xp.uint8)


def tile_groups(values, n: int, k: int, group: int, xp=np):
    """(N, G) per-group values (scales or zero points) -> (NT, KT, 128/group, 8, 2), zero padded."""
    nt, kt = tile_dims(n, k)
    gpt = TILE_K // group
    v = xp.zeros((nt * TILE_ROWS, kt * gpt), dtype=values.dtype)
    v[:n, : values.shape[1]] = values
    v = v.reshape(nt, 2, 8, kt, gpt).transpose(0, 3, 4, 2, 1)
    return xp.ascontiguousarray(v)
