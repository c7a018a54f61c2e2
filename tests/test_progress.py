"""Progress on stderr (engine/util/progress.py): tqdm bars on a terminal, plain occasional lines
in a log, nothing with --quiet; and the long commands that use it."""
import io

import pytest
from click.testing import CliRunner
from tqdm import tqdm

import engine.util.progress as P
from tiny_model import make_tiny_checkpoint


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    t = [0.0]
    monkeypatch.setattr(P, "_clock", lambda: t[0])
    yield t
    assert not P._active, "a bar was left open"


def no_cursor_codes(text: str) -> bool:
    return "\r" not in text and "\x1b" not in text


def test_a_log_gets_one_plain_line_per_interval_for_nested_bars(clock):
    log = io.StringIO()
    for li in P.progress_bar(range(4), desc="dgq: layers", unit="layer", file=log):
        for _ in P.progress_bar(range(10), desc=f"layer {li}: calibration", unit="seq", leave=False, file=log):
            clock[0] += 2.0                                        # 80 s in all
    lines = log.getvalue().splitlines()
    assert no_cursor_codes(log.getvalue())
    assert lines == [
        "[dgq: layers] 1/4 layer (25%), 30s elapsed, ~1m30s left | [layer 1: calibration] 5/10 seq (50%), "
        "10s elapsed, ~10s left",
        "[dgq: layers] 2/4 layer (50%), 1m00s elapsed, ~1m00s left | [layer 2: calibration] 10/10 seq (100%), "
        "20s elapsed",
        "[dgq: layers] done: 4/4 layer in 1m20s"]              # the inner bars (leave=False) end silently


def test_lines_carry_the_running_value_and_stay_occasional(clock):
    log = io.StringIO()
    with P.progress_bar(total=854, desc="perplexity", unit="win", file=log) as bar:
        for i in range(854):                                       # ~30 min at 2.1 s a window
            clock[0] += 2.1
            bar.set_postfix(ppl=f"{20 - i / 100:.3f}", refresh=False)
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert 55 <= len(lines) <= 62 and no_cursor_codes(log.getvalue())
    assert lines[0] == "[perplexity] 15/854 win (1%), 31s elapsed, ~29m21s left, ppl 19.860"
    assert lines[-1] == "[perplexity] done: 854/854 win in 29m53s, ppl 11.470"


def test_a_bar_closed_short_of_its_total_says_stopped_not_done(clock):
    """A failure, break or interrupt closes the bar early: its last line must not read as the end."""
    log = io.StringIO()
    with pytest.raises(RuntimeError):
        with P.progress_bar(total=10, desc="perplexity", unit="win", file=log) as bar:
            for i in range(10):
                clock[0] += 40.0
                bar.update(1)
                if i == 2:
                    raise RuntimeError("non-finite logits")
    assert log.getvalue().splitlines()[-1] == "[perplexity] stopped at: 3/10 win in 2m00s"
    log = io.StringIO()
    for i in P.progress_bar(range(10), desc="layers", unit="layer", file=log):
        clock[0] += 40.0
        if i == 3:
            break
    assert log.getvalue().splitlines()[-1] == "[layers] stopped at: 3/10 layer in 2m40s"


def test_the_plain_bar_takes_initial_and_disable_and_refuses_what_it_would_drop(clock):
    log = io.StringIO()
    with P.progress_bar(total=10, desc="resume", file=log, initial=4) as bar:
        clock[0] += 31.0
        bar.update(1)
    assert log.getvalue().splitlines() == ["[resume] 5/10 it (50%), 31s elapsed, ~31s left",
                                           "[resume] stopped at: 5/10 it in 31s"]
    log = io.StringIO()
    with P.progress_bar(total=2, desc="off", file=log, disable=True) as bar:
        clock[0] += 99.0
        bar.update(2)
    assert log.getvalue() == ""
    with pytest.raises(TypeError, match="position"):
        P.progress_bar(total=2, file=io.StringIO(), position=1)


def test_work_within_the_first_interval_prints_nothing(clock):
    log = io.StringIO()
    for _ in P.progress_bar(range(100), desc="quick", file=log):
        clock[0] += 0.25                                           # 25 s
    assert log.getvalue() == ""


def test_a_terminal_keeps_the_tqdm_bar(clock):
    term = Tty()
    bar = P.progress_bar(total=3, desc="perplexity", unit="win", file=term)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "perplexity" in term.getvalue() and "\r" in term.getvalue()


def test_disabled_shows_nothing_anywhere(clock, monkeypatch):
    monkeypatch.setattr(P, "INTERVAL_S", 0.0)
    for f in (Tty(), io.StringIO()):
        assert list(P.progress_bar(range(5), desc="x", enabled=False, file=f)) == list(range(5))
        assert f.getvalue() == ""


def test_a_broken_stderr_does_not_stop_the_work(clock, monkeypatch):
    monkeypatch.setattr(P, "INTERVAL_S", 0.0)
    log = io.StringIO()
    log.close()
    assert sum(P.progress_bar(range(4), desc="x", file=log)) == 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(d, dtype="bfloat16", shards=1, max_position_embeddings=64)
    return d


@pytest.mark.parametrize("quiet", [False, True])
def test_quantize_writes_plain_progress_to_a_log(tiny_dir, tmp_path, monkeypatch, quiet):
    """Redirected stderr used to collect tqdm's \\r redraws and the nested bars' ESC[A moves."""
    from dgq_cli import quantize
    monkeypatch.setattr(P, "INTERVAL_S", 0.0)                      # a line at every step
    r = CliRunner().invoke(quantize, [str(tiny_dir), "--out", str(tmp_path / "o.q.safetensors"), "--device", "cpu",
                                      "--group", "16", "--method", "rtn", "--act", "static", "--calib", "random",
                                      "--n-seq", "2", "--seq-len", "8"] + (["--quiet"] if quiet else []))
    assert r.exit_code == 0, r.output
    assert no_cursor_codes(r.stderr)
    progress = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    if quiet:
        assert progress == []
    else:
        assert any("[rtn: layers (sequential)] 1/2 layer (50%)" in ln and "[layer 1: calibration]" in ln
                   for ln in progress), r.stderr
        assert progress[-1].startswith("[rtn: layers (sequential)] done: 2/2 layer in ")


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_writes_plain_progress_to_a_log(tiny_dir, tmp_path, monkeypatch, quiet):
    """dgq-eval showed nothing at all unless stderr was a terminal."""
    from dgq_cli import eval_cmd
    monkeypatch.setattr(P, "INTERVAL_S", 0.0)
    f = tmp_path / "t.txt"
    f.write_text("the cat sat on the mat. " * 40)
    r = CliRunner().invoke(eval_cmd, ["--weights", str(tiny_dir), "--text", str(f), "--window", "32",
                                      "--device", "cpu"] + (["--quiet"] if quiet else []))
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1].startswith("perplexity: ")
    assert no_cursor_codes(r.stderr)
    if quiet:
        assert r.stderr == ""
    else:
        lines = r.stderr.splitlines()
        assert lines[0].startswith("[perplexity] 1/") and ", ppl " in lines[0], r.stderr
        assert lines[-1].startswith("[perplexity] done: ")
