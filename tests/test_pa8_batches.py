"""bench/pa8_batches.py: its --settings are checked on the CPU, before any GPU time."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("pa8_batches", Path(__file__).parents[1] / "bench" / "pa8_batches.py")
pa8_batches = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pa8_batches)


def test_settings_parse_into_typed_wb_tune_fields():
    got = pa8_batches.parse_settings(" pa8_mt=2 ; pa8_tok_x=0,pa8_rb4_max_k=65536;")
    assert got == [{"wb.pa8_mt": 2}, {"wb.pa8_tok_x": False, "wb.pa8_rb4_max_k": 65536}]
    assert type(got[1]["wb.pa8_tok_x"]) is bool
    assert all(d.get("wb.pa8_mt", 1) in (1, 2, 4) for d in pa8_batches.parse_settings(pa8_batches.DEFAULT_SETTINGS))


@pytest.mark.parametrize("bad", ["__class__=1", "nope=1", "pa8_mt=x", "pa8_mt", "pa8_mt=3", "pa8_mt=2,resident=y"])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        pa8_batches.parse_settings(bad)


def test_the_command_line_refuses_them_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        pa8_batches.main(["--settings", "pa8_mt=3"])
    assert e.value.code == 2 and "pa8_mt=3" in capsys.readouterr().err
