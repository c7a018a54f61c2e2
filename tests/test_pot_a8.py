"""The W3-PoT × INT8 layout (engine/formats/pot_a8.py) and the bit tricks of cuda/gemv_pot_a8.cu, on the CPU.

Round trips of the packing (odd shapes, K past a warp step, the spare code under both signs of
the scale), the kernel's selector masking, prmt lookup (with its sign-replicate rule) and dp4a
word for word against the code table, the exact fma emulation, and the reference GEMV against
a float64 W·x. tests/test_pot_a8_gpu.py runs the kernel against the same reference.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from engine.formats import planes, pot
from engine.formats import pot_a8 as P

SHAPES = [(1, 1), (5, 77), (8, 1024), (9, 1056), (16, 1100), (3, 4096), (13, 2080)]


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
    assert w.shape == (P.n_tiles(n), P.n_steps(k), 3, 8, 32)
    assert np.array_equal(P.unpack_pot_a8(w, n, k), codes)
    # everything past K and past N is code 0 (the kernel reads it as weight 0)
    full = P.unpack_pot_a8(w, P.n_tiles(n) * 8, P.n_steps(k) * 1024)
    assert not full[n:].any() and not full[:, k:].any()
    sp = P.pack_scales(s, k)
    assert sp.shape == (P.n_tiles(n), P.n_steps(k), 8, 8)
    assert np.array_equal(P.unpack_scales(sp, n, k), s)
    assert np.count_nonzero(sp) == np.count_nonzero(s)


def test_word_layout_by_hand():
    """Channel 8j + q: bits 0-2 of nibble q of word j; channel 24 + q: bit b in bit 3 of nibble q of word b."""
    codes = np.zeros((1, 32), dtype=np.uint8)
    codes[0, 8 * 1 + 5] = 6                 # word 1, nibble 5
    codes[0, 24 + 2] = 5                    # bits 0 and 2: bit 3 of nibble 2 of words 0 and 2
    w = P.pack_pot_a8(codes)[0, 0, :, 0, 0]
    assert [hex(v) for v in w] == [hex(1 << 11), hex(6 << 20), hex(1 << 11)]


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
            w = P.pack_pot_a8(codes)[0, 0, :, 0, 0]
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
    tiles = np.zeros((m, 1, 3, 8, 32), dtype=np.uint32)
    tiles[:, 0, :, 0, 0] = w
    codes = np.stack([P.unpack_pot_a8(t[None], 1, 32)[0] for t in tiles])
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
    """The kernel's control flow, one scalar at a time (warps, lanes, the two register batches)."""
    kc = P.n_chunks(k)
    steps = P.n_steps(k)
    dots = P.chunk_dots(words, n, x8[:k])
    s32 = np.zeros((n, 8 * steps), np.float32)
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
                        d = dots[row, c] if c < kc else 0
                        acc = P.fma32(s32[row, c >> 2], np.float32(d), acc)[()]
                    st += 2 * nw
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


@pytest.mark.parametrize("n,k,nw", [(3, 77, 4), (2, 5000, 4), (2, 9000, 8), (1, 3100, 8)])
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
    the kernel's parameters, the grid one block per RB rows and token; bad inputs get one clear error."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import host_gemm
    import host_prefill

    from engine.gpu import kargs, pot_a8
    from engine.gpu.ops import CudaOpError
    n, k = 13, 1100
    codes, s = rand_layer(np.random.default_rng(5), n, k)
    words, scale = P.pack_pot_a8(codes), P.pack_scales(s, k)
    grids, exprs = [], []
    real = host_gemm._Kernel.launch_bound
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound",
                        lambda self, grid, block, bound, args, *a, **kw: (grids.append((grid, block)),
                                                                          real(self, grid, block, bound, args, *a, **kw)))
    with host_prefill.faked() as cp:
        monkeypatch.setattr(pot_a8, "require_cupy", lambda: cp)
        p = pot_a8.upload(words, scale, n, k)
        x8 = cp.zeros(32 * P.n_chunks(k), dtype=np.int8)
        sx = cp.ones(1, dtype=np.float32)
        with kargs.intercepted(lambda expr, run: (exprs.append(expr), run())):
            for v in pot_a8.VARIANTS:
                pot_a8.gemv_pot_a8(x8, sx, p, variant=v)
            x3 = cp.zeros((3, 1136), dtype=np.int8)                   # three tokens, rows of 1136 bytes
            assert pot_a8.gemv_pot_a8(x3, cp.ones(3, dtype=np.float32), p).shape == (3, n)
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
        "gemv_pot3_a8<8, 4, false>", pot_a8.SILU_EXPR]
    assert [g for g, _ in grids] == [(-(-n // rb), 1) for rb, _ in pot_a8.VARIANTS] + [(2, 3), (4, 1)]
    assert [b for _, b in grids] == [(32 * nw,) for _, nw in pot_a8.VARIANTS] + [(128,), (128,)]


def test_model_runs_pot3_layers_through_the_a8_gemv_with_a_fake_cupy(monkeypatch):
    """tuning.WB_TUNE.pot3_a8 at load: every pot3 linear of a (fake-CuPy) CudaModel holds the
    pot3-a8 layout, its norms and quantizers write INT8 rows of K padded to 32 (mode dynamic),
    and a prefill of M tokens launches gemv_pot3_a8 over a (row blocks, M) grid for q|k|v, o,
    gate|up and down, and no fp16-activation GEMV; a decode step's layers fold their quantization
    (the SiLU variant, quant_amax). Off (the default), the same model loads its layers for gemv_pot."""
    import dataclasses
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import host_gemm
    import host_prefill

    from engine.bench.e2e import SMOLLM2, random_model
    from engine.gpu import kargs, tuning
    from engine.gpu import pot_a8 as gpu_pot_a8
    from engine.gpu.cache import Buffers
    from engine.gpu.fused import MODE
    cfg = dataclasses.replace(SMOLLM2, num_hidden_layers=2)
    mw = random_model(cfg, 3)
    launches = []
    real = host_gemm._Kernel.launch_bound
    monkeypatch.setattr(host_gemm._Kernel, "launch_bound",
                        lambda self, grid, block, bound, args, *a, **kw: (launches.append((grid, dict(args))),
                                                                          real(self, grid, block, bound, args, *a, **kw)))

    def run(a8: bool, m: int):
        exprs, pairs = [], []
        launches.clear()
        monkeypatch.setattr(tuning.WB_TUNE, "pot3_a8", a8)
        with host_prefill.faked() as cp:
            monkeypatch.setattr(gpu_pot_a8, "require_cupy", lambda: cp)
            for name in ("stack", "concatenate"):               # gpu/wb.py's tiles (pot3_a8 off)
                setattr(cp, name, host_prefill._fake(getattr(np, name)))
            from engine.gpu.model import CudaModel
            gm = CudaModel(mw)
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

    gm, exprs, pairs = run(True, 5)
    assert all(g.pa8 is not None and g.wb is None and g.mode == MODE["dynamic"] and g.kp % 32 == 0
               for L in gm.layers for g in L.linears())
    a8 = [(grid, args) for e, (grid, args) in pairs if e.startswith("gemv_pot3_a8")]
    assert len(a8) == 4 * cfg.num_hidden_layers and not any(e.startswith("gemv_pot<") for e in exprs)
    ns = [cfg.q_size + 2 * cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size, 2 * cfg.intermediate_size,
          cfg.hidden_size] * cfg.num_hidden_layers
    rb = gpu_pot_a8.DEFAULT[0]
    assert [grid for grid, _ in a8] == [(-(-n // rb), 5) for n in ns]
    assert [args["N"] for _, args in a8] == ns and all(args["ldo"] == args["N"] for _, args in a8)
    assert [args["ldx"] for _, args in a8] == [cfg.hidden_size, cfg.q_size, cfg.hidden_size,
                                               cfg.intermediate_size] * cfg.num_hidden_layers
    rows = [args["mode"] for e, (_, args) in pairs if "rmsnorm_quant" in e or "quant_rows" in e or "silu_mul_quant" in e]
    # per layer: norm, quant of the attention output, norm, silu_mul_quant; the final norm feeds the fp16 head
    assert rows == [MODE["dynamic"]] * 4 * cfg.num_hidden_layers + [MODE["fp16"]]

    # the one-token step folds its quantization (CudaModel._fold_quant): the SiLU variant for gate|up
    # (grid I/4, writing mf and amax), quant_amax for o and down, no silu_mul_quant or quant_rows
    assert folds == [True, False]
    per = cfg.num_hidden_layers
    assert sum(e == gpu_pot_a8.SILU_EXPR for e in steps) == per
    assert sum(e.startswith("gemv_pot3_a8") for e in steps) == 4 * per
    assert sum(e.startswith("quant_amax") for e in steps) == 2 * per
    assert not any(e.startswith(("silu_mul_quant", "quant_rows")) for e in steps)
    silu = [args for grid, args in launches if "mf" in args and args["mf"] is not None]
    assert len(silu) == per and all(a["N"] == 2 * cfg.intermediate_size and a["amax"] is not None for a in silu)

    gm, _, _ = run(False, 5)
    assert all(g.pa8 is None and g.wb is not None and g.mode == MODE["fp16"] for L in gm.layers for g in L.linears())
