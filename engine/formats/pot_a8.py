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
channels); the S = Kc // 32 full steps are stored by tiles of 8 rows, step by step, each word's
32 chunks together:
    words[t, st, j, r, l] = word j of chunk 32·st + l of row 8t + r
    (ceil(N / 8), S, 3, 8, 32) uint32,  S = Kc // 32,  Kc = ceil(K / 32)
(zero past N), so the lanes of a warp reading word j of one step of one row read 128 contiguous
bytes, and every line a block of 8 (or 4) rows reads in a step lies at a fixed offset from one
pointer (no per-row address arithmetic in the kernel). The last L = Kc % 32 chunks (a partial
step, "the tail"; none when L = 0) are stored alike without the padding to a step:
    tail[t, j, r, l] = word j of chunk 32·S + l of row 8t + r        (ceil(N / 8), 3, 8, L) uint32
so a layer holds K padded to 32 channels, not to 1024 (with the last step padded, SmolLM2's K = 576
took 1024 channels a row and the model 5.21 bits a weight on the GPU; now 3.135, as its file).
`words` below is the pair (words, tail) as pack_pot_a8 makes it. Inside a chunk, channel i = 0..31:
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
alike: scales[t, st, r, q] = s[8t + r, 8·st + q], (ceil(N / 8), S, 8, 8) float16, and those of
the tail row by row, stail[n, q] = s[n, 8·S + q], (8·ceil(N / 8), ceil(L / 4)) float16 (zero past
N): 8·S + ceil(L / 4) = G, no group padded. `scale` below is the pair (scales, stail). The kernel
reads the tail with lanes l < L only: lanes past Kc add nothing.

The kernel's order of sums, which `gemv_pot_a8_ref` reproduces bit for bit: lane l of warp w
takes chunks 32·st + l < Kc of the steps st = w, w + NW, w + 2·NW, ... (the tail is step S, the
last of warp S % NW), and per row acc = fma(s[n, c >> 2], float(dot), acc) in fp32 (a chunk at a
time); then a butterfly over the warp's lanes (xor 16, 8, 4, 2, 1), the warps' sums added in order
0..NW-1, and y = fp16(sum · (0.25 · sx)).
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
PER_STEP = STEP * CHUNK // GROUP     # groups a full step: 8
PER_LANE = GROUP // CHUNK            # chunks a group: 4 (lane l's group in its step is l // 4)
BITS = 3
VALUES = np.array([0, 4, 2, 1, 8, -4, -2, -1], dtype=np.int8)     # 4 · pot3 unit, code 0..7
LUT_LO = int(VALUES[:4].view(np.uint8).view("<u4")[0])            # 0x01020400: bytes of codes 0..3
LUT_HI = int(VALUES[4:].view(np.uint8).view("<u4")[0])            # 0xFFFEFC08: codes 4..7
LOW3 = 0x77777777            # the selectors of the 24 codes held in bits 0-2 of the nibbles


def takes(bits: int, group: int) -> bool:
    """Whether this layout (the W3-PoT × INT8 GEMV) holds pot<bits> layers in groups of `group`: pot3
    in groups of GROUP only. The one rule the converter's GPU check (converters.quantize.gpu_refusal)
    and the GPU's loader (engine.gpu.linear.GpuLinear) apply."""
    return (int(bits), int(group)) == (3, GROUP)


def n_chunks(k: int) -> int:
    return -(-k // CHUNK)


def n_full_steps(k: int) -> int:
    """S: the warp steps of 32 chunks stored in `words` (the kernel's main loop)."""
    return n_chunks(k) // STEP


def n_tail(k: int) -> int:
    """L: the chunks past the full steps, stored in `tail` (lanes 0..L-1 of one more step)."""
    return n_chunks(k) % STEP


def n_tail_groups(k: int) -> int:
    return -(-n_tail(k) // PER_LANE)


def n_tiles(n: int) -> int:
    return -(-n // TILE_ROWS)


def shapes(n: int, k: int) -> tuple[tuple, tuple]:
    """((words, tail), (scales, stail)): the array shapes an n×k layer takes in this layout."""
    t, s, L = n_tiles(n), n_full_steps(k), n_tail(k)
    return (((t, s, WORDS, TILE_ROWS, STEP), (t, WORDS, TILE_ROWS, L)),
            ((t, s, TILE_ROWS, PER_STEP), (t * TILE_ROWS, n_tail_groups(k))))


def chunk_words(c: np.ndarray) -> np.ndarray:
    """(..., 32) codes 0..7 of chunks -> (..., 3) uint32 words (module docstring)."""
    c = np.asarray(c, dtype=np.uint32)
    nib = np.uint32(4) * np.arange(8, dtype=np.uint32)                     # nibble q starts at bit 4q
    extra = c[..., 24:]                                                    # channels 24..31 of each chunk
    out = np.empty(c.shape[:-1] + (WORDS,), dtype=np.uint32)
    for j in range(WORDS):
        low = (c[..., 8 * j:8 * j + 8] << nib).sum(axis=-1, dtype=np.uint64)                # bits 0-2 of nibble q
        top = ((((extra >> np.uint32(j)) & np.uint32(1)) << np.uint32(3)) << nib).sum(axis=-1, dtype=np.uint64)
        out[..., j] = (low | top).astype(np.uint32)
    return out


def word_codes(w: np.ndarray) -> np.ndarray:
    """The inverse of chunk_words: (..., 3) uint32 -> (..., 32) uint8 codes."""
    w = np.asarray(w, dtype=np.uint32)
    nib = np.uint32(4) * np.arange(8, dtype=np.uint32)
    codes = np.zeros(w.shape[:-1] + (CHUNK,), dtype=np.uint8)
    for j in range(WORDS):
        nibbles = (w[..., j, None] >> nib) & np.uint32(0xF)               # (..., 8)
        codes[..., 8 * j:8 * j + 8] = (nibbles & np.uint32(7)).astype(np.uint8)
        codes[..., 24:] |= (((nibbles >> np.uint32(3)) & np.uint32(1)) << np.uint32(j)).astype(np.uint8)
    return codes


def pack_pot_a8(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) pot3 codes 0..7 -> words (ceil(N/8), S, 3, 8, 32) and tail (ceil(N/8), 3, 8, L) uint32
    (module docstring)."""
    codes = np.asarray(codes)
    check(codes.ndim == 2, f"pot3-a8 packing needs a 2-D (N, K) array, got shape {codes.shape}")
    check(codes.size == 0 or (int(codes.min()) >= 0 and int(codes.max()) < 8), "pot3 codes must lie in 0..7")
    n, k = codes.shape
    t, s, kc = n_tiles(n), n_full_steps(k), n_chunks(k)
    c = np.zeros((t * TILE_ROWS, kc * CHUNK), dtype=np.uint8)
    c[:n, :k] = codes
    w = chunk_words(c.reshape(t, TILE_ROWS, kc, CHUNK))                    # (T, 8 rows, Kc, 3)
    full = w[:, :, :s * STEP].reshape(t, TILE_ROWS, s, STEP, WORDS).transpose(0, 2, 4, 1, 3)   # (T, S, 3, 8, 32)
    tail = w[:, :, s * STEP:].transpose(0, 3, 1, 2)                        # (T, 3, 8, L)
    return np.ascontiguousarray(full), np.ascontiguousarray(tail)


def _check_words(words, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    check(isinstance(words, (tuple, list)) and len(words) == 2,
          "pot3-a8 words are a pair (words, tail) as pack_pot_a8 makes it")
    full, tail = (np.asarray(a, dtype=np.uint32) for a in words)
    want = shapes(n, k)[0]
    check((full.shape, tail.shape) == want,
          f"pot3-a8 words {full.shape} and tail {tail.shape} cannot hold {n}×{k}: they are "
          f"{want[0]} and {want[1]}")
    return full, tail


def unpack_pot_a8(words: tuple[np.ndarray, np.ndarray], n: int, k: int) -> np.ndarray:
    """(words, tail) -> (N, K) uint8 codes; the inverse of pack_pot_a8."""
    full, tail = _check_words(words, n, k)
    t, s = full.shape[:2]
    w = np.concatenate([full.transpose(0, 3, 1, 4, 2).reshape(t, TILE_ROWS, s * STEP, WORDS),     # (T, 8, Kc, 3)
                        tail.transpose(0, 2, 3, 1)], axis=2)
    return word_codes(w).reshape(t * TILE_ROWS, -1)[:n, :k]


def pack_scales(wscale: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, ceil(K/128)) float16 group scales -> scales (ceil(N/8), S, 8, 8) and stail
    (8·ceil(N/8), ceil(L/4)) float16, zero past N."""
    w = np.asarray(wscale, dtype=np.float16)
    g = -(-k // GROUP)
    check(w.ndim == 2 and w.shape[1] == g, f"pot3-a8 scales must be (N, {g}) for K = {k} in groups of {GROUP}")
    n, t, s = w.shape[0], n_tiles(w.shape[0]), n_full_steps(k)
    assert s * PER_STEP + n_tail_groups(k) == g                           # no group padded
    out = np.zeros((t * TILE_ROWS, g), dtype=np.float16)
    out[:n] = w
    full = out[:, :s * PER_STEP].reshape(t, TILE_ROWS, s, PER_STEP).transpose(0, 2, 1, 3)   # (T, S, 8, 8)
    return np.ascontiguousarray(full), np.ascontiguousarray(out[:, s * PER_STEP:])


def unpack_scales(scale: tuple[np.ndarray, np.ndarray], n: int, k: int) -> np.ndarray:
    """The inverse of pack_scales: (N, ceil(K/128)) float16."""
    check(isinstance(scale, (tuple, list)) and len(scale) == 2,
          "pot3-a8 scales are a pair (scales, stail) as pack_scales makes it")
    full, tail = (np.asarray(a) for a in scale)
    check((full.shape, tail.shape) == shapes(n, k)[1],
          f"pot3-a8 scales {full.shape} and stail {tail.shape} cannot hold {n}×{k}")
    t, s = n_tiles(n), n_full_steps(k)
    return np.concatenate([full.transpose(0, 2, 1, 3).reshape(t * TILE_ROWS, s * PER_STEP), tail], axis=1)[:n]


def from_pot3(qweight: np.ndarray, wscale: np.ndarray, k: int, group: int) -> tuple[tuple, tuple]:
    """A pot3 layer's bit planes (N, Kc, 3) and scales (N, G) -> ((words, tail), (scales, stail))
    of this layout."""
    check(group == GROUP, f"pot3-a8 takes groups of {GROUP} channels, not {group}")
    return pack_pot_a8(unpack_planes(qweight, BITS, k)), pack_scales(wscale, k)


def nbytes(n: int, k: int) -> int:
    """Bytes an n×k layer holds in this layout: words, tail (uint32), scales and stail (fp16)."""
    (w, wt), (sc, st) = shapes(n, k)
    return 4 * (int(np.prod(w)) + int(np.prod(wt))) + 2 * (int(np.prod(sc)) + int(np.prod(st)))


# ----------------------------------------------------------------- the kernel's bit tricks, word for word

def selectors(w0, w1, w2) -> list:
    """The eight prmt selectors of a chunk (uint32 arrays, only the low 16 bits count), in the
    order of the token's x8 words 0..7 (channels 4i..4i+3): as cuda/gemv_pot_a8.cu pa8_weights and pa8_dot."""
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

def chunk_dots(words: tuple[np.ndarray, np.ndarray], n: int, x8: np.ndarray) -> np.ndarray:
    """(N, Kc) int64: Σ over each chunk of VALUES[code] · x8 (channels past K: code 0)."""
    kc = words[0].shape[1] * STEP + words[1].shape[-1]
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


def gemv_pot_a8_ref(words: tuple[np.ndarray, np.ndarray], scale: tuple[np.ndarray, np.ndarray], x8: np.ndarray,
                    sx: float, n: int, k: int, nw: int) -> np.ndarray:
    """(N,) float16 y = W·x as cuda/gemv_pot_a8.cu gemv_pot3_a8<RB, NW = nw> computes it, bit for
    bit (the order of sums in the module docstring; RB does not change it). words, scale: the pairs
    pack_pot_a8 and pack_scales make; x8: the token's K int8 (more are ignored); sx: its scale."""
    kc = n_chunks(k)
    s = -(-kc // STEP)                                                  # the full steps and the tail
    dots = chunk_dots(words, n, np.asarray(x8).reshape(-1)[:k]).astype(np.float32)
    s32 = np.zeros((n, s * PER_STEP), dtype=np.float32)                 # (N, 8s), zero past the last group
    s32[:, :-(-k // GROUP)] = unpack_scales(scale, n, k)
    acc = np.zeros((n, nw, 32), dtype=np.float32)                       # lane l of warp w
    for st in range(s):
        c = STEP * st + np.arange(STEP)
        ok = c < kc                                                     # lanes past Kc (the tail's) add nothing
        cc = c[ok]
        acc[:, st % nw, ok] = fma32(s32[:, cc >> 2], dots[:, cc], acc[:, st % nw, ok])
    lanes = np.arange(32)
    for off in (16, 8, 4, 2, 1):                                        # __shfl_xor_sync butterfly
        acc = acc + acc[:, :, lanes ^ off]
    tot = acc[:, 0, 0]
    for w in range(1, nw):
        tot = tot + acc[:, w, 0]
    return (tot * np.float32(np.float32(0.25) * np.float32(sx))).astype(np.float16)


def fp16_exact(scale: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether every weight s/4 · VALUES[code] of a layer with these scales (the pair pack_scales
    makes) is exact in fp16, so that dequantized_f16 is: s/4 representable (a subnormal too, where
    its bits fit) and 2|s| ≤ 65504 (the spare level); s/2 and s follow. Then the fp16-Ŵ path
    (cuda/gemv_pot_a8.cu dequant_pot3_a8 and cuBLAS) computes the GEMV's function up to the order
    of fp32 sums."""
    a = np.concatenate([np.asarray(x, dtype=np.float32).ravel() for x in scale])
    q = a * np.float32(0.25)
    return bool(np.isfinite(a).all() and (q.astype(np.float16).astype(np.float32) == q).all()
                and (2 * np.abs(a) <= 65504).all())


def dequantized_f16(words: tuple[np.ndarray, np.ndarray], scale: tuple[np.ndarray, np.ndarray], n: int,
                    k: int) -> np.ndarray:
    """Ŵ (N, K) float16 = fp16(s/4 · VALUES[code]) from float32 arithmetic, as cuda/gemv_pot_a8.cu
    dequant_pot3_a8 writes it, bit for bit (exact where fp16_exact). The kernel multiplies fp16(s)
    by the fp16 unit VALUES/4 in fp16 instead: one rounding of the same exact product, so the
    same bits for every finite scale (tests/test_pot_a8.py checks all 63488 finite fp16 patterns)."""
    codes = unpack_pot_a8(words, n, k)
    s = np.repeat(unpack_scales(scale, n, k).astype(np.float32) * np.float32(0.25), GROUP, axis=1)[:, :k]
    return (s * VALUES[codes].astype(np.float32)).astype(np.float16)


def dequantized(words: tuple[np.ndarray, np.ndarray], scale: tuple[np.ndarray, np.ndarray], n: int,
                k: int) -> np.ndarray:
    """Ŵ (N, K) float64 = s · unit(code) (words, scale: the pairs pack_pot_a8, pack_scales make)."""
    codes = unpack_pot_a8(words, n, k)
    s = np.repeat(unpack_scales(scale, n, k).astype(np.float64), GROUP, axis=1)[:, :k]
    return VALUES[codes].astype(np.float64) / 4.0 * s
