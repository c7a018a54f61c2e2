"""Issue 18: lazy checkpoints, the layer-by-layer converter (float and sequential calibration),
the streaming q.safetensors writer and fp16 embeddings, on tiny random models (seconds)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import dgq_cli
from converters import calibrate as cal
from converters import smooth
from converters.quantize import METHODS, quantize_checkpoint, quantize_to_file
from engine.api import load_model
from engine.io.checkpoint import load_checkpoint
from engine.io.layout import LazyTensors, ModelWeights, WeightsError
from engine.io.qfile import QFileWriter, load_qfile, save_qfile
from engine.io.safetensors import SafetensorsWriter, read_safetensors, round_to_dtype, write_safetensors
from engine.model import LINEAR_NAMES, Model
from tiny_model import make_tiny_checkpoint, write_tiny_gguf

OPTS = {"pot": dict(wbits=3), "int-rtn": dict(wbits=3), "int-search": dict(wbits=3)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "m"
    ck = make_tiny_checkpoint(d, dtype="float16", shards=2, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=3, head_dim=16)
    return d, ck


def seqs_for(c, n=3, t=20):
    return np.random.default_rng(2).integers(0, c.vocab_size, size=(n, t)).astype(np.int32)


def linear_bytes(w):
    """Every quantized tensor of every layer, as bytes (exact comparison)."""
    out = {}
    for i, L in enumerate(w.layers):
        out[f"{i}.norms"] = L.attn_norm.tobytes() + L.mlp_norm.tobytes()
        for n in LINEAR_NAMES:
            ql = getattr(L, n)
            out[f"{i}.{n}"] = (ql.kind, ql.act, ql.ascale, {k: a.tobytes() for k, a in ql.tensors().items()})
    return out


# ----------------------------------------------------------------------------- lazy reading

@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_lazy_checkpoint_reads_on_access_and_equals_eager(model_dir, tmp_path, kind):
    d, ck = model_dir
    path = d
    if kind == "gguf":
        pytest.importorskip("gguf")
        path = tmp_path / "m.gguf"
        write_tiny_gguf(path, ck)
    eager = load_checkpoint(path)
    lazy = load_checkpoint(path, lazy=True)
    assert isinstance(lazy.tensors, LazyTensors) and lazy.tensors.loads == 0     # nothing read yet
    assert "model.layers.2.mlp.up_proj.weight" in lazy.tensors and lazy.tensors.loads == 0
    a = lazy.tensors["model.layers.2.mlp.up_proj.weight"]
    assert lazy.tensors.loads == 1 and lazy.tensors.live() == ["model.layers.2.mlp.up_proj.weight"]
    del a
    assert lazy.tensors.live() == []
    assert list(lazy.tensors) == list(eager.tensors)
    for n in eager.tensors:
        np.testing.assert_array_equal(lazy.tensors[n], eager.tensors[n])


def test_lazy_nan_is_reported_when_read(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "m")
    t, meta = read_safetensors(tmp_path / "m" / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan
    write_safetensors(tmp_path / "m" / "model.safetensors", t, meta)
    lazy = load_checkpoint(tmp_path / "m", lazy=True)             # names and shapes are fine
    lazy.tensors["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(WeightsError, match="down_proj.weight holds 1 NaN"):
        lazy.tensors["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(WeightsError, match="NaN"):
        load_checkpoint(tmp_path / "m")
    del ck


# ----------------------------------------------------------------------------- the layer walk

def test_layer_walk_statistics_equal_the_whole_model_pass(model_dir):
    """calibrate_layer on the float activations == calibrate over Model.forward, bit for bit."""
    _, ck = model_dir
    c = ck.config
    w = ModelWeights.from_hf(c, ck.tensors)
    seqs = seqs_for(c)
    whole = cal.calibrate(w, seqs, kv=True, progress=False)
    X = w.embed[seqs]
    for li in range(c.num_hidden_layers):
        stats, kv = cal.calibrate_layer(c, li, w.layers[li], X, kv=True, advance=True)
        np.testing.assert_array_equal(kv, whole.kv_absmax[li])
        for site, st in stats.items():
            ref = whole.sites[(li, site)]
            np.testing.assert_array_equal(st.absmax, ref.absmax)
            np.testing.assert_array_equal(st.tok_absmax, ref.tok_absmax)
            np.testing.assert_array_equal(st.H, ref.H)


def test_float_calibration_equals_a_whole_model_reference(model_dir):
    """quantize_checkpoint (layer walk) against the converter's former recipe written out here:
    one whole-model pass, smoothing folded, statistics rescaled, every linear quantized."""
    from converters.quantize import SMOOTH_SITES, quantize_linear
    from engine.model import SITE_OF
    _, ck = model_dir
    seqs = seqs_for(ck.config)
    got, _ = quantize_checkpoint(ck, "dgq", group=32, calib=seqs, progress=False, calibration="float",
                                 act="static", gptq=False, sink_weight=1.0)
    w = ModelWeights.from_hf(ck.config, ck.tensors)
    stats = cal.calibrate(w, seqs, progress=False)
    scales = {(li, s): smooth.percentile_scales(stats.sites[(li, s)].absmax)
              for li in range(ck.config.num_hidden_layers) for s in SMOOTH_SITES}
    w = smooth.fold_scales(w, scales)
    for key, s in scales.items():
        stats.sites[key] = cal.scaled(stats.sites[key], s)
    for li, L in enumerate(w.layers):
        for n in LINEAR_NAMES:
            st = stats.sites[(li, SITE_OF[n])]
            act = "dynamic" if n == "down" else "static"
            ql = quantize_linear(getattr(L, n), "dg", act, cal.static_ascale(st) if act == "static" else None,
                                 32, H=st.H, search=True)
            g = getattr(got.layers[li], n)
            assert g.ascale == ql.ascale
            for k, a in ql.tensors().items():
                np.testing.assert_array_equal(g.tensors()[k], a, err_msg=f"{li}.{n}.{k}")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_streams_to_the_same_file(model_dir, tmp_path, method):
    """quantize_to_file (lazy checkpoint, layer by layer) == quantize_checkpoint + save_qfile,
    byte for byte in every tensor; the file loads and runs."""
    d, ck = model_dir
    seqs = seqs_for(ck.config)
    kw = dict(group=32, calib=seqs, progress=False, **OPTS.get(method, {}))
    w, recipe = quantize_checkpoint(ck, method, **kw)
    a = tmp_path / "a.q.safetensors"
    save_qfile(a, w, ck.config, ck.tokenizer, ck.chat_template, recipe)
    lazy = load_checkpoint(d, lazy=True)
    live = []
    b = tmp_path / "b.q.safetensors"
    r2, size, lin = quantize_to_file(lazy, b, method, on_layer=lambda li, L: live.append(lazy.tensors.live()), **kw)
    assert size == os.path.getsize(b) and sorted(os.listdir(tmp_path)) == ["a.q.safetensors", "b.q.safetensors"]
    ta, ma = read_safetensors(a)
    tb, mb = read_safetensors(b)
    assert list(ta) == list(tb) and ma["linears"] == mb["linears"]
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and ta[n].tobytes() == tb[n].tobytes(), n
    assert ta["model.embed_tokens.weight"].dtype == np.float16
    # Laziness: when a layer is handed on, no float tensor is still referenced but its own
    # norms (the embedding goes once the calibration inputs are built), and each was read once.
    for li, names in enumerate(live):
        assert set(names) <= {f"model.layers.{li}.input_layernorm.weight",
                              f"model.layers.{li}.post_attention_layernorm.weight"}, (li, names)
    assert lazy.tensors.loads == len(lazy.tensors)
    assert lin["params"] == sum(int(np.prod(getattr(L, n).shape)) for L in w.layers for n in LINEAR_NAMES)
    q = load_model(str(b), "cpu")
    toks = seqs[0]
    ref = Model(ModelWeights.from_hf(ck.config, ck.tensors)).forward(toks)
    out = q.model.forward(toks)
    assert np.isfinite(out).all() and np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.8


def test_sequential_calibration_differs_and_is_recorded(model_dir):
    _, ck = model_dir
    seqs = seqs_for(ck.config)
    wf, rf = quantize_checkpoint(ck, "dgq", group=32, calib=seqs, progress=False, kv8=True, calibration="float")
    ws, rs = quantize_checkpoint(ck, "dgq", group=32, calib=seqs, progress=False, kv8=True)   # dgq's default
    bf, bs = linear_bytes(wf), linear_bytes(ws)
    assert bf["0.q"] == bs["0.q"] and bf["0.down"] == bs["0.down"]     # layer 0 sees the same inputs
    assert any(bf[k] != bs[k] for k in bf if k.startswith("2."))         # later layers do not
    assert rs["calibration"]["mode"] == "sequential" and rf["calibration"]["mode"] == "float"
    assert "sequential" in rs["stats_from"] and rs["kv_cache"]["k_scale"] != rf["kv_cache"]["k_scale"]
    assert {m: s.calibration for m, s in METHODS.items() if s.calibration == "sequential"} == \
        dict.fromkeys(("dgq", "dgq-rtn", "rtn"), "sequential")                         # docs/QUALITY.md
    _, r8 = quantize_checkpoint(ck, "rtn", wbits=8, group=32, calib=seqs, progress=False)
    assert r8["calibration"]["mode"] == "float"                                      # W8 not measured
    # the percentile clip (two passes) walks sequentially as well
    w2, r2 = quantize_checkpoint(ck, "dgq-rtn", group=32, calib=seqs, progress=False, act_clip=99.0,
                                 calibration="sequential")
    assert r2["calibration_passes"] == 2
    with pytest.raises(ValueError, match="--calibration"):
        quantize_checkpoint(ck, "dgq", calib=seqs, progress=False, calibration="layerwise")


def test_sequential_inputs_are_the_quantized_model_activations(model_dir):
    """Layer 2's statistics in sequential mode are those of the quantized layers 0-1 (checked
    through a whole-model pass over a model whose first layers are the quantized ones)."""
    _, ck = model_dir
    seqs = seqs_for(ck.config)
    ws, _ = quantize_checkpoint(ck, "rtn", group=32, calib=seqs, progress=False, calibration="sequential")
    w = ModelWeights.from_hf(ck.config, ck.tensors)
    mixed = ModelWeights(config=w.config, embed=w.embed, layers=ws.layers[:2] + w.layers[2:], norm=w.norm,
                         lm_head=w.lm_head)
    st = cal.calibrate(mixed, seqs, gram=False, layers=[2], progress=False)
    assert ws.layers[2].q.ascale == cal.static_ascale(st.sites[(2, "attn_in")])
    assert ws.layers[2].down.ascale == cal.static_ascale(st.sites[(2, "down_in")])


# ----------------------------------------------------------------------------- files

def test_streaming_writer_equals_write_safetensors_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    t = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.uint8),
         "c": np.float16([1, 2, 3]), "d": np.arange(5, dtype=np.uint32), "e": np.float32(2.0)}
    write_safetensors(tmp_path / "x", t, {"k": "v"})
    with SafetensorsWriter(tmp_path / "y") as w:
        for k, v in t.items():
            w.add(k, v)
        w.finish({"k": "v"})
    assert (tmp_path / "x").read_bytes() == (tmp_path / "y").read_bytes()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "z") as w:
            w.add("a", t["a"])
            w.add("b", t["b"])
            raise RuntimeError("a failure half way")
    assert sorted(os.listdir(tmp_path)) == ["x", "y"]                # no spill file, no z


def test_killed_conversion_leaves_no_file(model_dir, tmp_path):
    """SIGTERM in the middle of the layer walk removes the spill files (util/files handlers)."""
    d, _ = model_dir
    code = (f"import os, signal, sys; sys.path.insert(0, {os.getcwd()!r})\n"
            "from converters.quantize import quantize_to_file\n"
            "from engine.io.checkpoint import load_checkpoint\n"
            f"ck = load_checkpoint({str(d)!r}, lazy=True)\n"
            "def stop(li, L):\n"
            "    if li == 1: os.kill(os.getpid(), signal.SIGTERM)\n"
            f"quantize_to_file(ck, {str(tmp_path / 'o.q.safetensors')!r}, 'rtn', group=32, calib='random',"
            " n_seq=2, seq_len=8, progress=False, on_layer=stop)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=os.getcwd())
    assert r.returncode == -signal.SIGTERM, r.stderr.decode()[-500:]
    assert os.listdir(tmp_path) == []


def test_fp16_and_fp32_embeddings_both_load(model_dir, tmp_path):
    _, ck = model_dir
    w, recipe = quantize_checkpoint(ck, "w4a16", group=32, progress=False)
    for dt in ("float16", "float32"):
        p = tmp_path / f"{dt}.q.safetensors"
        save_qfile(p, w, ck.config, ck.tokenizer, None, recipe, embed_dtype=dt)
        t, _ = read_safetensors(p)
        assert t["model.embed_tokens.weight"].dtype == dt and t["lm_head.weight"].dtype == dt
        assert t["model.norm.weight"].dtype == np.float32
        q = load_qfile(p)
        assert q.weights.embed.dtype == np.float32
        np.testing.assert_array_equal(q.weights.embed, round_to_dtype(w.embed, dt))
    a, b = (os.path.getsize(tmp_path / f"{dt}.q.safetensors") for dt in ("float16", "float32"))
    assert abs((b - a) - 2 * ck.config.vocab_size * ck.config.hidden_size * 2) < 256   # embed + lm_head halved
    big = w.embed.copy()
    big[0, 0] = 1e6                                                            # past fp16's range: kept fp32
    with QFileWriter(tmp_path / "big.q.safetensors", ck.config) as qw:
        qw.add_floats(big, w.norm, w.lm_head)
        for i, L in enumerate(w.layers):
            qw.add_layer(i, L)
        qw.finish(ck.tokenizer, None, recipe)
    assert qw.float_dtypes == {"model.embed_tokens.weight": "float32", "lm_head.weight": "float16"}
    assert load_qfile(tmp_path / "big.q.safetensors").weights.embed[0, 0] == 1e6


def test_cli_quantize_streams_with_sequential_calibration(model_dir, tmp_path):
    d, _ = model_dir
    out = tmp_path / "m.q.safetensors"
    r = CliRunner().invoke(dgq_cli.quantize, [str(d), "--out", str(out), "--method", "dgq", "--group", "32",
                                              "--calib", "random", "--n-seq", "2", "--seq-len", "16",
                                              "--calibration", "sequential", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "sequential calibration" in r.output and "peak RSS" in r.output
    r = CliRunner().invoke(dgq_cli.quantize, [str(d), "--out", str(tmp_path / "w8.q.safetensors"), "--method",
                                              "w8a8", "--calib", "random",
                                              "--n-seq", "2", "--seq-len", "16", "--quiet"])
    assert r.exit_code == 0 and "float calibration" in r.output, r.output
    q = load_qfile(out)
    assert q.recipe["calibration"]["mode"] == "sequential" and q.recipe["embed_dtype"] == "float16"
    # dgq's default recipe (MethodSpec): per-token activations, GPTQ, sink weight 512
    assert (q.recipe["act"], q.recipe["gptq"]["mode"], q.recipe["calibration"]["sink_weight"]) == \
        ("dynamic", "grid", 512.0)
    former = tmp_path / "former.q.safetensors"
    r = CliRunner().invoke(dgq_cli.quantize, [str(d), "--out", str(former), "--group", "32", "--calib", "random",
                                              "--n-seq", "2", "--seq-len", "16", "--quiet", "--act", "static",
                                              "--no-gptq", "--sink-weight", "1"])
    assert r.exit_code == 0 and "act static," in r.output, r.output
    f = load_qfile(former).recipe
    assert (f["act"], f["gptq"], f["calibration"]["sink_weight"], f["dynamic_sites"]) == \
        ("static", False, 1.0, ["down_in"])
    r = CliRunner().invoke(dgq_cli.quantize, [str(d), "--out", str(former), "--method", "rtn", "--gptq"])
    assert r.exit_code != 0 and "--gptq" in r.output, r.output
    assert set(q.recipe["phase_s"]) == {"load", "calibrate", "quantize", "propagate", "write"}
    r = CliRunner().invoke(dgq_cli.quantize, [str(d), "--out", str(out), "--calibration", "nope"])
    assert r.exit_code != 0 and "--calibration" in r.output
    json.dumps(q.recipe)


def test_scale_bench_runs_on_a_tiny_shape(tmp_path, capsys):
    """python -m engine.bench quantize: builds the checkpoint, runs dgq-quantize in a child,
    reports phases and peak RSS, cleans up."""
    from engine.bench.__main__ import main
    assert main(["quantize", "--shape", "tiny", "--n-seq", "2", "--seq-len", "16", "--group", "32", "--quiet",
                 "--json", "--dir", str(tmp_path), "--calibration", "sequential"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["peak_rss_mb"] > 0 and row["phase_s"]["propagate"] >= 0 and row["file_bytes"] > 0
    assert os.listdir(tmp_path) == []


def test_scale_bench_knows_which_methods_calibrate(tmp_path, capsys):
    """The bench's list of methods without calibration is the converter's (it may not import
    converters/), and a weight-only run goes through (dgq-quantize refuses --calib there)."""
    from converters.quantize import METHODS, needs_calibration
    from engine.bench.__main__ import main
    from engine.bench.quantize import UNCALIBRATED
    assert set(UNCALIBRATED) == {m for m in METHODS if not needs_calibration(m, 3 if m.startswith("int") else 4)}
    assert main(["quantize", "--shape", "tiny", "--method", "w4a16", "--group", "32", "--quiet", "--json",
                 "--dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["file_bytes"] > 0
