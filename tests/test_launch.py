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
