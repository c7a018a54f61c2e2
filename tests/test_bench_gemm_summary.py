"""`python -m engine.bench gemm`'s summary per M range (issue 20, item 4): geometric means of the
peer ratios over the shapes, and the targets; `gemm-summary LOG` reads a `gemm --json` log."""
import json
import math

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
    with pytest.raises(SystemExit, match="no `python -m engine.bench gemm --json` rows"):
        main(["gemm-summary", str(empty)])
