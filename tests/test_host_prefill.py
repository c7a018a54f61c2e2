"""bench/host_prefill.py: a whole eager prefill runs through the engine's launchers with the fake
CuPy (so the tool times what the engine runs), launch for launch, and the fakes are undone."""
import sys
from pathlib import Path

from engine.gpu import backend, fused, kernels, tuning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host_prefill  # noqa: E402


def test_a_prefill_reaches_every_launch_and_fakes_are_undone():
    before = (backend.cupy_or_none, fused.cupy_or_none, kernels.module, tuning.PREFILL.graphs)
    ms, launches = host_prefill.host_ms("smollm2", 24, 1)
    layers = host_prefill.SMOLLM2.num_hidden_layers
    # a layer: norm, q|k|v, RoPE, attention, quant, o, norm, gate|up, silu_mul_quant, down; the
    # last norm and the head
    assert launches == 10 * layers + 2 and ms > 0
    assert (backend.cupy_or_none, fused.cupy_or_none, kernels.module, tuning.PREFILL.graphs) == before


def test_main_prints_the_row(capsys):
    assert host_prefill.main(["--tokens", "16", "--reps", "1"]) == 0
    assert "launches" in capsys.readouterr().out


def test_float_gate_up_loads_as_one_fp16_linear():
    """The FP16 baseline (float gate and up arrays, interleave asked for, as CudaModel builds
    gate|up): one fp16 (2I, K) weight, no SiLU epilogue; float arrays have no out_features, so
    the SiLU-pair check reads their rows (the bench's FP16 rows once failed there)."""
    import numpy as np

    from engine.gpu.linear import GpuLinear
    with host_prefill.faked() as cp:
        g, u = np.ones((16, 32), np.float32), np.full((16, 32), 2, np.float32)
        lin = GpuLinear(cp, [g, u], interleave=True, name="layer 0 gate|up_proj")
        assert (lin.n, lin.kp, lin.silu_fused, lin.interleaved) == (32, 32, False, False)
        np.testing.assert_array_equal(np.asarray(lin.w16), np.concatenate([g, u]).astype(np.float16))
