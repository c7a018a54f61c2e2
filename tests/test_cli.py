"""The command-line tools end to end on a tiny checkpoint, and their errors."""
import numpy as np
import pytest
from click.testing import CliRunner

from dgq_cli import eval_cmd, run
from engine.model import Model, ModelWeights
from engine.io.hf_dir import load_hf_dir
from test_model import independent_forward
from tiny_model import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(d, dtype="bfloat16", shards=2, max_position_embeddings=64)
    return d


@pytest.mark.parametrize("dtype,shards,tie", [("float32", 1, False), ("bfloat16", 3, True), ("float16", 2, False)])
def test_loaded_checkpoint_forward_equals_independent(tmp_path, dtype, shards, tie):
    written = make_tiny_checkpoint(tmp_path, dtype=dtype, shards=shards, tie=tie)
    ck = load_hf_dir(tmp_path)
    tokens = np.array([5, 77, 130, 2, 9, 143, 40])
    got = Model(ModelWeights.from_hf(ck.config, ck.tensors)).forward(tokens)
    want = independent_forward(written.config, written.tensors, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_run_streams_greedy_tokens(tiny_dir):
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", "the cat", "--raw",
                                 "--max-new-tokens", "6", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "decode" in r.stderr and "tok/s" in r.stderr
    # the streamed text is what greedy decoding of the reference model produces
    ck = load_hf_dir(tiny_dir)
    m = Model(ModelWeights.from_hf(ck.config, ck.tensors))
    ids = list(ck.tokenizer.encode("the cat").ids)
    new = []
    for _ in range(6):
        nxt = int(m.forward(np.array(ids + new))[-1].argmax())
        new.append(nxt)
        if nxt == ck.config.eos_token_id:
            new.pop()
            break
    assert r.stdout.rstrip("\n") == ck.tokenizer.decode(new, skip_special_tokens=True)


def test_run_chat_template_and_sampling(tiny_dir):
    args = ["--weights", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "5", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--device", "cpu"]
    a, b = CliRunner().invoke(run, args), CliRunner().invoke(run, args)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout                 # seeded sampling is reproducible


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "  "], "prompt"),
    (["--prompt", "x", "--weights", "/nonexistent/model"], "/nonexistent/model"),
    (["--prompt", "x " * 200, "--raw"], "context"),
    (["--prompt", "x", "--temperature", "-1"], "Error: --temperature must be a finite number >= 0"),
    (["--prompt", "x", "--top-p", "1.5"], "Error: --top-p must be in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_run_errors_are_one_line(tiny_dir, args, needle):
    if "--weights" not in args:
        args = args + ["--weights", str(tiny_dir)]
    r = CliRunner().invoke(run, args + ["--device", "cpu"])
    assert r.exit_code != 0
    assert needle in r.output
    assert "Traceback" not in r.output


def test_eval_text_file(tiny_dir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the other one is at the center of the river. " * 40)
    r = CliRunner().invoke(eval_cmd, ["--weights", str(tiny_dir), "--text", str(f), "--window", "32",
                                      "--device", "cpu"])
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    assert 1.0 < float(last.split()[1]) < 1e4


def test_lm_head_int8(tiny_dir, tmp_path):
    """--lm-head int8: dgq-eval scores with the INT8 head (close to the float one) and says so,
    dgq-run greedy-decodes what the NumPy model with that head decodes; a bad value is refused."""
    f = tmp_path / "t.txt"
    f.write_text("the other one is at the center of the river. " * 40)
    ppl = {}
    for head in ("fp16", "int8"):
        r = CliRunner().invoke(eval_cmd, ["--weights", str(tiny_dir), "--text", str(f), "--window", "32",
                                          "--lm-head", head, "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert ("int8 lm_head" in r.stdout) == (head == "int8")
        ppl[head] = float(r.stdout.strip().splitlines()[-1].split()[1])
    assert abs(ppl["int8"] / ppl["fp16"] - 1) < 0.02, ppl
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", "the cat", "--raw", "--max-new-tokens",
                                 "5", "--lm-head", "int8", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    ck = load_hf_dir(tiny_dir)
    m = Model(ModelWeights.from_hf(ck.config, ck.tensors).with_int8_lm_head())
    ids, new = list(ck.tokenizer.encode("the cat").ids), []
    for _ in range(5):
        nxt = int(m.forward(np.array(ids + new))[-1].argmax())
        if nxt == ck.config.eos_token_id:
            break
        new.append(nxt)
    assert r.stdout.rstrip("\n") == ck.tokenizer.decode(new, skip_special_tokens=True)
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", "x", "--lm-head", "int4"])
    assert r.exit_code != 0 and "--lm-head" in r.output


def test_eval_needs_exactly_one_source(tiny_dir):
    r = CliRunner().invoke(eval_cmd, ["--weights", str(tiny_dir), "--device", "cpu"])
    assert r.exit_code != 0 and "--text" in r.output


def test_eval_names_its_flag_for_an_engine_error(tiny_dir, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("the cat")
    r = CliRunner().invoke(eval_cmd, ["--weights", str(tiny_dir), "--text", str(f), "--window", "32",
                                      "--device", "cpu"])
    assert r.exit_code == 1 and "Error: --window 32: the text has only" in r.output, r.output


def test_engine_errors_about_a_parameter_name_the_commands_flag():
    """engine/util/errors.py param_error: Python reads `top_p must be ...`, a command its flag."""
    import click

    from dgq_cli import user_errors
    from engine.util.errors import param_error

    @click.command()
    @click.option("--top-p", type=float)
    @user_errors
    def cmd(top_p):
        raise param_error(ValueError, "top_p" if top_p else "top_k", "must be in (0, 1]")
    assert CliRunner().invoke(cmd, ["--top-p", "2"]).output == "Error: --top-p must be in (0, 1]\n"
    assert CliRunner().invoke(cmd, []).output == "Error: top_k must be in (0, 1]\n"   # no such flag: as is


def test_kernel_choice_flags_reach_load_model(tiny_dir, monkeypatch):
    """--kernel-choice / --objective are checked by click and passed to load_model unchanged."""
    import dgq_cli
    seen = {}
    real = dgq_cli.load_model

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(dgq_cli, "load_model", spy)
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", "the cat", "--raw", "--max-new-tokens", "2",
                                 "--device", "cpu", "--kernel-choice", "learned", "--objective", "energy"])
    assert r.exit_code == 0, r.output
    assert (seen["kernel_choice"], seen["objective"]) == ("learned", "energy")
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", "x", "--kernel-choice", "fastest"])
    assert r.exit_code == 2 and "--kernel-choice" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--method", "pot", "--wbits", "3", "--act", "static"], "pot keeps float activations by default"),
    (["--method", "int-search", "--wbits", "3", "--act", "dynamic"], "--act does not apply"),
    (["--method", "w4a16", "--act", "dynamic"], "--act does not apply"),
    (["--method", "w4a16", "--calib", "random"], "--calib would do nothing"),
    (["--method", "int-rtn", "--wbits", "3", "--group", "32", "--n-seq", "4", "--seq-len", "8"], "--n-seq and --seq-len"),
    (["--method", "rtn", "--act", "dynamic", "--calibration", "float"], "reads no calibration text"),
    (["--method", "int-rtn", "--wbits", "3", "--group", "32", "--sink-weight", "10"], "--sink-weight would do nothing"),
    (["--method", "w4a16", "--sink-weight", "10"], "--sink-weight would do nothing"),
    (["--method", "rtn", "--calib", "random", "--sink-weight", "1"], "no weight search"),
    (["--method", "dgq-rtn", "--sink-weight", "512"], "dgq, fptq, fptq-dg, pot, int-search"),
])
def test_quantize_refuses_options_the_method_ignores(tiny_dir, tmp_path, args, needle):
    """A flag that would change nothing is refused before the model loads, not ignored after
    minutes of work (`--method pot --act static` wrote a float-activation file)."""
    from dgq_cli import quantize
    out = tmp_path / "o.q.safetensors"
    r = CliRunner().invoke(quantize, [str(tiny_dir), "--out", str(out), "--quiet", "--device", "cpu", "--group", "16"]
                           + args, env={"DGQ_DEBUG": ""})
    assert r.exit_code != 0 and needle in r.output, r.output
    assert "internal error" not in r.output and not out.exists()
    r = CliRunner().invoke(quantize, [str(tiny_dir), "--out", str(out), "--quiet", "--device", "cpu", "--group", "16",
                                      "--method", "rtn", "--act", "static", "--calib", "random", "--n-seq", "2",
                                      "--seq-len", "8"])
    assert r.exit_code == 0, r.output                          # a method that calibrates takes them


@pytest.mark.parametrize("args,note", [(["--method", "dgq-rtn", "--group", "16"], "groups of 64·2^j"),
                                       (["--method", "w4a16", "--group", "16"], "'g' layers"),
                                       (["--method", "dgq-rtn", "--group", "64"], None),
                                       (["--method", "int-rtn", "--wbits", "3", "--group", "32"], None),
                                       (["--method", "pot", "--wbits", "4", "--group", "32", "--act", "dynamic"],
                                        "pot3 in groups of 128 only"),
                                       (["--method", "pot", "--wbits", "3", "--group", "128", "--act", "dynamic"], None)])
def test_quantize_notes_a_file_only_the_cpu_runs(tiny_dir, tmp_path, args, note):
    """A group or kind the GPU kernels do not run is written (the CPU engine runs it) with one note
    on stderr saying so; a file the GPU runs gets none."""
    from dgq_cli import quantize
    from engine.formats import dg
    from engine.gpu import ops
    assert ops.CHUNK_K == dg.GPU_GROUP_UNIT and [g for g in range(1, 600) if dg.gpu_group(g)] == [64, 128, 256, 512]
    out = tmp_path / "o.q.safetensors"
    extra = ["--calib", "random", "--n-seq", "2", "--seq-len", "8"] if args[1] in ("dgq-rtn", "pot") else []
    r = CliRunner().invoke(quantize, [str(tiny_dir), "--out", str(out), "--quiet", "--device", "cpu"] + args + extra)
    assert r.exit_code == 0 and out.exists(), r.output
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    if note is None:
        assert notes == [], r.stderr
    else:
        assert len(notes) == 1 and note in notes[0], r.stderr
    if "--act" in args:             # pot with INT8 activations: every linear of the file says so
        from engine.io.qfile import load_qfile
        acts = {getattr(L, n).act for L in load_qfile(out).weights.layers for n in ("q", "o", "gate", "down")}
        assert acts == {"dynamic"}


def test_a_missing_module_is_named_not_an_internal_error(tiny_dir, tmp_path, monkeypatch):
    import converters.quantize
    from dgq_cli import quantize

    def missing(*a, **kw):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")
    monkeypatch.setattr(converters.quantize, "quantize_to_file", missing)
    r = CliRunner().invoke(quantize, [str(tiny_dir), "--out", str(tmp_path / "o.q.safetensors"), "--quiet",
                                      "--device", "cpu"], env={"DGQ_DEBUG": ""})
    assert r.exit_code == 1 and "'scipy' is not installed" in r.output and "internal error" not in r.output, r.output


def test_a_closed_pipe_ends_the_run_quietly(tiny_dir):
    """`dgq-run ... | head -c 1`: no "Error: Broken pipe" once the reader has what it wanted."""
    import subprocess
    import sys
    code = ("import sys; from dgq_cli import run_main; sys.argv = ['dgq-run', '--weights', sys.argv[1], "
            "'--prompt', 'the cat', '--raw', '--max-new-tokens', '60', '--device', 'cpu']; run_main()")
    p = subprocess.Popen([sys.executable, "-c", code, str(tiny_dir)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)
    p.stdout.read(1)
    p.stdout.close()                                  # the reader goes away, as head does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 1) and "Error" not in err and "Traceback" not in err, err


def test_a_model_without_a_tokenizer_is_named(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    for cmd, args in ((run, ["--prompt", "hi", "--raw"]), (eval_cmd, ["--corpus", "wiki", "--window", "64"])):
        r = CliRunner().invoke(cmd, ["--weights", str(tmp_path / "m"), "--device", "cpu"] + args)
        assert r.exit_code != 0 and str(tmp_path / "m") in r.output and "no tokenizer" in r.output, r.output


def test_a_long_prompt_shows_prefill_progress(monkeypatch):
    import io
    import sys

    import dgq_cli
    from engine.model.generate import PREFILL_CHUNK

    class Tty(io.StringIO):
        def isatty(self):
            return True
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    with dgq_cli.prefill_progress(PREFILL_CHUNK) as cb:
        assert cb is None                                      # one chunk: nothing to show
    with dgq_cli.prefill_progress(3 * PREFILL_CHUNK) as cb:
        for done in (PREFILL_CHUNK, 2 * PREFILL_CHUNK, 3 * PREFILL_CHUNK):
            cb(done, 3 * PREFILL_CHUNK)
    assert "prefill" in err.getvalue() and f"{2 * PREFILL_CHUNK}/{3 * PREFILL_CHUNK}" in err.getvalue()
    import engine.util.progress
    monkeypatch.setattr(Tty, "isatty", lambda self: False)    # a log: plain lines, no bar
    monkeypatch.setattr(engine.util.progress, "INTERVAL_S", 0.0)
    err.seek(0)
    err.truncate()
    with dgq_cli.prefill_progress(3 * PREFILL_CHUNK) as cb:
        cb(PREFILL_CHUNK, 3 * PREFILL_CHUNK)
    assert err.getvalue().startswith(f"[prefill] {PREFILL_CHUNK}/{3 * PREFILL_CHUNK} tok (33%)")
    assert "\r" not in err.getvalue() and "\x1b" not in err.getvalue()
