"""`python -m engine.parallel WEIGHTS --tp N [--check T]`: the split a user would get, its bytes
per rank, the simulated sharded forward against TP = 1, and the one-line error of a model that
cannot be split that way."""
import pytest

from converters.quantize import quantize_checkpoint
from engine.io.qfile import save_qfile
from engine.parallel import shard
from engine.parallel.__main__ import main, rank_bytes
from test_qfile import seqs_for, tiny_ckpt


@pytest.fixture(scope="module")
def qfile(tmp_path_factory):
    """A tiny dgq file (per-token activations): hidden 32 = 4 heads of 8, 2 KV heads, FFN 48, group 16."""
    ck = tiny_ckpt()
    w, recipe = quantize_checkpoint(ck, "dgq", group=16, calib=seqs_for(ck.config), progress=False)
    path = tmp_path_factory.mktemp("tp") / "tiny.q.safetensors"
    save_qfile(path, w, ck.config, ck.tokenizer, ck.chat_template, recipe)
    return path, w


def test_plan_bytes_and_check(qfile, capsys):
    path, w = qfile
    assert main([str(path), "--tp", "2", "--check", "12"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: 2 layers") and out[0].endswith("over 2 ranks")
    assert out[1].startswith("rank 0: heads 0..1 (2), KV heads 0..0 (1)")
    assert out[2].startswith("rank 1: heads 2..3 (2), KV heads 1..1 (1)")
    assert "greedy token agreed by every rank and TP=1" in out[3]
    diff = float(out[3].split("max |logit difference| ")[1].split()[0])
    assert diff < 1e-3
    # the ranks' bytes add up to the whole, plus what every rank repeats: the norms, and the
    # row-parallel o's and down's per-row scales (applied once, after the all-reduce); at TP = 2
    # that is one extra copy of each
    _, shards = shard(w, 2)
    norms = sum(a.nbytes for L in w.layers for a in L.floats().values() if a is not None and not isinstance(a, dict))
    row_scales = sum(getattr(L, n).cscale.nbytes for L in w.layers for n in ("o", "down"))
    assert row_scales > 0
    assert sum(rank_bytes(s) for s in shards) == rank_bytes(w) + norms + w.norm.nbytes + row_scales


def test_unsplittable_model_is_one_line_error(qfile, capsys):
    path, _ = qfile
    assert main([str(path), "--tp", "4"]) == 1                  # o's groups of 16 hold 2 heads each
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "4 ranks" in err


def test_bad_arguments(qfile, tmp_path):
    path, _ = qfile
    with pytest.raises(SystemExit):
        main([str(path), "--tp", "2", "--check", "-1"])
    assert main([str(tmp_path / "missing.q.safetensors"), "--tp", "2"]) == 1
    assert main([str(path), "--tp", "0"]) == 1


def test_check_reports_a_disagreement(qfile, capsys, monkeypatch):
    """--check exits 1 and shows TP=1's top-two gap when the ranks' token is not TP=1's."""
    from engine.parallel import sim
    path, _ = qfile
    real = sim.TPModel.forward_greedy
    monkeypatch.setattr(sim.TPModel, "forward_greedy",
                        lambda self, tokens, cache=None: (real(self, tokens)[0], [-1] * self.tp))
    assert main([str(path), "--tp", "2", "--check", "8"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS: [-1, -1] vs" in out and "top two logits are" in out


def test_load_model_tp_generates_what_tp1_generates(qfile):
    """load_model(..., tp=2) on the CPU: the simulated sharded model through the whole
    generation path gives TP=1's greedy tokens."""
    from engine.api import load_model
    from engine.parallel import TPModel
    path, _ = qfile
    one, two = load_model(str(path), "cpu"), load_model(str(path), "cpu", tp=2)
    assert isinstance(two.model, TPModel) and two.model.tp == 2 and two.device == "cpu"
    prompt = [5, 17, 33, 2, 90, 41]
    (a,) = one.generate([prompt], max_new_tokens=10, chat=False)
    (b,) = two.generate([prompt], max_new_tokens=10, chat=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


def test_load_model_tp_refusals(qfile, monkeypatch):
    import engine.api as api
    from engine.gpu.backend import BackendError
    from engine.io.layout import ModelError
    path, _ = qfile
    for bad in (0, -1, True, 2.0):
        with pytest.raises(BackendError, match="tp must be a whole number"):
            api.load_model(str(path), "cpu", tp=bad)
    with pytest.raises(ModelError, match="4 ranks"):
        api.load_model(str(path), "cpu", tp=4)              # o's groups of 16 hold 2 heads each
    monkeypatch.setattr(api, "resolve_device", lambda device: "cuda")
    with pytest.raises(BackendError, match="over several GPUs is not built yet"):
        api.load_model(str(path), "cuda", tp=2)


def test_dgq_run_tp_flag(qfile):
    from click.testing import CliRunner
    from dgq_cli import run
    path, _ = qfile
    args = ["--weights", str(path), "--device", "cpu", "--raw", "--prompt", "hello world", "--max-new-tokens", "6"]
    one, two = CliRunner().invoke(run, args), CliRunner().invoke(run, args + ["--tp", "2"])
    assert one.exit_code == two.exit_code == 0, (one.output, two.output)
    assert one.stdout == two.stdout and one.stdout.strip()
    bad = CliRunner().invoke(run, args + ["--tp", "4"])
    assert bad.exit_code != 0 and "4 ranks" in bad.output


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "gemma3", "mistral"])
def test_planned_bytes_equal_the_real_shards(family):
    """--shape's sizes come from the config alone (shard.planned_bytes); on every family's tiny
    dg model (biases, q/k norms, sandwich norms, tied heads) they equal the sliced weights' bytes."""
    from engine.parallel.shard import planned_bytes
    from test_tp_sim import family_model
    w = family_model(family, "dg-dynamic")                   # group 8, float32 embedding
    for tp in (1, 2):
        plan, shards = shard(w, tp)
        got = [planned_bytes(w.config, p, "dg", 8, w.embed.itemsize) for p in plan.ranks]
        assert got == [rank_bytes(s) for s in shards], (family, tp)


def test_shape_report(capsys):
    assert main(["--shape", "llama3-70b", "--tp", "2", "--context", "8192"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("llama3-70b (80 layers, hidden 8192, 64 heads / 8 KV heads), dg g128:")
    assert "over 2 ranks" in out[0] and len(out) == 3
    assert out[1].startswith("rank 0: heads 0..31 (32), KV heads 0..3 (4)")
    # KV: 80 layers x 4 KV heads x (K and V) x 128 x 2 bytes x 8192 positions = 1.25 GiB a rank
    assert "KV 1.25 GiB" in out[1] and "KV 1.25 GiB" in out[2]
    assert main(["--shape", "nope", "--tp", "2"]) == 1
    assert "unknown model shape 'nope'" in capsys.readouterr().err
    assert main(["--shape", "llama7b", "--tp", "64"]) == 1                     # 32 heads
    assert "error: cannot split 32 attention heads over 64 ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--shape", "llama7b", "--tp", "2", "--check", "4"])
