"""bench/host_gemm.py: the fake CuPy still carries ops.gemm_a8w4's host path to a launch for
every 7B prefill linear (so the tool measures what the engine runs), and the fakes are undone."""
import sys
from pathlib import Path

from engine.gpu import backend, choice, kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host_gemm  # noqa: E402


def test_every_linear_reaches_a_launch_and_fakes_are_undone(monkeypatch):
    launched = []

    class Recording(host_gemm._Kernel):
        def __call__(self, grid, block, args, shared_mem=0):
            launched.append((grid, block, len(args), shared_mem))

    monkeypatch.setattr(host_gemm, "_Kernel", Recording)
    before = (backend.cupy_or_none, kernels.function, kernels.device_info, choice.STATE.policy)
    caches = [getattr(obj, name) for obj, name in host_gemm.CACHES]
    snapshot = [dict(c) for c in caches]
    with host_gemm.faked():
        res = host_gemm.time_calls(512, 2)
        assert all(len(getattr(obj, name)) for obj, name in host_gemm.CACHES[:3])    # the fakes filled them
    assert [getattr(obj, name) for obj, name in host_gemm.CACHES] == caches
    assert all(a is b for a, b in zip((getattr(obj, name) for obj, name in host_gemm.CACHES), caches))
    assert [dict(c) for c in caches] == snapshot                     # untouched
    assert set(res) == set(host_gemm.LINEARS_7B) and all(v > 0 for v in res.values())
    assert len(launched) == 3 * len(host_gemm.LINEARS_7B)          # a warm call and two timed, each
    assert all(len(g) == 2 and g[0] >= 1 and nargs > 10 and smem > 0 for g, _, nargs, smem in launched)
    assert (backend.cupy_or_none, kernels.function, kernels.device_info, choice.STATE.policy) == before


def test_main_prints_a_row_per_m(capsys):
    assert host_gemm.main(["--m", "64", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 64 |" in out and "policy" in out
