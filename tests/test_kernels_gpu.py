"""CUDA kernels against the NumPy reference (formats.py), plus CPU checks of the GPU layout.

The layout tests (no GPU) round-trip pack_host/unpack_host and emulate, in NumPy
uint32 arithmetic, the register dequantization (common.cuh dq_word) and the
mma fragment assignment, so a layout bug shows up in CI too. The GPU tests
(`@pytest.mark.gpu`) require bit-exact int32 accumulators for every kernel, fp16
outputs equal to the reference epilogue rounded to fp16, and bit-exact
activation quantization. Outputs are poisoned before each launch so an element
a kernel forgets to write cannot pass by inheriting a previous result.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import formats
from engine.gpu import backend
from engine.gpu import ops as ops_cuda

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not backend.has_gpu(), reason="needs an NVIDIA GPU and CuPy")


# ----------------------------------------------------------------------------- helpers

def random_dg(n, k, group=128, seed=0, act="dynamic", small_s=None, ascale=0.05):
    """A valid "dg" layer: codes clamped by the overflow guard |(q - z)·S| ≤ 127."""
    rng = np.random.default_rng(seed)
    G = formats.n_groups(k, group)
    z = rng.integers(0, 16, (n, G)).astype(np.uint8)
    if small_s is None:
        small_s = rng.random() < 0.5
    s = rng.integers(1, 9 if small_s else 128, (n, G)).astype(np.uint8)
    q = rng.integers(0, 16, (n, k))
    m = formats.expand_groups(127 // s.astype(np.int32), k, group)
    ze = formats.expand_groups(z.astype(np.int32), k, group)
    q = np.clip(q, np.maximum(0, ze - m), np.minimum(15, ze + m)).astype(np.uint8)
    cscale = (rng.random(n, dtype=np.float32) * 2e-3 + 1e-4).astype(np.float32)
    return formats.QuantLinear(kind="dg", act=act, in_features=k, out_features=n, group=group,
                               qweight=formats.pack_uint4(q), qzeros=z, gscale=s, cscale=cscale,
                               ascale=ascale if act == "static" else None)


def random_x8(m, k, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(-127, 128, (m, k)).astype(np.int8)


M32 = np.uint64(0xFFFFFFFF)


def _dq_word_np(w, s, z):
    """NumPy twin of common.cuh dq_word: uint32 words -> (a, b) uint32 of 4 int8 each."""
    w, s, z = (np.asarray(v, np.uint64) for v in (w, s, z))
    c = (np.uint64(256) - z * s) & M32
    c02 = (c * np.uint64(0x00010001)) & M32
    c13 = (c02 << np.uint64(8)) & M32
    u = w >> np.uint64(4)
    r0 = ((w & np.uint64(0x000F000F)) * s + c02) & M32
    r2 = ((w & np.uint64(0x0F000F00)) * s + c13) & M32
    r1 = ((u & np.uint64(0x000F000F)) * s + c02) & M32
    r3 = ((u & np.uint64(0x0F000F00)) * s + c13) & M32
    lo, hi = np.uint64(0x00FF00FF), np.uint64(0xFF00FF00)
    return ((r0 & lo) | (r2 & hi)).astype(np.uint32), ((r1 & lo) | (r3 & hi)).astype(np.uint32)


def _bytes_i8(v):
    """(...,) uint32 -> (..., 4) int8, byte 0 first."""
    return np.ascontiguousarray(v.astype("<u4")).view(np.int8).reshape(*v.shape, 4)


# ----------------------------------------------------------------------------- CPU: layout

@pytest.mark.parametrize("n,k,group", [(40, 576, 128), (16, 128, 128), (24, 640, 64), (8, 512, 256)])
def test_pack_unpack_roundtrip(n, k, group):
    ql = random_dg(n, k, group, seed=n + k)
    ph = ops_cuda.pack_host(ql)
    assert ph.qw.shape == (ph.n_pad // 16, ph.k_pad // 64, 32, 4) and ph.qw.dtype == np.uint32
    assert ph.k_pad % max(128, group) == 0 and ph.n_pad % 16 == 0
    q, z, s = ops_cuda.unpack_host(ph)
    np.testing.assert_array_equal(q, ql.codes())
    np.testing.assert_array_equal(z, ql.qzeros)
    np.testing.assert_array_equal(s, ql.gscale)
    # padded K and N dequantize to exactly zero: (q - z)·S = 0
    qp, zp, sp = ops_cuda.unpack_host(ph, crop=False)
    w8 = (qp.astype(np.int32) - np.repeat(zp, group, 1)) * np.repeat(sp, group, 1)
    assert not w8[:, k:].any() and not w8[n:, :].any()
    np.testing.assert_array_equal(w8[:n, :k], ql.int8_weight())


def test_group_size_rejected():
    with pytest.raises(ops_cuda.CudaOpError):
        ops_cuda.padded_dims(64, 576, 96)
    with pytest.raises(ops_cuda.CudaOpError):
        ops_cuda.pack_host(formats.QuantLinear(kind="i8", act="dynamic", in_features=8, out_features=8, group=128,
                                               qweight=np.zeros((8, 8), np.int8),
                                               cscale=np.ones(8, np.float32)))


def test_register_dequant_and_fragments_emulated():
    """Rebuild W8 the way a warp sees it: mma A fragments a0..a3 per k-step from each lane's
    16-byte vector and meta word (common.cuh), and compare with QuantLinear.int8_weight()."""
    ql = random_dg(48, 576, 128, seed=7, small_s=False)
    ph = ops_cuda.pack_host(ql)
    R, C = ph.n_pad // 16, ph.k_pad // 64
    w8 = np.zeros((ph.n_pad, ph.k_pad), np.int8)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for r in range(R):
        for c in range(C):
            vec = ph.qw[r, c]                                # (32 lanes, 4 words)
            mw = ph.meta[r, (c * 64) // ph.group][g]          # (32,) meta word of lane group g
            s_lo, z_lo = mw & 0xFF, (mw >> 8) & 0xFF
            s_hi, z_hi = (mw >> 16) & 0xFF, mw >> 24
            for step in range(2):
                a0, a2 = _dq_word_np(vec[:, 2 * step], s_lo, z_lo)       # row g
                a1, a3 = _dq_word_np(vec[:, 2 * step + 1], s_hi, z_hi)   # row g+8
                k0 = 64 * c + 32 * step
                for reg, drow, dk in ((a0, 0, 0), (a1, 8, 0), (a2, 0, 16), (a3, 8, 16)):
                    vals = _bytes_i8(reg)                                 # (32, 4)
                    for i in range(4):
                        w8[16 * r + drow + g, k0 + dk + 4 * t + i] = vals[:, i]
    np.testing.assert_array_equal(w8[:48, :576], ql.int8_weight())
    assert not w8[:, 576:].any() and not w8[48:].any()


def test_dequant_trick_exhaustive():
    """Every (code, z, S) allowed by the overflow guard, in every nibble position."""
    rows = []
    for s in range(1, 128):
        m = 127 // s
        for z in range(16):
            for q in range(max(0, z - m), min(15, z + m) + 1):
                rows.append((q, z, s))
    q, z, s = (np.array(v, np.uint64) for v in zip(*rows))
    for pos in range(8):
        # the other seven nibbles hold the zero point (a valid code: W8 = 0)
        w = sum(((q if j == pos else z) << np.uint64(4 * j)) for j in range(8))
        a, b = _dq_word_np(w, s, z)
        out = np.concatenate([_bytes_i8(a), _bytes_i8(b)], axis=1)   # k = 0,1,2,3,16,17,18,19
        order = [0, 4, 1, 5, 2, 6, 3, 7]                              # nibble j -> output slot
        expect = ((q.astype(np.int64) - z.astype(np.int64)) * s.astype(np.int64)).astype(np.int8)
        np.testing.assert_array_equal(out[:, order[pos]], expect)
        others = [i for i in range(8) if i != order[pos]]
        assert not out[:, others].any()


def _dp4a_su_np(a, b, c):
    """NumPy twin of common.cuh dp4a_su: Σ_i int8(a.byte i)·uint8(b.byte i) + c, int64."""
    av = np.ascontiguousarray(np.asarray(a, np.uint32).astype("<u4")).view(np.int8).reshape(-1, 4).astype(np.int64)
    bv = np.ascontiguousarray(np.asarray(b, np.uint32).astype("<u4")).view(np.uint8).reshape(-1, 4).astype(np.int64)
    return (av * bv).sum(axis=1) + c


@pytest.mark.parametrize("layer", ["random", "extreme"])
def test_dp4a_chunk_emulated(layer):
    """The one-token GEMV's arithmetic (common.cuh dp_chunk, dp_xsum, dp_lanes_sum) emulated
    lane by lane over the packed layout, K padded inside a group: each lane's dp4a sums of masked
    nibbles, S·(Σx·q − z·Σx) a chunk, the sum over the lanes t of a row: exactly
    formats.gemm_a8w4_ref. This checks the algebra and the fragment positions, restated here in
    NumPy; the CUDA itself is held to the reference by tests/test_gemv_decode_gpu.py."""
    rng = np.random.default_rng(11)
    ql = random_dg(40, 1100, 128, seed=3, small_s=False) if layer == "random" else extreme_dg(32, 2048, 128, rng)
    ph = ops_cuda.pack_host(ql)
    R, C = ph.n_pad // 16, ph.k_pad // 64
    x8 = np.zeros(ph.k_pad, np.int8)
    x8[:ql.in_features] = rng.integers(-127, 128, ql.in_features) if layer == "random" else \
        np.where(rng.random(ql.in_features) < 0.5, -127, 127)
    xw = x8.view("<u4")                                      # x as words: word i = x8[4i..4i+3]
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    m0f, m0h = np.uint32(0x0F0F0F0F), np.uint32(0xF0F0F0F0)
    acc = np.zeros((R, 2, 32), np.int64)                     # row tile, (row g, row g+8), lane
    for r in range(R):
        for c in range(C):
            w = ph.qw[r, c]                                  # (32, 4): x, y, z, w words of each lane
            mw = ph.meta[r, (c * 64) // ph.group][g].astype(np.int64)
            x = [xw[16 * c + 4 * q + t] for q in range(4)]   # k = 64c + 16q + 4t .. +3
            xs = sum(_dp4a_su_np(x[q], np.uint32(0x01010101), 0) for q in range(4))
            la = _dp4a_su_np(x[2], w[:, 2] & m0f, _dp4a_su_np(x[0], w[:, 0] & m0f, 0))
            lb = _dp4a_su_np(x[3], w[:, 2] & m0h, _dp4a_su_np(x[1], w[:, 0] & m0h, 0))
            ha = _dp4a_su_np(x[2], w[:, 3] & m0f, _dp4a_su_np(x[0], w[:, 1] & m0f, 0))
            hb = _dp4a_su_np(x[3], w[:, 3] & m0h, _dp4a_su_np(x[1], w[:, 1] & m0h, 0))
            assert not (lb % 16).any() and not (hb % 16).any()          # 16·q sums: >> 4 is exact
            acc[r, 0] += (mw & 0xFF) * (la + (lb >> 4) - ((mw >> 8) & 0xFF) * xs)
            acc[r, 1] += ((mw >> 16) & 0xFF) * (ha + (hb >> 4) - (mw >> 24) * xs)
    rows = acc.reshape(R, 2, 8, 4).sum(axis=3)               # dp_lanes_sum: over t
    got = rows.reshape(-1)[:ql.out_features]                 # rows 16r + 8h + g
    want = formats.gemm_a8w4_ref(x8[None, :ql.in_features], ql.int8_weight())[0]
    assert np.all(np.abs(rows) < 2**31)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- GPU

def _cp():
    import cupy
    return cupy


def _acc_check(ql, x8, kernel, cfg=None):
    cp = _cp()
    layer = ops_cuda.pack_for_gpu(ql)
    ref = formats.gemm_a8w4_ref(x8, ql.int8_weight())
    out = cp.full((x8.shape[0], ql.out_features), -12345, dtype=cp.int32)
    got = ops_cuda.gemm_a8w4_acc(cp.asarray(x8), layer, kernel=kernel, cfg=cfg, out=out)
    bad = np.argwhere(cp.asnumpy(got) != ref)
    assert bad.size == 0, f"{kernel}: {len(bad)} wrong of {ref.size}, first at {bad[:3].tolist()}"
    return layer, ref


def _f16_check(ql, layer, x8, ref_acc, sx, kernel):
    cp = _cp()
    want = formats.epilogue_ref(ref_acc, sx, ql.cscale).astype(np.float16)
    out = cp.full(want.shape, np.float16(np.nan), dtype=cp.float16)
    got = cp.asnumpy(ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx), layer, kernel=kernel, out=out))
    assert not np.isnan(got).any(), f"{kernel}: unwritten outputs"
    # fp16 ulp distance (same sign ordering trick); the kernel computes the same float32 value
    gi = got.view(np.int16).astype(np.int32)
    wi = want.view(np.int16).astype(np.int32)
    gi = np.where(gi < 0, -32768 - gi, gi)
    wi = np.where(wi < 0, -32768 - wi, wi)
    ulp = np.abs(gi - wi).max(initial=0)
    assert ulp <= 1, f"{kernel}: fp16 output differs by {ulp} ulp"
    return ulp


@gpu
@needs_gpu
@pytest.mark.parametrize("m,k,n,group", [
    (1, 4096, 1024, 128), (3, 576, 200, 128), (8, 128, 8, 128), (16, 2048, 520, 128),
    (17, 1024, 264, 64), (33, 1280, 136, 128), (64, 576, 192, 128), (130, 2304, 1032, 128),
    (300, 1024, 392, 256),
])
def test_gemm_bitexact_all_kernels(m, k, n, group):
    ql = random_dg(n, k, group, seed=m * 7 + n)
    x8 = random_x8(m, k, seed=m + k)
    sx = (np.random.default_rng(m).random(m, dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
    for kernel in ops_cuda.kernels_for(m):
        layer, ref = _acc_check(ql, x8, kernel)
        _f16_check(ql, layer, x8, ref, sx, kernel)


@gpu
@needs_gpu
def test_gemm_fuzz():
    rng = np.random.default_rng(2026)
    for case in range(14):
        m = int(rng.integers(1, 301))
        k = int(rng.integers(1, 129)) * 128
        n = int(rng.integers(1, 97)) * 8
        group = int(rng.choice([64, 128, 128, 256]))   # 256 with K % 256 = 128: short last group
        ql = random_dg(n, k, group, seed=case)
        x8 = random_x8(m, k, seed=100 + case)
        sx = (rng.random(m, dtype=np.float32) * 0.05 + 1e-4).astype(np.float32)
        for kernel in ops_cuda.kernels_for(m):
            layer, ref = _acc_check(ql, x8, kernel)
        _f16_check(ql, layer, x8, ref, sx, "auto")


@gpu
@needs_gpu
@pytest.mark.parametrize("m,n,k", [(1025, 1001, 4100), (2047, 4103, 1000), (4096, 517, 11010),
                                   (8192, 1001, 4100), (3, 7, 130), (77, 999, 2050)])
def test_gemm_bitexact_any_shape(m, n, k):
    """Issue 20's shapes: odd N (the kernels' scalar stores), K even but not a multiple of the
    128-wide tile (a short last group), M up to 8192 (the large tiles and their automatic tail
    splits); every kernel for M in int32, the default choice in fp16."""
    rng = np.random.default_rng(m * 7 + n)
    ql = random_dg(n, k, int(rng.choice([64, 128])), seed=m + n + k)
    x8 = random_x8(m, k, seed=k)
    sx = (rng.random(m, dtype=np.float32) * 0.05 + 1e-4).astype(np.float32)
    for kernel in ops_cuda.kernels_for(m):
        layer, ref = _acc_check(ql, x8, kernel)
    _f16_check(ql, layer, x8, ref, sx, "auto")


def extreme_dg(n, k, group, rng):
    """A "dg" layer at the edges of its format: codes 0 and 15 against zero points 15 and 0,
    S = 127, 8, 9 and 1 (|(q - z)·S| within int8)."""
    G = k // group
    z = np.where(rng.random((n, G)) < 0.5, 0, 15).astype(np.uint8)
    s = rng.choice(np.array([127, 8, 9, 1], np.uint8), (n, G))
    m = formats.expand_groups(127 // s.astype(np.int32), k, group)
    ze = formats.expand_groups(z.astype(np.int32), k, group)
    q = np.where(rng.random((n, k)) < 0.5, 0, 15)
    q = np.clip(q, np.maximum(0, ze - m), np.minimum(15, ze + m)).astype(np.uint8)
    return formats.QuantLinear(kind="dg", act="dynamic", in_features=k, out_features=n, group=group,
                               qweight=formats.pack_uint4(q), qzeros=z, gscale=s,
                               cscale=np.full(n, 1e-6, np.float32))


@gpu
@needs_gpu
def test_gemm_extremes():
    """Codes 0 and 15 against zero points 15 and 0, S = 127 and S = 8/9, |x8| = 127, K = 16384."""
    n, k, group = 64, 16384, 128
    G = k // group
    rng = np.random.default_rng(5)
    ql = extreme_dg(n, k, group, rng)
    x8 = np.where(rng.random((20, k)) < 0.5, -127, 127).astype(np.int8)
    x8[0] = 127
    for kernel in ops_cuda.kernels_for(20):
        _acc_check(ql, x8, kernel)
    # all-maximal row against all-maximal weights: |acc| = 127²·16384 still fits int32
    ql2 = formats.QuantLinear(kind="dg", act="dynamic", in_features=k, out_features=8, group=group,
                              qweight=formats.pack_uint4(np.full((8, k), 1, np.uint8)),
                              qzeros=np.zeros((8, G), np.uint8), gscale=np.full((8, G), 127, np.uint8),
                              cscale=np.ones(8, np.float32))
    for kernel in ops_cuda.kernels_for(1):
        _, ref = _acc_check(ql2, np.full((1, k), 127, np.int8), kernel)
        assert ref[0, 0] == 127 * 127 * k


@gpu
@needs_gpu
@pytest.mark.parametrize("k", [128, 576])
def test_gemm_small_k_and_m1(k):
    ql = random_dg(24, k, 128, seed=k)
    x8 = random_x8(1, k, seed=k)
    for kernel in ops_cuda.kernels_for(1):
        _acc_check(ql, x8, kernel)


@gpu
@needs_gpu
def test_split_k_repeatable():
    """Forced split-K: counters re-arm, so a second launch on the same workspace is still exact."""
    ql = random_dg(256, 4096, 128, seed=11)
    x8 = random_x8(96, 4096, seed=12)
    for kernel in [k for k in ops_cuda.kernels_for(96) if k != "gemv"]:
        for _ in range(2):
            _acc_check(ql, x8, kernel, cfg={"splits": 3})


@gpu
@needs_gpu
def test_quant_static_bitexact():
    cp = _cp()
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((37, 1000)) * 3).astype(np.float16)
    s = np.float32(0.0371)
    x[0, :10] = (np.arange(10) + 0.5) * 0.125   # exact ties with s = 0.125 below
    for dt in (np.float16, np.float32):
        for scale in (s, np.float32(0.125)):
            got = cp.asnumpy(ops_cuda.quantize_act_static(cp.asarray(x.astype(dt)), scale, k_pad=1024))
            np.testing.assert_array_equal(got[:, :1000], formats.quantize_act_ref(x.astype(np.float32), scale))
            assert not got[:, 1000:].any()


@gpu
@needs_gpu
def test_quant_dynamic_bitexact():
    cp = _cp()
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((19, 576)) * rng.random((19, 1)) * 40).astype(np.float16)
    x[3] = 0
    for dt in (np.float16, np.float32):
        x8, sx = ops_cuda.quantize_act_dynamic(cp.asarray(x.astype(dt)), k_pad=640)
        want_s = formats.act_scale_dynamic(x.astype(np.float32))
        np.testing.assert_array_equal(cp.asnumpy(sx), want_s)
        got = cp.asnumpy(x8)
        np.testing.assert_array_equal(got[:, :576], formats.quantize_act_ref(x.astype(np.float32), want_s))
        assert not got[:, 576:].any()


@gpu
@needs_gpu
@pytest.mark.parametrize("act,m", [("dynamic", 1), ("static", 5), ("dynamic", 77)])
def test_linear_matches_linear_ref(act, m):
    """Quantize + GEMM on the GPU vs formats.linear_ref (fp32 input, K = 576 padded to 640)."""
    cp = _cp()
    ql = random_dg(192, 576, 128, seed=m, act=act, ascale=0.03)
    x = (np.random.default_rng(m).standard_normal((m, 576)) * 2).astype(np.float32)
    want = formats.linear_ref(x, ql).astype(np.float16)
    got = cp.asnumpy(ops_cuda.linear_a8w4(cp.asarray(x), ops_cuda.pack_for_gpu(ql)))
    np.testing.assert_array_equal(got, want)


@gpu
@needs_gpu
def test_every_instantiated_variant_bitexact():
    """Every GEMV (MT, RW, U) and wgmma (BT, STAGES, NWG, WPF, OVL) the registry compiles,
    with K = 1152 (9 stages: odd, not a multiple of the weight prefetch ring) and split-K."""
    ql = random_dg(200, 1152, 128, seed=21)
    sx = lambda m: (np.random.default_rng(m).random(m, dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
    for mt, cfgs in ops_cuda.GEMV_CFGS.items():
        m = 8 * mt - 3
        x8 = random_x8(m, 1152, seed=mt)
        for rw, u in cfgs:
            layer, ref = _acc_check(ql, x8, "gemv", cfg={"mt": mt, "rw": rw, "u": u})
        for rw, u in ops_cuda.GEMV_WIDE.get(mt, ()):                 # 16 warps a block
            layer, ref = _acc_check(ql, x8, "gemv", cfg={"mt": mt, "rw": rw, "u": u, "nw": 16})
    for m in (40, 150):
        x8 = random_x8(m, 1152, seed=m)
        for bm, _ in ops_cuda.MMA_CFGS:
            for splits in (1, 2):
                _acc_check(ql, x8, "mma", cfg={"bm": bm, "splits": splits})
        if not ops_cuda.has_wgmma():
            continue
        for bt, st, nwg, wpf, ovl in ops_cuda.WGMMA_CFGS:
            cfg = {"bt": bt, "stages": st, "nwg": nwg, "wpf": wpf, "ovl": ovl}
            for splits in (1, 2):
                layer, ref = _acc_check(ql, x8, "wgmma", cfg={**cfg, "splits": splits})
            cp = _cp()
            want = formats.epilogue_ref(ref, sx(m), ql.cscale).astype(np.float16)
            got = ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx(m)), layer, kernel="wgmma", cfg=cfg,
                                     out=cp.full(want.shape, np.float16(np.nan), dtype=cp.float16))
            np.testing.assert_array_equal(cp.asnumpy(got), want, err_msg=str(cfg))


@gpu
@needs_gpu
def test_wgmma_split_tail_bitexact():
    """The split tail (cfg["tail"] = [tail_from, splits]: the tiles from tail_from on split K,
    the rest whole) of every instantiated wgmma tile: int32 and fp16 outputs bit-exact, the tail at
    the first, a middle and the last tile, 2, 3 and 7 ways (more than a split has stages for the
    ring: K = 1152 is 9 stages), each twice on one workspace (the counters re-arm)."""
    cp = _cp()
    if not ops_cuda.has_wgmma():
        pytest.skip("needs sm_90")
    ql = random_dg(520, 1152, 128, seed=33)
    for bt, st, nwg, wpf, ovl in ops_cuda.WGMMA_CFGS:
        m = 2 * bt + 5
        x8 = random_x8(m, 1152, seed=bt)
        sxm = (np.random.default_rng(m).random(m, dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
        tiles = 3 * -(-520 // (64 * nwg))
        cfg = {"bt": bt, "stages": st, "nwg": nwg, "wpf": wpf, "ovl": ovl, "splits": 1}
        for tail in ([0, 2], [tiles // 2, 3], [tiles - 1, 7]):
            for _ in range(2):
                layer, ref = _acc_check(ql, x8, "wgmma", cfg={**cfg, "tail": tail})
            want = formats.epilogue_ref(ref, sxm, ql.cscale).astype(np.float16)
            got = ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sxm), layer, kernel="wgmma", cfg={**cfg, "tail": tail},
                                     out=cp.full(want.shape, np.float16(np.nan), dtype=cp.float16))
            np.testing.assert_array_equal(cp.asnumpy(got), want, err_msg=f"{cfg} tail {tail}")
    with pytest.raises(ops_cuda.CudaOpError, match="tail"):
        _acc_check(ql, random_x8(40, 1152, seed=1), "wgmma", cfg={**cfg, "splits": 2, "tail": [1, 2]})


@gpu
@needs_gpu
def test_wgmma_automatic_split_tail_bitexact():
    """The split tail the 256-token tile takes by itself on a shape past one wave (M = 1024, the
    tiles one wave + 12 on this GPU's SMs: perfmodel.tail_split splits those 12 tiles), and as
    cfg {"tail": 2}, int32 accumulators bit-exact."""
    if not ops_cuda.has_wgmma():
        pytest.skip("needs sm_90")
    from engine.gpu import kernels, perfmodel
    sm = kernels.device_info()["sm_count"]
    n, k = 128 * -(-(sm + 12) // 4), 3072
    cfg = {"bt": 256, "stages": 4, "nwg": 2, "wpf": 0, "ovl": 2, "splits": 1}
    plan = perfmodel.launch_plan("wgmma", cfg, 1024, n, k, 128, sm)
    assert plan["tail_splits"] > 1 and plan["tail_from"] == plan["tiles"] - plan["tiles"] % sm
    ql = random_dg(n, k, 128, seed=5)
    x8 = random_x8(1024, k, seed=6)
    for c in (cfg, {**cfg, "tail": 2}):
        _acc_check(ql, x8, "wgmma", cfg=c)


@gpu
@needs_gpu
@pytest.mark.parametrize("group", [64, 128])
def test_wgmma_shared_memory_weights_bitexact(group):
    """The WPF = 0 tiles (weights and meta through the shared-memory ring with the activations)
    at the token counts they serve, N = 200 (a partial row tile: zero-filled copies), K = 1152 and
    1408 (9 and 11 stages), split K 1, 2 and 5 (fewer stages a block than the ring keeps in
    flight), int32 accumulators and the fp16 epilogue."""
    cp = _cp()
    if not ops_cuda.has_wgmma():
        pytest.skip("needs sm_90")
    wsm = [c for c in ops_cuda.WGMMA_CFGS if c[3] == 0]
    assert wsm
    for k in (1152, 1408):
        ql = random_dg(200, k, group, seed=k + group)
        for m in (17, 32, 64):
            x8 = random_x8(m, k, seed=m)
            sxm = (np.random.default_rng(m).random(m, dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
            for bt, st, nwg, wpf, ovl in wsm:
                if m > bt:
                    continue
                cfg = {"bt": bt, "stages": st, "nwg": nwg, "wpf": wpf, "ovl": ovl}
                for splits in (1, 2, 5):
                    layer, ref = _acc_check(ql, x8, "wgmma", cfg={**cfg, "splits": splits})
                want = formats.epilogue_ref(ref, sxm, ql.cscale).astype(np.float16)
                got = ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sxm), layer, kernel="wgmma", cfg=cfg,
                                         out=cp.full(want.shape, np.float16(np.nan), dtype=cp.float16))
                np.testing.assert_array_equal(cp.asnumpy(got), want, err_msg=str(cfg))


@gpu
@needs_gpu
@pytest.mark.parametrize("cluster_max", [0, 8])
def test_wgmma_split_k_cluster_and_workspace_bitexact(cluster_max, monkeypatch):
    """Split K 2, 3, 5 and 8 ways, the partials summed in a thread block cluster (GEMM.wgmma_cluster_max
    = 8, the tiles of ops.wgmma_cluster_tile: each CTA finishes its share of the token groups, uneven
    at 3 and 5 ways, empty for some CTAs where a 32-token tile has 4 groups for 5 or 8) or through
    the workspace turnstile (0, and the other tiles); every WPF = 0 tile and two register-ring
    tiles, M within one and over two token tiles, int32 accumulators and the fp16 epilogue."""
    cp = _cp()
    if not ops_cuda.has_wgmma():
        pytest.skip("needs sm_90")
    monkeypatch.setattr(ops_cuda.GEMM, "wgmma_cluster_max", cluster_max)
    assert (ops_cuda._split_cluster(3, 1) is not None) == (cluster_max > 0)
    assert ops_cuda._split_cluster(9, 1) is None and ops_cuda._split_cluster(3, 2) is None
    clusters = []                        # (splits, the rule's answer) of every call
    rule = ops_cuda._split_cluster
    monkeypatch.setattr(ops_cuda, "_split_cluster", lambda *a: clusters.append((a[0], rule(*a))) or clusters[-1][1])
    tiles = [c for c in ops_cuda.WGMMA_CFGS if c[3] == 0] + [(128, 4, 2, 2, 2), (64, 6, 1, 4, 2)]
    ql = random_dg(200, 1152, 128, seed=7)
    for m in (17, 64, 130):
        x8 = random_x8(m, 1152, seed=m)
        sxm = (np.random.default_rng(m).random(m, dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
        for bt, st, nwg, wpf, ovl in tiles:
            if m > 2 * bt:
                continue
            for splits in (2, 3, 5, 8):
                cfg = {"bt": bt, "stages": st, "nwg": nwg, "wpf": wpf, "ovl": ovl, "splits": splits}
                layer, ref = _acc_check(ql, x8, "wgmma", cfg=cfg)
                want = formats.epilogue_ref(ref, sxm, ql.cscale).astype(np.float16)
                got = ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sxm), layer, kernel="wgmma", cfg=cfg,
                                         out=cp.full(want.shape, np.float16(np.nan), dtype=cp.float16))
                np.testing.assert_array_equal(cp.asnumpy(got), want, err_msg=str(cfg))
    # every split of a cluster tile ran in a cluster (these few tiles are always resident), or none did
    assert clusters and all((c is not None) == (cluster_max > 0 and s > 1) for s, c in clusters), clusters


@gpu
@needs_gpu
def test_wgmma_blocks_is_the_driver_occupancy():
    """tuning.wgmma_blocks (what split-K fills, ops and the performance model alike) is the number
    of blocks an SM the driver reports for every compiled wgmma configuration."""
    cp = _cp()
    if not ops_cuda.has_wgmma():
        pytest.skip("needs sm_90")
    from engine.gpu import kargs, tuning
    for bt, st, nwg, wpf, ovl in ops_cuda.WGMMA_CFGS:
        expr = f"gemm_a8w4_wgmma<{bt},{st},{nwg},{wpf},{ovl},false>"
        fn = kargs.function(ops_cuda.WGMMA_FILE, expr)
        smem = tuning.wgmma_smem(bt, st, nwg, wpf)
        ops_cuda.set_smem(fn, smem)
        occ = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.raw.kernel.ptr, nwg * 128, smem)
        assert occ == tuning.wgmma_blocks(bt, nwg, wpf, st), (expr, fn.num_regs, occ)


@gpu
@needs_gpu
@pytest.mark.parametrize("m,cfg,kernel", [(1, {}, "gemv"), (3, {}, "gemv"), (1, {"rw": 2, "u": 2}, "gemv"),
                                          (12, {"rw": 4, "u": 2}, "gemv"), (1, {"rw": 1, "u": 2, "nw": 16}, "gemv"),
                                          (12, None, "auto")])
def test_gemv_residual_add_bitexact(m, cfg, kernel):
    """gemm_a8w4(resid=h): the GEMV adds fp16(y) into float32 h instead of writing y, bit-exactly
    as h + float(y) (the add of add_rmsnorm_quant), and leaves out untouched. "auto" at M = 12,
    which runs wgmma on sm_90 without resid (ops.gemv_max_m() = 8), still adds through the GEMV
    (up to GEMM.gemv_max_m rows)."""
    cp = _cp()
    rng = np.random.default_rng(40 + m)
    ql = random_dg(200, 576, 128, seed=m)
    layer = ops_cuda.pack_for_gpu(ql)
    x8 = random_x8(m, 576, seed=m)
    sx = (rng.random(m, dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
    y = formats.epilogue_ref(formats.gemm_a8w4_ref(x8, ql.int8_weight()), sx, ql.cscale).astype(np.float16)
    h0 = rng.standard_normal((m, 200)).astype(np.float32)
    h = cp.asarray(h0)
    got = ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx), layer, kernel=kernel, cfg=cfg, resid=h)
    assert got is h
    np.testing.assert_array_equal(h.get(), h0 + y.astype(np.float32))
    out = cp.full((m, 200), np.nan, cp.float16)                  # given out as well: left as it was
    h = cp.asarray(h0)
    ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx), layer, kernel=kernel, cfg=cfg, out=out, resid=h)
    assert np.isnan(out.get()).all()
    np.testing.assert_array_equal(h.get(), h0 + y.astype(np.float32))
    if kernel == "auto":                                         # without resid: whichever kernel, the same y
        np.testing.assert_array_equal(cp.asnumpy(ops_cuda.gemm_a8w4(cp.asarray(x8), cp.asarray(sx), layer)), y)


@gpu
@needs_gpu
def test_gemv_residual_rejects_bad_input():
    cp = _cp()
    layer = ops_cuda.pack_for_gpu(random_dg(64, 256, 128, seed=2))
    x8, sx = cp.zeros((1, 256), cp.int8), cp.ones((1,), cp.float32)
    with pytest.raises(ops_cuda.CudaOpError, match="resid must be"):
        ops_cuda.gemm_a8w4(x8, sx, layer, resid=cp.zeros((1, 64), cp.float16))
    with pytest.raises(ops_cuda.CudaOpError, match="runs in the GEMV"):
        ops_cuda.gemm_a8w4(cp.zeros((40, 256), cp.int8), cp.ones((40,), cp.float32), layer,
                           resid=cp.zeros((40, 64), cp.float32))


def test_interleave_rows():
    """Each 16-row tile of the interleaved gate|up layer: 8 gate channels, then the same 8 up."""
    p = ops_cuda.interleave_rows(64)
    assert sorted(p) == list(range(64))
    t = p.reshape(-1, 16)
    for r, tile in enumerate(t):
        np.testing.assert_array_equal(tile[:8], np.arange(8 * r, 8 * r + 8))
        np.testing.assert_array_equal(tile[8:], tile[:8] + 32)
    with pytest.raises(ops_cuda.CudaOpError, match="I % 8"):
        ops_cuda.interleave_rows(40)


@gpu
@needs_gpu
@pytest.mark.parametrize("inter,k", [(64, 576), (1376, 1024)])
def test_gemv_silu_then_quant_equals_row_kernel_path(inter, k):
    """The batch-1 MLP without silu_mul_quant: gate|up interleaved → SiLU GEMV (fp32 row + atomic
    absmax) → quant_amax → down, against the launch sequence it replaces (gate|up GEMM →
    silu_mul_quant → down GEMM): the same int8 row, scale and bits in h."""
    import cupy as cp
    from engine.gpu import fused
    from engine.gpu.fused import MODE, RowShape
    from engine.gpu.linear import _fuse
    gate, up = random_dg(inter, k, 128, seed=1), random_dg(inter, k, 128, seed=2)
    down = ops_cuda.pack_for_gpu(random_dg(96, inter, 128, seed=3))
    gu = _fuse([gate, up])
    plain = ops_cuda.pack_for_gpu(gu)
    inter_l = ops_cuda.pack_for_gpu(gu.take_rows(ops_cuda.interleave_rows(2 * inter)))
    x8 = cp.asarray(random_x8(1, k, seed=5))
    sx = cp.asarray(np.float32([0.013]))
    h0 = np.random.default_rng(0).standard_normal((1, 96)).astype(np.float32)

    # the launches it replaces
    g = ops_cuda.gemm_a8w4(x8, sx, plain)
    m8, msx = cp.zeros((1, down.k_pad), cp.int8), cp.zeros((1,), cp.float32)
    fused.silu_mul_quant(1, RowShape(), gu=g, I=inter, mode=MODE["dynamic"], static_scale=cp.ones(1, cp.float32),
                         x8=m8, ld=down.k_pad, sx=msx, mh=cp.zeros((1, inter), cp.float16), il=0)
    want = cp.asarray(h0)
    ops_cuda.gemm_a8w4(m8, msx, down, resid=want)

    mf = cp.full((1, inter), np.nan, cp.float32)
    amax = cp.zeros((1,), cp.uint32)
    ops_cuda.gemv_a8w4_silu(x8, sx, inter_l, mf, amax)
    gh = g.get().astype(np.float32)
    ref = gh[:, :inter] / (1 + np.exp(-gh[:, :inter])) * gh[:, inter:]
    np.testing.assert_allclose(mf.get(), ref, rtol=1e-5, atol=1e-7)          # silu(gate)·up, float32
    assert amax.get().view(np.float32)[0] == np.abs(mf.get()).max()          # the atomic absmax
    np.testing.assert_array_equal(m8.get()[0, :inter],                       # the row kernel's int8
                                  formats.quantize_act_ref(mf.get(), msx.get())[0])
    q8, qsx = cp.full((1, down.k_pad), 9, cp.int8), cp.zeros((1,), cp.float32)
    fused.quant_amax(1, x=mf, K=inter, mode=MODE["dynamic"], static_scale=None, amax=amax, x8=q8,
                     ld=down.k_pad, sx=qsx)
    np.testing.assert_array_equal(q8.get(), m8.get())                        # pad columns zeroed too
    np.testing.assert_array_equal(qsx.get(), msx.get())
    h = cp.asarray(h0)
    ops_cuda.gemm_a8w4(q8, qsx, down, resid=h)
    np.testing.assert_array_equal(h.get(), want.get())


@gpu
@needs_gpu
def test_gemv_silu_rejects_bad_input():
    cp = _cp()
    layer = ops_cuda.pack_for_gpu(random_dg(64, 256, 128, seed=2))
    x8, sx, amax = cp.zeros((1, 256), cp.int8), cp.ones((1,), cp.float32), cp.zeros((1,), cp.uint32)
    with pytest.raises(ops_cuda.CudaOpError, match="out must be"):
        ops_cuda.gemv_a8w4_silu(x8, sx, layer, cp.zeros((1, 64), cp.float32), amax)
    with pytest.raises(ops_cuda.CudaOpError, match="amax must be"):
        ops_cuda.gemv_a8w4_silu(x8, sx, layer, cp.zeros((1, 32), cp.float32), cp.zeros((1,), cp.float32))
    with pytest.raises(ops_cuda.CudaOpError, match="one token"):
        ops_cuda.gemv_a8w4_silu(cp.zeros((2, 256), cp.int8), cp.ones((2,), cp.float32), layer,
                                cp.zeros((1, 32), cp.float32), amax)
