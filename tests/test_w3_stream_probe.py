"""bench/w3_stream_probe.py without a GPU: it refuses shapes its probes cannot read whole (a K
off 1024 would leave the layout's tail unread) and says so in one line rather than a traceback."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.gpu import backend

ROOT = Path(__file__).resolve().parents[1]


def probe():
    spec = importlib.util.spec_from_file_location("w3_stream_probe", ROOT / "bench" / "w3_stream_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("shapes", ["4096x100", "4000x11008", "4096x11008,1100x4096"])
def test_refuses_shapes_with_a_tail(shapes, capsys):
    assert probe().main(["--shapes", shapes]) == 2
    err = capsys.readouterr().err
    assert "K must be a multiple of 1024" in err and err.count("\n") == 1


def test_without_a_gpu_one_line(capsys):
    if backend.cupy_or_none() is not None:
        pytest.skip("a GPU is here: the probe would run")
    assert probe().main(["--shapes", "4096x11008"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("w3_stream_probe: ") and err.count("\n") == 1
