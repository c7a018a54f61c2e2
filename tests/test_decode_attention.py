"""attn_decode_gqa (cuda/attention.cu) on the CPU: its launch rules, and a NumPy emulation of
what it computes — the lanes' cp.async records, the mma.sync fragments built from them (byte
permutes and the int8 → fp16 bias trick bit for bit), the online softmax of each warp, the merge
of the warps and of the splits — against a float64 one-pass softmax. No GPU: the index maps and
the split/merge arithmetic are held here; tests/test_decode_attention_gpu.py runs the kernel.

The emulation mirrors the kernel's names (g, t, kg, jv, CHK, CHV, d0, ...); mma m16n8k16 is the
PTX fragment layout: A row g / g + 8, columns 2t, 2t+1 (+8); B rows 2t, 2t+1 (+8), column g;
C row g / g + 8, columns 2t, 2t+1.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from engine.gpu import attention, kargs, kernels, tuning
from engine.model.kv_cache import quantize_kv_ref

ROOT = Path(__file__).resolve().parent.parent
A = tuning.ATTENTION


def defines() -> dict[str, int]:
    text = (ROOT / "cuda" / "attention.cu").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define (\w+) (\d+)\b", text, re.M)}


# ----------------------------------------------------------------------------- launch rules
def test_gqa_kernel_takes_attn_decodes_parameters():
    """The attn_decode launcher passes its keywords (checked against attn_decode by
    tests/test_kernel_args.py) to either kernel: the two parameter lists are one."""
    assert kargs.signature("attention.cu", "attn_decode_gqa") == kargs.signature("attention.cu", "attn_decode")
    for t in A.kv_types:
        for d in A.head_dims:
            assert f"attn_decode_gqa<{t}, {d}>" in attention.ATTN_EXPRS


def test_gqa_constants_and_shared_memory():
    d = defines()
    assert d["GQ_WARPS"] * 32 == A.threads
    assert (d["GQ_HEADS"], d["GQ_STEP"]) == (A.gqa_heads, A.gqa_step)
    assert A.gqa_max_splits <= d["GQ_MAX_SPLITS"]
    body = re.search(r"struct GqLayout \{(.*?)\};", (ROOT / "cuda" / "attention.cu").read_text(), re.S).group(1)
    for hd, kv8 in itertools.product(A.head_dims + A.wide_head_dims, (False, True)):
        env = {"D": hd, "GQ_WARPS": d["GQ_WARPS"], "GQ_HEADS": d["GQ_HEADS"], "GQ_STEP": d["GQ_STEP"]}
        for name, expr in re.findall(r"static constexpr int (\w+) = ([^;]+);", body):
            expr = expr.replace("sizeof(KV)", "1" if kv8 else "2").replace("/", "//")
            expr = re.sub(r"(.+?) \? (.+?) : (.+)", r"(\2) if (\1) else (\3)", expr)
            env[name] = eval(expr, {}, dict(env))  # noqa: S307  (a constexpr of our own source)
        assert env["BYTES"] == attention.gqa_smem(hd, kv8)
        assert env["STAGES"] in (3, 4)
        assert env["REC"] % 16 == 0 and env["VB"] in (8, 16, 32, 64)
        # static shared memory (sq, snk, snv, snew, wts) within the launcher's allowance
        static = (2 * d["GQ_HEADS"] * hd + 8 * hd + 4 * (d["GQ_HEADS"] + 2)
                  + 4 * d["GQ_HEADS"] * d["GQ_MAX_SPLITS"] + 4)
        assert static <= attention.GQA_STATIC_SMEM


def test_gqa_splits_policy():
    """One sequence at batch 1 fills the H200's 132 SMs (2 blocks an SM at fp16, D = 128);
    never more splits than the scratch holds (attn_decode's nsplit) or the merge takes."""
    sm = 228 * 1024
    # Llama-2-7B: 32 kv heads of D 128; 8 splits = 256 blocks = one wave of 2 a SM
    assert attention.gqa_splits(1, 32, 32, 128, False, 129, 132, sm) == 8
    assert attention.gqa_splits(8, 32, 32, 128, False, 129, 132, sm) == 1
    assert attention.gqa_splits(32, 32, 32, 128, True, 129, 132, sm) == 1
    # Llama-3-8B (32 / 8) and SmolLM2 (9 / 3): the cap on what the last block merges
    assert attention.gqa_splits(1, 32, 8, 128, False, 129, 132, sm) == A.gqa_max_splits
    assert attention.gqa_splits(1, 9, 3, 64, False, 129, 132, sm) == A.gqa_max_splits
    assert attention.gqa_splits(1, 9, 3, 64, False, 3, 132, sm) == 3          # a small cache
    assert attention.gqa_groups(48, 3) == 2 and attention.gqa_groups(9, 3) == 1
    # INT8 K/V at D = 128: a 66 KB ring, 3 blocks an SM by shared memory, so 12 splits (396 slots),
    # and by 166 registers (168 in units of 8); at 172 registers the registers hold only 2: 8 splits
    assert attention.gqa_smem(128, True) == 66 * 1024 and attention.gqa_smem(128, False) == 96 * 1024
    assert attention.gqa_splits(1, 32, 32, 128, True, 129, 132, sm) == 12
    assert attention.gqa_splits(1, 32, 32, 128, True, 129, 132, sm, 166) == 12
    assert attention.gqa_splits(1, 32, 32, 128, True, 129, 132, sm, 172) == 8
    assert attention.gqa_splits(1, 32, 32, 128, False, 129, 132, sm, 168) == 8
    # DECODE.gqa_wave_fit (off by default): with more units than slots (264), two splits where that
    # leaves fewer waves a unit's work (batch 12: 384 units, 2 waves at one split, 3 for twice the
    # blocks), else one
    saved = tuning.DECODE.gqa_wave_fit
    try:
        tuning.DECODE.gqa_wave_fit = True
        for b, want in ((9, 2), (12, 2), (13, 1), (16, 1), (20, 2), (24, 1), (32, 1)):
            assert attention.gqa_splits(b, 32, 32, 128, False, 129, 132, sm) == want, b
            assert attention.gqa_splits(b, 32, 32, 128, False, 1, 132, sm) == 1        # the scratch holds one
        tuning.DECODE.gqa_wave_fit = False
        assert attention.gqa_splits(12, 32, 32, 128, False, 129, 132, sm) == 1
    finally:
        tuning.DECODE.gqa_wave_fit = saved
    for b in (1, 2, 8, 32):
        for hq, hkv in ((32, 32), (32, 8), (9, 3), (64, 4)):
            ns = attention.gqa_splits(b, hq, hkv, 128, False, 1 << 20, 132, sm)
            assert 1 <= ns <= A.gqa_max_splits
            # the counters (B·Hq) and partials (B·Hq·nsplit) of attn_decode hold the gqa kernel's
            assert b * hkv * attention.gqa_groups(hq, hkv) <= b * hq


def test_decode_kernel_switch(monkeypatch):
    assert attention.DECODE_KERNEL in attention.DECODE_KERNELS == ("auto", "gqa", "heads")
    A = attention.ATTENTION
    short, long = A.gqa_min_keys // A.decode_chunk - 1, A.gqa_min_keys // A.decode_chunk
    for name, want in (("auto", ("heads", "gqa")), ("gqa", ("gqa", "gqa")), ("heads", ("heads", "heads"))):
        monkeypatch.setattr(attention, "DECODE_KERNEL", name)
        assert (attention.decode_kernel(short), attention.decode_kernel(long)) == want
        assert attention.decode_kernel(short, 256) == "gqa"            # wide heads: only the gqa kernel
    # from gqa_batch sequences a step, auto takes the gqa kernel from gqa_min_keys_batch positions
    monkeypatch.setattr(attention, "DECODE_KERNEL", "auto")
    lo, hi = A.gqa_min_keys_batch // A.decode_chunk - 1, A.gqa_min_keys_batch // A.decode_chunk
    assert A.gqa_min_keys_batch < A.gqa_min_keys
    assert [attention.decode_kernel(n, 128, A.gqa_batch) for n in (lo, hi, long)] == ["heads", "gqa", "gqa"]
    assert [attention.decode_kernel(n, 128, A.gqa_batch - 1) for n in (lo, hi, long)] == ["heads", "heads", "gqa"]


# ----------------------------------------------------------------------------- bit-level helpers
def byte_perm(x, y, s):
    """CUDA __byte_perm / PTX prmt (default mode) on uint32 arrays: result byte i is byte
    (s >> 4i) & 7 of the 8 bytes y:x."""
    x, y = np.asarray(x, np.uint64), np.asarray(y, np.uint64)
    both = x | (y << np.uint64(32))
    out = np.zeros(np.broadcast(x, y).shape, np.uint64)
    for i in range(4):
        sel = np.uint64((s >> (4 * i)) & 7)
        out |= ((both >> (np.uint64(8) * sel)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return out.astype(np.uint32)


def h2(w):
    """uint32 words -> their two fp16 halves (low, high) as float64."""
    w = np.asarray(w, np.uint32)
    return ((w & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64),
            (w >> 16).astype(np.uint16).view(np.float16).astype(np.float64))


def pack_h2(lo, hi):
    lo = np.asarray(lo, np.float16).view(np.uint16).astype(np.uint32)
    hi = np.asarray(hi, np.float16).view(np.uint16).astype(np.uint32)
    return lo | (hi << 16)


def i8x4_h2(w):
    """The kernel's i8x4_h2: ((b0, b1), (b2, b3)) of w as fp16 pairs, exactly, by its bit operations
    (1024 + b + 128 as the bits 0x64xx, minus 1152)."""
    u = np.asarray(w, np.uint32) ^ np.uint32(0x80808080)
    a, b = byte_perm(u, 0x64646464, 0x4140), byte_perm(u, 0x64646464, 0x4342)
    bias = np.float16(1152.0)

    def sub(v):                  # __hsub2 (v, bias): exact here, fp16 arithmetic
        lo, hi = h2(v)
        return pack_h2(lo.astype(np.float16) - bias, hi.astype(np.float16) - bias)
    return sub(a), sub(b)


def words(lst):
    """A lane's record elements (fp16 or int8, last axis) as uint32 words, little-endian."""
    return np.ascontiguousarray(lst).view(np.uint32)


def test_int8_to_fp16_trick_is_exact_for_every_byte():
    v = np.arange(-128, 128, dtype=np.int8)
    w = words(np.stack([v, np.roll(v, 1), np.roll(v, 2), np.roll(v, 3)], axis=-1))[:, 0]     # (256,) words
    want = np.stack([v, np.roll(v, 1), np.roll(v, 2), np.roll(v, 3)], axis=-1).astype(np.float64)
    lo, hi = i8x4_h2(w)
    got = np.stack([*h2(lo), *h2(hi)], axis=-1)
    np.testing.assert_array_equal(got, want)


def mma_top(d0, d1, a0, a2, b0, b1):
    """mma_f16_top over a warp: per-lane registers (32,) -> (d0, d1) of m16n8k16 with A's rows
    8..15 zero. Products of fp16 are exact and accumulate in fp32 (here float64, then fp32)."""
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    Am, Bm = np.zeros((16, 16)), np.zeros((16, 8))
    for r, cols in ((a0, 2 * t), (a2, 2 * t + 8)):
        lo, hi = h2(r)
        Am[g, cols], Am[g, cols + 1] = lo, hi
    for r, rows in ((b0, 2 * t), (b1, 2 * t + 8)):
        lo, hi = h2(r)
        Bm[rows, g], Bm[rows + 1, g] = lo, hi
    Dm = Am @ Bm
    return (np.float32(d0) + Dm[g, 2 * t]).astype(np.float32), (np.float32(d1) + Dm[g, 2 * t + 1]).astype(np.float32)


# ----------------------------------------------------------------------------- the kernel, emulated
def split_h2(x, y):
    """split_h2: fp16 (x, y) and the fp16 pair of what rounding left out."""
    hx, hy = np.float16(x), np.float16(y)
    return pack_h2(hx, hy), pack_h2(np.float32(x) - np.float32(hx), np.float32(y) - np.float32(hy))


def emulate_gqa(q16, kc, vc, ks, vs, n, k_new, v_new, skn, svn, ns, scale):
    """attn_decode_gqa for one sequence, one kv head and one group of nh ≤ 8 query heads.

    q16 (nh, D) fp16 (rotated), kc/vc (cap, D) the cache of the kv head (fp16 or int8 codes),
    ks/vs (cap,) their scales (kv8, else None), n keys to stream (p = n), k_new/v_new (D,) the
    new token as the cache holds it (floats), skn/svn its scales, ns the grid's splits.
    Returns (out (nh, D) float32, the partials used)."""
    nh, D = q16.shape
    kv8 = kc.dtype == np.int8
    ES = 1 if kv8 else 2
    W, STEP = A.threads // 32, A.gqa_step
    CHK, KB, VB = 16 // ES, D * ES // 4, D * ES // 8
    VCH = min(VB, 16)
    CHV, KS, NT, VU = VCH // ES, D // 16, D // 8, VB // 4
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    sl2 = np.float32(scale * 1.4426950408889634)
    sq = np.zeros((A.gqa_heads, D), np.float16)
    sq[:nh] = q16
    # Q as the A operand: d0 of k-step s per lane
    qa = []
    for s in range(KS):
        d0 = CHK * (4 * (4 * s // CHK) + t) + (4 * s) % CHK
        qa.append((pack_h2(sq[g, d0], sq[g, d0 + 1]), pack_h2(sq[g, d0 + 2], sq[g, d0 + 3])))
    per = -(-n // ns)
    chunk = max(W * STEP, -(-per // STEP) * STEP)
    active = -(-n // chunk) if n > 0 else 1
    kbytes = np.ascontiguousarray(kc).view(np.uint8)              # (cap, D·ES)
    vbytes = np.ascontiguousarray(vc).view(np.uint8)
    parts = []
    for sp in range(ns):
        c0, c1 = sp * chunk, min(n, sp * chunk + chunk)
        nsteps = -(-(c1 - c0) // STEP) if c0 < c1 else 0
        mml, mo = np.zeros((W, 8, 2), np.float32), np.zeros((W, 8, D), np.float32)
        for warp in range(W):
            mine = -(-(nsteps - warp) // W) if nsteps > warp else 0
            o = np.zeros((NT, 2, 32), np.float32)
            m, l = np.full(32, -np.inf, np.float32), np.zeros(32, np.float32)
            for i in range(mine):
                kb = c0 + (warp + i * W) * STEP
                # the lane records (a key past c1 copies row c0: its score is masked, its P is 0)
                krec = np.zeros((2, 32, KB), np.uint8)
                for kg in range(2):
                    key = kb + kg * 8 + g
                    row = np.where(key < c1, key, c0)
                    for j in range(KB // 16):
                        for ln in range(32):
                            off = (4 * j + t[ln]) * 16
                            krec[kg, ln, 16 * j:16 * j + 16] = kbytes[row[ln], off:off + 16]
                vrec = np.zeros((4, 32, VB), np.uint8)
                ksc, vsc = np.ones((4, 32), np.float32), np.ones((4, 32), np.float32)
                if kv8:     # the step's scales: lane r < 16 copies key kb + r's k scale, 16 + r its v scale
                    skey = kb + (lane & 15)
                    srow = np.where(skey < c1, skey, c0)
                    sblock = np.where(lane < 16, ks[srow], vs[srow]).astype(np.float32)
                    # a lane reads the 8-byte pairs at 8t, 32 + 8t (k) and 64 + 8t, 96 + 8t (v)
                    ksc = np.stack([sblock[2 * t], sblock[2 * t + 1], sblock[8 + 2 * t], sblock[9 + 2 * t]])
                    vsc = np.stack([sblock[16 + 2 * t], sblock[17 + 2 * t], sblock[24 + 2 * t], sblock[25 + 2 * t]])
                for jv in range(4):
                    key = kb + 2 * t + (jv & 1) + (jv >> 1) * 8
                    row = np.where(key < c1, key, c0)
                    for a in range(VB // VCH):
                        for ln in range(32):
                            off = (8 * a + g[ln]) * VCH
                            vrec[jv, ln, a * VCH:(a + 1) * VCH] = vbytes[row[ln], off:off + VCH]
                # S = Q·Kᵀ
                x = np.zeros((2, 2, 32), np.float32)
                for kg in range(2):
                    kw = words(krec[kg])                              # (32, KB/4)
                    s0, s1 = np.zeros(32, np.float32), np.zeros(32, np.float32)
                    for s in range(KS):
                        if kv8:
                            b0, b1 = i8x4_h2(kw[:, s])
                        else:
                            b0, b1 = kw[:, 2 * s], kw[:, 2 * s + 1]
                        s0, s1 = mma_top(s0, s1, qa[s][0], qa[s][1], b0, b1)
                    key = kb + 8 * kg + 2 * t
                    x[kg, 0] = np.where(key < c1, s0 * ksc[2 * kg] * sl2, -np.inf)
                    x[kg, 1] = np.where(key + 1 < c1, s1 * ksc[2 * kg + 1] * sl2, -np.inf)
                mx = np.maximum(np.maximum(x[0, 0], x[0, 1]), np.maximum(x[1, 0], x[1, 1]))
                mx = np.maximum(mx, mx[lane ^ 1])
                mx = np.maximum(mx, mx[lane ^ 2])
                mnew = np.maximum(m, mx)
                with np.errstate(invalid="ignore"):
                    alpha = np.exp2(m - mnew).astype(np.float32)
                m = mnew
                pr = np.exp2(x - mnew).astype(np.float32)
                l = (l * alpha + (pr[0, 0] + pr[0, 1]) + (pr[1, 0] + pr[1, 1])).astype(np.float32)
                o *= alpha
                ph0, pl0 = split_h2(pr[0, 0] * vsc[0], pr[0, 1] * vsc[1])
                ph2, pl2 = split_h2(pr[1, 0] * vsc[2], pr[1, 1] * vsc[3])
                vw = words(vrec)                                      # (4, 32, VU)
                assert vw.shape[-1] == VU
                TPW = 4 if kv8 else 2
                for w in range(NT // TPW):
                    if kv8:
                        b0 = [*i8x4_h2(byte_perm(vw[0, :, w], vw[1, :, w], 0x5140)),
                              *i8x4_h2(byte_perm(vw[0, :, w], vw[1, :, w], 0x7362))]
                        b1 = [*i8x4_h2(byte_perm(vw[2, :, w], vw[3, :, w], 0x5140)),
                              *i8x4_h2(byte_perm(vw[2, :, w], vw[3, :, w], 0x7362))]
                    else:
                        b0 = [byte_perm(vw[0, :, w], vw[1, :, w], 0x5410), byte_perm(vw[0, :, w], vw[1, :, w], 0x7632)]
                        b1 = [byte_perm(vw[2, :, w], vw[3, :, w], 0x5410), byte_perm(vw[2, :, w], vw[3, :, w], 0x7632)]
                    for e in range(TPW):
                        o[TPW * w + e] = mma_top(*o[TPW * w + e], ph0, ph2, b0[e], b1[e])
                        o[TPW * w + e] = mma_top(*o[TPW * w + e], pl0, pl2, b0[e], b1[e])
            lsum = l + l[lane ^ 1]
            lsum = lsum + lsum[lane ^ 2]
            for ln in range(32):
                if t[ln] == 0:
                    mml[warp, g[ln]] = m[ln], lsum[ln]
                for i in range(NT):
                    for c in range(2):
                        mo[warp, g[ln], CHV * (8 * (i // CHV) + 2 * t[ln] + c) + i % CHV] = o[i, c, ln]
        if sp >= active:
            continue
        snew = (q16.astype(np.float32) @ k_new.astype(np.float32)) * np.float32(skn) * sl2 if sp == 0 else None
        M = mml[:, :nh, 0].max(axis=0)
        if sp == 0:
            M = np.maximum(M, snew)
        e = np.exp2(mml[:, :nh, 0] - M)                              # (W, nh)
        lsum = (e * mml[:, :nh, 1]).sum(axis=0)
        acc = (e[:, :, None] * mo[:, :nh]).sum(axis=0)
        if sp == 0:
            en = np.exp2(snew - M)
            lsum = lsum + en
            acc = acc + en[:, None] * (v_new * np.float32(svn))[None, :]
        parts.append((M, lsum, acc))
    assert len(parts) == active
    Ms = np.stack([p[0] for p in parts])                             # (active, nh)
    M = Ms.max(axis=0)
    wts = np.exp2(Ms - M) / (np.exp2(Ms - M) * np.stack([p[1] for p in parts])).sum(axis=0)
    out = (wts[:, :, None] * np.stack([p[2] for p in parts])).sum(axis=0)
    return out.astype(np.float16).astype(np.float32), parts


def softmax_ref(q, k, v, scale):
    """One-pass softmax attention in float64: q (nh, D), k/v (n + 1, D)."""
    s = q.astype(np.float64) @ k.astype(np.float64).T * scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v.astype(np.float64)


@pytest.mark.parametrize("kv8", [False, True], ids=["fp16", "kv8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n,ns,nh,qs", [(0, 4, 3, 2), (5, 8, 1, 2), (64, 2, 8, 2), (77, 3, 4, 2), (300, 4, 3, 2),
                                         (1000, 2, 8, 2), (300, 4, 3, 16), (1000, 2, 8, 16)])
def test_split_merge_emulation_equals_one_pass_softmax(d, kv8, n, ns, nh, qs):
    """The kernel's arithmetic (its records, fragments, online softmax, merges), emulated, equals
    a one-pass float64 softmax over keys 0..n (key n the new token) within the GPU tests' bound;
    ragged chunks, empty splits, warps without keys, n = 0 (the new token alone) included, and a
    peaked softmax (q 16× N(0, 1): a few keys carry the weight)."""
    rng = np.random.default_rng(n * 7 + d + kv8 + nh + qs)
    cap = n + 3
    q16 = (qs * rng.standard_normal((nh, d))).astype(np.float16)
    k = rng.standard_normal((cap, d)).astype(np.float16)
    v = rng.standard_normal((cap, d)).astype(np.float16)
    if kv8:
        (k8, ks), (v8, vs) = quantize_kv_ref(k.astype(np.float32)), quantize_kv_ref(v.astype(np.float32))
        kc, vc = k8.copy(), v8.copy()
        kref, vref = k8 * ks[:, None].astype(np.float64), v8 * vs[:, None].astype(np.float64)
        k_new, v_new = k8[n].astype(np.float32), v8[n].astype(np.float32)
        skn, svn = float(ks[n]), float(vs[n])
        kc[n:], vc[n:] = 99, -99                      # never read: the new row comes from registers
        ks[n:], vs[n:] = np.nan, np.nan
    else:
        kc, vc, ks, vs = k.copy(), v.copy(), None, None
        kref, vref = k.astype(np.float64), v.astype(np.float64)
        k_new, v_new, skn, svn = k[n].astype(np.float32), v[n].astype(np.float32), 1.0, 1.0
        kc[n:], vc[n:] = np.nan, np.nan
    scale = 1 / np.sqrt(d)
    got, parts = emulate_gqa(q16, kc, vc, ks, vs, n, k_new, v_new, skn, svn, ns, scale)
    want = softmax_ref(q16, kref[:n + 1], vref[:n + 1], scale)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max()
    assert err <= 2.0 ** -9 * np.abs(vref[:n + 1]).max(), err
    # a one-pass softmax over all splits' keys is what the merge reproduces: the partials' sums
    # in log2 units add up to the full normaliser
    M = max(float(p[0].max()) for p in parts)
    total = sum((np.exp2(p[0].astype(np.float64) - M) * p[1]).sum() for p in parts)
    s = q16.astype(np.float64) @ kref[:n + 1].T * scale * np.log2(np.e)
    assert np.isclose(total, np.exp2(s - M).sum(), rtol=1e-5)


def test_merge_of_partial_softmaxes_equals_one_pass():
    """The merge alone, in the kernel's log2 form: partials (m_s, l_s, acc_s) of any split of the
    keys combine to the one-pass softmax (float64)."""
    rng = np.random.default_rng(3)
    s, v = rng.standard_normal(1000) * 4, rng.standard_normal((1000, 16))
    want = np.exp(s - s.max()) @ v / np.exp(s - s.max()).sum()
    s2 = s * np.log2(np.e)
    for cuts in ([0, 1000], [0, 1, 1000], [0, 333, 334, 900, 1000], list(range(0, 1001, 100))):
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            m = s2[a:b].max()
            parts.append((m, np.exp2(s2[a:b] - m).sum(), np.exp2(s2[a:b] - m) @ v[a:b]))
        M = max(p[0] for p in parts)
        L = sum(np.exp2(p[0] - M) * p[1] for p in parts)
        got = sum(np.exp2(p[0] - M) / L * p[2] for p in parts)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_nvcc_is_not_needed_here():
    """The sources this emulation mirrors are the ones the engine compiles."""
    src = kernels.source("attention.cu")
    for frag in ("__byte_perm(u, 0x64646464u, 0x4140)", "__byte_perm(vw[0][w], vw[1][w], 0x5140)",
                 "__byte_perm(vw[0][w], vw[1][w], 0x7632)", "(4 * j + t) * 16", "(8 * a + g) * L::VCH",
                 "CHK * (4 * (4 * s / CHK) + t) + (4 * s) % CHK", "CHV * (8 * (i / CHV) + 2 * t + c) + i % CHV",
                 "max(GQ_WARPS * GQ_STEP, (per + GQ_STEP - 1) / GQ_STEP * GQ_STEP)",
                 # kv8 scales: lane r < 16 copies key kb + r's k scale, 16 + r its v scale; a lane
                 # reads the pairs at 8t, 32 + 8t (k) and 64 + 8t, 96 + 8t (v)
                 "return row0 + (size_t)(kb + d < c1 ? kb + d : c0) * Hkv;",
                 "cp_async_ca<4>(scales(slot) + 4 * lane, (lane < 16 ? ks : vs) + sc(lane & 15));",
                 # kv8: K's and V's codes enter the mmas exactly (no bias 1152 carried in S or O)
                 "if constexpr (KV8) i8x4_h2(kw[s], b0, b1);", "const float s0 = sacc[0], s1 = sacc[1];",
                 "i8x4_h2(__byte_perm(vw[0][w], vw[1][w], 0x5140), b0[0], b0[1]);",
                 "const __half2 ha = __hsub2(*reinterpret_cast<const __half2*>(&lo), bias);",
                 "const u32 sa = scales(slot) + 8 * t;",
                 "k0 = lds64f(sa), k1 = lds64f(sa + 32), v0 = lds64f(sa + 64), v1 = lds64f(sa + 96);",
                 "ksc[0] = k0.x; ksc[1] = k0.y; ksc[2] = k1.x; ksc[3] = k1.y;",
                 "vsc[0] = v0.x; vsc[1] = v0.y; vsc[2] = v1.x; vsc[3] = v1.y;"):
        assert frag in src, frag


# ----------------------------------------------------------------------------- the context table
def test_context_table_bytes_come_from_the_shapes():
    """engine.bench.e2e.step_bytes: the weights every step reads plus the K/V it attends,
    computed from the model's shapes and the context (Llama-2-7B: 512 KiB of fp16 K/V a
    position, 256 KiB + scales at INT8)."""
    from types import SimpleNamespace

    from engine.bench.e2e import LLAMA2_7B, LLAMA3_8B, format_context_table, kv_bytes_per_position, step_bytes
    assert kv_bytes_per_position(LLAMA2_7B, False) * LLAMA2_7B.num_hidden_layers == 512 * 1024
    assert kv_bytes_per_position(LLAMA2_7B, True) * 32 == 256 * 1024 + 2 * 32 * 32 * 4
    assert kv_bytes_per_position(LLAMA3_8B, False) * 32 == 128 * 1024          # GQA: 8 kv heads
    embed, head = np.zeros(10, np.float16), np.zeros(20, np.float16)
    gm = SimpleNamespace(config=LLAMA2_7B, embed=embed, lm_head=head,
                         weight_bytes=lambda: {"linears": 3_340_000_000, "other": embed.nbytes + head.nbytes + 1000})
    w, kv = step_bytes(gm, 1, 2048, 32, False)
    assert w == 3_340_000_000 + head.nbytes + 1000 + 2 * 4096
    assert kv == 512 * 1024 * (2048 + 16.5)
    w8, kv8 = step_bytes(gm, 32, 2048, 32, True)
    assert w8 == w + 31 * 2 * 4096 and kv8 == 32 * (256 * 1024 + 8192) * (2048 + 16.5)
    rows = [dict(phase="device", name="GPU", copy_bw_gbs=4230.0),
            dict(phase="context", model="m", attn="gqa", context=8192, batch=32, kv="fp16", skipped="too big"),
            dict(phase="context", model="m", attn="gqa", context=128, batch=1, kv="int8", tok_s=900.0, step_ms=1.1,
                 weight_mb=3600.0, kv_mb=17.0, roof_tok_s=1170.0, pct_copy_bw=77.0, attn_us=3.0, attn_pct_copy_bw=20.0)]
    table = format_context_table(rows)
    assert "copy bandwidth 4230 GB/s" in table and "skipped: too big" in table
    assert "| m | gqa | 128 | 1 | int8 | 900 | 1.100 | 3600 | 17 | 1170 | 77 | 3.0 | 20 |" in table
    head_cols = table.splitlines()[2].count("|")
    assert all(line.count("|") == head_cols for line in table.splitlines()[2:])


def test_gqa_launch_names_sizes_and_splits(monkeypatch):
    """The launcher names the main module's attn_decode_gqa<KV, d>, opts in to its shared memory
    and sizes its grid by the blocks an SM holds (fp16, D = 128: 2, so 8 splits at batch 1; INT8
    at 166 registers: 3, so 12)."""
    from types import SimpleNamespace
    from engine.gpu import kargs, kernels
    seen = []
    fns = []
    monkeypatch.setattr(kargs, "function", lambda kf, expr: fns.append(SimpleNamespace(
        max_dynamic_shared_size_bytes=0, num_regs=166)) or fns[-1])
    monkeypatch.setattr(kargs, "launch", lambda kf, expr, grid, block, shared_mem=0, **a: seen.append(
        (kf, expr, grid, shared_mem)))
    monkeypatch.setattr(kernels, "device_info", lambda: {"name": "fake", "cc": 90, "sm_count": 132,
                                                         "l2_bytes": 50 << 20, "smem_optin": 232448})
    monkeypatch.setattr(attention, "_GQA_LAUNCH", {})
    kc = np.zeros((1,), np.float16)
    args = dict(kc=kc, D=128, Hq=32, Hkv=32)
    attention._decode_gqa("attn_decode", 1, 129, args)
    attention._decode_gqa("attn_decode", 1, 129, dict(args, kc=np.zeros((1,), np.int8)))
    (kf0, e0, g0, s0), (kf8, e8, g8, s8) = seen
    assert (kf0, e0, g0, s0) == (attention.ATTN, "attn_decode_gqa<__half, 128>", (8, 32, 1), 96 * 1024)
    assert (kf8, e8, g8, s8) == (attention.ATTN, "attn_decode_gqa<signed char, 128>", (12, 32, 1), 66 * 1024)
    assert e0 in attention.ATTN.exprs and e8 in attention.ATTN.exprs
    assert [f.max_dynamic_shared_size_bytes for f in fns] == [96 * 1024, 66 * 1024]     # opted in
