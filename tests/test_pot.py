"""Power-of-two ("pot2..4") and uniform bit-plane ("int2..4") weights: layout, reference,
validation, converter and file round trip (CPU)."""
import numpy as np
import pytest

from converters.pot import int_linear, pot_linear
from converters.quantize import quantize_checkpoint
from engine import formats
from engine.formats import planes
from engine.io.qfile import QFileError, load_qfile, save_qfile
from engine.io.safetensors import read_safetensors, write_safetensors
from engine.model import LINEAR_NAMES, Model, ModelWeights
from test_quantize import tiny_ckpt, tiny_seqs

BITS = (2, 3, 4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [32, 64, 100, 576, 1])
def test_planes_round_trip(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    codes = rng.integers(0, 1 << bits, size=(7, k))
    p = planes.pack_planes(codes, bits)
    assert p.shape == (7, -(-k // 32), bits) and p.dtype == np.uint32
    np.testing.assert_array_equal(planes.unpack_planes(p, bits, k), codes)
    assert planes.padding_is_zero(p, k)


def test_planes_bit_order():
    """Word j of a chunk holds bit j of every code, code i at bit i (the kernels' contract)."""
    codes = np.zeros((1, 32), dtype=np.uint8)
    codes[0, 5] = 0b101
    p = planes.pack_planes(codes, 3)
    assert p[0, 0].tolist() == [1 << 5, 0, 1 << 5]


def test_planes_reject_out_of_range():
    with pytest.raises(formats.FormatError, match="0..7"):
        planes.pack_planes(np.array([[8]]), 3)


def _pot(bits, k=64, group=32, seed=0, n=6):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return W, pot_linear(W, bits, group, search=False)


@pytest.mark.parametrize("bits", BITS)
def test_pot_levels(bits):
    """Hand-built codes: m = 0 is zero, m ≥ 1 is ±s·2^-(m-1); the spare code of pot2, pot3 (sign set, m = 0)
    is +2s, and a negative scale mirrors every level."""
    kind = formats.KINDS[f"pot{bits}"]
    L = kind.levels
    codes = np.array([[m | (sgn << (bits - 1)) for sgn in (0, 1) for m in range(L + 1)]], dtype=np.uint8)
    k = codes.shape[1]
    s = np.float16(0.75)
    ql = formats.QuantLinear(kind=f"pot{bits}", act="none", in_features=k, out_features=1, group=32,
                             qweight=planes.pack_planes(codes, bits), wscale=np.array([[s]], np.float16))
    want = [sg * (0.0 if m == 0 else 0.75 * 2.0 ** -(m - 1)) for sg in (1, -1) for m in range(L + 1)]
    if kind.spare:
        want[L + 1] = 1.5                                                     # the spare code: +2s
        ql.wscale = -ql.wscale
        np.testing.assert_array_equal(ql.dequantize()[0], -np.array(want, dtype=np.float32))
        ql.wscale = -ql.wscale
    np.testing.assert_array_equal(ql.dequantize()[0], np.array(want, dtype=np.float32))


@pytest.mark.parametrize("bits", BITS)
def test_pot_reference_equals_fp16_bit_trick(bits):
    """The format's guarantee (engine/formats/pot.py): on the fp16 bits, bits(s) - ((m-1) << 10)
    with the sign XOR-ed in (0 for m = 0; the spare code: bits(s) + (1 << 10), 2s) is exactly
    the reference weight for every valid scale, negative ones (pot2, pot3) included."""
    W, ql = _pot(bits, k=256, group=32, n=40, seed=bits)
    kind = formats.KINDS[f"pot{bits}"]
    rng = np.random.default_rng(7)
    exp = rng.integers(kind.min_scale_exp, kind.max_scale_exp + 1, ql.wscale.shape)
    mant = rng.integers(0, 1024, ql.wscale.shape)
    neg = (rng.random(ql.wscale.shape) < 0.5) if kind.spare else np.zeros(ql.wscale.shape, bool)
    ql.wscale = ((exp << 10) | mant | (neg.astype(np.int64) << 15)).astype(np.uint16).view(np.float16)
    codes = rng.integers(0, 1 << bits, (ql.out_features, ql.in_features)).astype(np.uint8)
    ql.qweight = planes.pack_planes(codes, bits)                            # every code, the spare one too
    formats.validate(ql)
    codes = codes.astype(np.uint16)
    m = codes & ((1 << (bits - 1)) - 1)
    sign = codes >> (bits - 1)
    sbits = formats.expand_groups(ql.wscale.view(np.uint16), ql.in_features, ql.group).astype(np.uint16)
    w16 = ((sbits - ((m - 1) << 10)) ^ (sign << 15)).astype(np.uint16)
    w16 = np.where(m == 0, np.uint16(0), w16)
    if kind.spare:
        w16 = np.where(codes == kind.spare_code, (sbits + (1 << 10)).astype(np.uint16), w16)
    w16 = w16.view(np.float16)
    np.testing.assert_array_equal(w16.astype(np.float32), ql.dequantize())


@pytest.mark.parametrize("bits", BITS)
def test_pot_validation(bits):
    _, ql = _pot(bits)
    kw = dict(kind=ql.kind, in_features=ql.in_features, out_features=ql.out_features, group=ql.group)
    at = ql.wscale.copy()
    at[0, 0] = np.float16(2.0 ** (formats.KINDS[ql.kind].min_scale_exp - 15))     # exactly the floor: valid
    formats.QuantLinear(act="none", qweight=ql.qweight, wscale=at, **kw)
    low = ql.wscale.copy()
    low[0, 0] = np.float16(2.0 ** (formats.KINDS[ql.kind].min_scale_exp - 16))   # one below the floor
    with pytest.raises(formats.FormatError, match="at least 2"):
        formats.QuantLinear(act="none", qweight=ql.qweight, wscale=low, **kw)
    spare = formats.KINDS[ql.kind].spare
    for bad in (np.nan, np.inf) if spare else (-1.0, np.nan, np.inf):
        s = ql.wscale.copy()
        s[1, 0] = bad
        with pytest.raises(formats.FormatError, match="finite"):
            formats.QuantLinear(act="none", qweight=ql.qweight, wscale=s, **kw)
    if spare:                  # a negative scale mirrors the group; 2|s| must stay finite
        s = ql.wscale.copy()
        s[1, 0] = -s[1, 0]
        formats.QuantLinear(act="none", qweight=ql.qweight, wscale=s, **kw)
        s[1, 0] = np.float16(-32768.0)
        with pytest.raises(formats.FormatError, match="spare level"):
            formats.QuantLinear(act="none", qweight=ql.qweight, wscale=s, **kw)
    formats.QuantLinear(act="dynamic", qweight=ql.qweight, wscale=ql.wscale, **kw)     # INT8 tokens: valid
    with pytest.raises(formats.FormatError, match="'none'.*'dynamic'.*not act 'static'"):
        formats.QuantLinear(act="static", qweight=ql.qweight, wscale=ql.wscale, ascale=0.1, **kw)
    with pytest.raises(formats.FormatError, match="shape"):
        formats.QuantLinear(act="none", qweight=ql.qweight[:, :1], wscale=ql.wscale, **kw)
    with pytest.raises(formats.FormatError, match="dtype"):
        formats.QuantLinear(act="none", qweight=ql.qweight, wscale=ql.wscale.astype(np.float32), **kw)


@pytest.mark.parametrize("bits", BITS)
def test_int_validation(bits):
    W = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    ql = int_linear(W, bits, 32)
    kw = dict(kind=ql.kind, act="none", in_features=64, out_features=4, group=32, qweight=ql.qweight)
    z = ql.qzeros.copy()
    z[0, 0] = 1 << bits                                   # one past the largest code
    with pytest.raises(formats.FormatError, match="zero points"):
        formats.QuantLinear(qzeros=z, wscale=ql.wscale, **kw)
    for bad in (0.0, -1.0, np.nan, np.inf):
        s = ql.wscale.copy()
        s[1, 1] = bad
        with pytest.raises(formats.FormatError, match="positive finite"):
            formats.QuantLinear(qzeros=ql.qzeros, wscale=s, **kw)
    qmax = (1 << bits) - 1                                # |q - z| ≤ qmax: s·qmax must stay within fp16
    s = ql.wscale.copy()
    s[0, 0] = np.float16(formats.FP16_MAX / qmax * 0.99)
    formats.QuantLinear(qzeros=ql.qzeros, wscale=s, **kw)
    s[0, 0] = np.float16(formats.FP16_MAX / qmax * 1.01)
    with pytest.raises(formats.FormatError, match=f"wscale holds .*times {qmax}.*beyond fp16"):
        formats.QuantLinear(qzeros=ql.qzeros, wscale=s, **kw)


@pytest.mark.parametrize("kind", ["pot2", "pot3", "pot4", "int2", "int3", "int4"])
def test_bit_plane_groups_are_32_64_or_128(kind):
    """The one group rule of the bit-plane kinds (formats/planes.py GROUPS), which the converter and
    the GPU launchers share: a layer of any other group is refused, tensors consistent or not."""
    assert planes.GROUPS == (32, 64, 128)
    bits = int(kind[-1])
    W = np.random.default_rng(bits).standard_normal((4, 256)).astype(np.float32) * 0.05
    make = pot_linear if kind.startswith("pot") else int_linear
    for group in planes.GROUPS:
        make(W, bits, group)
    ql = make(W, bits, 128)
    for group in (16, 96, 256, 1000):
        g = -(-256 // group)
        arrays = {t: np.resize(getattr(ql, t), (4, g) if t != "qweight" else getattr(ql, t).shape)
                  for t in ("qweight", "qzeros", "wscale") if getattr(ql, t) is not None}
        with pytest.raises(formats.FormatError, match=f"{kind} layers take groups of 32, 64 or 128.*not {group}"):
            formats.QuantLinear(kind=kind, act="none", in_features=256, out_features=4, group=group, **arrays)
        with pytest.raises(formats.FormatError, match="groups of 32, 64 or 128"):
            formats.kind_tensors(kind, 4, 256, group)


def test_padding_must_be_zero():
    W = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    ql = pot_linear(W, 3, 32, search=False)
    q = ql.qweight.copy()
    q[0, -1, 0] |= np.uint32(1 << 31)                     # a code past K = 40
    with pytest.raises(formats.FormatError, match="past in_features"):
        formats.QuantLinear(kind="pot3", act="none", in_features=40, out_features=3, group=32, qweight=q,
                            wscale=ql.wscale)


@pytest.mark.parametrize("bits", BITS)
def test_pot_rounds_to_the_nearest_level(bits):
    """search=False keeps |s| = the group's max |w|; every weight lands on its nearest level (pot3:
    the spare level 2s among them, on the side the sign of s chose: the group's largest weight's)."""
    W, ql = _pot(bits, k=96, group=32, n=20)
    D = ql.dequantize()
    kind = formats.KINDS[ql.kind]
    lev = kind.magnitudes()
    s = formats.expand_groups(ql.wscale, 96, 32).astype(np.float64)
    top = np.take_along_axis(W.reshape(20, 3, 32), np.abs(W.reshape(20, 3, 32)).argmax(-1)[..., None], -1)
    assert (np.sign(ql.wscale.astype(np.float32)) == (np.sign(top[..., 0]) if kind.spare else 1)).all()
    cand = np.sign(W)[..., None] * lev * np.abs(s)[..., None]                  # (N, K, L+1)
    if kind.spare:
        cand = np.concatenate([cand, (kind.spare * s)[..., None]], axis=-1)
    best = np.abs(cand - W[..., None]).min(axis=-1)
    np.testing.assert_allclose(np.abs(D - W), best, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", BITS)
def test_pot_rounding_is_the_closed_form_bit_for_bit(bits):
    """ŵ of the search (_round_value) and of the codes (_nearest) is, bit for bit, the closed form
    unit·a (unit = ±2^-j, 0 below half the smallest level, the spare level from 1.5a), over
    multipliers that reach both ends, with zeros of both signs and tiny weights."""
    from converters.pot import _Pot
    rng = np.random.default_rng(bits)
    W = (rng.standard_normal((40, 6, 64)) * rng.choice([1e-3, 0.05, 3.0], (40, 6, 1))).astype(np.float32)
    W[0, 0, :4], W[1, 1, :4], W[2, 2, 0] = 0.0, -0.0, 1e-30
    f = _Pot(bits)
    s0 = f.start(W)
    for beta in (0.05, 0.3, 0.77, 1.0, 1.37, 2.0):
        s = f.scale(np.float32(beta) * s0)
        a = np.abs(s)[..., None]
        u = np.log2(a) - f.log2w
        j = np.clip(np.floor(u + f.SHIFT), 0, f.levels - 1)
        nz = u <= f.levels
        unit = np.where(nz, np.exp2(-j), 0) * np.where((f.wm < 0) & nz, np.float32(-1), np.float32(1))
        if f.spare:
            unit = np.where(f.wm >= 1.5 * a, f.spare, unit)
        want = unit * a
        for got in (f._round_value(s), f._nearest(f.wm, f.log2w, a)[1]):
            assert got.dtype == want.dtype and np.array_equal(got.view(np.uint32), want.view(np.uint32)), beta


@pytest.mark.parametrize("fn", [pot_linear, int_linear])
@pytest.mark.parametrize("bits", BITS)
def test_search_is_never_worse(fn, bits):
    """Per group, on the group's output objective d H_gg dᵀ: the search with H is never worse than
    the search without H (step 2 holds γ = 0) nor than the start scale S0, RTN for the uniform
    codes (step 2 holds S0). Heavy-tailed weights: without S0 among the candidates, 1 to 24 of
    these 192 groups came out worse than RTN."""
    rng = np.random.default_rng(bits)
    W = (rng.standard_t(3, size=(64, 96)) * 0.03).astype(np.float32)
    X = rng.standard_normal((300, 96))
    X[:, :2] *= 20
    H = X.T @ X

    def group_obj(ql):
        d = (ql.dequantize() - W).astype(np.float64)
        return np.stack([np.einsum("ni,ij,nj->n", d[:, g:g + 32], H[g:g + 32, g:g + 32], d[:, g:g + 32])
                         for g in range(0, 96, 32)], axis=1)                  # (N, G)
    no_h, rtn = fn(W, bits, 32, search=True), fn(W, bits, 32, search=False)
    with_h = group_obj(fn(W, bits, 32, H=H, search=True, refit=False))   # the search alone (the refit: below)
    assert (with_h <= group_obj(no_h) * (1 + 1e-9)).all()
    assert (with_h <= group_obj(rtn) * (1 + 1e-9)).all()
    assert ((no_h.dequantize() - W) ** 2).sum() <= ((rtn.dequantize() - W) ** 2).sum() * (1 + 1e-6)


@pytest.mark.parametrize("fam_name", ["pot", "int"])
def test_fine_pass_improves_on_the_coarse_grid(fam_name):
    """Step 1's 0.01 steps around the coarse best: never worse than every 5th β alone, and
    better somewhere (heavy-tailed weights, so the error curve is not flat)."""
    from converters import pot as P
    fam = P._Pot(3) if fam_name == "pot" else P._Int(3)
    rng = np.random.default_rng(5)
    Wg = (rng.standard_t(3, size=(64, 4, 32)) * 0.02).astype(np.float32)
    s0 = fam.start(Wg)
    coarse = np.min([fam.weight_error(Wg, fam.scale(np.float32(b) * s0))
                     for b in P.BETAS[P.BETA_COARSE - 1::P.BETA_COARSE]], axis=0)   # (R, G)
    final = fam.weight_error(Wg, P._search(fam, Wg, None, True))
    assert (final <= coarse * (1 + 1e-6)).all()
    assert (final < coarse * (1 - 1e-4)).any()


@pytest.mark.parametrize("bits", BITS)
def test_int_is_min_max(bits):
    W = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    ql = int_linear(W, bits, 64)
    qmax = (1 << bits) - 1
    lo, hi = np.minimum(W.min(1), 0), np.maximum(W.max(1), 0)
    np.testing.assert_allclose(ql.wscale[:, 0].astype(np.float32), (hi - lo) / qmax, rtol=1e-3)
    err = np.abs(ql.dequantize() - W).max(axis=1)
    assert (err <= ql.wscale[:, 0].astype(np.float32) * 0.51 + 1e-6).all()


@pytest.mark.parametrize("bits", BITS)
def test_pot_with_int8_activations_computes_x8_times_w_times_sx(bits):
    """act "dynamic": the reference quantizes each token by the A8 rule and multiplies the INT8 row
    by the dequantized PoT weights, in float64, times the token's scale."""
    import dataclasses
    _, ql = _pot(bits)
    q8 = dataclasses.replace(ql, act="dynamic")
    x = np.random.default_rng(bits).standard_normal((5, ql.in_features)).astype(np.float32)
    x[2] = 0.0                                                     # an all-zero token: scale 1, output 0
    sx = formats.act_scale_dynamic(x)
    want = ((formats.quantize_act_ref(x, sx).astype(np.float64) @ ql.dequantize().astype(np.float64).T)
            * sx[:, None]).astype(np.float32)
    got = formats.linear_ref(x, q8)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, formats.linear_ref(x, ql)) and not got[2].any()
    from engine.model.ops_ref import PreparedLinear
    np.testing.assert_array_equal(PreparedLinear(q8)(x), want)


def test_converter_rejects_bad_bits_and_groups():
    W = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match="2, 3 or 4"):
        pot_linear(W, 5)
    with pytest.raises(ValueError, match="32, 64 or 128"):
        int_linear(W, 3, 16)


@pytest.mark.parametrize("method,kind,act", [("pot", "pot", None), ("int-rtn", "int", None),
                                             ("int-search", "int", None), ("pot", "pot", "dynamic")])
@pytest.mark.parametrize("bits", [2, 3])
def test_quantize_checkpoint_weight_only(method, kind, act, bits, tmp_path):
    """pot / int files (and pot with INT8 activations): kinds, recipe, output near the float model's,
    a q.safetensors round trip computing the same logits."""
    ck = tiny_ckpt(hidden_size=48, intermediate_size=96, head_dim=6)
    seqs = tiny_seqs(ck.config)
    ref = Model(ModelWeights.from_hf(ck.config, ck.tensors)).forward(seqs[0])
    w, recipe = quantize_checkpoint(ck, method, wbits=bits, group=32, calib=seqs, progress=False, act=act)
    assert all(getattr(L, n).kind == f"{kind}{bits}" and getattr(L, n).act == (act or "none")
               for L in w.layers for n in LINEAR_NAMES)
    assert recipe["act"] == (act or "none")
    assert recipe["wbits"] == bits and recipe["weight_search"] == (method != "int-rtn")
    out = Model(w).forward(seqs[0])
    if bits == 3:            # 2-bit weights of a random tiny model keep little of its output
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.6   # measured 0.43-0.47
    p = tmp_path / "m.q.safetensors"
    save_qfile(p, w, ck.config, ck.tokenizer, ck.chat_template, recipe, embed_dtype="float32")  # exact
    back = load_qfile(p)
    np.testing.assert_array_equal(Model(back.weights).forward(seqs[0]), out)


def test_quantize_rejects_bad_wbits():
    ck = tiny_ckpt()
    with pytest.raises(ValueError, match="2, 3 or 4"):
        quantize_checkpoint(ck, "pot", wbits=8, progress=False)


BAD_P = "model.layers.0.self_attn.q_proj"      # K = 48: the last plane word has 16 padding bits


def _set(name, idx, v):
    return lambda t, m: t[f"{BAD_P}.{name}"].__setitem__(idx, v)


def _retype(name, f):
    return lambda t, m: t.__setitem__(f"{BAD_P}.{name}", np.ascontiguousarray(f(t[f"{BAD_P}.{name}"])))


def _spec(**kw):
    """Edit the layer's `linears` metadata entry."""
    import json

    def edit(t, m):
        lin = json.loads(m["linears"])
        lin[BAD_P].update(kw)
        m["linears"] = json.dumps(lin)
    return edit


def _both(*edits):
    def edit(t, m):
        for e in edits:
            e(t, m)
    return edit


def _pad_bit(t, m):
    t[f"{BAD_P}.qweight"][0, -1, 0] |= np.uint32(1 << 31)              # channel 63 of K = 48


def _groups_1000(t, m):                      # a foreign file: group 1000 and tensors shaped for it
    for name in ("wscale", "qzeros"):
        if f"{BAD_P}.{name}" in t:
            t[f"{BAD_P}.{name}"] = np.ascontiguousarray(t[f"{BAD_P}.{name}"][:, :1])


POT, SPARE = ("pot2", "pot3", "pot4"), ("pot2", "pot3")
BAD_KINDS = [("pot2", "none"), ("pot2", "dynamic"), ("pot3", "none"), ("pot3", "dynamic"),
             ("pot4", "none"), ("pot4", "dynamic"), ("int3", "none")]   # int is weight-only
# name: (kinds it applies to, edit of (tensors, metadata), words the error must hold)
BAD_EDITS = {
    "NaN scale": (None, _set("wscale", (0, 0), np.nan), ("NaN",)),
    "Inf scale": (None, _set("wscale", (1, 0), np.inf), ("Inf",)),
    "padding bits": (None, _pad_bit, ("past in_features",)),
    "scale below the floor": (POT, _set("wscale", (0, 0), np.float16(1e-6)), ("at least 2^",)),
    "|s| = 2^15": (SPARE, _set("wscale", (0, 0), np.float16(-32768.0)), ("below 2^15", "spare level")),
    "negative scale": (("pot4", "int3"), _set("wscale", (0, 0), np.float16(-0.01)), ("positive",)),
    "int scale overflow": (("int3",), _set("wscale", (0, 0), np.float16(60000.0)), ("times 7", "beyond fp16")),
    "qweight dtype": (None, _retype("qweight", lambda a: a.astype(np.int32)), ("qweight", "dtype int32")),
    "qweight shape": (None, _retype("qweight", lambda a: a[:, :1]), ("qweight", "shape")),
    "wscale dtype": (None, _retype("wscale", lambda a: a.astype(np.float32)), ("wscale", "dtype float32")),
    "group 1000": (None, _spec(group=1000), ("groups of 32, 64 or 128", "not 1000")),
    "group 1000, tensors to match": (None, _both(_spec(group=1000), _groups_1000), ("groups of 32, 64 or 128",)),
    "act static on pot": (POT, _both(_spec(act="static"),
                                     lambda t, m: t.__setitem__(f"{BAD_P}.ascale", np.array(0.05, np.float32))),
                          ("'none'", "'dynamic'", "not act 'static'")),
    "act dynamic on int": (("int3",), _spec(act="dynamic"), ("weight-only",)),
}


@pytest.fixture(scope="module")
def good_bit_plane_file(tmp_path_factory):
    """(kind, act) -> a valid q.safetensors of a tiny model whose linears are all of that kind,
    groups of 32; each built once for the module."""
    import dataclasses
    made = {}

    def get(kind, act):
        if (kind, act) not in made:
            ck = tiny_ckpt(hidden_size=48, intermediate_size=96, head_dim=6)
            w, recipe = quantize_checkpoint(ck, "int-rtn", wbits=3, group=32, progress=False)
            bits = int(kind[-1])
            for L in w.layers:
                for n in LINEAR_NAMES:
                    ql = getattr(L, n)
                    if kind.startswith("pot"):
                        ql = pot_linear(ql.dequantize(), bits, 32, search=False)
                    setattr(L, n, dataclasses.replace(ql, act=act))
            p = tmp_path_factory.mktemp("bitplanes") / f"{kind}-{act}.q.safetensors"
            save_qfile(p, w, ck.config, ck.tokenizer, ck.chat_template, recipe)
            load_qfile(p)                                                   # the unedited file loads
            made[(kind, act)] = p
        return made[(kind, act)]
    return get


@pytest.mark.parametrize("kind,act,what", [(k, a, what) for k, a in BAD_KINDS for what, (kinds, _, _) in BAD_EDITS.items()
                                           if kinds is None or k in kinds])
def test_bad_bit_plane_file_gives_one_clear_error(good_bit_plane_file, kind, act, what, tmp_path):
    """Every damaged pot/int layer is refused at load with one QFileError naming the file and the
    layer and saying what is wrong, never a traceback from deep inside NumPy, nor a silent load."""
    _, edit, words = BAD_EDITS[what]
    tensors, meta = read_safetensors(good_bit_plane_file(kind, act))
    edit(tensors, meta)
    bad = tmp_path / "bad.q.safetensors"
    write_safetensors(bad, tensors, meta)
    with pytest.raises(QFileError) as e:
        load_qfile(bad)
    msg = str(e.value)
    assert str(bad) in msg and BAD_P in msg and "\n" not in msg, msg
    assert all(wd in msg for wd in words), msg


@pytest.mark.parametrize("kind,bits", [("pot", 2), ("pot", 3), ("int", 2), ("int", 3), ("int", 4)])
def test_as_dual_grained_keeps_codes_and_rounds_only_scales(kind, bits):
    """The W-PoT × INT8 stretch: codes become exact INT4 integers; only the group scales move,
    each by at most half an integer step of the row's grid (and never past the INT8 guard)."""
    from converters.pot import as_dual_grained, int_linear, pot_linear
    from engine.formats import dg as dgk
    from engine.formats.common import expand_groups
    rng = np.random.default_rng(bits)
    W = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 0.1, (48, 1))).astype(np.float32)
    ql = (pot_linear if kind == "pot" else int_linear)(W, bits, 64, search=False)
    d = as_dual_grained(ql)
    w8 = dgk.int8_weight(d).astype(np.int64)                        # raises if the guard broke
    unit = ql.dequantize().astype(np.float64) / np.abs(expand_groups(ql.wscale, 256, 64).astype(np.float64))
    S = expand_groups(d.gscale, 256, 64).astype(np.int64)
    c = (1 << ((1 << (bits - 1)) - 2)) if kind == "pot" else 1
    np.testing.assert_array_equal(w8, np.rint(unit * c).astype(np.int64) * S)      # codes exact
    step = np.abs(ql.wscale.astype(np.float64)) / c
    got = d.gscale.astype(np.float64) * d.cscale[:, None]
    near = np.abs(got - step) <= 0.5 * d.cscale[:, None] + 1e-12 * step
    assert (near | ((d.gscale == 1) & (step < d.cscale[:, None]))).all()     # S floors at 1


def test_as_dual_grained_refuses_pot4():
    from converters.dgq import QuantizeError
    from converters.pot import as_dual_grained, pot_linear
    ql = pot_linear(np.ones((2, 128), np.float32), 4, 128, search=False)
    with pytest.raises(QuantizeError, match="pot2, pot3"):
        as_dual_grained(ql)


@pytest.mark.parametrize("fn", [pot_linear, int_linear])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("compensate", [False, True])
def test_scale_refit_keeps_codes_and_never_worsens_a_row(fn, bits, compensate):
    """The joint least-squares refit of a row's group scales (converters/pot.py _refit_scales):
    the codes (and zero points) stay, every stored scale is a float16 value (PoT: at or above its
    floor), no row's full-H output error d H dᵀ grows, the total falls, and a group whose codes are
    all zero keeps its scale."""
    from converters.dgq import row_objective
    rng = np.random.default_rng(10 * bits + compensate)
    W = (rng.standard_t(3, size=(48, 160)) * 0.03).astype(np.float32)
    W[5, 32:64] = 0.0                                                       # a dead group
    X = rng.standard_normal((400, 160)) * np.exp(rng.standard_normal(160))
    H = X.T @ X
    a = fn(W, bits, 32, H=H, search=True, compensate=compensate, refit=False)
    b = fn(W, bits, 32, H=H, search=True, compensate=compensate, refit=True)
    np.testing.assert_array_equal(b.qweight, a.qweight)
    if a.qzeros is not None:
        np.testing.assert_array_equal(b.qzeros, a.qzeros)
    assert b.wscale.dtype == np.float16 and np.isfinite(b.wscale.astype(np.float32)).all()
    if fn is pot_linear:          # |s| (pot3's sign mirrors a group and the refit keeps it)
        assert (np.abs(b.wscale.astype(np.float32)) >= 2.0 ** (formats.KINDS[f"pot{bits}"].min_scale_exp - 15)).all()
        np.testing.assert_array_equal(np.signbit(b.wscale), np.signbit(a.wscale))
    dead = (a.dequantize().reshape(48, 5, 32) == 0).all(axis=2)             # groups without a nonzero level
    assert dead[5, 1] or compensate                                         # GPTQ may move weight into it
    np.testing.assert_array_equal(b.wscale[dead], a.wscale[dead])
    ea = row_objective(W, a.dequantize().astype(np.float64), H)
    eb = row_objective(W, b.dequantize().astype(np.float64), H)
    assert (eb <= ea * (1 + 1e-9)).all()
    assert eb.sum() < ea.sum() * 0.999
    assert b.meta["refit_rows"] > 0 and np.isclose(b.meta["obj"], eb.sum(), rtol=1e-6)


@pytest.mark.parametrize("fn", [pot_linear, int_linear])
def test_more_gptq_and_refit_rounds_never_worsen_a_row(fn, monkeypatch):
    """converters.pot.REFIT_ROUNDS: each further round (GPTQ on the refit grid, then the refit)
    keeps per row the better result, so no row's d H dᵀ grows from one round to the next, and the
    file stays valid (codes on the grid)."""
    from converters import pot
    from converters.dgq import row_objective
    rng = np.random.default_rng(3)
    W = (rng.standard_t(3, size=(40, 128)) * 0.03).astype(np.float32)
    X = rng.standard_normal((400, 128)) * np.exp(rng.standard_normal(128))
    H = X.T @ X
    errs = []
    for rounds in (1, 2, 3):
        monkeypatch.setattr(pot, "REFIT_ROUNDS", rounds)
        ql = fn(W, 3, 32, H=H, search=True, compensate=True)
        formats.validate(ql)
        errs.append(row_objective(W, ql.dequantize().astype(np.float64), H))
    assert (errs[1] <= errs[0] * (1 + 1e-9)).all() and (errs[2] <= errs[1] * (1 + 1e-9)).all()
    assert errs[2].sum() < errs[0].sum()
