"""The GPU tile layout of b-bit codes (engine/formats/tiles.py) and, on the CPU, a word-for-word
model of how cuda/gemv_wb.cu decodes it (byte permutes, masks, fp16 magic numbers): every unit
weight the model builds must be the format's exact value. tests/test_wb_gpu.py runs the kernels."""
import numpy as np
import pytest

from engine.formats import tiles


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(16, 128), (33, 100), (8, 300), (40, 257), (1, 1)])
def test_tiles_round_trip(bits, n, k):
    rng = np.random.default_rng(bits * 1000 + n + k)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    t = tiles.tile_codes(codes, bits)
    nt, kt = tiles.tile_dims(n, k)
    assert t.dtype == np.uint32 and t.shape == (nt * kt * tiles.tile_words(bits),)
    np.testing.assert_array_equal(tiles.untile_codes(t, bits, n, k), codes)
    # exactly b bits a weight once the tiles are full
    if n % 16 == 0 and k % 128 == 0:
        assert t.nbytes * 8 == bits * n * k


def test_tile_groups_pairs_rows():
    n, k, group = 20, 256, 64
    v = np.arange(n * 4, dtype=np.float16).reshape(n, 4)
    t = tiles.tile_groups(v, n, k, group)                     # (NT, KT, G/tile, 8, 2)
    assert t.shape == (2, 2, 2, 8, 2)
    assert t[0, 1, 0, 3, 1] == v[8 + 3, 2]                     # row tile 0, k tile 1, first group, row g+8
    assert t[1, 0, 1, 2, 0] == v[16 + 2, 1]
    assert t[1, 0, 1, 5, 0] == 0                               # row 21 is padding


# ---------------------------------------------------------------- the kernel's decode, modelled


def prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32, generic mode: byte i = byte sel_i & 7 of {b:a}; bit 3 of sel_i replicates its sign."""
    src = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


LUT = {2: (0xBC403C00, 0), 3: (0x34383C00, 0xB4B8BC40), 4: (0x34383C00, 0x24282C30)}


def half2(v: int) -> tuple[float, float]:
    h = np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)
    return float(h[0]), float(h[1])


def spare(w0, w1, w2):
    return ((w0 >> 3) & 0x11111111) | ((w1 >> 2) & 0x22222222) | ((w2 >> 1) & 0x44444444)


def step_units(kind: str, bits: int, rw, s: int, z: int) -> list[float]:
    """wb_step: the four unit weights (e = 0..3) of step s of one row, as the kernel builds them."""
    sp = spare(*rw) if bits == 3 else 0
    w = rw[s // 4] if bits == 2 else (sp if bits == 3 and s >= 6 else rw[s // 2])
    half = (s % 4) // 2 if bits == 2 else s % 2
    sub = s % 2 if bits == 2 else 0
    if kind == "pot":
        sel = (w >> (16 * half + 2 * sub)) & (0x3333 if bits == 2 else 0x7777)
        r = prmt(*LUT[bits], sel)
        if bits == 4:
            r |= prmt((w << 4) & 0xFFFFFFFF, w, 0xFBEA if half else 0xD9C8) & 0x80808080
        lo, hi = prmt(r, 0, 0x1404), prmt(r, 0, 0x3424)
        return [*half2(lo), *half2(hi)]
    mask = {4: 0x00F0000F, 3: 0x00700007}.get(bits, 0x00C0000C if sub else 0x00300003)
    magic = 0x4C005C00 if sub else 0x54006400
    base = (256.0, 16.0) if sub else (1024.0, 64.0)
    units = []
    for byte in (2 * half, 2 * half + 1):
        p = (prmt(w, 0, 0x4040 + 0x0101 * byte) & mask) | magic
        a, b = half2(p)
        units += [np.float16(a) - np.float16(base[0] + z), np.float16(b) - np.float16(base[1] + z)]
    return [float(u) for u in units]


def pot_unit(code: int, bits: int) -> float:
    """The format's unit (engine/formats/pot.py PotKind.units), written out again here."""
    m, sign = code & ((1 << (bits - 1)) - 1), -1.0 if code >> (bits - 1) else 1.0
    if bits in (2, 3) and code == 1 << (bits - 1):
        return 2.0                                        # the spare code of pot2 and pot3
    return 0.0 if m == 0 else sign * 2.0 ** -(m - 1)


@pytest.mark.parametrize("kind", ["pot", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_decode_model_gives_exact_units(kind, bits):
    """Every lane, row and step of a random 16×128 tile (every code value many times)."""
    rng = np.random.default_rng(7 + bits)
    codes = rng.integers(0, 1 << bits, (16, 128)).astype(np.uint8)
    z = int(rng.integers(0, 1 << bits))
    t = tiles.tile_codes(codes, bits).astype(np.int64)
    words = np.concatenate([t[: 128].reshape(32, 4)] + ([t[128: 256].reshape(32, 4)] if bits == 4 else [])
                           + ([t[128: 192].reshape(32, 2)] if bits == 3 else []), axis=1)   # (32 lanes, 2b)
    for lane in range(32):
        g, tt = lane // 4, lane % 4
        for h, row in ((0, g), (1, g + 8)):
            rw = [int(v) for v in words[lane, h * bits: (h + 1) * bits]]
            for s in range(8):
                got = step_units(kind, bits, rw, s, z)
                c = codes[row, 16 * s + 4 * tt: 16 * s + 4 * tt + 4]
                want = [pot_unit(int(v), bits) if kind == "pot" else float(int(v) - z) for v in c]
                assert got == want, (lane, h, s, got, want)
