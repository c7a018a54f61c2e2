"""Issue 17: every case of "Why" — damaged files and odd arguments a user found — refused with
one clear line, nothing lost, nothing half-written, no hang. (The generated corruptions are
in tests/test_fuzz_inputs.py; these are the named cases, one test each.)"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import dgq_cli
from converters.export import MARKER, ExportError, export_hf_dir
from engine import formats
from engine.api import load_model
from engine.io.checkpoint import load_checkpoint
from engine.io.hf_dir import load_hf_dir
from engine.io.layout import ModelError, ModelWeights, WeightsError
from engine.io.qfile import QFileError, load_qfile, save_qfile
from engine.io.safetensors import read_safetensors_header, write_safetensors
from engine.model import Model
from engine.model.generate import GenerationError, encode_prompt
from engine.util.files import atomic_file, clean_stale
from fuzz_inputs import st_build, st_parse
from tiny_model import make_tiny_checkpoint, write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--prompt", "hi", "--raw", "--max-new-tokens", "1", "--device", "cpu"]


@contextmanager
def deadline(seconds=10):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def boom(*_):
        raise TimeoutError(f"hung for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cli(cmd, args):
    r = CliRunner().invoke(cmd, args, env={"DGQ_DEBUG": ""})
    return r


def assert_one_line_error(r, *needles):
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, r.output
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture()
def hf(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    return tmp_path / "m"


def q_file(tmp_path, method="dgq-rtn"):
    from converters.quantize import quantize_checkpoint
    ck = load_hf_dir(make_tiny_dir(tmp_path / "src"))
    seqs = np.random.default_rng(1).integers(0, ck.config.vocab_size, (2, 16)).astype(np.int32)
    w, recipe = quantize_checkpoint(ck, method, group=16, calib=seqs, progress=False)
    path = tmp_path / f"{method}.q.safetensors"
    save_qfile(path, w, ck.config, ck.tokenizer, ck.chat_template, recipe)
    return path


def make_tiny_dir(d):
    make_tiny_checkpoint(d)
    return d


def edit_tensor(path, suffix, fn):
    from engine.io.safetensors import _ST_DTYPES
    h, data = st_parse(path)
    data = bytearray(data)
    name = next(n for n in sorted(h) if n.endswith(suffix))
    e = h[name]
    b, end = e["data_offsets"]
    a = np.frombuffer(bytes(data[b:end]), dtype=_ST_DTYPES[e["dtype"]]).reshape(e["shape"]).copy()
    fn(a)
    data[b:end] = a.tobytes()
    path.write_bytes(st_build(h, bytes(data)))
    return name


# ----------------------------------------------------------------------------- tracebacks

def test_prompt_with_bytes_that_are_not_utf8(hf):
    # a command line's undecodable bytes reach Python as lone surrogates (PEP 383)
    r = cli(dgq_cli.run, ["--weights", str(hf), "--prompt", "caf\udce9", "--raw", "--device", "cpu"])
    assert_one_line_error(r, "--prompt", "UTF-8")
    tok = load_hf_dir(hf).tokenizer
    with pytest.raises(GenerationError, match="UTF-8"):
        encode_prompt(tok, b"caf\xe9", None, False)
    with pytest.raises(GenerationError, match="must be text"):
        encode_prompt(tok, 42, None, False)
    assert encode_prompt(tok, "café".encode(), None, False) == encode_prompt(tok, "café", None, False)


@pytest.mark.parametrize("field,value,needle", [
    ("num_hidden_layers", 10**9, "beyond any real model"),
    ("num_hidden_layers", 1000, "holds 21 tensors"),          # plausible, but not in this file
    ("vocab_size", 10**7, "parameters"),                        # checked against the bytes
    ("max_position_embeddings", 10**13, "beyond any real model"),
])
def test_absurd_config_is_checked_against_the_file(hf, field, value, needle):
    cfg = json.loads((hf / "config.json").read_text())
    cfg[field] = value
    (hf / "config.json").write_text(json.dumps(cfg))
    with deadline(10):
        with pytest.raises(WeightsError, match=needle):
            load_checkpoint(hf)
        assert_one_line_error(cli(dgq_cli.run, ["--weights", str(hf)] + RUN), "config.json")


@pytest.mark.parametrize("key,value,needle", [("llama.block_count", 10**9, "beyond any real model"),
                                              ("llama.block_count", 1000, "tensors"),
                                              ("llama.context_length", 10**13, "beyond any real model")])
def test_absurd_gguf_metadata_is_checked_against_the_file(tmp_path, hf, key, value, needle):
    import gguf
    from fuzz_inputs import _gguf_hook
    from gguf.gguf_writer import GGUFValue
    f = tmp_path / "m.gguf"
    with _gguf_hook(lambda w: w.kv_data[0].__setitem__(key, GGUFValue(value, gguf.GGUFValueType.UINT64))):
        write_tiny_gguf(f, load_hf_dir(hf))
    with deadline(10), pytest.raises(WeightsError, match=needle):
        load_model(str(f))


@pytest.mark.parametrize("field,value,needle", [("num_hidden_layers", 10**9, "beyond any real model"),
                                                ("num_hidden_layers", 500, "tensors"),
                                                ("max_position_embeddings", 2**40, "beyond any real model")])
def test_absurd_q_file_config_is_checked_against_the_file(tmp_path, field, value, needle):
    path = q_file(tmp_path)
    h, data = st_parse(path)
    cfg = json.loads(h["__metadata__"]["config"])
    cfg[field] = value
    h["__metadata__"]["config"] = json.dumps(cfg)
    path.write_bytes(st_build(h, data))
    with deadline(10), pytest.raises(QFileError, match=needle):
        load_qfile(path)


# ----------------------------------------------------------------------------- a hang

@pytest.mark.parametrize("name", ["w.gguf", "w.safetensors", "w.q.safetensors", "weights"])
def test_fifo_as_weights_is_refused_not_blocking(tmp_path, name):
    f = tmp_path / name
    os.mkfifo(f)
    with deadline(10):
        with pytest.raises(WeightsError, match="not a regular file"):
            load_checkpoint(f)
        assert_one_line_error(cli(dgq_cli.run, ["--weights", str(f)] + RUN), "not a regular file")
        assert_one_line_error(cli(dgq_cli.quantize, [str(f), "--out", str(tmp_path / "o.q.safetensors")]),
                              "not a regular file")
    assert sorted(os.listdir(tmp_path)) == [name]


def test_fifo_inside_a_model_directory_is_refused(hf):
    for name in ("model.safetensors", "config.json"):
        d = hf.parent / f"fifo-{name}"
        shutil.copytree(hf, d)
        (d / name).unlink()
        os.mkfifo(d / name)
        with deadline(10), pytest.raises(WeightsError, match="not a regular file"):
            load_checkpoint(d)


# ----------------------------------------------------------------------------- silent wrong results

def test_overlapping_tensor_byte_ranges_are_refused(hf):
    f = hf / "model.safetensors"
    h, data = st_parse(f)
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    h[b]["data_offsets"] = list(h[a]["data_offsets"])      # same size: everything else still adds up
    f.write_bytes(st_build(h, data))
    with pytest.raises(WeightsError, match="share bytes"):
        read_safetensors_header(f)
    assert_one_line_error(cli(dgq_cli.run, ["--weights", str(hf)] + RUN), "share bytes", "model.safetensors")
    # the safetensors library agrees that such a file is invalid
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    with pytest.raises(SafetensorError):
        load_file(str(f))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_hf_weights_are_named_at_load_and_never_quantized(tmp_path, hf, value):
    name = edit_tensor(hf / "model.safetensors", "mlp.up_proj.weight", lambda a: a.reshape(-1).__setitem__(7, value))
    with pytest.raises(WeightsError, match=f"tensor {name.replace('.', '[.]')} holds 1 NaN/Inf"):
        load_checkpoint(hf)
    out = tmp_path / "o.q.safetensors"
    assert_one_line_error(cli(dgq_cli.quantize, [str(hf), "--out", str(out), "--method", "w4a16", "--quiet"]),
                          name)
    assert not out.exists()


def test_nonfinite_gguf_weights_are_named_at_load(tmp_path, hf):
    from fuzz_inputs import _gguf_hook

    def poison(w):
        ti = w.tensors[0]["blk.1.ffn_gate.weight"]
        a = np.array(ti.tensor, copy=True)
        a[3, 4] = np.nan
        ti.tensor = a
    f = tmp_path / "m.gguf"
    with _gguf_hook(poison):
        write_tiny_gguf(f, load_hf_dir(hf))
    with pytest.raises(WeightsError, match="blk.1.ffn_gate.weight holds 1 NaN/Inf"):
        load_checkpoint(f)


def test_overflowing_dg_codes_are_refused_on_every_path(tmp_path):
    path = q_file(tmp_path)
    ok = load_qfile(path).weights.layers[0].q
    edit_tensor(path, "layers.0.self_attn.q_proj.qweight", lambda a: a.fill(0xFF))     # codes 15
    edit_tensor(path, "layers.0.self_attn.q_proj.qzeros", lambda a: a.fill(0))
    edit_tensor(path, "layers.0.self_attn.q_proj.gscale", lambda a: a.fill(127))      # |15·127| > 127
    with pytest.raises(QFileError, match="overflow int8"):
        load_qfile(path)
    assert_one_line_error(cli(dgq_cli.run, ["--weights", str(path)] + RUN), "overflow int8")
    # an in-memory layer (the Python API) that breaks the guard is refused by the CPU path too
    bad = formats.QuantLinear(kind="dg", act=ok.act, in_features=ok.in_features, out_features=ok.out_features,
                              group=ok.group, qweight=np.full_like(ok.qweight, 0xFF), qzeros=np.zeros_like(ok.qzeros),
                              gscale=np.full_like(ok.gscale, 127), cscale=ok.cscale, ascale=ok.ascale)
    with pytest.raises(formats.FormatError, match="overflow int8"):
        bad.int8_weight()
    with pytest.raises(formats.FormatError, match="overflow int8"):
        formats.check_no_overflow(bad)


@pytest.mark.parametrize("suffix,value,needle", [("mlp.down_proj.cscale", 1e30, "cscale holds 1e[+]30"),
                                                 ("self_attn.q_proj.ascale", 1e12, "not a usable activation scale")])
def test_absurd_but_finite_scales_are_refused_without_warnings(tmp_path, suffix, value, needle):
    path = q_file(tmp_path)
    edit_tensor(path, suffix, lambda a: a.reshape(-1).__setitem__(0, value))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # not a RuntimeWarning either
        with pytest.raises(QFileError, match=needle):
            load_qfile(path)


def test_n_seq_zero_is_refused_not_the_default(hf, tmp_path):
    out = tmp_path / "o.q.safetensors"
    assert_one_line_error(cli(dgq_cli.quantize, [str(hf), "--out", str(out), "--n-seq", "0", "--quiet"]), "--n-seq")
    assert_one_line_error(cli(dgq_cli.quantize, [str(hf), "--out", str(out), "--seq-len", "0", "--quiet"]),
                          "--seq-len")
    from converters.calibrate import CalibrationError, calibration_tokens
    with pytest.raises(CalibrationError, match="--n-seq"):
        calibration_tokens(None, "random", n_seq=0, seq_len=8, vocab_size=10)
    assert not out.exists()


def test_boolean_token_array_is_not_a_mask(hf):
    from engine.model.generate import generate
    ck = load_hf_dir(hf)
    m = Model(ModelWeights.from_hf(ck.config, ck.tensors))
    with pytest.raises(GenerationError, match="integer token ids"):
        generate(m, np.array([True, False, True]), 2)
    with pytest.raises(ModelError, match="integer array"):
        m.forward(np.array([True, False, True]))
    with pytest.raises(ModelError, match="integer array"):
        m.forward(np.array([1.0, 2.0]))


def test_ragged_tokens_seeds_and_stops_are_refused_in_our_words(hf):
    """The Python API's token arrays, seed and stop set: one clear error, not NumPy's."""
    from engine.model.generate import generate
    ck = load_hf_dir(hf)
    m = Model(ModelWeights.from_hf(ck.config, ck.tensors))
    with pytest.raises(ModelError, match="1-D token array"):
        m.forward([1, [2, 3]])
    with pytest.raises(GenerationError, match="1-D sequence of integer token ids"):
        generate(m, [1, [2, 3]], 1)
    for seed in (-1, 0.5, 2**63, True):
        with pytest.raises(GenerationError, match="seed must be an integer"):
            generate(m, [1, 2], 1, seed=seed, temperature=1.0)
    for stop in (5, {1.5}, {"a"}):
        with pytest.raises(GenerationError, match="stop must be a set of integer token ids"):
            generate(m, [1, 2], 1, stop=stop)
    assert len(generate(m, [1, 2], 2, seed=None, stop=[np.int64(10**6)])[0]) == 2     # valid ones still run
    assert len(generate(m, [1, 2], 2, stop=np.array([10**6]))[0]) == 2
    assert len(generate(m, [1, 2], 2, stop=range(10**6, 10**6 + 2))[0]) == 2


# ----------------------------------------------------------------------------- lost data

@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_out_that_is_a_fifo_or_a_device_is_not_replaced(tmp_path, hf, kind):
    """`--out /dev/null` (as root) must not turn the device into a regular file. The device here
    is a null device of our own in tmp_path (root only), so a regression cannot harm /dev/null."""
    import stat
    out = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    r = cli(dgq_cli.quantize, [str(hf), "--out", str(out), "--method", "w4a16", "--group", "16", "--quiet",
                               "--device", "cpu"])
    assert_one_line_error(r, "not a regular file")
    assert out.is_fifo() if kind == "fifo" else out.is_char_device()
    with pytest.raises(Exception, match="not a regular file"):
        with atomic_file(out):
            pass

def test_quantize_out_that_is_its_own_input_is_refused(tmp_path, hf):
    g = tmp_path / "m.gguf"
    write_tiny_gguf(g, load_hf_dir(hf))
    link = tmp_path / "link.gguf"
    link.symlink_to(g)
    before = {p: p.read_bytes() for p in [g, hf / "model.safetensors", hf / "config.json"]}
    for model, out in [(g, g), (g, link), (link, g), (hf, hf / "model.safetensors"), (hf, hf / "config.json"),
                       (hf, hf / "tokenizer.json")]:
        r = cli(dgq_cli.quantize, [str(model), "--out", str(out), "--method", "w4a16", "--quiet"])
        assert_one_line_error(r, "--out", "one of the inputs")
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat " * 50)
    r = cli(dgq_cli.quantize, [str(hf), "--out", str(calib), "--calib", str(calib), "--quiet"])
    assert_one_line_error(r, "one of the inputs")
    assert {p: p.read_bytes() for p in before} == before


def test_export_overwrite_only_replaces_its_own_exports(tmp_path, hf):
    ck = load_hf_dir(hf)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    r = cli(dgq_cli.export, [str(hf), "--out", str(mine)])                 # no hint at --overwrite here
    assert "--overwrite" not in assert_one_line_error(r, "not empty and was not written by dgq-export")
    r = cli(dgq_cli.export, [str(hf), "--out", str(mine), "--overwrite"])
    assert_one_line_error(r, "not a directory written by dgq-export")
    with pytest.raises(ExportError, match="not a directory written by dgq-export"):
        export_hf_dir(ck, mine, overwrite=True)
    assert (mine / "thesis.txt").read_text() == "years of work"
    out = tmp_path / "export"
    assert cli(dgq_cli.export, [str(hf), "--out", str(out)]).exit_code == 0
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("x")
    assert_one_line_error(cli(dgq_cli.export, [str(hf), "--out", str(out)]), "pass --overwrite")   # an export: the hint
    assert cli(dgq_cli.export, [str(hf), "--out", str(out), "--overwrite"]).exit_code == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(dgq_cli.export, [str(hf), "--out", str(empty)]).exit_code == 0
    # the input itself, or a directory above it, is never the output
    assert_one_line_error(cli(dgq_cli.export, [str(out), "--out", str(out), "--overwrite"]), "overlap")
    assert_one_line_error(cli(dgq_cli.export, [str(hf), "--out", str(tmp_path), "--overwrite"]), "overlap")
    assert load_hf_dir(out).config == ck.config
    assert sorted(os.listdir(tmp_path)) == ["empty", "export", "m", "notes"]


# ----------------------------------------------------------------------------- litter

WRITER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "file":
        from engine.util.files import atomic_file
        with atomic_file(target) as f:
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    else:
        import converters.export as ex
        from engine.io.hf_dir import load_hf_dir
        real = ex._write_dir
        def slow(*a, **kw):
            real(*a, **kw)
            print("writing", flush=True)
            time.sleep(60)
        ex._write_dir = slow
        ex.export_hf_dir(load_hf_dir(sys.argv[3]), target)
""")


@pytest.mark.parametrize("mode", ["file", "dir"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_write_leaves_no_temporary(tmp_path, hf, mode, sig):
    work = tmp_path / "out"
    work.mkdir()
    target = work / ("m.q.safetensors" if mode == "file" else "export")
    script = WRITER.format(root=str(ROOT), tests=str(ROOT / "tests"))
    p = subprocess.Popen([sys.executable, "-c", script, mode, str(target), str(hf)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing", p.stderr.read()
        assert [n for n in os.listdir(work) if n.startswith(".")]          # the temporary exists
        p.send_signal(sig)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig == signal.SIGINT:
        assert p.returncode != 0                      # KeyboardInterrupt
    else:
        assert p.returncode == -sig                   # dies of the signal, as without the handler
    assert os.listdir(work) == [], os.listdir(work)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_killed_runs_are_cleaned_and_live_ones_kept(tmp_path):
    target = tmp_path / "m.q.safetensors"
    stale = tmp_path / f".m.q.safetensors.{dead_pid()}.0123abcd.tmp"
    stale.write_bytes(b"half")
    fresh = tmp_path / f".m.q.safetensors.{dead_pid()}.4567abcd.tmp"     # maybe another host's writer
    fresh.write_bytes(b"recent")
    live = tmp_path / f".m.q.safetensors.{os.getppid()}.89abcdef.tmp"    # a running writer's
    live.write_bytes(b"busy")
    other = tmp_path / ".unrelated.tmp"
    other.write_bytes(b"not ours")
    for p in (stale, live, other):
        os.utime(p, (1, 1))                                               # untouched for decades
    for _ in range(3):                                                    # no run adds one
        with atomic_file(target) as f:
            f.write(b"data")
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, live.name, other.name, fresh.name])


def test_a_stale_export_directory_is_cleaned_by_the_next_export(tmp_path, hf):
    stale = tmp_path / f".export.{dead_pid()}.0badc0de.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"half")
    os.utime(stale, (1, 1))
    export_hf_dir(load_hf_dir(hf), tmp_path / "export")
    assert sorted(os.listdir(tmp_path)) == ["export", "m"]


def test_a_killed_overwrite_gets_the_previous_export_back(tmp_path, hf):
    out = tmp_path / "export"
    export_hf_dir(load_hf_dir(hf), out)
    old = tmp_path / f".export.{dead_pid()}.00000000.old"           # killed between the two renames
    os.replace(out, old)
    assert clean_stale(out) == []                                    # too recent: maybe still moving
    os.utime(old, (1, 1))
    assert clean_stale(out) == [old]
    assert (out / MARKER).is_file() and not old.exists()


# ----------------------------------------------------------------------------- unclear messages

def test_symlink_loop_is_not_called_missing(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(WeightsError, match="symbolic link loop"):
        load_checkpoint(a)
    assert_one_line_error(cli(dgq_cli.run, ["--weights", str(a)] + RUN), "symbolic link loop")


def test_negative_sizes_are_told_in_our_words(hf):
    f = hf / "model.safetensors"
    h, data = st_parse(f)
    h["model.norm.weight"]["shape"] = [-32]
    f.write_bytes(st_build(h, data))
    with pytest.raises(WeightsError, match="model.norm.weight has a negative size"):
        load_checkpoint(hf)


def test_errors_about_out_name_the_users_path_not_the_temporary(tmp_path, hf):
    missing = tmp_path / "no-such-dir" / "m.q.safetensors"
    with pytest.raises(OSError) as e:
        write_safetensors(missing, {"x": np.zeros(2, np.float32)})
    assert str(missing) in str(e.value) and ".tmp" not in str(e.value) and "does not exist" in str(e.value)
    r = cli(dgq_cli.quantize, [str(hf), "--out", str(missing), "--method", "w4a16", "--quiet"])
    line = assert_one_line_error(r, "--out", str(missing))
    assert ".tmp" not in line
    if Path("/proc/self").is_dir():                   # Linux: a directory there that takes no new files
        with pytest.raises(OSError) as e:
            write_safetensors("/proc/x.safetensors", {"x": np.zeros(2, np.float32)})
        assert e.value.strerror == "output /proc/x.safetensors: cannot write: /proc takes no new files", str(e.value)
        assert isinstance(e.value, FileNotFoundError)            # the errno's own subclass, for callers
        r = cli(dgq_cli.quantize, [str(hf), "--out", "/proc/x.safetensors", "--method", "w4a16", "--quiet"])
        assert assert_one_line_error(r) == "Error: output /proc/x.safetensors: cannot write: /proc takes no new files"


def test_out_dot_is_not_an_empty_name(tmp_path, hf, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    line = assert_one_line_error(cli(dgq_cli.export, [str(hf), "--out", "."]), "--out .")
    assert "empty name" not in line
    assert os.listdir(work) == []
    r = cli(dgq_cli.quantize, [str(hf), "--out", ".", "--method", "w4a16", "--quiet"])
    assert "empty name" not in assert_one_line_error(r, "--out")


def test_flags_are_checked_before_the_model_loads(hf, tmp_path, monkeypatch):
    import engine.io.checkpoint as ckmod

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(ckmod, "load_checkpoint", no_load)
    monkeypatch.setattr(dgq_cli, "load_model", no_load)
    out = str(tmp_path / "o.q.safetensors")
    for cmd, args, needle in [
        (dgq_cli.quantize, [str(hf), "--out", out, "--wbits", "5"], "--wbits"),
        (dgq_cli.quantize, [str(hf), "--out", out, "--method", "pot", "--group", "48"], "48"),
        (dgq_cli.quantize, [str(hf), "--out", out, "--calib", str(tmp_path / "none.txt")], "none.txt"),
        (dgq_cli.quantize, [str(hf), "--out", out, "--method", "rtn", "--gptq"], "--gptq"),
        (dgq_cli.quantize, [str(hf), "--out", out, "--sink-weight", "-2"], "--sink-weight"),
        (dgq_cli.quantize, [str(hf), "--out", str(tmp_path / "x" / "o.q.safetensors")], "does not exist"),
        (dgq_cli.export, [str(hf), "--out", str(tmp_path / "e"), "--shard-size", "huge"], "--shard-size"),
        (dgq_cli.run, ["--weights", str(hf), "--prompt", "hi", "--temperature", "nan"], "--temperature"),
        (dgq_cli.run, ["--weights", str(hf), "--prompt", "hi", "--top-p", "2"], "--top-p"),
        (dgq_cli.run, ["--weights", str(tmp_path / "nope"), "--prompt", "hi"], "nope"),
    ]:
        assert_one_line_error(cli(cmd, args), needle)


# ----------------------------------------------------------------------------- numeric hygiene at run time

def test_nan_in_cpu_activations_or_logits_is_one_clear_error(hf):
    edit_tensor(hf / "model.safetensors", "embed_tokens.weight", lambda a: a.__setitem__(slice(None), 3e38))
    r = cli(dgq_cli.run, ["--weights", str(hf)] + RUN)            # finite weights, overflowing activations
    assert_one_line_error(r, "non-finite values")
    ck = load_hf_dir(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelError, match="non-finite values"):
            Model(ModelWeights.from_hf(ck.config, ck.tensors)).forward(np.array([1, 2, 3]))
        t = dict(ck.tensors)
        t["model.embed_tokens.weight"] = np.ones_like(t["model.embed_tokens.weight"])
        t["model.layers.1.mlp.down_proj.weight"] = np.full_like(t["model.layers.1.mlp.down_proj.weight"], np.nan)
        with pytest.raises(ModelError, match="non-finite values .* layer 1"):    # NaN from an API-built model
            Model(ModelWeights.from_hf(ck.config, t)).forward(np.array([1, 2, 3]))


def test_load_model_takes_only_paths(hf):
    for bad, needle in [(42, "path"), ("", "empty"), ("  ", "empty")]:
        with pytest.raises(WeightsError, match=needle):
            load_model(bad)


def test_valid_inputs_still_work_through_every_command(tmp_path, hf):
    """The checks refuse nothing valid: quantize (into the model's own directory, a new file),
    run and eval the result, export it back."""
    out = hf / "new.q.safetensors"
    r = cli(dgq_cli.quantize, [str(hf), "--out", str(out), "--method", "dgq-rtn", "--group", "16",
                               "--calib", "random", "--n-seq", "2", "--seq-len", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_qfile(out).config == load_hf_dir(hf).config
    assert not [n for n in os.listdir(hf) if n.startswith(".")]
    r = cli(dgq_cli.run, ["--weights", str(out)] + RUN)
    assert r.exit_code == 0, r.output
    text = tmp_path / "t.txt"
    text.write_text("the other one is at the center of the river. " * 20)
    r = cli(dgq_cli.eval_cmd, ["--weights", str(out), "--text", str(text), "--window", "16", "--device", "cpu"])
    assert r.exit_code == 0 and r.output.strip().splitlines()[-1].startswith("perplexity: "), r.output
    r = cli(dgq_cli.export, [str(hf), "--out", str(tmp_path / "e"), "--shard-size", "20KB"])
    assert r.exit_code == 0, r.output
    assert load_hf_dir(tmp_path / "e").config == load_hf_dir(hf).config


def test_a_q_file_loads_whatever_its_name(tmp_path):
    """dgq-quantize writes whatever --out names; the loader knows a DGQ file by its header, as it
    knows a GGUF by its magic, so `--out model.bin` (or `model.gguf`) can be run, and a GGUF named
    .safetensors loads as the GGUF it is."""
    q = q_file(tmp_path)
    for name in ("model.bin", "model", "model.gguf"):          # the header decides, not the suffix
        other = tmp_path / name
        shutil.copy(q, other)
        assert load_checkpoint(other).recipe == load_checkpoint(q).recipe
    junk = tmp_path / "junk.bin"
    junk.write_bytes((5).to_bytes(8, "little") + b"{abcd")
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        load_checkpoint(junk)
    for name, want in (("cut.gguf", "not a readable GGUF"), ("cut.safetensors", "truncated safetensors file")):
        (tmp_path / name).write_bytes(b"GGU")                    # neither signature: the suffix names the kind
        with pytest.raises(WeightsError, match=want):
            load_checkpoint(tmp_path / name)
