"""W3-PoT weights against one INT8 token: the layout of cuda/gemv_pot_a8.cu and its NumPy reference.

A pot3 weight (engine/formats/pot.py) is ŵ = s · unit(code) with units {0, +1, +½, +¼, +2 (the
spare code), −1, −½, −¼} for codes 0..7, so 4·unit is an exact small integer:
    VALUES[code] = 0, +4, +2, +1, +8, −4, −2, −1       ŵ = (s / 4) · VALUES[code]
The spare level needs no per-group sign here: its unit is always +2 and the group's side comes
from the sign of s, which multiplies an fp32 partial sum. With x ≈ sx · x8 (INT8 per token),
    y[n] = sx · Σ_g (s[n,g] / 4) · Σ_{k∈g} VALUES[code[n,k]] · x8[k],
the inner sums exact in int32 (|Σ| ≤ 32·8·128 a chunk), computed by dp4a.

Layout ("pot3-a8 words"). K is cut into chunks of 32 consecutive channels (the last padded
with code 0); each (row n, chunk c) is three 32-bit words. A warp step is 32 chunks (1024
channels), and the words are stored by tiles of 8 rows, step by step, each word's 32 chunks
together:
    words[t, st, j, r, l] = word j of chunk 32·st + l of row 8t + r
    (ceil(N / 8), S, 3, 8, 32) uint32,  S = ceil(Kc / 32),  Kc = ceil(K / 32)
(zero past Kc and past N), so the lanes of a warp reading word j of one step of one row read 128
contiguous bytes, and every line a block of 8 (or 4) rows reads in a step lies at a fixed offset
from one pointer (no per-row address arithmetic in the kernel). Inside a chunk, channel i = 0..31:
    i = 8j + q  (i < 24):  the 3-bit code in bits 0-2 of nibble q of word j
    i = 24 + q  (q < 8):   bit b of the code in bit 3 of nibble q of word b
Why: the kernel's prmt looks codes up in an 8-byte table, four selectors (nibbles) a prmt, and a
selector nibble's bit 3 must be 0 (it switches prmt to sign replication). `w & 0x77777777` is
then the selectors of channels 8j..8j+7 (low half: 8j..8j+3, high half: 8j+4..8j+7), and
    e = ((w0 >> 3) & 0x11111111) | ((w1 >> 2) & 0x22222222) | ((w2 >> 1) & 0x44444444)
those of channels 24..31. Selector half h of word j feeds the four int8 of channels 4(2j+h) ..
4(2j+h)+3 in byte order, i.e. dp4a against the token's x8 word 2j+h: the k order is natural
and a lane's x is one plain 32-byte read.

Scales: groups of 128 (chunk c lies in group c >> 2), the layer's wscale (N, G) float16 tiled
alike, zero-padded: scales[t, st, r, q] = s[8t + r, 8·st + q], (ceil(N / 8), S, 8, 8) float16.
Lanes past Kc meet zero words and the kernel clamps their x to the last chunk: their dot is 0.

The kernel's order of sums, which `gemv_pot_a8_ref` reproduces bit for bit: lane l of warp w
takes chunks 32·st + l of the steps st = w, w + NW, w + 2·NW, ..., and per row acc = fma(s[n, c
>> 2], float(dot), acc) in fp32 (a chunk at a time); then a butterfly over the warp's lanes
(xor 16, 8, 4, 2, 1), the warps' sums added in order 0..NW-1, and y = fp16(sum · (0.25 · sx)).
"""
from __future__ import annotations

import numpy as np

from .common import check
from .planes import unpack_planes

CHUNK = 32                   # channels of a (row, chunk): three words
WORDS = 3                    # words a chunk
STEP = 32                    # chunks a warp step (one a lane)
TILE_ROWS = 8                # rows a tile of the layout
GROUP = 128                  # channels a scale (a chunk's group: c >> 2)
BITS = 3
VALUES = np.array([0, 4, 2, 1, 8, -4, -2, -1], dtype=np.int8)     # 4 · pot3 unit, code 0..7
LUT_LO = int(VALUES[:4].view(np.uint8).view("<u4")[0])            # 0x01020400: bytes of codes 0..3
LUT_HI = int(VALUES[4:].view(np.uint8).view("<u4")[0])            # 0xFFFEFC08: codes 4..7
LOW3 = 0x77777777            # the selectors of the 24 codes held in bits 0-2 of the nibbles


def n_chunks(k: int) -> int:
    return -(-k // CHUNK)


def n_steps(k: int) -> int:
    return -(-n_chunks(k) // STEP)


def n_tiles(n: int) -> int:
    return -(-n // TILE_ROWS)


def pack_pot_a8(codes: np.ndarray) -> np.ndarray:
    """(N, K) pot3 codes 0..7 -> (ceil(N/8), S, 3, 8, 32) uint32 words (module docstring)."""
    codes = np.asarray(codes)
    check(codes.ndim == 2, f"pot3-a8 packing needs a 2-D (N, K) array, got shape {codes.shape}")
    check(codes.size == 0 or (int(codes.min()) >= 0 and int(codes.max()) < 8), "pot3 codes must lie in 0..7")
    n, k = codes.shape
    t, s = n_tiles(n), n_steps(k)
    c = np.zeros((t * TILE_ROWS, s * STEP * CHUNK), dtype=np.uint32)
    c[:n, :k] = codes
    c = c.reshape(t, TILE_ROWS, s, STEP, CHUNK).transpose(0, 2, 1, 3, 4)   # (T, S, 8 rows, 32 lanes, 32 channels)
    nib = np.uint32(4) * np.arange(8, dtype=np.uint32)                     # nibble q starts at bit 4q
    out = np.empty((t, s, WORDS, TILE_ROWS, STEP), dtype=np.uint32)
    extra = c[..., 24:]                                                    # channels 24..31 of each chunk
    for j in range(WORDS):
        low = (c[..., 8 * j:8 * j + 8] << nib).sum(axis=-1, dtype=np.uint64)                # bits 0-2 of nibble q
        top = ((((extra >> np.uint32(j)) & np.uint32(1)) << np.uint32(3)) << nib).sum(axis=-1, dtype=np.uint64)
        out[:, :, j] = (low | top).astype(np.uint32)
    return out


def unpack_pot_a8(words: np.ndarray, n: int, k: int) -> np.ndarray:
    """(ceil(N/8), S, 3, 8, 32) uint32 -> (N, K) uint8 codes; the inverse of pack_pot_a8."""
    p = np.asarray(words, dtype=np.uint32)
    check(p.ndim == 5 and p.shape[2:] == (WORDS, TILE_ROWS, STEP),
          f"pot3-a8 words are (T, S, 3, 8, 32), got shape {p.shape}")
    t, s = p.shape[:2]
    check(s == n_steps(k) and t == n_tiles(n), f"pot3-a8 words of shape {p.shape} cannot hold {n}×{k}")
    nib = np.uint32(4) * np.arange(8, dtype=np.uint32)
    codes = np.zeros((t, s, TILE_ROWS, STEP, CHUNK), dtype=np.uint8)
    for j in range(WORDS):
        nibbles = (p[:, :, j, :, :, None] >> nib) & np.uint32(0xF)       # (T, S, 8, 32, 8)
        codes[..., 8 * j:8 * j + 8] = (nibbles & np.uint32(7)).astype(np.uint8)
        codes[..., 24:] |= (((nibbles >> np.uint32(3)) & np.uint32(1)) << np.uint32(j)).astype(np.uint8)
    return codes.transpose(0, 2, 1, 3, 4).reshape(t * TILE_ROWS, s * STEP * CHUNK)[:n, :k]


def pack_scales(wscale: np.ndarray, k: int) -> np.ndarray:
    """(N, ceil(K/128)) float16 group scales -> (ceil(N/8), S, 8, 8) float16, zero-padded."""
    w = np.asarray(wscale, dtype=np.float16)
    g = -(-k // GROUP)
    check(w.ndim == 2 and w.shape[1] == g, f"pot3-a8 scales must be (N, {g}) for K = {k} in groups of {GROUP}")
    n, t, s = w.shape[0], n_tiles(w.shape[0]), n_steps(k)
    per = STEP * CHUNK // GROUP                                            # groups a step: 8
    out = np.zeros((t * TILE_ROWS, s * per), dtype=np.float16)
    out[:n, :g] = w
    return np.ascontiguousarray(out.reshape(t, TILE_ROWS, s, per).transpose(0, 2, 1, 3))


def unpack_scales(scales: np.ndarray, n: int, k: int) -> np.ndarray:
    """The inverse of pack_scales: (N, ceil(K/128)) float16."""
    t, s, r, per = scales.shape
    return np.asarray(scales).transpose(0, 2, 1, 3).reshape(t * r, s * per)[:n, :-(-k // GROUP)]


def from_pot3(qweight: np.ndarray, wscale: np.ndarray, k: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """A pot3 layer's bit planes (N, Kc, 3) and scales (N, G) -> (words, scales) of this layout."""
    check(group == GROUP, f"pot3-a8 takes groups of {GROUP} channels, not {group}")
    return pack_pot_a8(unpack_planes(qweight, BITS, k)), pack_scales(wscale, k)


# ----------------------------------------------------------------- the kernel's bit tricks, word for word

def selectors(w0, w1, w2) -> list:
    """The eight prmt selectors of a chunk (uint32 arrays, only the low 16 bits count), in the
    order of the token's x8 words 0..7 (channels 4i..4i+3): as cuda/gemv_pot_a8.cu pa8_chunk."""
    u = np.uint32
    m = [np.asarray(w, dtype=u) & u(LOW3) for w in (w0, w1, w2)]
    e = (((np.asarray(w0, dtype=u) >> u(3)) & u(0x11111111)) | ((np.asarray(w1, dtype=u) >> u(2)) & u(0x22222222))
         | ((np.asarray(w2, dtype=u) >> u(1)) & u(0x44444444)))
    return [m[0], m[0] >> u(16), m[1], m[1] >> u(16), m[2], m[2] >> u(16), e, e >> u(16)]


def prmt(a, b, sel):
    """PTX prmt.b32 (generic mode) on uint32 arrays: result byte i is byte (nibble i of sel) & 7 of
    the 8 bytes {b, a} (a = bytes 0-3), or, where the nibble's bit 3 is set, that byte's sign
    bit replicated (0x00 or 0xFF)."""
    u = np.uint32
    a, b, sel = (np.asarray(v, dtype=u) for v in (a, b, sel))
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(np.broadcast(a, b, sel).shape, dtype=u)
    for i in range(4):
        nib = (sel >> u(4 * i)) & u(0xF)
        byte = ((src >> ((nib & u(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)).astype(u)
        byte = np.where(nib & u(8), np.where(byte & u(0x80), u(0xFF), u(0)), byte)
        out |= byte << u(8 * i)
    return out


def dp4a(a, b, c):
    """dp4a.s32.s32: c + Σ_i a.byte[i] · b.byte[i], the bytes signed (uint32 a, b; int64 c)."""
    a8 = np.asarray(a, dtype="<u4")[..., None].view(np.int8).astype(np.int64)      # (..., 4)
    b8 = np.asarray(b, dtype="<u4")[..., None].view(np.int8).astype(np.int64)
    return np.asarray(c, dtype=np.int64) + (a8 * b8).sum(axis=-1)


def chunk_dot_emulated(w: np.ndarray, xw: np.ndarray) -> np.ndarray:
    """The kernel's int32 dot of chunks: w (..., 3) uint32 words, xw (..., 8) uint32 words of x8
    (channel 4i + b in byte b of word i) -> (...) int64, by the kernel's instructions."""
    sels = selectors(w[..., 0], w[..., 1], w[..., 2])
    d = np.zeros(w.shape[:-1], dtype=np.int64)
    for i, s in enumerate(sels):
        d = dp4a(prmt(LUT_LO, LUT_HI, s), xw[..., i], d)
    return d


# ----------------------------------------------------------------- the reference GEMV

def chunk_dots(words: np.ndarray, n: int, x8: np.ndarray) -> np.ndarray:
    """(N, S·32) int64: Σ over each chunk of VALUES[code] · x8 (chunks past K: 0)."""
    s = words.shape[1]
    kc = s * STEP
    w = VALUES[unpack_pot_a8(words, n, kc * CHUNK)].astype(np.int32).reshape(n, kc, CHUNK)
    xp = np.zeros(kc * CHUNK, dtype=np.int32)
    x = np.asarray(x8, dtype=np.int32).reshape(-1)[:kc * CHUNK]
    xp[:x.size] = x
    return np.einsum("nci,ci->nc", w, xp.reshape(kc, CHUNK), dtype=np.int64)


def fma32(a, b, c) -> np.ndarray:
    """Correctly rounded float32 fma(a, b, c) (CUDA fmaf): a·b is exact in float64; the sum is
    rounded to odd in float64 (a TwoSum's error decides the last bit), which then rounds to
    float32 exactly as one rounding of the exact result would (53 ≥ 24 + 2)."""
    p = np.asarray(a, dtype=np.float32).astype(np.float64) * np.asarray(b, dtype=np.float32).astype(np.float64)
    c = np.asarray(c, dtype=np.float32).astype(np.float64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even & np.isfinite(s)
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def gemv_pot_a8_ref(words: np.ndarray, scale: np.ndarray, x8: np.ndarray, sx: float, n: int, k: int,
                    nw: int) -> np.ndarray:
    """(N,) float16 y = W·x as cuda/gemv_pot_a8.cu gemv_pot3_a8<RB, NW = nw> computes it, bit for
    bit (the order of sums in the module docstring; RB does not change it). words, scale: as
    pack_pot_a8 and pack_scales make them; x8: the token's K int8 (more are ignored); sx: its scale."""
    s = words.shape[1]
    kc = n_chunks(k)
    dots = chunk_dots(words, n, np.asarray(x8).reshape(-1)[:k]).astype(np.float32)
    s32 = np.zeros((n, s * STEP * CHUNK // GROUP), dtype=np.float32)     # (N, 8S), zero past the last group
    s32[:, :-(-k // GROUP)] = unpack_scales(scale, n, k)
    acc = np.zeros((n, nw, 32), dtype=np.float32)                       # lane l of warp w
    for st in range(s):
        c = STEP * st + np.arange(STEP)
        ok = c < kc                                                     # lanes past Kc add fma(s, 0, acc) = acc
        cc = c[ok]
        acc[:, st % nw, ok] = fma32(s32[:, cc >> 2], dots[:, cc], acc[:, st % nw, ok])
    lanes = np.arange(32)
    for off in (16, 8, 4, 2, 1):                                        # __shfl_xor_sync butterfly
        acc = acc + acc[:, :, lanes ^ off]
    tot = acc[:, 0, 0]
    for w in range(1, nw):
        tot = tot + acc[:, w, 0]
    return (tot * np.float32(np.float32(0.25) * np.float32(sx))).astype(np.float16)


def dequantized(words: np.ndarray, scale: np.ndarray, n: int, k: int) -> np.ndarray:
    """Ŵ (N, K) float64 = s · unit(code) (words, scale as pack_pot_a8, pack_scales make them)."""
    codes = unpack_pot_a8(words, n, k)
    s = np.repeat(unpack_scales(scale, n, k).astype(np.float64), GROUP, axis=1)[:, :k]
    return VALUES[codes].astype(np.float64) / 4.0 * s
