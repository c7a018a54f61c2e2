"""q.safetensors: exact round trip, end-to-end quantize → save → load → forward, and rejection
of every kind of broken file with one QFileError naming the file."""
import dataclasses
import json
import os

import numpy as np
import pytest

from converters.quantize import quantize_checkpoint
from engine import formats
from engine.model import LINEAR_NAMES, Model, ModelWeights
from engine.io.qfile import QFileError, load_qfile, save_qfile
from engine.io.checkpoint import load_checkpoint
from engine.io.layout import Checkpoint
from engine.io.safetensors import read_safetensors, round_to_dtype, write_safetensors
from tiny_model import TINY_CHAT_TEMPLATE, make_tiny_config, make_tiny_tensors, make_tiny_tokenizer


def tiny_ckpt(tie=False, template=TINY_CHAT_TEMPLATE):
    c = make_tiny_config(tie_word_embeddings=tie)
    return Checkpoint(c, make_tiny_tensors(c), make_tiny_tokenizer(), template, "memory")


def seqs_for(c):
    return np.random.default_rng(1).integers(0, c.vocab_size, size=(2, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A dgq model (static acts, kv8) written once; tests copy and damage it."""
    ck = tiny_ckpt()
    w, recipe = quantize_checkpoint(ck, "dgq", group=16, kv8=True, calib=seqs_for(ck.config), progress=False,
                                    act="static")
    path = tmp_path_factory.mktemp("q") / "tiny.q.safetensors"
    save_qfile(path, w, ck.config, ck.tokenizer, ck.chat_template, recipe)
    return ck, w, recipe, path


def as_stored(w):
    """w as the file holds it: embedding and lm_head rounded to fp16 (save_qfile's default)."""
    f16 = lambda a: round_to_dtype(a, "float16")                      # noqa: E731
    embed = f16(w.embed)
    return dataclasses.replace(w, embed=embed, lm_head=embed if w.lm_head is w.embed else f16(w.lm_head))


def assert_same_linear(a, b):
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        return
    assert (a.kind, a.act, a.group, a.shape, a.ascale) == (b.kind, b.act, b.group, b.shape, b.ascale)
    for f in ("qweight", "qzeros", "gscale", "cscale", "wscale"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def test_round_trip_is_exact_and_runs(saved):
    ck, w, recipe, path = saved
    q = load_qfile(path)
    assert q.config == ck.config and q.recipe == recipe and q.chat_template == ck.chat_template
    assert q.tokenizer.encode("the cat").ids == ck.tokenizer.encode("the cat").ids
    for La, Lb in zip(w.layers, q.weights.layers):
        np.testing.assert_array_equal(La.attn_norm, Lb.attn_norm)
        np.testing.assert_array_equal(La.mlp_norm, Lb.mlp_norm)
        for n in LINEAR_NAMES:
            assert_same_linear(getattr(La, n), getattr(Lb, n))
    np.testing.assert_array_equal(as_stored(w).embed, q.weights.embed)
    np.testing.assert_array_equal(as_stored(w).lm_head, q.weights.lm_head)
    assert q.kv_scales.shape == (ck.config.num_hidden_layers, 2, ck.config.num_key_value_heads)
    toks = seqs_for(ck.config)[0]
    np.testing.assert_array_equal(Model(q.weights).forward(toks), Model(as_stored(w)).forward(toks))
    # the engine's dispatch finds it too
    assert load_checkpoint(path).recipe == recipe


@pytest.mark.parametrize("method,tie,template", [("w4a16", True, None), ("w8a8", False, "x"),
                                                 ("fptq", True, TINY_CHAT_TEMPLATE)])
def test_end_to_end_other_kinds(tmp_path, method, tie, template):
    ck = tiny_ckpt(tie=tie, template=template)
    w, recipe = quantize_checkpoint(ck, method, group=16, calib=seqs_for(ck.config), progress=False)
    p = tmp_path / "m.q.safetensors"
    size = save_qfile(p, w, ck.config, ck.tokenizer.to_str(), ck.chat_template, recipe)
    assert size == os.path.getsize(p)
    assert [f for f in os.listdir(tmp_path) if f != "m.q.safetensors"] == []      # no temp left behind
    q = load_qfile(p)
    assert q.chat_template == template and q.kv_scales is None
    toks = seqs_for(ck.config)[1]
    np.testing.assert_array_equal(Model(q.weights).forward(toks), Model(as_stored(w)).forward(toks))
    if tie:
        assert q.weights.lm_head is q.weights.embed


def test_float_linears_are_stored_too(tmp_path):
    ck = tiny_ckpt()
    w, recipe = quantize_checkpoint(ck, "rtn", group=16, calib=seqs_for(ck.config), progress=False)
    w.layers[1].down = ModelWeights.from_hf(ck.config, ck.tensors).layers[1].down    # keep one in float
    p = tmp_path / "m.q.safetensors"
    save_qfile(p, w, ck.config, ck.tokenizer, None, recipe)
    q = load_qfile(p)
    assert isinstance(q.weights.layers[1].down, np.ndarray)
    assert q.linears["model.layers.1.mlp.down_proj"]["kind"] == "float"
    np.testing.assert_array_equal(q.weights.layers[1].down, w.layers[1].down)


# ----------------------------------------------------------------------------- rejection

def rewrite(src, dst, edit_tensors=None, edit_meta=None):
    tensors, meta = read_safetensors(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    write_safetensors(dst, tensors, meta)
    return dst


def expect_error(path, *words):
    with pytest.raises(QFileError) as e:
        load_qfile(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_rejects_wrong_version_and_format(saved, tmp_path):
    _, _, _, src = saved
    p = rewrite(src, tmp_path / "v.safetensors", edit_meta=lambda m: m.__setitem__("version", "2"))
    expect_error(p, "version", "'2'")
    p = rewrite(src, tmp_path / "f.safetensors", edit_meta=lambda m: m.__setitem__("format", "gptq"))
    expect_error(p, "not a dgq-safetensors file")
    p = rewrite(src, tmp_path / "m.safetensors", edit_meta=lambda m: m.pop("recipe"))
    expect_error(p, "recipe")
    p = rewrite(src, tmp_path / "j.safetensors", edit_meta=lambda m: m.__setitem__("config", "{oops"))
    expect_error(p, "config", "JSON")


def test_rejects_missing_extra_wrong_dtype_wrong_shape(saved, tmp_path):
    _, _, _, src = saved
    name = "model.layers.1.mlp.up_proj.gscale"
    p = rewrite(src, tmp_path / "a.safetensors", lambda t: t.pop(name))
    expect_error(p, "missing", name)
    p = rewrite(src, tmp_path / "b.safetensors", lambda t: t.__setitem__("model.layers.0.extra", np.zeros(2)))
    expect_error(p, "unexpected", "model.layers.0.extra")
    p = rewrite(src, tmp_path / "c.safetensors", lambda t: t.__setitem__(name, t[name].astype(np.int8)))
    expect_error(p, "dtype", name)
    p = rewrite(src, tmp_path / "d.safetensors", lambda t: t.__setitem__(name, t[name][:, :1].copy()))
    expect_error(p, "shape", name)
    p = rewrite(src, tmp_path / "e.safetensors",
                lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.float16)))
    expect_error(p, "dtype", "model.norm.weight")
    p = rewrite(src, tmp_path / "g.safetensors",
                lambda t: t.__setitem__(name, np.full_like(t[name], 200)))                  # S > 127
    expect_error(p, "model.layers.1.mlp.up_proj", "1..127")


def test_rejects_inconsistent_linears_metadata(saved, tmp_path):
    _, _, _, src = saved

    def drop_static(m):
        lin = json.loads(m["linears"])
        lin["model.layers.0.self_attn.q_proj"]["act"] = "dynamic"     # but the ascale tensor is there
        m["linears"] = json.dumps(lin)
    expect_error(rewrite(src, tmp_path / "a.safetensors", edit_meta=drop_static), "unexpected", "ascale")

    def bad_kind(m):
        lin = json.loads(m["linears"])
        lin["model.layers.0.mlp.down_proj"]["kind"] = "gptq"
        m["linears"] = json.dumps(lin)
    expect_error(rewrite(src, tmp_path / "b.safetensors", edit_meta=bad_kind), "unknown linear kind")


def test_rejects_truncated_missing_and_foreign_files(saved, tmp_path):
    _, _, _, src = saved
    data = open(src, "rb").read()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"t{cut}.safetensors"
        p.write_bytes(data[:cut])
        expect_error(p, "truncated")
    expect_error(tmp_path / "absent.safetensors", "no such file")
    p = tmp_path / "text.safetensors"
    p.write_bytes(b"hello world, not a safetensors file at all")
    expect_error(p)


def test_save_rejects_mismatched_config(saved, tmp_path):
    ck, w, recipe, _ = saved
    other = make_tiny_config(num_hidden_layers=3)
    with pytest.raises(QFileError):
        save_qfile(tmp_path / "x.safetensors", w, other, ck.tokenizer, None, recipe)
    with pytest.raises(QFileError):
        save_qfile(tmp_path / "y.safetensors", w, ck.config, ck.tokenizer, None, {"bad": np.float32(1)})
    assert not os.listdir(tmp_path)


def test_failed_write_keeps_the_old_file(saved, tmp_path):
    ck, w, recipe, src = saved
    p = tmp_path / "keep.safetensors"
    p.write_bytes(open(src, "rb").read())
    before = p.read_bytes()
    bad = ModelWeights(config=w.config, embed=w.embed, layers=list(w.layers), norm=w.norm, lm_head=w.lm_head)
    bad.layers[0] = type(w.layers[0])(**{**w.layers[0].__dict__, "q": formats.QuantLinear.__new__(formats.QuantLinear)})
    with pytest.raises(Exception):
        save_qfile(p, bad, ck.config, ck.tokenizer, None, recipe)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]
