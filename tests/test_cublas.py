"""engine/gpu/cublas.py's host-side parts: which mapped library is libcublas, and which
operand layouts it hands to cuBLAS (leading dimension) or refuses."""
import numpy as np

from engine.gpu import cublas

MAPS = """\
7f01-7f02 r-xp 00000000 08:01 1 /venv/site-packages/cupy_backends/cuda/libs/cublas.cpython-312-x86_64-linux-gnu.so
7f03-7f04 r-xp 00000000 08:01 2 /venv/site-packages/nvidia/cu13/lib/libcublasLt.so.13
7f05-7f06 r-xp 00000000 08:01 3 /venv/site-packages/nvidia/cu13/lib/libcublas.so.13
7f07-7f08 rw-p 00000000 00:00 0
"""


def test_libcublas_path_skips_cupy_module_and_cublaslt():
    assert cublas.libcublas_path(MAPS) == "/venv/site-packages/nvidia/cu13/lib/libcublas.so.13"
    assert cublas.libcublas_path(MAPS.replace("libcublas.so.13", "libfoo.so")) is None
    assert cublas.libcublas_path("") is None


def test_row_major_leading_dimension():
    a = np.zeros((6, 10), np.float16)
    assert cublas._row_major(a) == 10
    assert cublas._row_major(a[::2]) == 20
    assert cublas._row_major(a[:, :4]) == 10
    assert cublas._row_major(a.T) is None              # columns of stride 10
    assert cublas._row_major(a[:, ::2]) is None
    assert cublas._row_major(np.zeros(4, np.float16)) is None
