"""`python -m engine.bench e2e --ab FIELD=INT,...`: parsing and the A/B settings (no GPU)."""
from __future__ import annotations

import pytest

from engine.bench.e2e import decode_variants, parse_ab
from engine.gpu import tuning


def test_parse_ab_types_and_errors():
    assert parse_ab("gemv_dp4a=0, gemv_dp_u=4") == {"gemv_dp4a": False, "gemv_dp_u": 4}
    for bad in ("nope=1", "gemv_dp4a", "gemv_dp_u=x", "gemv_dp_u=--5", "gemv=1", ""):
        with pytest.raises(ValueError, match="--ab"):
            parse_ab(bad)


def test_decode_variants_set_and_restore_tuning():
    before = (tuning.GEMM.gemv_dp4a, tuning.GEMM.gemv_dp_u, tuning.DECODE.gqa_wave_fit)
    rows = decode_variants(ab=[{"gemv_dp4a": not before[0], "gemv_dp_u": 4},
                               {"decode.gqa_wave_fit": not before[2]}])
    assert [r[0] for r in rows] == [f"gemv_dp4a={int(not before[0])},gemv_dp_u=4",
                                    f"decode.gqa_wave_fit={int(not before[2])}"]
    with rows[0][1]():
        assert (tuning.GEMM.gemv_dp4a, tuning.GEMM.gemv_dp_u) == (not before[0], 4)
    with rows[1][1]():
        assert tuning.DECODE.gqa_wave_fit == (not before[2])
    with pytest.raises(RuntimeError):
        with rows[0][1]():
            raise RuntimeError
    assert (tuning.GEMM.gemv_dp4a, tuning.GEMM.gemv_dp_u, tuning.DECODE.gqa_wave_fit) == before


def test_context_table_repeats_under_each_ab_setting(monkeypatch):
    """run_context(ab=...): the table again under each setting, in one process, the setting in
    force while its rows run and named in the attention column; restored afterwards."""
    import sys
    import types

    from engine.bench import e2e
    seen = []

    def context_row(cp, gm, label, ctx, bsz, kv8, steps, bw, rng):
        seen.append((tuning.GEMM.gemv_dp_u, ctx, kv8, bsz))
        return {"model": label, "phase": "context", "attn": "gqa", "context": ctx, "batch": bsz,
                "kv": "int8" if kv8 else "fp16", "tok_s": 1.0}
    monkeypatch.setattr(e2e, "context_row", context_row)
    monkeypatch.setattr(e2e, "random_model", lambda shape, q: types.SimpleNamespace(
        config=types.SimpleNamespace(max_position_embeddings=1 << 20)))
    monkeypatch.setitem(sys.modules, "engine.gpu.model", types.SimpleNamespace(CudaModel=lambda mw: object()))
    monkeypatch.setattr(e2e, "gc", types.SimpleNamespace(collect=lambda: None))
    cp = types.SimpleNamespace(get_default_memory_pool=lambda: types.SimpleNamespace(free_all_blocks=lambda: None))
    monkeypatch.setattr(e2e, "_device", lambda: (cp, None, [{"phase": "device", "name": "fake", "copy_bw_gbs": 1.0}]))
    before = tuning.GEMM.gemv_dp_u
    rows = e2e.run_context([128], models=("llama7b",), batches=(32,), ab=[{"gemv_dp_u": before + 3}])
    ctx_rows = [r for r in rows if r["phase"] == "context"]
    assert [r["attn"] for r in ctx_rows] == ["gqa", "gqa", f"gqa gemv_dp_u={before + 3}", f"gqa gemv_dp_u={before + 3}"]
    assert [s[0] for s in seen] == [before, before, before + 3, before + 3]
    assert tuning.GEMM.gemv_dp_u == before

    # fp16: the FP16 path's rows after the A8W4 ones, under the engine's own settings only
    seen.clear()
    monkeypatch.setattr(e2e, "dequantized_copy", lambda mw: "dequantized")
    models = []
    monkeypatch.setitem(sys.modules, "engine.gpu.model", types.SimpleNamespace(CudaModel=lambda mw: models.append(mw)))
    rows = e2e.run_context([128, 1024], models=("llama7b",), batches=(32,), ab=[{"gemv_dp_u": before + 3}], fp16=True)
    ctx_rows = [r for r in rows if r["phase"] == "context"]
    assert [r["model"].split()[-1] for r in ctx_rows] == ["A8W4"] * 8 + ["FP16"] * 4
    assert [r["attn"] for r in ctx_rows[8:]] == ["gqa"] * 4 and [s[0] for s in seen[8:]] == [before] * 4
    assert [(s[1], s[2]) for s in seen[8:]] == [(128, False), (128, True), (1024, False), (1024, True)]
    assert models[-1] == "dequantized" and len(models) == 2

    def no_room(mw):                                                   # the FP16 model does not fit
        if mw == "dequantized":
            raise e2e.ModelError("out of memory")
    monkeypatch.setitem(sys.modules, "engine.gpu.model", types.SimpleNamespace(CudaModel=no_room))
    rows = e2e.run_context([128], models=("llama7b",), batches=(32,), fp16=True)
    assert [r["model"].split()[-1] for r in rows if r["phase"] == "context"] == ["A8W4", "A8W4", "FP16"]
    assert "does not fit" in rows[-1]["skipped"] and "skipped" in e2e.format_context_table(rows)


def test_ab_reaches_the_weight_only_tuning_too():
    assert parse_ab("wb.resident=0,gemv_dp_u=4") == {"wb.resident": False, "gemv_dp_u": 4}
    with pytest.raises(ValueError, match="wb.FIELD"):
        parse_ab("wb.no_such_field=1")
    before = (tuning.WB_TUNE.resident, tuning.GEMM.gemv_dp_u)
    (name, ctx), = decode_variants(ab=[{"wb.resident": not before[0], "gemv_dp_u": 4}])
    assert "wb.resident" in name
    with ctx():
        assert tuning.WB_TUNE.resident is (not before[0]) and tuning.GEMM.gemv_dp_u == 4
    assert (tuning.WB_TUNE.resident, tuning.GEMM.gemv_dp_u) == before


@pytest.mark.parametrize("prefix,obj,field,value", [("rows.", "ROWS", "act_per", 32),
                                                     ("prefill.", "PREFILL", "graphs", 0),
                                                     ("decode.", "DECODE", "gqa_wave_fit", 1)])
def test_ab_reaches_the_row_kernels_and_captured_prefills(prefix, obj, field, value):
    """--ab rows.FIELD (tuning.ROWS) and prefill.FIELD (tuning.PREFILL): parsed, refused for an
    unknown field, set inside the variant and restored after."""
    target = getattr(tuning, obj)
    assert parse_ab(f"{prefix}{field}={value}") == {f"{prefix}{field}": value}
    with pytest.raises(ValueError, match=f"{prefix}FIELD"):
        parse_ab(f"{prefix}no_such_field=1")
    before = getattr(target, field)
    (name, ctx), = decode_variants(ab=[{f"{prefix}{field}": value}])
    assert name == f"{prefix}{field}={value}"
    with ctx():
        assert getattr(target, field) == value
    assert getattr(target, field) == before


def test_host_ms_times_the_prefill_without_its_wait_on_the_gpu():
    """e2e's host_ms: fn runs with the model's logits check (its one sync) replaced, which comes
    back after; the device is synchronised after each call, outside the timed part."""
    import types

    from engine.bench import e2e
    from engine.gpu import model as model_mod
    landed = model_mod.check_finite_logits
    syncs, seen = [], []
    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(synchronize=lambda: syncs.append(1))))

    def fn():
        seen.append(model_mod.check_finite_logits is landed)
        assert model_mod.check_finite_logits(cp, "logits", "prefill") == "logits"
    ms = e2e.prefill_host_ms(cp, fn, reps=3)
    assert ms >= 0 and seen == [False] * 3 and len(syncs) == 3
    assert model_mod.check_finite_logits is landed


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_random_pot_layer_has_no_spare_code_and_averages_zero(bits):
    """The benchmarks' random W<b>-PoT layers: valid codes without pot2/pot3's spare level (+2·s),
    so their weights average zero and a deep random stack stays finite in float16 (with the
    spare code a random row summed +s/4 of its input a weight: NaN logits at the 7B shape)."""
    import numpy as np

    from engine.bench.e2e import random_pot_layer
    from engine.formats import planes, pot
    ql = random_pot_layer(np.random.default_rng(1), 128, 1024, bits)
    codes = planes.unpack_planes(ql.qweight, bits, 1024)
    assert not (codes == (1 << (bits - 1))).any() or bits not in pot.SPARE_BITS
    w = ql.dequantize().astype(np.float64)
    unit = float(np.abs(w).mean())
    assert unit > 0 and abs(float(w.mean())) < 0.02 * unit


def test_pot_bits_3a8_loads_w3_pot_with_int8_activations(monkeypatch):
    """--pot-bits 3a8: a W3-PoT model of act "dynamic" (INT8 tokens, the pot3-a8 GEMV), decode at
    batches 1 and 8 and a prefill of 512 tokens, then the same model with the INT8 output head (beside
    "A8W4 int8-head", decode only); a bit width other than 2, 3, 4 and 3a8 is refused."""
    import types

    from engine.bench import __main__ as cli
    from engine.bench import e2e
    calls = []

    def bench_model(cp, name, mw, **kw):
        calls.append((name, mw, kw.get("batches"), kw.get("prefill_lens")))
        return []
    monkeypatch.setattr(e2e, "bench_model", bench_model)
    def random_model(shape, q, act="none"):
        mw = types.SimpleNamespace(q=q, act=act, head="fp16")
        mw.with_int8_lm_head = lambda: types.SimpleNamespace(q=q, act=act, head="int8")
        return mw
    monkeypatch.setattr(e2e, "random_model", random_model)
    monkeypatch.setattr(e2e, "dequantized_copy", lambda mw: mw)
    monkeypatch.setattr(e2e, "_device", lambda: (None, None, []))
    monkeypatch.setattr(e2e, "format_table", lambda rows: "")
    e2e.run_e2e(models=("llama7b",), pot_bits=(3, "3a8"))
    pot = [c for c in calls if "PoT" in c[0]]
    assert [(mw.q, mw.act, mw.head, b, p) for _, mw, b, p in pot] == [
        (3, "none", "fp16", (1, 8), ()), (3, "dynamic", "fp16", (1, 8), (512,)), (3, "dynamic", "int8", (1,), ())]
    assert "INT8 activations" in pot[1][0] and "INT8" not in pot[0][0] and pot[2][0] == pot[1][0] + " int8-head"
    monkeypatch.setattr(cli, "run_e2e", lambda **kw: calls.append(kw["pot_bits"]) or [])
    monkeypatch.setattr(cli, "cp_or_fail", lambda: None)
    assert cli.main(["e2e", "--models", "llama7b", "--pot-bits", "4,3a8"]) == 0 and calls[-1] == (4, "3a8")
    with pytest.raises(cli.BenchError, match="3a8"):
        cli.main(["e2e", "--pot-bits", "5"])
