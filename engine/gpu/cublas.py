"""fp16 GEMMs through cuBLAS that a CUDA graph can capture: the FP16 path's float linears and
lm_head past our fp16 GEMV's rows (fused.matmul_f16).

CuPy refuses every cuBLAS call while a stream captures, its low-level bindings included
(cupy/cupy#6290: "calling cuBLAS API during stream capture is currently unsupported"). cuBLAS
itself supports capture given a workspace of the caller's (the cuBLAS guide, "CUDA Graphs
Support"): here cublasGemmEx of the libcublas that CuPy has loaded is called through ctypes,
with a handle and a workspace of our own, one per thread and device. The product is bit-equal to
cp.matmul's (H200, M = 32, 4096²), and a graph of it runs at 9.7 µs a 4096² GEMM at M = 32 against
19.1 eagerly (issue 20: "with the FP16 path captured in a graph too, so the ratio is fair").

Where no libcublas can be found (not Linux, a CuPy without cuBLAS) `gemm_f16` returns False and
the caller falls back to cp.matmul, eager only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np

from .backend import BackendError, cupy_or_none

WORKSPACE_BYTES = 32 << 20       # cuBLAS's guide: ≥ 32 MiB on Hopper
_OP_N, _OP_T = 0, 1              # cublasOperation_t
_R_16F, _R_32F = 2, 0            # cudaDataType CUDA_R_16F, CUDA_R_32F
_COMPUTE_32F = 68                # cublasComputeType_t CUBLAS_COMPUTE_32F (cp.matmul's for fp16)
_GEMM_DEFAULT = -1               # cublasGemmAlgo_t CUBLAS_GEMM_DEFAULT
_NAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so")


def libcublas_path(maps_text: str | None = None) -> str | None:
    """The path of the libcublas (not cublasLt) mapped into this process, from /proc/self/maps
    (or the text given), else None."""
    if maps_text is None:
        try:
            with open("/proc/self/maps") as f:
                maps_text = f.read()
        except OSError:
            return None
    for line in maps_text.splitlines():
        path = line.split()[-1] if line.split() else ""
        name = path.rsplit("/", 1)[-1]
        if name.startswith("libcublas.so"):
            return path
    return None


def _load():
    """ctypes.CDLL of libcublas with the four functions' signatures set, or None."""
    cp = cupy_or_none()
    try:
        cp.cuda.device.get_cublas_handle()        # CuPy maps its libcublas
    except Exception:                             # no GPU (cp None), or a CuPy without cuBLAS
        return None
    lib = None
    for name in (libcublas_path(), *_NAMES, ctypes.util.find_library("cublas")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    vp, ci = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [vp, ci, ci, ci, ci, ci, vp, vp, ci, ci, vp, ci, ci, vp, vp, ci, ci, ci, ci]
    for f in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmEx):
        f.restype = ci
    return lib


_LIB: list = []                  # [lib or None] once looked up
# (thread id, device id) -> _Handle, for the life of the process: a captured graph holds its
# workspace's pointer, so neither may go when a thread ends
_HANDLES: dict = {}
_ONE = np.ones(1, np.float32)    # alpha, beta: host scalars, read when a call is made (or captured)
_ZERO = np.zeros(1, np.float32)


def _check(status: int, what: str):
    if status != 0:
        raise BackendError(f"cuBLAS {what} failed with status {status}")


class _Handle:
    """A cuBLAS handle of the current device with its own workspace, bound to the last stream.
    One workspace serves every stream a thread runs products on, so those products must not
    overlap in time: the engine synchronises between prefill and decode steps, and a decode
    step runs once eagerly on its stream before it is captured (gpu/decode.py), so the handle
    and workspace exist before any capture."""

    def __init__(self, cp, lib):
        self.lib, self.stream = lib, None
        self.ptr = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(self.ptr)), "cublasCreate")
        self.workspace = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)

    def bind(self, stream_ptr: int):
        """cublasSetStream resets the workspace to cuBLAS's own pool: set ours again after it."""
        if stream_ptr != self.stream:
            _check(self.lib.cublasSetStream_v2(self.ptr, stream_ptr), "cublasSetStream")
            _check(self.lib.cublasSetWorkspace_v2(self.ptr, self.workspace.data.ptr, WORKSPACE_BYTES),
                   "cublasSetWorkspace")
            self.stream = stream_ptr


def available() -> bool:
    """Whether gemm_f16 can run (libcublas found): float linears are then capturable at any M."""
    if not _LIB:
        _LIB.append(_load())
    return _LIB[0] is not None


def _row_major(a, itemsize: int = 2) -> int | None:
    """The leading dimension of a 2-D array with unit column stride, else None."""
    if a.ndim != 2 or a.strides[1] != itemsize or a.strides[0] % itemsize or a.strides[0] < a.shape[1] * itemsize:
        return None
    return a.strides[0] // itemsize


def _overlap(a, lda: int, b, ldb: int) -> bool:
    """Whether the rows of a and b (leading dimensions lda, ldb, in elements) may share bytes."""
    def span(x, ld):
        lo = x.data.ptr
        return lo, lo + x.itemsize * ((x.shape[0] - 1) * ld + x.shape[1])
    (a0, a1), (b0, b1) = span(a, lda), span(b, ldb)
    return a0 < b1 and b0 < a1


def gemm_f16(cp, x, w, out) -> bool:
    """out (M, N) fp16 or fp32 = x (M, K) · w (N, K)ᵀ (both fp16) on the current stream, fp32
    accumulation, as cp.matmul(x, w.T, out=out) for fp16 out; capturable. False (nothing run) where
    cuBLAS was not found or an operand's layout is not rows of unit stride."""
    if not available() or x.dtype != cp.float16 or w.dtype != cp.float16 or out.dtype not in (cp.float16,
                                                                                              cp.float32):
        return False
    ldx, ldw, ldo = _row_major(x), _row_major(w), _row_major(out, out.itemsize)
    if None in (ldx, ldw, ldo):
        return False
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or out.shape != (m, n) or 0 in (m, n, k):
        return False                     # cp.matmul says what is wrong, or fills an empty product
    if _overlap(out, ldo, x, ldx) or _overlap(out, ldo, w, ldw):
        return False                     # cp.matmul copies first
    key = (threading.get_ident(), cp.cuda.Device().id)
    h = _HANDLES.get(key)
    if h is None:
        h = _HANDLES[key] = _Handle(cp, _LIB[0])
    h.bind(cp.cuda.get_current_stream().ptr)
    # column-major view: outᵀ (N, M) = op_T(w as K × N) · (x as K × M)
    _check(h.lib.cublasGemmEx(h.ptr, _OP_T, _OP_N, n, m, k, _ONE.ctypes.data, w.data.ptr, _R_16F, ldw,
                              x.data.ptr, _R_16F, ldx, _ZERO.ctypes.data, out.data.ptr,
                              _R_16F if out.dtype == cp.float16 else _R_32F, ldo,
                              _COMPUTE_32F, _GEMM_DEFAULT), "cublasGemmEx")
    return True
