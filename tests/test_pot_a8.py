"""The W3-PoT × INT8 layout (engine/formats/pot_a8.py) and the bit tricks of cuda/gemv_pot_a8.cu, on the CPU.

Round trips of the packing (odd shapes, K past a warp step, with and without a tail, the spare
code under both signs of the scale), the bytes a layer holds (SmolLM2's shapes within issue 15's
b + 0.2 bits), the kernel's selector masking, prmt lookup (with its sign-replicate rule) and dp4a
word for word against the code table, the exact fma emulation, and the reference GEMV against
a float64 W·x; the kernel's index arithmetic, read from its source, run for every block, warp
and lane of both variants against the layout, the tail included (check_kernel_offsets).
tests/test_pot_a8_gpu.py runs the kernel against the same reference.
"""
from __future__ import annotations

import hashlib
import re
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.formats import planes, pot
from engine.formats import pot_a8 as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))   # host_prefill, host_gemm: fake CuPys

SHAPES = [(1, 1), (5, 77), (8, 1024), (9, 1056), (16, 1100), (3, 4096), (13, 2080), (7, 576), (9, 1536), (4, 1000),
          (6, 3100), (3, 5000)]


def rand_layer(rng, n, k, spare_share=0.2):
    codes = rng.integers(0, 8, (n, k)).astype(np.uint8)
    codes[rng.random((n, k)) < spare_share] = pot.KINDS["pot3"].spare_code
    s = (rng.uniform(0.005, 0.05, (n, -(-k // 128))) * rng.choice([-1, 1], (n, -(-k // 128)))).astype(np.float16)
    return codes, s


def fp16_ulp(v):
    return np.spacing(np.abs(v).astype(np.float16)).astype(np.float64)


def test_values_are_four_times_the_pot3_units():
    assert np.array_equal(P.VALUES.astype(np.float32), 4 * pot.KINDS["pot3"].units())
    assert (P.LUT_LO, P.LUT_HI) == (0x01020400, 0xFFFEFC08)


@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_round_trip(n, k):
    rng = np.random.default_rng(n * 7919 + k)
    codes, s = rand_layer(rng, n, k)
    w = P.pack_pot_a8(codes)
    kc, nt = P.n_chunks(k), P.n_tiles(n)
    steps, tl = kc // 32, kc % 32
    assert (P.n_full_steps(k), P.n_tail(k), P.n_tail_groups(k)) == (steps, tl, -(-tl // 4))
    assert [a.shape for a in w] == [(nt, steps, 3, 8, 32), (nt, 3, 8, tl)]
    assert np.array_equal(P.unpack_pot_a8(w, n, k), codes)
    # everything past K (to the chunk) and past N is code 0 (the kernel reads it as weight 0)
    full = P.unpack_pot_a8(w, nt * 8, kc * 32)
    assert not full[n:].any() and not full[:, k:].any()
    # the tail is word for word the chunks 32·S.. of the rows, as a full step would hold them
    padded = P.pack_pot_a8(np.pad(codes, ((0, 0), (0, (steps + 1) * 1024 - k))))[0]
    assert np.array_equal(w[1], padded[:, steps, :, :, :tl])
    sp = P.pack_scales(s, k)
    assert [a.shape for a in sp] == [(nt, steps, 8, 8), (8 * nt, -(-tl // 4))]
    assert np.array_equal(P.unpack_scales(sp, n, k), s)
    assert sum(np.count_nonzero(a) for a in sp) == np.count_nonzero(s)
    assert sum(a.nbytes for a in w + sp) == P.nbytes(n, k) == nt * 8 * (12 * kc + 2 * -(-k // 128))


def test_layout_checks_its_shapes():
    codes, s = rand_layer(np.random.default_rng(0), 9, 1100)
    w, sp = P.pack_pot_a8(codes), P.pack_scales(s, 1100)
    with pytest.raises(ValueError, match="cannot hold 9×1200"):
        P.unpack_pot_a8(w, 9, 1200)
    with pytest.raises(ValueError, match="a pair"):
        P.unpack_pot_a8(w[0], 9, 1100)
    with pytest.raises(ValueError, match="cannot hold 17×1100"):
        P.unpack_scales(sp, 17, 1100)


# SmolLM2-135M's linears (q|k|v, o, gate|up, down: N×K) and Llama-2-7B's, with the bits a weight the
# pot3-a8 layout holds on the GPU (words, tail, scales: 3 + 16/128 = 3.125 where K % 128 == 0)
SMOLLM2_SHAPES = [(960, 576), (576, 576), (3072, 576), (1536, 576), (576, 1536)]
LLAMA7B_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]


def test_pot3_g128_bits_a_weight_on_the_gpu(monkeypatch):
    """Issue 15's memory bar, b + 0.2 = 3.2 bits a weight for pot3 g128, holds for SmolLM2's shapes
    (K = 576 and 1536, where a layout padded to warp steps of 1024 channels held 5.21) as
    gpu/pot_a8.upload holds them from a pot3 layer's planes (fake CuPy), and for 7B's."""
    import host_prefill

    from engine.gpu import pot_a8
    rng = np.random.default_rng(15)
    with host_prefill.faked() as cp:
        monkeypatch.setattr(pot_a8, "require_cupy", lambda: cp)
        for n, k in SMOLLM2_SHAPES:
            codes, s = rand_layer(rng, n, k)
            p = pot_a8.upload(*P.from_pot3(planes.pack_planes(codes, 3), s, k, 128), n, k)
            bits = 8 * p.nbytes() / (n * k)
            assert p.nbytes() == P.nbytes(n, k) and bits <= 3.2, (n, k, bits)
            assert bits == pytest.approx(3 + 16 * -(-k // 128) / k)           # only K's last group padded
    for n, k in LLAMA7B_SHAPES:
        assert 8 * P.nbytes(n, k) / (n * k) <= 3.2, (n, k)


def test_word_layout_by_hand():
    """Channel 8j + q: bits 0-2 of nibble q of word j; channel 24 + q: bit b in bit 3 of nibble q of word b."""
    codes = np.zeros((1, 32), dtype=np.uint8)
    codes[0, 8 * 1 + 5] = 6                 # word 1, nibble 5
    codes[0, 24 + 2] = 5                    # bits 0 and 2: bit 3 of nibble 2 of words 0 and 2
    w = P.pack_pot_a8(codes)[1][0, :, 0, 0]                 # K = 32: one chunk, the tail
    assert [hex(v) for v in w] == [hex(1 << 11), hex(6 << 20), hex(1 << 11)]
    assert np.array_equal(P.pack_pot_a8(np.pad(codes, ((0, 0), (0, 992))))[0][0, 0, :, 0, 0], w)   # a full step


def test_from_pot3_matches_the_pot_kind():
    """A pot3 layer (bit planes, negative scales, spare codes) gives the same weights in this layout."""
    rng = np.random.default_rng(3)
    n, k = 11, 1000
    codes, s = rand_layer(rng, n, k)
    qweight = planes.pack_planes(codes, 3)
    w, sp = P.from_pot3(qweight, s, k, 128)
    kind = pot.KINDS["pot3"]
    want = kind.units()[codes].astype(np.float64) * np.repeat(s.astype(np.float64), 128, axis=1)[:, :k]
    assert np.array_equal(P.dequantized(w, sp, n, k), want)
    spare = codes == kind.spare_code
    neg = np.repeat(s < 0, 128, axis=1)[:, :k]
    assert (spare & neg).any() and (spare & ~neg).any()          # the spare level on both sides
    with pytest.raises(ValueError, match="groups of 128"):
        P.from_pot3(qweight, np.zeros((n, 32), np.float16), k, 32)


def test_prmt_generic_and_sign_replicate():
    a, b = 0x80017F02, 0xFF00FE10          # bytes 0..7: 02 7F 01 80 10 FE 00 FF
    assert int(P.prmt(a, b, 0x3210)) == a and int(P.prmt(a, b, 0x7654)) == b
    assert int(P.prmt(a, b, 0x0123)) == 0x027F0180
    # bit 3 of a nibble: the selected byte's sign bit replicated
    assert int(P.prmt(a, b, 0xB9F8)) == 0xFF00FF00         # bytes 0 (02), 7 (FF), 1 (7F), 3 (80) -> signs
    assert int(P.prmt(a, b, 0x8C0D)) == 0x000002FF         # 5 (FE) -> FF, byte 0 as is, 4 (10) and 0 -> 00


def test_selectors_never_switch_prmt_to_sign_mode():
    rng = np.random.default_rng(1)
    w = rng.integers(0, 2**32, (3, 4096), dtype=np.uint64).astype(np.uint32)
    for s in P.selectors(*w):
        assert not (s & np.uint32(0x8888)).any()


def test_lookup_gives_every_code_its_value():
    """All 8 codes at every position of a chunk: the kernel's selectors and prmt make VALUES[code]."""
    for code in range(8):
        for shift in range(8):                  # rotate the codes over the 32 channels
            codes = ((np.arange(32) + shift + code) % 8).astype(np.uint8)[None]
            w = P.pack_pot_a8(codes)[1][0, :, 0, 0]
            got = np.concatenate([P.prmt(P.LUT_LO, P.LUT_HI, s)[None].view(np.int8) for s in P.selectors(*w)])
            assert np.array_equal(got, P.VALUES[codes[0]])


def test_chunk_dot_emulation_matches_codes():
    """Random words and tokens: 8 prmt + 8 dp4a (emulated) = Σ VALUES[code]·x8, exactly."""
    rng = np.random.default_rng(2)
    m = 3000
    w = rng.integers(0, 2**32, (m, 3), dtype=np.uint64).astype(np.uint32)
    x8 = rng.integers(-128, 128, (m, 32)).astype(np.int8)
    x8[:8] = -128                                                   # the extremes: all ones is code 7
    w[:4] = 0xFFFFFFFF                                              # everywhere, bit 3s included
    xw = x8.view("<u4")                                             # (m, 8): channel 4i + b in byte b of word i
    got = P.chunk_dot_emulated(w, xw)
    codes = P.word_codes(w)                                         # (m, 32): the layout's decoder (unpack_pot_a8)
    assert np.array_equal(got, (P.VALUES[codes].astype(np.int64) * x8).sum(axis=1))


def exact_f32(q: Fraction) -> np.float32:
    """q rounded to float32 once, ties to even."""
    r = np.float32(float(q))
    cands = [r, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.uint32)) & 1))
    return np.float32(best)


def test_fma32_is_one_rounding():
    a = np.float32(2.0**-24 * (1 + 2.0**-15))
    b = np.float32(-(1 - 2.0**-15))
    c = np.float32(1 + 2.0**-23)           # a·b + c = 1 + 2^-24 + 2^-54: above the midpoint
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) == np.float32(1.0)   # double rounding
    assert P.fma32(a, b, c) == np.float32(1 + 2.0**-23)
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(300).astype(np.float32) * np.float32(2.0) ** rng.integers(-30, 30, 300) for _ in range(3)]
    got = P.fma32(*xs)
    for a, b, c, g in zip(*xs, got):
        assert g == exact_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def kernel_loop(words, scale, x8, sx, n, k, nw):
    """The kernel's control flow, one scalar at a time (warps, lanes, the two register batches, the
    tail after the full steps)."""
    steps, tl = P.n_full_steps(k), P.n_tail(k)
    dots = P.chunk_dots(words, n, x8[:k])
    s32 = np.zeros((n, 8 * steps + 8), np.float32)
    s32[:, :-(-k // 128)] = P.unpack_scales(scale, n, k)
    y = np.zeros(n, np.float16)
    for row in range(n):
        red = []
        for warp in range(nw):
            lanes = []
            for lane in range(32):
                acc = np.float32(0)
                st = warp
                while st < steps:                         # compute(b0); then b1 = st + NW
                    for s_ in (st, st + nw):
                        if s_ >= steps:
                            break
                        c = 32 * s_ + lane
                        acc = P.fma32(s32[row, c >> 2], np.float32(dots[row, c]), acc)[()]
                    st += 2 * nw
                if tl and warp == steps % nw and lane < tl:   # the tail: lanes < L of one warp
                    c = 32 * steps + lane
                    acc = P.fma32(s32[row, c >> 2], np.float32(dots[row, c]), acc)[()]
                lanes.append(acc)
            v = np.array(lanes, np.float32)
            for off in (16, 8, 4, 2, 1):
                v = v + v[np.arange(32) ^ off]
            red.append(v[0])
        tot = red[0]
        for v in red[1:]:
            tot = np.float32(tot + v)
        y[row] = np.float16(tot * np.float32(np.float32(0.25) * np.float32(sx)))
    return y


@pytest.mark.parametrize("n,k,nw", [(3, 77, 4), (2, 5000, 4), (2, 9000, 8), (1, 3100, 8), (2, 576, 4), (1, 4096, 4),
                                   (1, 11008, 4)])
def test_reference_follows_the_kernel_order(n, k, nw):
    rng = np.random.default_rng(k)
    codes, s = rand_layer(rng, n, k)
    w, sp = P.pack_pot_a8(codes), P.pack_scales(s, k)
    x8 = rng.integers(-127, 128, k).astype(np.int8)
    assert np.array_equal(P.gemv_pot_a8_ref(w, sp, x8, 0.013, n, k, nw), kernel_loop(w, sp, x8, 0.013, n, k, nw))


@pytest.mark.parametrize("n,k", SHAPES + [(40, 11008)])
@pytest.mark.parametrize("nw", [4, 8])
def test_reference_against_float64(n, k, nw):
    rng = np.random.default_rng(n + 31 * k)
    codes, s = rand_layer(rng, n, k)
    w, sp = P.pack_pot_a8(codes), P.pack_scales(s, k)
    x8 = rng.integers(-127, 128, k).astype(np.int8)
    sx = np.float32(0.0123)
    y = P.gemv_pot_a8_ref(w, sp, x8, sx, n, k, nw).astype(np.float64)
    ref = P.dequantized(w, sp, n, k) @ (x8.astype(np.float64) * np.float64(sx))
    # fp16 rounding (half an ulp) plus the fp32 sums' error, far below another half ulp here
    bound = fp16_ulp(ref) + 64 * np.finfo(np.float32).eps * (np.abs(P.dequantized(w, sp, n, k)) @ np.abs(
        x8.astype(np.float64) * np.float64(sx)))
    assert (np.abs(y - ref) <= bound).all()


def test_launcher_binds_the_kernel_with_a_fake_cupy(monkeypatch):
    """engine/gpu/pot_a8.py through kargs with bench/host_prefill.py's fake CuPy: the keywords are
    the kernel's parameters (the tail's arrays included), the grid one block per RB rows and token;
    bad inputs get one clear error. (One token a block here: WB_TUNE.pa8_mt = 1; MT tokens a block
    in test_token_blocks_take_mt_tokens_and_the_rest_one_each.)"""
    import host_gemm
    import host_prefill

    from engine.gpu import kargs, pot_a8
    from engine.gpu.ops import CudaOpError
    from engine.gpu.tuning import WB_TUNE
    monkeypatch.setattr(WB_TUNE, "pa8_mt", 1)
    n, k = 13, 1100
    codes, s = rand_layer(np.random.default_rng(5), n, k)
    words, scale = P.pack_pot_a8(codes), P.pack_scales(s, k)
    grids, exprs = [], []
    real = host_gemm._Kernel.launch_bound
    args_seen = []
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound",
                        lambda self, grid, block, bound, args, *a, **kw: (grids.append((grid, block)),
                                                                          args_seen.append(dict(args)),
                                                                          real(self, grid, block, bound, args, *a, **kw)))
    with host_prefill.faked() as cp:
        monkeypatch.setattr(pot_a8, "require_cupy", lambda: cp)
        p = pot_a8.upload(words, scale, n, k)
        x8 = cp.zeros(32 * P.n_chunks(k), dtype=np.int8)
        sx = cp.ones(1, dtype=np.float32)
        with kargs.intercepted(lambda expr, run: (exprs.append(expr), run())):
            for v in pot_a8.VARIANTS:
                pot_a8.gemv_pot_a8(x8, sx, p, variant=v)
            assert all(a["tail"] is p.tail and a["stail"] is p.stail and a["KC"] == 35 for a in args_seen)
            assert p.tail.shape == (2, 3, 8, 3) and p.stail.shape == (16, 1)   # K = 1100: 35 chunks, one step and 3
            x3 = cp.zeros((3, 1136), dtype=np.int8)                   # three tokens, rows of 1136 bytes
            assert pot_a8.gemv_pot_a8(x3, cp.ones(3, dtype=np.float32), p).shape == (3, n)
            monkeypatch.setattr(pot_a8, "MAX_GRID_Y", 2)             # past the grid's y limit: launches of 2, 1
            at = len(args_seen)
            pot_a8.gemv_pot_a8(x3, cp.ones(3, dtype=np.float32), p)
            monkeypatch.setattr(pot_a8, "MAX_GRID_Y", 65535)
            sliced = args_seen[at:]
            assert [a["x8"].data.ptr - x3.data.ptr for a in sliced] == [0, 2 * 1136]
            assert [a["out"].shape[0] for a in sliced] == [3, 1] and sliced[1]["sx"].size == 1
            assert all(a["resid"] is None for a in args_seen)
            # resid: the residual stream (M, N) float32 takes y instead of out, sliced as x8 is
            h = cp.zeros((3, n), dtype=np.float32)
            monkeypatch.setattr(pot_a8, "MAX_GRID_Y", 2)
            at = len(args_seen)
            assert pot_a8.gemv_pot_a8(x3, cp.ones(3, dtype=np.float32), p, resid=h) is h
            monkeypatch.setattr(pot_a8, "MAX_GRID_Y", 65535)
            sliced = args_seen[at:]
            assert [a["resid"].data.ptr - h.data.ptr for a in sliced] == [0, 2 * n * 4]
            assert all(a["out"] is None for a in sliced)
        with pytest.raises(CudaOpError, match="at least 1120 bytes"):
            pot_a8.gemv_pot_a8(x8[:1100], sx, p)
        with pytest.raises(CudaOpError, match="a multiple of 16"):
            pot_a8.gemv_pot_a8(cp.zeros((2, 1128), dtype=np.int8), cp.ones(2, dtype=np.float32), p)
        with pytest.raises(CudaOpError, match="at least 3 elements"):
            pot_a8.gemv_pot_a8(x3, sx, p)
        with pytest.raises(CudaOpError, match="not among"):
            pot_a8.gemv_pot_a8(x8, sx, p, variant=(16, 4))
        with pytest.raises(CudaOpError, match="sx as a float32"):
            pot_a8.gemv_pot_a8(x8, cp.ones(1, dtype=np.float16), p)
        with pytest.raises(CudaOpError, match="float16"):
            pot_a8.gemv_pot_a8(x8, sx, p, out=cp.zeros(n, dtype=np.float32))
        empty = pot_a8.upload(P.pack_pot_a8(codes[:, :0]), P.pack_scales(s[:, :0], 0), n, 0)
        assert pot_a8.gemv_pot_a8(x8, sx, empty) is not None             # K = 0: zeros, returned
        h1 = cp.zeros(n, dtype=np.float32)
        at = len(args_seen)
        assert pot_a8.gemv_pot_a8(x8, sx, empty, resid=h1) is h1 and len(args_seen) == at   # K = 0: h unchanged
        for bad in (cp.zeros(n, dtype=np.float16), cp.zeros(n + 1, dtype=np.float32), cp.zeros((1, n), np.float32)):
            with pytest.raises(CudaOpError, match="adds into a C-contiguous float32"):
                pot_a8.gemv_pot_a8(x8, sx, p, resid=bad)
        with pytest.raises(CudaOpError, match="writes out or adds into resid"):
            pot_a8.gemv_pot_a8(x8, sx, p, out=cp.zeros(n, dtype=np.float16), resid=h1)
        with pytest.raises(CudaOpError, match="do not make"):
            pot_a8.upload(words, scale, n + 8, k)
        # the SiLU variant: N = 2I rows (I = 16), grid I / 4 blocks, one token
        c32, s32 = rand_layer(np.random.default_rng(6), 32, k)
        gu = pot_a8.upload(P.pack_pot_a8(c32), P.pack_scales(s32, k), 32, k)
        mf, amax = cp.zeros((1, 16), dtype=np.float32), cp.zeros(1, dtype=np.uint32)
        with kargs.intercepted(lambda expr, run: (exprs.append(expr), run())):
            assert pot_a8.gemv_pot_a8_silu(x8.reshape(1, -1), sx, gu, mf, amax) is mf
        with pytest.raises(CudaOpError, match="I % 8"):
            pot_a8.gemv_pot_a8_silu(x8, sx, p, cp.zeros(6, dtype=np.float32), amax)
        with pytest.raises(CudaOpError, match="one token"):
            pot_a8.gemv_pot_a8_silu(x3, cp.ones(3, dtype=np.float32), gu, mf, amax)
        with pytest.raises(CudaOpError, match="mf must be"):
            pot_a8.gemv_pot_a8_silu(x8, sx, gu, cp.zeros((1, 32), dtype=np.float32), amax)
        with pytest.raises(CudaOpError, match="amax must be"):
            pot_a8.gemv_pot_a8_silu(x8, sx, gu, mf, cp.zeros(1, dtype=np.float32))
    assert exprs == [f"gemv_pot3_a8<{rb}, {nw}, false>" for rb, nw in pot_a8.VARIANTS] + [
        "gemv_pot3_a8<8, 4, false>"] * 5 + [pot_a8.SILU_EXPR]
    # one token: (row blocks, 1); several: tokens along x (tok_x), each launch's share of them
    assert [g for g, _ in grids] == [(-(-n // rb), 1) for rb, _ in pot_a8.VARIANTS] + [(3, 2), (2, 2), (1, 2), (2, 2),
                                                                                       (1, 2), (4, 1)]
    assert [a["tok_x"] for a in args_seen] == [0] * len(pot_a8.VARIANTS) + [1] * 5 + [0]
    assert [b for _, b in grids] == [(32 * nw,) for _, nw in pot_a8.VARIANTS] + [(128,)] * 6


def test_tokens_along_x_only_for_several_tokens_and_when_set(monkeypatch):
    """WB_TUNE.pa8_tok_x: several tokens launch over (M, row blocks) with tok_x = 1; one token, the
    setting off, or more row blocks than the grid's y holds keep (row blocks, M) and tok_x = 0
    (one token a block: WB_TUNE.pa8_mt = 1)."""
    import host_gemm
    import host_prefill

    from engine.gpu import pot_a8
    from engine.gpu.tuning import WB_TUNE
    monkeypatch.setattr(WB_TUNE, "pa8_mt", 1)
    n, k = 40, 300
    codes, s = rand_layer(np.random.default_rng(9), n, k)
    seen = []
    real = host_gemm._Kernel.launch_bound
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound",
                        lambda self, grid, block, bound, args, *a, **kw: (seen.append((grid, args["tok_x"])),
                                                                          real(self, grid, block, bound, args, *a, **kw)))
    with host_prefill.faked() as cp:
        monkeypatch.setattr(pot_a8, "require_cupy", lambda: cp)
        p = pot_a8.upload(P.pack_pot_a8(codes), P.pack_scales(s, k), n, k)
        x1, x4 = cp.zeros(320, dtype=np.int8), cp.zeros((4, 320), dtype=np.int8)
        sx = cp.ones(4, dtype=np.float32)
        pot_a8.gemv_pot_a8(x1, sx, p)
        pot_a8.gemv_pot_a8(x4, sx, p)
        monkeypatch.setattr(WB_TUNE, "pa8_tok_x", False)
        pot_a8.gemv_pot_a8(x4, sx, p)
        monkeypatch.setattr(WB_TUNE, "pa8_tok_x", True)
        monkeypatch.setattr(pot_a8, "MAX_GRID_Y", 4)            # 5 row blocks past the y limit: tokens on y
        pot_a8.gemv_pot_a8(x4, sx, p)
    assert seen == [((5, 1), 0), ((4, 5), 1), ((5, 4), 0), ((5, 4), 0)]


def test_token_blocks_take_mt_tokens_and_the_rest_one_each(monkeypatch):
    """WB_TUNE.pa8_mt: M ≥ 2 tokens of an MT_VARIANTS launch go MT a block, MT the largest of 1, 2,
    4 up to min(M, pa8_mt) (gemv_pot3_a8<RB, NW, false, MT>, M // MT blocks along the tokens), the
    last M % MT one a block in a second launch whose x8, sx and out start at that token; one token,
    another variant or MT = 1 launch once; an MT without instantiations is refused before any
    launch."""
    import host_gemm
    import host_prefill

    from engine.gpu import kargs, pot_a8
    from engine.gpu.ops import CudaOpError
    from engine.gpu.tuning import WB_TUNE
    n, k = 40, 300
    codes, s = rand_layer(np.random.default_rng(10), n, k)
    seen = []
    real = host_gemm._Kernel.launch_bound
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound",
                        lambda self, grid, block, bound, args, *a, **kw: (seen.append((grid, dict(args))),
                                                                          real(self, grid, block, bound, args, *a, **kw)))
    exprs = []
    with host_prefill.faked() as cp:
        monkeypatch.setattr(pot_a8, "require_cupy", lambda: cp)
        p = pot_a8.upload(P.pack_pot_a8(codes), P.pack_scales(s, k), n, k)
        x6, sx = cp.zeros((6, 320), dtype=np.int8), cp.ones(6, dtype=np.float32)
        with kargs.intercepted(lambda expr, run: (exprs.append(expr), run())):
            monkeypatch.setattr(WB_TUNE, "pa8_mt", 4)
            pot_a8.gemv_pot_a8(x6, sx, p)                       # 4 in one block, 2 one a block
            pot_a8.gemv_pot_a8(x6[:4], sx, p, variant=(4, 4))   # 4: one launch of MT blocks
            pot_a8.gemv_pot_a8(x6, sx, p, variant=(8, 8))       # no MT instantiation: one a block
            pot_a8.gemv_pot_a8(x6[0], sx, p)                    # one token
            pot_a8.gemv_pot_a8(x6[:2], sx, p)                   # 2 of at most 4: one block of 2
            pot_a8.gemv_pot_a8(x6[:3], sx, p)                   # 3: one block of 2, then one of 1
            monkeypatch.setattr(WB_TUNE, "pa8_mt", 2)
            pot_a8.gemv_pot_a8(x6, sx, p)                       # 6 = 3 blocks of 2
            for bad in (3, 8, 0):
                monkeypatch.setattr(WB_TUNE, "pa8_mt", bad)
                with pytest.raises(CudaOpError, match="pa8_mt must be 1 or one of"):
                    pot_a8.gemv_pot_a8(x6, sx, p)
            at = len(seen)
            monkeypatch.setattr(WB_TUNE, "pa8_mt", 4)          # resid: the second launch's rows start at token 4
            h = cp.zeros((6, n), dtype=np.float32)
            pot_a8.gemv_pot_a8(x6, sx, p, resid=h)
            monkeypatch.setattr(WB_TUNE, "pa8_mt", 2)          # one token block a launch: 3 launches of 2 tokens
            monkeypatch.setattr(pot_a8, "MAX_GRID_Y", 1)
            monkeypatch.setattr(WB_TUNE, "pa8_tok_x", False)
            pot_a8.gemv_pot_a8(x6, sx, p)
    assert exprs[:9] == ["gemv_pot3_a8<8, 4, false, 4>", "gemv_pot3_a8<8, 4, false>", "gemv_pot3_a8<4, 4, false, 4>",
                         "gemv_pot3_a8<8, 8, false>", "gemv_pot3_a8<8, 4, false>", "gemv_pot3_a8<8, 4, false, 2>",
                         "gemv_pot3_a8<8, 4, false, 2>", "gemv_pot3_a8<8, 4, false>", "gemv_pot3_a8<8, 4, false, 2>"]
    assert [g for g, _ in seen[:at]] == [(1, 5), (2, 5), (1, 10), (6, 5), (5, 1), (1, 5), (1, 5), (1, 5), (3, 5)]
    a = [args for _, args in seen]
    assert a[1]["x8"].data.ptr - x6.data.ptr == 4 * 320 and a[1]["sx"].size == 2 and a[1]["out"].shape == (2, n)
    assert a[0]["x8"] is x6 and a[0]["out"].shape == (6, n)
    r = a[at:at + 2]                                            # the resid pair
    assert [x["resid"].data.ptr - h.data.ptr for x in r] == [0, 4 * n * 4] and all(x["out"] is None for x in r)
    last = seen[at + 2:]                                        # tokens along y, one block of 2 a launch
    assert [g for g, _ in last] == [(5, 1)] * 3 and [x["tok_x"] for _, x in last] == [0] * 3
    assert [x["x8"].data.ptr - x6.data.ptr for _, x in last] == [0, 2 * 320, 4 * 320]
    assert exprs[9:] == ["gemv_pot3_a8<8, 4, false, 4>", "gemv_pot3_a8<8, 4, false>"] + [
        "gemv_pot3_a8<8, 4, false, 2>"] * 3
    assert all(e in pot_a8.POT_A8_EXPRS for e in exprs)

def test_plain_launches_take_rb4_up_to_the_tuned_k(monkeypatch):
    """WB_TUNE.pa8_rb4_max_k: plain launches of K up to it take RB = 4 (DEFAULT's NW, so the same
    bits), the others DEFAULT; 0 (the default) never; an explicit variant wins."""
    import host_prefill

    from engine.gpu import kargs, pot_a8
    from engine.gpu.tuning import WB_TUNE
    n, k = 13, 1100
    codes, s = rand_layer(np.random.default_rng(5), n, k)
    exprs = []
    with host_prefill.faked() as cp:
        monkeypatch.setattr(pot_a8, "require_cupy", lambda: cp)
        p = pot_a8.upload(P.pack_pot_a8(codes), P.pack_scales(s, k), n, k)
        x8, sx = cp.zeros(32 * P.n_chunks(k), dtype=np.int8), cp.ones(1, dtype=np.float32)
        with kargs.intercepted(lambda expr, run: (exprs.append(expr), run())):
            for bound in (0, k, k - 1):
                monkeypatch.setattr(WB_TUNE, "pa8_rb4_max_k", bound)
                pot_a8.gemv_pot_a8(x8, sx, p)
            pot_a8.gemv_pot_a8(x8, sx, p, variant=(8, 8))
    assert pot_a8.DEFAULT == (8, 4)
    assert exprs == ["gemv_pot3_a8<8, 4, false>", "gemv_pot3_a8<4, 4, false>", "gemv_pot3_a8<8, 4, false>",
                     "gemv_pot3_a8<8, 8, false>"]


# ----------------------------------------------------------------- many tokens: Ŵ in fp16 and cuBLAS

# cuda/gemv_pot_a8.cu dequant_pot3_a8's body and those of the helpers it calls (comments dropped,
# whitespace collapsed), which _dequant_kernel_numpy transliterates: when they change, so must that
# and this digest
DEQUANT_SHA256 = "48f8d5d7c48256e1533c9b3684f5d62e631bf86cdc9de578ed71dc79408c5fc1"
DEQUANT_HELPERS = ("pa8_prmt(u32 a", "pa8_selector(const", "pa8_hmul2(u32 a")


def dequant_kernel_text(src: str) -> str:
    parts = []
    for start in DEQUANT_HELPERS + ("dequant_pot3_a8(\n",):
        i = src.index(start)
        parts.append(src[i:src.index("\n}\n", i)])
    return " ".join(re.sub(r"//[^\n]*", "", "\n".join(parts)).split())


UNIT_LO, UNIT_HI = 0x34383C00, 0xB4B8BC40        # cuda/gemv_pot_a8.cu PA8_UNIT_LO, PA8_UNIT_HI


def _pa8_selector(w, i: int) -> int:
    """cuda/gemv_pot_a8.cu pa8_selector transliterated (w: three words as ints)."""
    if i < 6:
        return (w[i >> 1] & P.LOW3) >> (16 * (i & 1))
    e = ((w[0] >> 3) & 0x11111111) | ((w[1] >> 2) & 0x22222222) | ((w[2] >> 1) & 0x44444444)
    return e >> (16 * (i & 1))


def _hmul2(a, b) -> int:
    """mul.rn.f16x2 on two uint32 words: each half the exact product rounded once to fp16."""
    ha, hb = (np.array([int(v) & 0xFFFFFFFF], "<u4").view(np.float16).astype(np.float64) for v in (a, b))
    return int((ha * hb).astype(np.float16).view("<u4")[0])


def test_selector_transliteration_is_the_gemvs():
    """pa8_selector (the dequantization's) gives the GEMV's eight selectors (formats.pot_a8.selectors,
    which mirror pa8_chunk), low 16 bits, on random words."""
    rng = np.random.default_rng(2)
    for w in rng.integers(0, 1 << 32, (200, 3), dtype=np.uint64).tolist():
        want = [int(v) & 0xFFFF for v in P.selectors(*w)]
        assert [_pa8_selector(w, i) & 0xFFFF for i in range(8)] == want


def test_unit_tables_are_the_fp16_units():
    """PA8_UNIT_LO/HI hold the high bytes of fp16(VALUES / 4) for codes 0..7, whose low bytes are 0,
    and the kernel's defines say so."""
    units = (P.VALUES.astype(np.float64) / 4).astype(np.float16).view(np.uint16)
    assert not (units & 0xFF).any()
    hi = (units >> 8).astype(np.uint8)
    assert (int(hi[:4].view("<u4")[0]), int(hi[4:].view("<u4")[0])) == (UNIT_LO, UNIT_HI)
    src = KERNEL_SRC.read_text()
    assert f"#define PA8_UNIT_LO {UNIT_LO:#010X}u".replace("0X", "0x") in src
    assert f"#define PA8_UNIT_HI {UNIT_HI:#010X}u".replace("0X", "0x") in src


def test_fp16_product_is_the_float32_product_for_every_scale():
    """dequant_pot3_a8's fp16 multiply of s by the unit VALUES/4 (one rounding of the exact
    product) gives dequantized_f16's fp16(float32(s/4) · VALUES) for every finite fp16 s: subnormal,
    overflowing and signed-zero results included."""
    s = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    s = s[np.isfinite(s)]
    with np.errstate(over="ignore"):
        want = (s.astype(np.float32)[:, None] * np.float32(0.25) * P.VALUES.astype(np.float32)).astype(np.float16)
        units = (P.VALUES.astype(np.float64) / 4).astype(np.float16)
        got = (s.astype(np.float64)[:, None] * units.astype(np.float64)).astype(np.float16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def _dequant_kernel_numpy(words, scale, n, k):
    """cuda/gemv_pot_a8.cu dequant_pot3_a8 transliterated: thread (row n, chunk c) reads its three
    words and scale from the full steps' arrays or the tail's by the kernel's index formulas and
    makes its 16 words of fp16 pairs; a warp whose 32 chunks are whole (K % 8 == 0) stores them
    through its shared-memory slots (rotated) 16 bytes a lane, the others a thread its own."""
    (full, tail), (sc, st) = words, scale
    fw, tw, fs, ts_ = full.ravel(), tail.ravel(), sc.view(np.uint16).ravel(), st.view(np.uint16).ravel()
    kc = P.n_chunks(k)
    steps, tl = kc // 32, kc % 32
    tg = (tl + 3) >> 2
    tile_step, scales_step = 3 * 8 * 32, 8 * 32 * 32 // 128
    out = np.zeros(n * k, np.uint16)
    for row in range(n):
        t, r = row // 8, row % 8
        hs = []                                           # each chunk's 16 words
        for c in range(kc):
            stp, l = c // 32, c % 32
            if stp < steps:
                tsx = t * steps + stp
                w = [int(fw[tsx * tile_step + (j * 8 + r) * 32 + l]) for j in range(3)]
                sb = fs[tsx * scales_step + r * (scales_step // 8) + (l >> 2)]
            else:
                w = [int(tw[((t * 3 + j) * 8 + r) * tl + l]) for j in range(3)]
                sb = ts_[row * tg + (l >> 2)]
            s2 = int(sb) | int(sb) << 16
            h = []
            for i in range(8):                            # channels 4i..4i+3
                b = P.prmt(UNIT_LO, UNIT_HI, _pa8_selector(w, i))
                h += [_hmul2(P.prmt(b, 0, 0x1404), s2), _hmul2(P.prmt(b, 0, 0x3424), s2)]
            hs.append(h)
        for c0 in range(0, kc, 32):                       # a warp's chunks (blocks of 128 threads: 4 warps)
            if (c0 + 32) * 32 <= k and k % 8 == 0:
                sw = [None] * 128                         # stage: 16-byte slots
                for lane in range(32):
                    for v4 in range(4):
                        sw[4 * lane + ((v4 + lane) & 3)] = hs[c0 + lane][4 * v4:4 * v4 + 4]
                for i in range(4):
                    for lane in range(32):
                        q = 32 * i + lane
                        src, part = q >> 2, q & 3
                        at = row * k + c0 * 32 + 8 * q    # ow[q]: 8 halves
                        for e, word in enumerate(sw[4 * src + ((part + src) & 3)]):
                            out[at + 2 * e], out[at + 2 * e + 1] = word & 0xFFFF, word >> 16
            else:
                for c in range(c0, min(c0 + 32, kc)):
                    for q in range(min(32, k - 32 * c)):
                        out[row * k + 32 * c + q] = (hs[c][q >> 1] >> (16 * (q & 1))) & 0xFFFF
    return out.view(np.float16).reshape(n, k)


@pytest.mark.parametrize("n,k", [(9, 77), (16, 1100), (5, 2080), (3, 4096)])
def test_dequant_kernel_reads_the_layout_as_unpack_does(n, k):
    """The fp16-Ŵ kernel's index formulas (transliterated) give dequantized_f16, which is the exact
    Ŵ (dequantized, float64) in fp16 for scales where fp16_exact holds; tiny or huge scales break it."""
    assert hashlib.sha256(dequant_kernel_text(KERNEL_SRC.read_text()).encode()).hexdigest() == DEQUANT_SHA256, \
        "dequant_pot3_a8 changed: update _dequant_kernel_numpy and DEQUANT_SHA256"
    codes, s = rand_layer(np.random.default_rng(n + k), n, k)
    words, scale = P.pack_pot_a8(codes), P.pack_scales(s, k)
    want = P.dequantized_f16(words, scale, n, k)
    assert P.fp16_exact(scale)
    np.testing.assert_array_equal(want, P.dequantized(words, scale, n, k).astype(np.float16))
    np.testing.assert_array_equal(_dequant_kernel_numpy(words, scale, n, k).view(np.uint16), want.view(np.uint16))
    exact_sub = np.float16(2.0 ** -14)                         # s/4 = 2^-16: a subnormal, exact
    inexact = np.nextafter(np.float16(2.0 ** -14), np.float16(1))   # s/4 needs 2 bits a subnormal lacks
    s2 = s.copy()
    s2[0, 0] = exact_sub
    assert P.fp16_exact(P.pack_scales(s2, k))
    for bad in (inexact, np.float16(40000)):                   # s/4 inexact; 2|s| past 65504
        s2 = s.copy()
        s2[0, 0] = bad
        assert not P.fp16_exact(P.pack_scales(s2, k))


def test_many_tokens_take_the_fp16_weight_gemm_with_a_fake_cupy(monkeypatch):
    """GpuLinear of a pot3-a8 layer: up to WB_TUNE.pa8_gemv_max_m tokens the GEMV; above, x8 to fp16,
    Ŵ in fp16, cuBLAS into fp32 and the row scales, each over its (columns, rows) grid; without
    cuBLAS or with scales that fp16 cannot hold exactly, the GEMV at any M."""
    import dataclasses
    import host_prefill

    from converters.pot import pot_linear
    from engine.gpu import cublas, kargs
    from engine.gpu import pot_a8 as gpu_pot_a8
    from engine.gpu.linear import GpuLinear
    from engine.gpu.tuning import WB_TUNE
    n, k = 40, 1100
    w = np.random.default_rng(3).standard_normal((n, k)).astype(np.float32) * 0.05
    ql = dataclasses.replace(pot_linear(w, 3, 128, search=False), act="dynamic")
    import host_gemm
    gemms, grids = [], []
    real = host_gemm._Kernel.launch_bound
    seen = []
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound",
                        lambda self, grid, block, bound, args, *a, **kw: (grids.append((grid, block)), seen.append(dict(args)),
                                                                          real(self, grid, block, bound, args, *a, **kw)))
    monkeypatch.setattr(cublas, "available", lambda: True)
    monkeypatch.setattr(cublas, "gemm_f16", lambda cp, x, wt, out: gemms.append((x.shape, wt.shape, out.dtype)) or True)

    def run(m, exact=True, add=False):
        exprs = []
        with host_prefill.faked() as cp:
            monkeypatch.setattr(gpu_pot_a8, "require_cupy", lambda: cp)
            lin = GpuLinear(cp, [ql], name="o_proj")
            lin.pa8.f16_exact = exact
            x8, sx = cp.zeros((m, lin.kp), dtype=np.int8), cp.ones(m, dtype=np.float32)
            out = cp.zeros((m, n), dtype=np.float16)
            h = cp.zeros((m, n), dtype=np.float32) if add else None
            with kargs.intercepted(lambda expr, go: (exprs.append(expr), go())):
                assert lin(x8, sx, None, out, h) is (h if add else out)
        return exprs

    bound = WB_TUNE.pa8_gemv_max_m
    mt = gpu_pot_a8.token_block(bound, gpu_pot_a8.DEFAULT)             # the bound's tokens, MT a block
    assert run(bound) == [f"gemv_pot3_a8<{gpu_pot_a8.DEFAULT[0]}, {gpu_pot_a8.DEFAULT[1]}, false, {mt}>"] * (mt > 1) + [
        f"gemv_pot3_a8<{gpu_pot_a8.DEFAULT[0]}, {gpu_pot_a8.DEFAULT[1]}, false>"] * (bound % mt > 0 or mt == 1) \
        and not gemms
    grids.clear()
    assert run(bound + 1) == ["rows_i8_to_f16", "dequant_pot3_a8", "scale_rows_pa8"]
    assert gemms == [((bound + 1, k), (n, k), np.float32)]
    # K = 1100, Kc = 35: x8 eight columns a thread, Ŵ a chunk a thread, the outputs four a thread
    assert grids == [((1, bound + 1), (256,)), ((1, n), (128,)), ((1, bound + 1), (256,))]
    assert [a["vec"] for a in seen if "vec" in a] == [0, 1]             # K % 8 != 0: x8 one by one; N % 4 == 0
    seen.clear()
    assert run(bound + 1, add=True)[-1] == "scale_rows_pa8" and len(gemms) == 2    # o, down: h += y
    assert seen[-1]["resid"] is not None and seen[-1]["out"] is None
    gemms.pop()
    assert run(bound + 1, exact=False)[0].startswith("gemv_pot3_a8") and len(gemms) == 1
    monkeypatch.setattr(cublas, "available", lambda: False)
    assert run(bound + 1)[0].startswith("gemv_pot3_a8") and len(gemms) == 1


def test_fp16_weight_gemm_vectorizes_where_widths_and_addresses_allow(monkeypatch):
    """gemm_pot_a8's `vec` flags (fake CuPy): x8 to fp16 eight columns a thread only where K and
    ldx are multiples of 8 and x8 is 8-byte aligned; the row scales four outputs a thread only
    where N % 4 == 0 and out (8 bytes) or resid (16 bytes) is aligned."""
    import host_prefill

    import host_gemm

    from engine.gpu import cublas, pot_a8
    monkeypatch.setattr(cublas, "available", lambda: True)
    monkeypatch.setattr(cublas, "gemm_f16", lambda cp, x, wt, out: True)
    seen, real = [], host_gemm._Kernel.launch_bound
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound", lambda self, grid, block, bound, args, *a, **kw: (
        seen.append(args.get("vec")), real(self, grid, block, bound, args, *a, **kw)))
    with host_prefill.faked() as cp:
        monkeypatch.setattr(pot_a8, "require_cupy", lambda: cp)

        def vecs(n, k, x_off=0, y_off=0, resid=False):
            codes, s = rand_layer(np.random.default_rng(n + k), n, k)
            p = pot_a8.upload(P.pack_pot_a8(codes), P.pack_scales(s, k), n, k)
            m, ldx = 3, 32 * P.n_chunks(k)
            x8 = cp.zeros(m * ldx + 16, dtype=np.int8)[x_off:x_off + m * ldx].reshape(m, ldx)
            y = cp.zeros(m * n + 8, dtype=np.float32 if resid else np.float16)[y_off:y_off + m * n].reshape(m, n)
            seen.clear()
            assert pot_a8.gemm_pot_a8(x8, cp.ones(m, dtype=np.float32), p, None if resid else y,
                                      resid=y if resid else None)
            flags = [v for v in seen if v is not None]
            assert len(flags) == 2
            return tuple(flags)                         # rows_i8_to_f16's, scale_rows_pa8's

        assert vecs(16, 1024) == (1, 1)
        assert vecs(16, 1024, resid=True) == (1, 1)
        assert vecs(16, 1100) == (0, 1)                 # K % 8 != 0
        assert vecs(13, 1024) == (1, 0)                 # N % 4 != 0
        assert vecs(16, 1024, x_off=4) == (0, 1)        # x8 4 bytes off its alignment
        assert vecs(16, 1024, y_off=2) == (1, 0)        # out 4 bytes off (2 halves)
        assert vecs(16, 1024, y_off=2, resid=True) == (1, 0)    # resid 8 bytes off


def test_model_runs_pot3_layers_through_the_a8_gemv_with_a_fake_cupy(monkeypatch):
    """pot3 layers of act "dynamic": every linear of a (fake-CuPy) CudaModel holds the
    pot3-a8 layout, its norms and quantizers write INT8 rows of K padded to 32 (mode dynamic),
    and a prefill of M tokens launches gemv_pot3_a8 over an (M, row blocks) grid (tok_x) for q|k|v, o,
    gate|up and down, and no fp16-activation GEMV; a decode step's layers fold their quantization
    (the SiLU variant, quant_amax). With act "none", the same codes load for gemv_pot."""
    import dataclasses
    import host_gemm
    import host_prefill

    from engine.bench.e2e import SMOLLM2, random_model
    from engine.gpu import kargs
    from engine.gpu import pot_a8 as gpu_pot_a8
    from engine.gpu.cache import Buffers
    from engine.gpu.fused import MODE
    cfg = dataclasses.replace(SMOLLM2, num_hidden_layers=2)
    mws = {a8: random_model(cfg, 3, act="dynamic" if a8 else "none") for a8 in (True, False)}
    launches = []
    real = host_gemm._Kernel.launch_bound
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound",
                        lambda self, grid, block, bound, args, *a, **kw: (launches.append((grid, dict(args))),
                                                                          real(self, grid, block, bound, args, *a, **kw)))

    def run(a8: bool, m: int):
        exprs, pairs = [], []
        launches.clear()
        with host_prefill.faked() as cp:
            monkeypatch.setattr(gpu_pot_a8, "require_cupy", lambda: cp)
            for name in ("stack", "concatenate"):               # gpu/wb.py's tiles (act "none")
                setattr(cp, name, host_prefill._fake(getattr(np, name)))
            from engine.gpu.model import CudaModel
            gm = CudaModel(mws[a8])
            cache = gm.new_cache(m + 8)
            if a8:                       # (the fp16-activation GEMV's grid asks the driver: not faked)
                with kargs.intercepted(lambda expr, go: (exprs.append(expr), go())):
                    gm.prefill(np.arange(m), cache)
                pairs = list(zip(exprs, launches))
                launches.clear()
                folds.extend([gm._fold_quant(1), gm._fold_quant(2)])
                b = Buffers(cp, cfg, 1, 1, gm._wide)          # a decode step's layers, attention left out
                with kargs.intercepted(lambda expr, go: (steps.append(expr), go())):
                    gm._layers(b, 1, cache, lambda li, bb, amax=None: None, cp.zeros(1, np.int32), decode=True)
            return gm, exprs, pairs

    steps, folds = [], []

    from engine.gpu import tuning
    m = max(tuning.gemv_bound(True), tuning.gemv_bound(False)) + 4   # past the A8W4 GEMV's rows: still folded
    gm, exprs, pairs = run(True, m)
    assert all(g.pa8 is not None and g.wb is None and g.mode == MODE["dynamic"] and g.kp % 32 == 0
               for L in gm.layers for g in L.linears())
    # issue 15's b + 0.2 bits a weight, as the model holds its layers (K = 576 and 1536: the compact tail)
    assert all(8 * g.nbytes() <= 3.2 * g.pa8.n * g.pa8.k for L in gm.layers for g in L.linears())
    a8 = [(grid, args) for e, (grid, args) in pairs if e.startswith("gemv_pot3_a8")]
    assert len(a8) == 4 * cfg.num_hidden_layers and not any(e.startswith("gemv_pot<") for e in exprs)
    ns = [cfg.q_size + 2 * cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size, 2 * cfg.intermediate_size,
          cfg.hidden_size] * cfg.num_hidden_layers
    rb = gpu_pot_a8.DEFAULT[0]
    mt = gpu_pot_a8.token_block(m, gpu_pot_a8.DEFAULT)                 # MT tokens a block (WB_TUNE.pa8_mt)
    assert m % mt == 0                                                  # so one launch a layer, m / MT blocks
    assert [grid for grid, _ in a8] == [(m // mt, -(-n // rb)) for n in ns]
    assert all(args["tok_x"] for _, args in a8)
    assert [args["N"] for _, args in a8] == ns and all(args["ldo"] == args["N"] for _, args in a8)
    assert [args["ldx"] for _, args in a8] == [cfg.hidden_size, cfg.q_size, cfg.hidden_size,
                                               cfg.intermediate_size] * cfg.num_hidden_layers
    # o and down add into h themselves (CudaModel._fold_resid), at any M: no norm adds a sublayer output
    assert [args["resid"] is not None and args["out"] is None for _, args in a8] == \
        [False, True, False, True] * cfg.num_hidden_layers
    norms = [args for e, (_, args) in pairs if e.startswith("add_rmsnorm_quant")]
    assert len(norms) == 2 * cfg.num_hidden_layers + 1 and all(a["y"] is None for a in norms)
    rows = [args["mode"] for e, (_, args) in pairs if "rmsnorm_quant" in e or "quant_rows" in e or "silu_mul_quant" in e]
    # per layer: norm, quant of the attention output, norm, silu_mul_quant; the final norm feeds the fp16 head
    assert rows == [MODE["dynamic"]] * 4 * cfg.num_hidden_layers + [MODE["fp16"]]

    # the one-token step folds its quantization (CudaModel._fold_quant): the SiLU variant for gate|up
    # (grid I/4, writing mf and amax), quant_amax for o and down, no silu_mul_quant or quant_rows
    assert folds == [True, False]
    per = cfg.num_hidden_layers
    assert sum(e == gpu_pot_a8.SILU_EXPR for e in steps) == per
    assert sum(e.startswith("gemv_pot3_a8") for e in steps) == 4 * per
    plain = [args for grid, args in launches if "mf" in args and args["mf"] is None]
    assert [a["resid"] is not None for a in plain] == [False, True, True] * per     # q|k|v, o, down
    assert sum(e.startswith("quant_amax") for e in steps) == 2 * per
    assert not any(e.startswith(("silu_mul_quant", "quant_rows")) for e in steps)
    silu = [args for grid, args in launches if "mf" in args and args["mf"] is not None]
    assert len(silu) == per and all(a["N"] == 2 * cfg.intermediate_size and a["amax"] is not None for a in silu)

    gm, _, _ = run(False, 5)
    assert all(g.pa8 is None and g.wb is not None and g.mode == MODE["fp16"] for L in gm.layers for g in L.linears())


# ----------------------------------------------------------------- the kernel's index arithmetic

KERNEL_SRC = Path(__file__).resolve().parents[1] / "cuda" / "gemv_pot_a8.cu"

# gemv_pot3_a8's index expressions, read from its source (one match each in the kernel's body):
# the declarations `TYPE NAME = EXPR;`, the pointer advances `NAME += EXPR;`, and the rest
_DECLS = {"steps": "int", "n0": "int", "tu": "size_t", "wp": r"u32\*", "wpu": r"u32\*", "w": r"u32\*",
          "rr": "int", "sp": r"unsigned short\*", "spu": r"unsigned short\*",
          # the tail's
          "tl": "int", "tg": "int", "tw": "bool", "tr": "size_t", "tp": r"u32\*", "tsp": r"unsigned short\*",
          "ru": "size_t", "tpu": r"u32\*", "tspu": r"unsigned short\*", "wt": r"u32\*", "rt": "int"}
_KERNEL_EXPRS = {
    **{name: rf"const {ty} {name} = ([^;]+);" for name, ty in _DECLS.items()},
    **{f"adv_{v}": rf"\b{v} \+= ([^;]+);" for v in ("wp", "sp", "wpu", "spu")},
    "x8": r"\bx8 \+= ([^;]+);", "out": r"\bout \+= ([^;]+);",
    "ts": r"const size_t ts = (.+?), r0 = ", "r0": r", r0 = ([^;]+);",
    "ldw": r"b\.w\[r\]\[j\] = pa8_ldw\((.+)\);$", "lds": r"b\.s\[r\] = pa8_lds\((.+)\);$",
    "ldx": r"pa8_ldx\((.+), b\.x\[t\]\);$",
    "ldt": r"t\.w\[r\]\[j\] = pa8_ldw\((.+)\);$", "ldts": r"t\.s\[r\] = pa8_lds\((.+)\);$",
    "tlive": r"auto load_t = \[&\]\(Pa8Batch<RB, MT>& t\) \{\s*if \((.+?)\) \{", "tx": r"if \((.+?)\) load_x\(.+, t\);",
    "tx_st": r"load_x\((.+), t\);",
    "silu_live": r"if \(threadIdx\.x < (\w+)\) \{", "gate": r"const float g = .*?row_sum\(([^)]+)\)",
    "up": r"const float u = .*?row_sum\(([^)]+)\)", "mf": r"mf\[([^\]]+)\] = v;",
    "amax": r"atomicMax\(amax \+ ([^,]+),",
    "plain_live": r"\} else if \((.+)\) \{$", "out_idx": r"out\[([^\]]+)\] = ",
    "out_row": r"const __half y = __float2half_rn\(row_sum\(([^)]+)\)",
    "resid_idx": r"resid\[([^\]]+)\] \+= __half2float\(y\);",
    # MT tokens a block: the epilogue's row and token of thread tid, the accumulator slot of
    # (token t, row r) in compute() and the token whose x it dots
    "ep_r": r"const int r = (threadIdx\.x % RB), t = ", "ep_t": r"const int r = threadIdx\.x % RB, t = ([^;]+);",
    "acc_slot": r"acc\[([^\]]+)\] = fmaf\(sc,", "acc_x": r"pa8_dot\(q, b\.x\[(\w+)\]\)",
    "sxq": r"sxq = 0\.25f \* sx\[([^\]]+)\];",
    "token_mt": r"const int token = \([^)]*\)(?: \* (\w+))?, row_blk",
    # which grid index is the token (block) and which the row block, by tok_x
    "token_sel": r"const int token = \(([^)]*)\)(?: \* \w+)?, row_blk", "row_sel": r", row_blk = ([^;]+);",
    # the MT bounds: x loaded and dotted for each token, the slots initialised, reduced, stored and
    # declared (acc and red), and the scale pointer's token
    "x_loop": r"for \(int t = 0; t < (\w+); \+\+t\)\s*pa8_ldx\(", "dot_loop": r"for \(int t = 0; t < (\w+); \+\+t\) acc\[",
    "acc_decl": r"float acc\[([^\]]+)\];", "acc_init": r"for \(int i = 0; i < ([^;]+); \+\+i\) acc\[i\] = 0\.f;",
    "shfl_loop": r"for \(int i = 0; i < ([^;]+); \+\+i\)\s*#pragma unroll\s*for \(int off = 16",
    "red_loop": r"for \(int i = 0; i < ([^;]+); \+\+i\) red\[warp\]\[i\] = acc\[i\];",
    "red_decl": r"__shared__ float red\[NW\]\[([^\]]+)\];", "sx_adv": r"\bsx \+= ([^;]+);",
}


# the kernel's load/compute loop (from `Pa8Batch<RB, MT> b0, b1;` to the reduction, comments dropped,
# whitespace collapsed), which check_kernel_offsets mirrors statement for statement: when the
# kernel's loop changes, so must that mirror and this digest. (Last changed by MT tokens a block:
# the batches' type Pa8Batch<RB, MT> and each epilogue thread's token scale sx[threadIdx.x / RB],
# pinned by _KERNEL_EXPRS["sxq"]; the statements the mirror follows are as before.)
KERNEL_LOOP_SHA256 = "470aef6992b738b395bc510fb28cca84d91910d7c077c7126e1aa4025e072c33"


def kernel_loop_text(code: str) -> str:
    i = code.index("Pa8Batch<RB, MT> b0, b1;")
    return code[i:code.index("#pragma unroll", i)].strip()


def _c_to_py(e: str) -> str:
    """One of the kernel's integer expressions as Python (NumPy arrays for the thread indices)."""
    e = " ".join(e.split())
    e = re.sub(r"reinterpret_cast<[^>]*>\((\w+)\)", r"\1", e)
    e = re.sub(r"\((?:size_t|int)\)", "", e)
    for c, p in (("row_blk", "bx"), ("token", "(by * MT)"), ("threadIdx.x", "tid"), ("/", "//"),
                 ("min(", "np.minimum(")):
        e = e.replace(c, p)
    e = re.sub(r"\(([^()?:]+?) \? ([^()?:]+?) : ([^()?:]+?)\)", r"((\2) if (\1) else (\3))", e)
    e = re.sub(r"^([^?]+?) \? ([^?]+?) : ([^?]+)$", r"(\2) if (\1) else (\3)", e)
    if "&&" in e:
        e = "(" + ") & (".join(e.split(" && ")) + ")"
    assert "?" not in e and "&&" not in e, e
    return e


def kernel_index_exprs(src: str) -> dict:
    body = src[src.index("gemv_pot3_a8(\n"):]
    code = " ".join(re.sub(r"//[^\n]*", "", body).split())
    assert hashlib.sha256(kernel_loop_text(code).encode()).hexdigest() == KERNEL_LOOP_SHA256, \
        "the kernel's loop changed: update check_kernel_offsets and KERNEL_LOOP_SHA256"
    ex = {}
    for name, pat in _KERNEL_EXPRS.items():
        hits = re.findall(pat, body, re.M)
        assert len(hits) == 1, f"{name}: {hits} in cuda/gemv_pot_a8.cu (update _KERNEL_EXPRS with the kernel)"
        ex[name] = _c_to_py(hits[0])
    ex["defines"] = {d: int(v) for d, v in re.findall(r"^#define (PA8_\w+) (\d+)\b", src, re.M)}
    ex["constexpr"] = [(c, _c_to_py(v)) for c, v in re.findall(r"constexpr int (\w+) = ([^;]+);", body)]
    ex["blockidx_uses"] = re.sub(r"//[^\n]*", "", body).count("blockIdx")   # the two selections' only
    ex["shfl"] = [(int(mk, 16), int(off)) for mk, off in re.findall(r"__shfl_xor_sync\((0x[0-9a-f]+)u, a, (\d+)\)", body)]
    return ex


def check_kernel_offsets(ex: dict, rb: int, nw: int, silu: bool, n: int, k: int, m: int = 1, ldx: int = 0,
                         mt: int = 1):
    """Run the kernel's pointer arithmetic (ex) for every block, token, warp and lane through its
    load/compute loop and its tail, and assert: each batch compute() reads holds, for register row r
    and word j, word j of chunk 32·st + lane of row R(r) (words[R // 8, st, j, R % 8, lane] for a
    full step st < S, tail[R // 8, j, R % 8, lane] for the tail, st = S, lanes < L only), that
    row's scale of the chunk's group (scale[R // 8, st, R % 8, lane // 4] or stail[R, lane // 4])
    and the token's x8 of that chunk; warp w reads the steps w, w + NW, ... in order, the tail last
    and only in warp S % NW, and no lane past the tail computes it; the epilogue writes every output
    once, from the register row of its row. R(r) = n0 + r (plain), gate row 4b + r for r < 4 and up
    row I + 4b + r - 4 (SILU, N = 2I). mt: tokens a block (m a multiple of it, grid y m / mt): the
    x8 of each of its tokens, and each (token, row) from its own accumulator slot."""
    kc, steps, tl, nt, i = P.n_chunks(k), P.n_full_steps(k), P.n_tail(k), P.n_tiles(n), n // 2
    ldx = ldx or 32 * kc
    wshape, sshape = (nt, steps, 3, 8, 32), (nt, steps, 8, 8)
    tshape, tsshape = (nt, 3, 8, tl), (8 * nt, P.n_tail_groups(k))
    gx = i // 4 if silu else -(-n // rb)              # the launchers' grids (test_launcher_binds_the_kernel...)
    assert m % mt == 0 and (mt == 1 or not silu)
    env = dict(ex["defines"], RB=rb, NW=nw, SILU=silu, N=n, KC=kc, ldx=ldx, ldo=0 if silu else n, MT=mt)
    for name, e in ex["constexpr"]:
        env[name] = eval(e, {}, env)                   # noqa: S307  (our kernel's constexprs)
    gy = m // mt
    bx, by, lane = np.arange(gx)[None, :, None], np.arange(gy)[:, None, None], np.arange(32)[None, None, :]
    grid = np.zeros((gy, gx, 32), np.int64)
    # compute(): token t's dot takes b.x[t] into slot t·RB + r, the slot the epilogue reads for (t, r);
    # block b's first token is b·MT (_c_to_py reads `token` as that)
    assert ex["acc_x"] == "t" and ex["token_mt"] == "MT"
    # tok_x: the token block is blockIdx.x and the row block blockIdx.y, else the reverse; the
    # kernel reads blockIdx nowhere else (_c_to_py reads `row_blk` as bx and `token` as by·MT)
    idx = types.SimpleNamespace(x="x", y="y")
    for tok_x, want in ((1, ("x", "y")), (0, ("y", "x"))):
        got = tuple(eval(ex[k], {}, {"tok_x": tok_x, "blockIdx": idx}) for k in ("token_sel", "row_sel"))   # noqa: S307
        assert got == want, (tok_x, got)
    assert ex["blockidx_uses"] == 4
    for name, want in (("x_loop", mt), ("dot_loop", mt), ("acc_decl", rb * mt), ("acc_init", rb * mt),
                       ("shfl_loop", rb * mt), ("red_loop", rb * mt), ("red_decl", rb * mt)):
        assert eval(ex[name], {}, env) == want, (name, ex[name])   # noqa: S307
    assert np.array_equal(eval(ex["sx_adv"], {}, dict(env, by=by)), by * mt)   # noqa: S307  block's first token
    rr_, tt_ = np.meshgrid(np.arange(rb), np.arange(mt))
    assert np.array_equal(eval(ex["acc_slot"], {}, dict(env, r=rr_, t=tt_)), tt_ * rb + rr_)   # noqa: S307

    def ev(name, e):
        return eval(ex[name], {"np": np}, e) + grid    # noqa: S307

    def uniform(v):                                    # a warp-uniform condition
        assert (v == v.flat[0]).all()
        return v.flat[0]

    for warp in range(nw):
        e = dict(env, bx=bx, by=by, lane=lane, warp=warp, words=0, scale=0, tail=0, stail=0, x8=0)
        assert (ev("steps", e) == steps).all()
        e["steps"] = steps
        for name in ("n0", "tl", "tg", "x8", "ts", "r0", "wp", "sp", "tu", "wpu", "spu", "tw", "tr", "tp", "tsp", "ru",
                     "tpu", "tspu"):
            e[name] = ev(name, e)
        assert (e["tl"] == tl).all() and (e["tg"] == tsshape[1]).all()
        tw = bool(uniform(e["tw"]))

        def load_w(half):
            b = {"tail": None}
            for r in range(rb):
                e.update(r=r, half=half)
                e["w"], e["rr"] = ev("w", e), ev("rr", e)
                for j in range(3):
                    e["j"] = j
                    b[r, j] = ev("ldw", e)
                b[r, "s"] = ev("lds", e)
            return b

        def load_t():
            live = ev("tlive", e).astype(bool)             # the lanes that load (the rest keep stale registers)
            b = {"tail": live}
            for r in range(rb):
                e["r"] = r
                e["wt"], e["rt"] = ev("wt", e), ev("rt", e)
                for j in range(3):
                    e["j"] = j
                    b[r, j] = np.where(live, ev("ldt", e), -1)
                b[r, "s"] = np.where(live, ev("ldts", e), -1)
            return b

        def load_x(st, b):
            e["st"] = st
            b["x"] = [ev("ldx", dict(e, t=t)) for t in range(mt)]

        def load_tx(b):
            live = ev("tx", e).astype(bool)
            load_x(uniform(ev("tx_st", e)), b)
            b["x"], b["xlive"] = [np.where(live, x, -1) for x in b["x"]], live

        def advance():
            for p in ("wp", "sp") + (("wpu", "spu") if silu else ()):
                e[p] = e[p] + ev("adv_" + p, e)

        read = []                # (batch, lanes that compute it) in compute() order: the kernel's loop
        all_lanes = np.ones_like(grid, dtype=bool)
        b0 = load_w(0) if warp < steps else None
        b1 = load_w(1) if warp + nw < steps else load_t() if tw else None
        if warp < steps:
            load_x(warp, b0)
        if warp + nw < steps:
            load_x(warp + nw, b1)
        elif tw:
            load_tx(b1)
        for st in range(warp, steps, 2 * nw):
            read.append((b0, all_lanes))
            advance()
            if st + 2 * nw < steps:
                b0 = load_w(0)
                load_x(st + 2 * nw, b0)
            if st + nw >= steps:
                break
            read.append((b1, all_lanes))
            if st + 3 * nw < steps:
                b1 = load_w(1)
                load_x(st + 3 * nw, b1)
        if tw:
            if warp + nw < steps:
                b1 = load_t()
                load_tx(b1)
            read.append((b1, lane + grid < tl))          # if (lane < tl) compute(b1)
        want_steps = list(range(warp, steps + (tl > 0), nw))          # the tail is step S
        assert len(read) == len(want_steps), (warp, len(read), want_steps)
        for st, (b, live) in zip(want_steps, read):
            c = 32 * st + lane + grid
            tail = st == steps
            assert (b["tail"] is not None) == tail, (warp, st)
            if tail:      # lanes < L (the mirror's compute condition, pinned by the digest) load it, the others not
                assert np.array_equal(b["tail"], live) and np.array_equal(b["xlive"], live), "the tail's lanes"
            for r in range(rb):
                row = (4 * bx + r if r < 4 else i + 4 * bx + r - 4) if silu else bx * rb + r
                for key, shape, want in [((r, j), tshape if tail else wshape,
                                          (row // 8, j, row % 8, lane) if tail else (row // 8, st, j, row % 8, lane))
                                         for j in range(3)] + [
                        ((r, "s"), tsshape if tail else sshape,
                         (row, lane >> 2) if tail else (row // 8, st, row % 8, (c >> 2) - 8 * st))]:
                    off = b[key][live]
                    assert ((off >= 0) & (off < np.prod(shape))).all(), (key, st, "out of bounds")
                    for got, w in zip(np.unravel_index(off, shape), want):
                        assert (got == (w + grid)[live]).all(), (key, warp, st)
            for t in range(mt):
                x = b["x"][t][live]
                assert (x == ((by * mt + t) * ldx + 32 * c)[live]).all() and (x + 32 <= m * ldx).all()
            assert (c[live] < kc).all()

    # the epilogue: thread tid of block (bx, by) writes which output, from which register row
    tid = np.arange(32 * nw)[None, None, :]
    e = dict(env, bx=bx, by=by, tid=tid, out=0)
    e["n0"] = eval(ex["n0"], {"np": np}, e)            # noqa: S307
    full = np.zeros((gy, gx, tid.size), np.int64)

    def at(expr, live):
        return (eval(expr, {"np": np}, e) + full)[live]   # noqa: S307

    if silu:
        live = tid + full < env[ex["silu_live"]]
        assert np.array_equal(np.nonzero(live[0, 0])[0], np.arange(4))
        for mask, off in ex["shfl"]:                   # the absmax butterfly within exactly those lanes
            assert {t for t in range(32) if mask >> t & 1} == {0, 1, 2, 3} == {t ^ off for t in range(4)}
        assert (at(ex["amax"], live) == at("by", live)).all()
        rg, ru = at(ex["gate"], live), at(ex["up"], live)
        assert (rg < 4).all() and (ru - 4 == rg).all()         # gate row 4b + t, up row I + 4b + t
        mf = at(ex["mf"], live)
        assert (mf == at("by", live) * i + 4 * at("bx", live) + rg).all()
        assert np.array_equal(np.sort(mf), np.arange(m * i))
    else:
        e["r"], e["t"] = eval(ex["ep_r"], {}, e), eval(ex["ep_t"], {}, e)   # noqa: S307
        live = at(ex["plain_live"], Ellipsis).astype(bool)
        idx, slot = at(ex["out"], live) + at(ex["out_idx"], live), at(ex["out_row"], live)
        r, t = at("r", live), at("t", live)
        assert (r < rb).all() and (t < mt).all() and (slot == t * rb + r).all()
        assert (idx == (at("by", live) * mt + t) * n + at("bx", live) * rb + r).all()
        assert np.array_equal(np.sort(idx), np.arange(m * n))
        assert (at(ex["resid_idx"], live) == idx).all()             # resid (M, ldo = N) takes y where out would
        assert (at(ex["sxq"], live) == t).all()                     # the scale of the row's token


# K: the tail alone (1, 77, 576), no tail (1024, 4096), the tail as a warp's first step (1536, 2080),
# its second (9300 at NW = 8, 13412 at 8) or third and later (9300 at NW = 4, 13412 at 4, 17000)
PLAIN_CASES = [(rb, nw, n, k, m, 1) for rb in (4, 8) for nw in (4, 8)
               for n, k in [(1, 1), (13, 77), (8, 1024), (21, 2080), (37, 9300), (9, 576), (5, 1536), (3, 13412),
                            (11, 17000)] for m in (1, 3)] + [
    # MT tokens a block (gpu/pot_a8.py MT_VARIANTS, MTS): m tokens, m / MT blocks along the tokens
    (rb, 4, n, k, m, mt) for rb in (4, 8) for n, k in [(13, 77), (21, 2080), (37, 9300), (11, 17000)]
    for m, mt in [(2, 2), (6, 2), (4, 4), (8, 4)]]
SILU_CASES = [(nw, i, k) for nw in (4, 8) for i in (8, 16, 24, 1376) for k in (77, 576, 1536, 2080, 4096, 9300)] + [
    (nw, 8, 17000) for nw in (4, 8)]


def test_kernel_offsets_address_the_layout():
    """gemv_pot3_a8's pointer arithmetic, read from cuda/gemv_pot_a8.cu and run for every block, token,
    warp and lane (check_kernel_offsets): the plain variant (RB 4 and 8, NW 4 and 8; N with a partial
    last tile, K not a multiple of 1024, up to 10 warp steps; 3 tokens with rows of 32·Kc + 16 bytes)
    reads row n0 + r, the SiLU variant gate row 4b + r and up row I + 4b + r - 4 (I = 8, 16, 24,
    1376), of chunk 32·st + lane as pack_pot_a8 and pack_scales lay them out, and writes each output once."""
    ex = kernel_index_exprs(KERNEL_SRC.read_text())
    for rb, nw, n, k, m, mt in PLAIN_CASES:
        check_kernel_offsets(ex, rb, nw, False, n, k, m, 0 if m == 1 else 32 * P.n_chunks(k) + 16, mt)
    for nw, i, k in SILU_CASES:
        check_kernel_offsets(ex, 8, nw, True, 2 * i, k)


@pytest.mark.parametrize("old,new", [
    ("r0 * PA8_STEP + lane", "r0 * PA8_TILE_ROWS + lane"),                     # a half tile's row offset
    ("(size_t)(N / 2 / PA8_TILE_ROWS) * steps", "(size_t)(N / 2 / PA8_TILE_ROWS)"),   # the up rows' tile
    ("wpu += 2 * NW * TILE_STEP", "wpu += NW * TILE_STEP"),                   # the up pointer's advance
    ("spu += 2 * NW * SCALES_STEP", "spu += NW * SCALES_STEP"),
    ("PA8_TILE_ROWS) + (lane >> 2);", "PA8_TILE_ROWS) + (lane >> 3);"),       # a lane's group
    ("rr * (SCALES_STEP / PA8_TILE_ROWS)", "r * (SCALES_STEP / PA8_TILE_ROWS)"),
    ("(j * PA8_TILE_ROWS + rr) * PA8_STEP", "(j * PA8_TILE_ROWS + r) * PA8_STEP"),
    ("half * NW * TILE_STEP", "half * TILE_STEP"),                            # the second batch
    ("SILU ? row_blk * HALF : row_blk * RB", "row_blk * RB"),
    ("x8 += (size_t)token * ldx", "x8 += (size_t)token * KC * 32"), # the token's row
    ("ldx + lane * PA8_CHUNK", "ldx + lane"),                                 # the lane's chunk of x
    ("const int steps = KC / PA8_STEP;", "const int steps = (KC + PA8_STEP - 1) / PA8_STEP;"),  # the padded steps
    # the tail: its warp, lanes, strides, groups, the up rows' offsets and its chunk of x
    ("warp == steps % NW", "warp == (steps + 1) % NW"),
    ("if (lane < tl) {", "if (lane <= tl) {"),
    ("if (lane < tl) load_x", "if (lane <= tl) load_x"),
    ("tail + tr * tl + lane", "tail + tr * PA8_STEP + lane"),
    ("(j * PA8_TILE_ROWS + rt) * tl", "(j * PA8_TILE_ROWS + rt) * PA8_STEP"),
    ("(size_t)n0 * tg + (lane >> 2)", "(size_t)n0 * PA8_TILE_ROWS + (lane >> 2)"),
    ("tspu) + rt * tg", "tspu) + rt * PA8_TILE_ROWS"),
    ("(tl + PA8_GROUP / PA8_CHUNK - 1) / (PA8_GROUP / PA8_CHUNK)", "tl / (PA8_GROUP / PA8_CHUNK)"),
    ("tp + ru * (PA8_WORDS * PA8_TILE_ROWS) * tl", "tp + ru * PA8_WORDS * tl"),
    ("tsp + ru * PA8_TILE_ROWS * tg", "tsp + ru * tg"),
    ("load_x(steps, t)", "load_x(steps - 1, t)"),
    ("if (lane < tl) compute(b1);", "compute(b1);"),                          # the loop (KERNEL_LOOP_SHA256)
    ("row_sum(threadIdx.x + HALF)", "row_sum(threadIdx.x + 1)"),
    ("mf[(size_t)token * (N / 2) + n0 + threadIdx.x]", "mf[(size_t)token * (N / 2) + 2 * n0 + threadIdx.x]"),
    ("__shfl_xor_sync(0xfu, a, 2)", "__shfl_xor_sync(0x3u, a, 2)"),
    ("n0 + (int)(threadIdx.x % RB) < N", "n0 + (int)(threadIdx.x % RB) <= N"),
    ("resid[(size_t)(token + t) * ldo + n0", "resid[(size_t)(token + t) * N / 2 + n0"),   # the residual's row
    # MT tokens a block: the block's first token, token t's x, its accumulator slot, the
    # epilogue's token of a thread, its scale (the loop: KERNEL_LOOP_SHA256)
    ("(tok_x ? blockIdx.x : blockIdx.y) * MT", "(tok_x ? blockIdx.x : blockIdx.y)"),
    ("(tok_x ? blockIdx.x : blockIdx.y) * MT", "(tok_x ? blockIdx.y : blockIdx.x) * MT"),
    ("row_blk = tok_x ? blockIdx.y : blockIdx.x", "row_blk = blockIdx.x"),
    ("x8 += (size_t)token * ldx", "x8 += (size_t)blockIdx.y * MT * ldx"),
    ("(size_t)t * ldx + (size_t)st", "(size_t)st"),
    ("acc[t * RB + r] = fmaf", "acc[r * MT + t] = fmaf"),
    ("pa8_dot(q, b.x[t])", "pa8_dot(q, b.x[0])"),
    ("t = threadIdx.x / RB;", "t = threadIdx.x / MT;"),
    ("sx[threadIdx.x / RB]", "sx[threadIdx.x % RB]"),
    ("for (int t = 0; t < MT; ++t)\n            pa8_ldx(", "for (int t = 0; t < 1; ++t)\n            pa8_ldx("),
    ("for (int t = 0; t < MT; ++t) acc[", "for (int t = 0; t < 1; ++t) acc["),
    ("float acc[RB * MT];", "float acc[RB];"),
    ("for (int i = 0; i < RB * MT; ++i) acc[i] = 0.f;", "for (int i = 0; i < RB; ++i) acc[i] = 0.f;"),
    ("for (int i = 0; i < RB * MT; ++i)\n#pragma unroll\n        for (int off",
     "for (int i = 0; i < RB; ++i)\n#pragma unroll\n        for (int off"),
    ("for (int i = 0; i < RB * MT; ++i) red[warp][i]", "for (int i = 0; i < RB; ++i) red[warp][i]"),
    ("__shared__ float red[NW][RB * MT];", "__shared__ float red[NW][RB];"),
    ("sx += token;", "sx += token / MT;"),
    ("if (st + NW >= steps) break;", "if (st + NW > steps) break;"),          # the loop (KERNEL_LOOP_SHA256)
])
def test_offset_check_catches_a_mutated_kernel(old, new):
    """check_kernel_offsets (or kernel_index_exprs' check of the loop it mirrors) fails on the
    kernel's source with one index expression or loop condition broken."""
    src = KERNEL_SRC.read_text()
    assert src.count(old) == 1
    if old in kernel_loop_text(" ".join(src.split())):
        with pytest.raises(AssertionError, match="loop changed"):
            kernel_index_exprs(src.replace(old, new))
        return
    ex = kernel_index_exprs(src.replace(old, new))
    with pytest.raises(AssertionError):
        for rb, nw, n, k, m, mt in PLAIN_CASES:
            check_kernel_offsets(ex, rb, nw, False, n, k, m, 0 if m == 1 else 32 * P.n_chunks(k) + 16, mt)
        for nw, i, k in SILU_CASES:
            check_kernel_offsets(ex, 8, nw, True, 2 * i, k)


@pytest.mark.parametrize("case", ["pot4", "group64", "mixed_act", "mixed_kind"])
def test_pot_int8_layers_the_gpu_cannot_run_are_a_backend_error(case):
    """pot layers of act "dynamic" that are not pot3 in groups of 128, or a fused group mixing them
    with other layers (files dgq-quantize never writes), stop a (fake-CuPy) CudaModel with one
    BackendError naming the layer, so --device auto runs the file on the CPU (engine/api.py)."""
    import dataclasses
    import host_prefill

    from engine.bench.e2e import SMOLLM2, random_model
    from engine.gpu.backend import BackendError
    cfg = dataclasses.replace(SMOLLM2, num_hidden_layers=1)
    bits = 4 if case == "pot4" else 3
    mw = random_model(cfg, bits, act="dynamic")
    L = mw.layers[0]
    if case == "group64":
        from converters.pot import pot_linear
        rng = np.random.default_rng(0)
        for n in ("q", "k", "v", "o", "gate", "up", "down"):
            w = getattr(L, n)
            setattr(L, n, dataclasses.replace(
                pot_linear(rng.standard_normal(w.shape).astype(np.float32) * 0.05, 3, 64, search=False), act="dynamic"))
    elif case == "mixed_act":
        L.k = dataclasses.replace(L.k, act="none")
    elif case == "mixed_kind":
        L.k = random_model(cfg, 4, act="dynamic").layers[0].k
    want = {"pot4": "holds pot4 in groups of 128", "group64": "holds pot3 in groups of 64",
            "mixed_act": "holds pot3 in groups of 128, act 'none'", "mixed_kind": "holds pot4"}[case]
    with host_prefill.faked():
        from engine.gpu.model import CudaModel
        where = "q\\|k\\|v" if case.startswith("mixed") else "\\S+"           # the first layer built: gate|up
        with pytest.raises(BackendError, match=f"layer 0 {where}_proj: .*pot3 in groups of 128 only.*{want}.*"
                                               "--device cpu"):
            CudaModel(mw)
