"""dgq-run's prompt sources (--prompt-file, '-', a pipe) and its interactive chat."""
import numpy as np
import pytest
from click.testing import CliRunner

import dgq_cli
from dgq_cli import run
from engine.api import load_model
from engine.model.generate import (Conversation, StopText, TextStream, encode_messages, encode_prompt, generate,
                                   stop_ids)
from tiny_model import make_tiny_checkpoint

BASE = ["--max-new-tokens", "6", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_chat")
    make_tiny_checkpoint(d, max_position_embeddings=96)
    return d


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(str(tiny_dir), "cpu")


def greedy_text(lm, ids, n=6):
    s = TextStream(lm.tokenizer)
    out, _ = generate(lm.model, ids, n, stop=stop_ids(lm.tokenizer, lm.config))
    text = "".join(s.push(t) for t in out if t not in stop_ids(lm.tokenizer, lm.config))
    return text + s.flush()


def test_prompt_file_stdin_and_pipe_equal_prompt(tiny_dir, tmp_path):
    ref = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", "the cat", "--raw"] + BASE)
    assert ref.exit_code == 0, ref.output
    f = tmp_path / "p.txt"
    f.write_text("the cat\n")                          # one trailing newline is dropped
    for args, stdin in ((["--prompt-file", str(f)], None), (["--prompt-file", "-"], "the cat\n"),
                        (["--prompt", "-"], "the cat"), ([], "the cat\n")):
        r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--raw"] + args + BASE, input=stdin)
        assert r.exit_code == 0, (args, r.output)
        assert r.stdout == ref.stdout, args


@pytest.mark.parametrize("args,stdin,needle", [
    (["--prompt", "x", "--prompt-file", "f"], None, "not both"),
    (["--prompt-file", "/nonexistent/p.txt"], None, "--prompt-file"),
    ([], "", "empty"),
    (["--prompt-file", "-"], "  \n", "empty"),
])
def test_prompt_source_errors(tiny_dir, args, stdin, needle):
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir)] + args + BASE, input=stdin)
    assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output


def test_prompt_file_not_utf8(tiny_dir, tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"caf\xe9")
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt-file", str(f)] + BASE)
    assert r.exit_code == 1 and "UTF-8" in r.output


def test_chat_turns_reset_and_exit(tiny_dir, lm, monkeypatch):
    """On a terminal without a prompt: each turn answers with the history through the template;
    /reset forgets it; /exit leaves. The first answer equals dgq-run --prompt's."""
    monkeypatch.setattr(dgq_cli, "_stdin_is_terminal", lambda: True)
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir)] + BASE, input="hello there\nand then?\n/reset\n/help\nhello there\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "/reset" in r.stderr and "history cleared" in r.stderr
    assert r.stderr.count("/help says this again") == 2                # the greeting, and /help (not a message)
    one = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", "hello there"] + BASE)
    first = greedy_text(lm, encode_prompt(lm.tokenizer, "hello there", lm.chat_template, True, lm.config))
    assert one.stdout == first + "\n"
    second_ids = encode_messages(lm.tokenizer, [{"role": "user", "content": "hello there"},
                                                {"role": "assistant", "content": first},
                                                {"role": "user", "content": "and then?"}],
                                 lm.chat_template, lm.config)
    second = greedy_text(lm, second_ids)
    answers = r.stdout.replace("> ", "").split("\n")
    assert answers[:3] == [first, second, first], answers


def test_chat_trims_history_with_a_notice(tiny_dir, monkeypatch):
    monkeypatch.setattr(dgq_cli, "_stdin_is_terminal", lambda: True)
    turns = "".join(f"message number {i} is here\n" for i in range(6))
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--max-new-tokens", "20", "--device", "cpu"],
                           input=turns)
    assert r.exit_code == 0, r.output
    assert "history trimmed" in r.stderr


def test_chat_needs_template_and_not_raw(tiny_dir, monkeypatch):
    monkeypatch.setattr(dgq_cli, "_stdin_is_terminal", lambda: True)
    r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--raw"] + BASE, input="hi\n")
    assert r.exit_code == 2 and "--raw" in r.output


def test_conversation_keeps_system_and_refuses_oversized(lm):
    conv = Conversation(lm.tokenizer, lm.chat_template, lm.config, reserve=8, system="be brief")
    ids, dropped = conv.prompt("hi")
    assert dropped == 0 and ids == encode_messages(lm.tokenizer, [{"role": "system", "content": "be brief"},
                                                                  {"role": "user", "content": "hi"}],
                                                   lm.chat_template, lm.config)
    with pytest.raises(ValueError, match="context"):
        conv.prompt("word " * 200)
    assert [m["content"] for m in conv.turns] == ["hi"]


def test_text_stream_equals_full_decode(lm):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.config.vocab_size, 300).tolist()
    s = TextStream(lm.tokenizer)
    got = "".join(s.push(t) for t in ids) + s.flush()
    assert got == lm.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_text_holds_back_and_cuts():
    st = StopText(["END", "\n\n"])
    out = [st.feed(p) for p in ("ab", "cE", "N", "x", "yE", "ND tail")]
    assert "".join(o for o, _ in out) == "abcENxy" and out[-1][1] and not out[-2][1]
    st = StopText(["zz"])
    assert st.feed("abz") == ("ab", False) and st.flush() == "z"
