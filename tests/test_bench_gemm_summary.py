"""`python -m engine.bench gemm`'s summary per M range (issue 20, item 4): geometric means of the
peer ratios over the shapes, and the targets; `gemm-summary LOG` reads a `gemm --json` log."""
import json
import math
import types

import pytest

from engine.bench import gemm
from engine.bench.__main__ import main


def _row(m, x_fp16, x_int8=None, x_tiny=None, k=4096, n=4096):
    return {"m": m, "k": k, "n": n, "x_fp16": x_fp16, "x_int8": x_int8, "x_tiny": x_tiny}


def test_geomean():
    assert gemm.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert gemm.geomean([]) is None
    with pytest.raises(ValueError, match="positive finite"):
        gemm.geomean([1.0, 0.0])
    with pytest.raises(ValueError, match="positive finite"):
        gemm.geomean([math.nan])


def test_summary_ranges_means_and_targets():
    rows = [_row(1, 2.0, None, 1.0), _row(16, 8.0, None, 4.0),                      # 1–16: no int8 peer
            _row(64, 1.0, 0.5), _row(256, 1.69, 2.0, k=8192, n=8192),                 # 64–256
            _row(1024, 1.2, 1.1), _row(4096, 1.5, 0.9)]                               # 1024–4096
    by = {(s["m_lo"], s["m_hi"]): s for s in gemm.summary(rows)}
    assert set(by) == {(1, 16), (64, 256), (1024, 4096)}                              # empty ranges left out
    assert by[(1, 16)]["rows"] == 2 and by[(1, 16)]["x_fp16"] == pytest.approx(4.0)
    assert by[(1, 16)]["x_int8"] is None and by[(1, 16)]["x_tiny"] == pytest.approx(2.0)
    assert "x_fp16_ok" not in by[(1, 16)]                                             # no target there
    assert by[(64, 256)]["x_fp16"] == pytest.approx(1.3) and by[(64, 256)]["x_fp16_ok"]
    assert by[(64, 256)]["x_int8"] == pytest.approx(1.0)
    s = by[(1024, 4096)]
    assert s["x_fp16"] == pytest.approx(math.sqrt(1.8)) and s["x_fp16_ok"]            # 1.34 ≥ 1.3
    assert s["x_int8"] == pytest.approx(math.sqrt(0.99)) and not s["x_int8_ok"]       # 0.995 < 1.0
    table = gemm.summary_table(rows)
    assert "| 64–256 | 2 | 1.30 | 1.00 | — | ×cuBLAS fp16 ≥ 1.3: meets |" in table
    assert "×cuBLAS int8 ≥ 1.0: short" in table
    no_int8 = gemm.summary([_row(1024, 1.4)])[0]                   # cuBLAS INT8 absent (no torch)
    assert no_int8["x_fp16_ok"] and no_int8["x_int8_ok"] is None
    assert "×cuBLAS int8 ≥ 1.0: not timed" in gemm.summary_table([_row(1024, 1.4)])


def test_gemm_summary_command(tmp_path, capsys):
    log = tmp_path / "rows.jsonl"
    rows = [dict(_row(m, 1.5, 1.2), device="H200") for m in (64, 128, 1024)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + json.dumps({"summary": True, "m_lo": 1}) + "\n")
    assert main(["gemm-summary", str(log)]) == 0                  # runs without a GPU
    out = capsys.readouterr().out
    assert "3 rows of" in out and "(H200)" in out and "| 64–256 | 2 | 1.50 | 1.20 |" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"m": 1, "x_fp16": 2.0}\nnot json\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: not a JSON row"):
        main(["gemm-summary", str(bad)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"phase": "device"}\n')
    with pytest.raises(SystemExit, match="no `python -m engine.bench gemm --json` .*rows"):
        main(["gemm-summary", str(empty)])


def _wb(kernel, k, n, vs_int, vs_a8w4, m=1):
    return {"k": k, "n": n, "m": m, "kernel": kernel, "vs_int_same_bits": vs_int, "vs_a8w4": vs_a8w4}


def test_gemv_wb_summary_against_issue_15(tmp_path, capsys):
    from engine.bench import wb
    rows = [_wb("pot3", 4096, 4096, 2.0, 1.0), _wb("pot3", 4096, 11008, 1.125, 1.3),
            _wb("pot3", 8192, 8192, 1.0, 1.2), _wb("pot2", 4096, 4096, 1.6, 0.9),
            _wb("pot3", 4096, 4096, 9.0, 9.0, m=16), _wb("int3", 4096, 4096, None, 0.8)]
    by = {r["kernel"]: r for r in wb.summary(rows)}
    assert set(by) == {"pot2", "pot3"} and by["pot3"]["rows"] == 3                  # M = 1 PoT rows only
    assert by["pot3"]["vs_int"] == pytest.approx(((2.0 * 1.125 * 1.0) ** (1 / 3)))
    assert not by["pot3"]["vs_int_ok"] and by["pot2"]["vs_int_ok"]
    assert by["pot3"]["vs_a8w4_target_shapes"] == pytest.approx((1.3 * 1.2) ** 0.5)
    assert not by["pot3"]["vs_a8w4_ok"]                                               # 1.2 < 1.25 on 8192²
    assert "vs_a8w4_ok" not in by["pot2"]
    log = tmp_path / "wb.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["gemm-summary", str(log)]) == 0
    out = capsys.readouterr().out
    assert "6 gemv-wb rows" in out and "| pot2 | 1 | 1.60× | 0.90× | INT-b / PoT-b ≥ 1.5: meets |" in out


def test_gemv_wb_shapes_and_kinds_are_checked_before_any_gpu_time():
    from engine.bench import wb
    from engine.bench.common import BenchError
    assert wb.parse_shapes("8192x8192, 4096×11008") == [(8192, 8192), (4096, 11008)]
    assert wb.parse_shapes("") == []
    for bad in ("8192", "8192x", "0x128", "axb", "1x2x3"):
        with pytest.raises(BenchError, match="--shapes"):
            wb.parse_shapes(bad)
    with pytest.raises(BenchError, match="--kinds: pot5"):
        wb.cmd_gemv_wb(types.SimpleNamespace(ms="1", shapes="", kinds="pot3,pot5", reps=1, json=False, md=None,
                                             ab=[], patch=None))
    with pytest.raises(BenchError, match="--ab"):
        wb.cmd_gemv_wb(types.SimpleNamespace(ms="1", shapes="", kinds="", reps=1, json=False, md=None,
                                             ab=["wb.nope=1"], patch=None))


def test_tune_picks_override_the_wpf0_table(tmp_path, monkeypatch):
    """`gemm --tune-json`: gemm-pick's choices (over every timed tile, WPF = 0 ones too) are what
    runs; GEMM.wgmma_wsm's tiles must not override them."""
    from engine.gpu import tuning
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm", True)
    monkeypatch.setattr(tuning.GEMM, "wgmma", dict(tuning.GEMM.wgmma))
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm_skip", frozenset())
    pick = {"bt": 128, "stages": 5, "nwg": 2, "wpf": 2, "ovl": 2, "splits": None}
    (tmp_path / "picks.json").write_text(json.dumps({"wgmma": {"mid": pick}}))
    gemm.apply_tune(str(tmp_path / "picks.json"))
    assert tuning.wgmma_cfg(200, 4096) == tuning.WgmmaCfg(**pick)
    assert tuning.wgmma_cfg(1024, 4096).wpf == 0 and tuning.wgmma_cfg(24).wpf == 0   # the buckets not picked


def test_gemm_tune_tails_and_tiles_filter_the_variants(monkeypatch):
    """--tails adds split-tail variants beside each unsplit wgmma one; --tiles keeps those wgmma
    tiles alone."""
    monkeypatch.setattr(gemm.ops_cuda, "has_wgmma", lambda: True)
    tile = (256, 4, 2, 0, 2)
    v = gemm._variants(1024, (), (1, 3), {tile})
    assert [c.get("tail") for _, c in v] == [None, 1, 3]
    assert all(k == "wgmma" and (c["bt"], c["stages"], c["nwg"], c["wpf"], c["ovl"]) == tile for k, c in v)
    full = gemm._variants(1024)
    tails = gemm._variants(1024, (), (2,))
    assert len(tails) == len(full) + sum(k == "wgmma" and c["splits"] == 1 for k, c in full)
    assert not any("tail" in c for k, c in tails if k != "wgmma")
    # at M <= 512 the automatic-split variant gets no tail (K is split there)
    assert not any("tail" in c and not c["splits"] == 1 for _, c in gemm._variants(256, (), (2,)))


def test_gemm_pick_leaves_out_the_tail_rows(tmp_path):
    """gemm-pick chooses among the landed rows only: a --tails row (cfg "tail") of a slower tile
    must not stand for that tile (it would replace the tile's own time in the pick's sums)."""
    base = {"m": 2048, "k": 4096, "n": 22016, "kernel": "wgmma"}
    fast = {"bt": 256, "stages": 4, "nwg": 2, "wpf": 0, "ovl": 2, "splits": 1}
    slow = {"bt": 128, "stages": 4, "nwg": 2, "wpf": 2, "ovl": 2, "splits": 1}
    rows = [{**base, "cfg": fast, "ms": 1.0}, {**base, "cfg": slow, "ms": 2.0},
            {**base, "cfg": {**slow, "tail": 2}, "ms": 0.5}, {**base, "cfg": {**fast, "tail": 2}, "ms": 3.0}]
    log = tmp_path / "tune.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["gemm-pick", str(log), "--out", str(tmp_path / "picks.json")]) == 0
    assert json.loads((tmp_path / "picks.json").read_text())["wgmma"]["large"]["bt"] == 256


def test_gemm_tune_variants_reach_the_tables_tiles():
    """gemm-tune times, at every M, the tile the table runs there (WPF = 0 ones included), and no
    tile of another M range: BT = 64 up to M = 256 only with WPF = 0, BT = 256 from M = 129 only
    with WPF = 0 (from 256 otherwise)."""
    from engine.gpu import tuning
    saved = gemm.ops_cuda.has_wgmma
    gemm.ops_cuda.has_wgmma = lambda: True
    try:
        for m in (9, 12, 17, 32, 64, 65, 128, 129, 200, 256, 512, 1024):
            tiles = {(c["bt"], c["stages"], c["nwg"], c["wpf"], c["ovl"]) for k, c in gemm._variants(m) if k == "wgmma"}
            assert tuning.wgmma_cfg(m).tile in tiles and tuning.GEMM.wgmma[tuning.wgmma_bucket(m)].tile in tiles
            assert all(bt >= m or bt >= 64 for bt, *_ in tiles)
            assert all(wpf == 0 for bt, _, _, wpf, _ in tiles if (bt == 64 and m > 64) or (bt == 256 and m < 256))
            assert (m > 128) == any(bt == 256 for bt, *_ in tiles) and (m <= 256) == any(bt == 64 for bt, *_ in tiles)
    finally:
        gemm.ops_cuda.has_wgmma = saved


def test_gemm_tune_times_each_variant_again_under_each_patch(monkeypatch, capsys, tmp_path):
    """`gemm-tune --patch FILE`: every variant timed as landed, then under each patch (kargs.patched in
    force while it runs), rows named by "setting"; gemm-pick reads only the landed rows."""
    from engine.gpu import kernels
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    monkeypatch.setattr(gemm, "cp_or_fail", lambda: types.SimpleNamespace(get_default_memory_pool=lambda: pool))
    layer = types.SimpleNamespace(nbytes=lambda: 1)
    monkeypatch.setattr(gemm, "gemm_case", lambda m, k, n: ([layer], None, None, None))
    variants = [("wgmma", {"bt": 32, "stages": 4, "nwg": 2, "wpf": 0, "ovl": 2, "splits": None}),
                ("wgmma", {"bt": 32, "stages": 5, "nwg": 2, "wpf": 0, "ovl": 2, "splits": None}),
                ("mma", {"bm": 64, "splits": None})]
    monkeypatch.setattr(gemm, "_variants", lambda m, *rest: variants)
    seen = []

    def fake_gemm(x8, sx, layer, kernel, cfg, out):
        seen.append((kernel, bool(kernels.EDITS)))
        if kernel == "wgmma" and kernels.EDITS:          # as kernels.function would for an edited file
            kernels.EDITS_USED.add("gemm_a8w4_sm90.cu")
    monkeypatch.setattr(gemm.ops_cuda, "gemm_a8w4", fake_gemm)
    # landed rows: the first variant 1.0 ms, the others 2.0; patched rows: the first 5.0, the others
    # 0.1. A pick that read the patched rows would take the second variant; the landed give the first
    per = 1 + len(json.load(open("bench/patches/wgmma-splitk.json")))

    def fake_time(fn, reps):
        fn(0)
        first = len(seen) <= per
        return (5.0 if first else 0.1) if seen[-1][1] else (1.0 if first else 2.0)
    monkeypatch.setattr(gemm, "time_calls", fake_time)
    args = types.SimpleNamespace(cases="32:4096:4096", splits="", reps=1, ab=[],
                                 patch="bench/patches/wgmma-splitk.json")
    assert gemm.cmd_gemm_tune(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = json.load(open("bench/patches/wgmma-splitk.json"))
    assert len(rows) == 3 * (1 + len(names))
    assert [r.get("setting", "") for r in rows[:1 + len(names)]] == [""] + [f"patch {p['name']}" for p in names]
    assert [p for _, p in seen] == ([False] + [True] * len(names)) * 3
    assert [r.get("edited") for r in rows] == ([None] + [True] * len(names)) * 2 + [None] + [False] * len(names)
    log = tmp_path / "tune.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["gemm-pick", str(log), "--out", str(tmp_path / "picks.json")]) == 0
    picks = json.loads((tmp_path / "picks.json").read_text())
    assert picks["wgmma"]["tiny"]["stages"] == 4                     # from the landed rows alone


def test_gemv_wb_summary_of_the_pot3_a8_gemv():
    """The W3-PoT × INT8 GEMV's default variant ("pot3a8") against A8W4's 1.25× bar; variants apart."""
    from engine.bench import wb
    rows = [_wb("pot3a8", 4096, 11008, None, 1.3), _wb("pot3a8", 8192, 8192, None, 1.26),
            _wb("pot3a8 rb4 nw4", 8192, 8192, None, 0.5), _wb("pot3", 8192, 8192, None, 0.8)]
    by = {r["kernel"]: r for r in wb.summary(rows)}
    assert set(by) == {"pot3", "pot3a8"} and by["pot3a8"]["rows"] == 2 and by["pot3a8"]["vs_a8w4_ok"]
    assert "pot3a8 | 2 | — | 1.28× | A8W4 / PoT3 ≥ 1.25" in wb.summary_table(rows)
