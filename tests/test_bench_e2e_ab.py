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
    before = (tuning.GEMM.gemv_dp4a, tuning.GEMM.gemv_dp_u, tuning.PREFETCH.enabled)
    rows = decode_variants(prefetch=(8,), ab=[{"gemv_dp4a": not before[0], "gemv_dp_u": 4}])
    assert [r[0] for r in rows] == ["prefetch o+8MB", f"gemv_dp4a={int(not before[0])},gemv_dp_u=4"]
    with rows[1][1]():
        assert (tuning.GEMM.gemv_dp4a, tuning.GEMM.gemv_dp_u) == (not before[0], 4)
    with rows[0][1]():
        assert tuning.PREFETCH.enabled and tuning.PREFETCH.gate_up_bytes == 8 << 20
    with pytest.raises(RuntimeError):
        with rows[1][1]():
            raise RuntimeError
    assert (tuning.GEMM.gemv_dp4a, tuning.GEMM.gemv_dp_u, tuning.PREFETCH.enabled) == before
