"""Launch-time rules of the GPU engine that need no GPU: row-kernel block shapes and the
sampling kernel's packed settings (cuda/rows.cuh, cuda/sample.cu)."""
import numpy as np
import pytest

from engine import ops_cuda
from engine.model_cuda import ROW_PERS, row_launch
from engine.backend import BackendError
from engine.sampling import SamplingError


def test_row_launch_covers_every_width_with_whole_warps():
    for width in range(1, ROW_PERS[-1] * 1024 + 1):
        expr, threads = row_launch("add_rmsnorm_quant", width)
        per = int(expr[expr.index("<") + 1:-1])
        assert threads % 32 == 0 and 32 <= threads <= 1024
        assert per * threads >= width                     # every element has a slot
        assert per * (threads - 32) < width               # no warp is left without an element
        assert per == 1 or (per // 2) * 1024 < width      # the smallest PER that fits
    with pytest.raises(BackendError, match="rows of up to"):
        row_launch("silu_mul_quant", ROW_PERS[-1] * 1024 + 1)


def test_sample_params_pack_and_validate():
    p = ops_cuda.sample_params(0.8, 50, 0.9, seed=-1)
    assert p.dtype == np.uint32 and p.shape == (5,)
    assert p[:2].view(np.float32).tolist() == pytest.approx([0.8, 0.9])
    assert p[2] == 50 and p[3] == p[4] == 0xFFFFFFFF       # the seed's 64 bits, two's complement
    assert ops_cuda.sample_params(seed=2**40 + 5)[3:].tolist() == [5, 2**8]
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                dict(top_p=0.0), dict(top_p=float("nan"))):
        with pytest.raises(SamplingError):
            ops_cuda.sample_params(**bad)
    with pytest.raises(ops_cuda.CudaOpError, match="seed"):
        ops_cuda.sample_params(seed=None)


def test_kernel_launch_marshalling_without_a_gpu():
    """engine/launch.py packs arguments as the driver reads them: pointers for arrays,
    a scalar's own bytes, null for None; bad grids and argument types are one clear error."""
    from engine import launch

    class FakeArray:                 # stands in for cupy.ndarray
        class data:
            ptr = 0xDEADBEEF000

    class FakeCp:
        ndarray = FakeArray

    import ctypes
    assert launch._arg(FakeArray(), FakeCp).value == 0xDEADBEEF000
    assert launch._arg(None, FakeCp).value is None
    for v in (np.int32(-7), np.float32(0.1), np.uint64(2**63 + 5), np.int64(-1)):
        assert bytes(launch._arg(v, FakeCp)) == v.tobytes()
    assert ctypes.sizeof(launch._Attr) == 72 and ctypes.sizeof(launch._Config) == 56  # cuda.h layouts
    with pytest.raises(BackendError, match="NumPy scalars"):
        launch._arg(3, FakeCp)                 # a Python int has no C type: the launchers pass np.int32
    assert launch._dims((4, 2), "grid") == (4, 2, 1) and launch._dims(7, "block") == (7, 1, 1)
    for bad in ((), (0,), (1, 1, 1, 1)):
        with pytest.raises(BackendError, match="grid"):
            launch._dims(bad, "grid")
