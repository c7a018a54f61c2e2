"""Kernel launches with programmatic dependent launch (PDL) on sm_90+.

CuPy's RawKernel launches through cuLaunchKernel, which keeps strict stream order: a
kernel's blocks are scheduled only after the previous kernel has drained, and a decode step
is 320 short kernels in a row. cuLaunchKernelEx with the launch attribute
PROGRAMMATIC_STREAM_SERIALIZATION lets a kernel start while the previous one finishes;
the kernel itself waits (griddepcontrol.wait, cuda/pdl.cuh) before it touches anything
the previous one writes or reads. Every kernel in cuda/ does, so `Kernel` may launch any of
them this way. It does so inside `capturing()`, around a stream capture: the attribute becomes a
programmatic graph edge, and the replayed decode step keeps the overlap (H100: the gap from
one kernel's end to the next one's start past its wait falls from 0.8-1.1 to 0.5-0.6 µs,
bench/pdl_probe.py). Eager launches stay on CuPy's faster host path.

The driver entry point is reached through ctypes (CuPy does not wrap cuLaunchKernelEx),
so this module marshals the arguments itself: CuPy arrays as device pointers, NumPy
scalars by their bytes (every launcher in the engine passes explicit np.int32 /
np.float32 / np.int64 / np.uint64 scalars, as CuPy's RawKernel also expects), None as a
null pointer.

DGQ_PDL=0 in the environment turns PDL off (plain CuPy launches): the A/B switch of the
benchmarks. GPUs below compute capability 9.0 have no PDL and always launch plainly.

A launch that asks for a thread block cluster (`cluster=`, sm_90: the wgmma GEMM's K splits,
engine/gpu/ops.py) always goes through cuLaunchKernelEx, with the cluster dimension attribute
(and PDL's where it applies), also eagerly and under DGQ_PDL=0 or plain_launches().
"""
from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from . import flags
from .backend import BackendError, cupy_or_none

CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _Attr(ctypes.Structure):          # CUlaunchAttribute: id, pad to 8, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint32 * 3),
                ("value_rest", ctypes.c_char * 52)]


def _attr(attr_id: int, value: tuple) -> _Attr:
    """A launch attribute whose value is up to three uint32 (a flag, or cluster dimensions)."""
    a = _Attr(id=attr_id)
    a.value[:len(value)] = value
    return a


class _Config(ctypes.Structure):        # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint32), ("grid_y", ctypes.c_uint32), ("grid_z", ctypes.c_uint32),
                ("block_x", ctypes.c_uint32), ("block_y", ctypes.c_uint32), ("block_z", ctypes.c_uint32),
                ("shared_mem", ctypes.c_uint32), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint32)]


_STATE: dict = {}


def _driver_fn(name: str, argtypes: list):
    """libcuda's `name` (CUresult-returning) on an sm_90+ GPU, else None: no CuPy, an older GPU,
    or a driver older than CUDA 12.0 (cached)."""
    key = "drv:" + name
    if key not in _STATE:
        fn = None
        cp = cupy_or_none()
        if cp is not None and int(cp.cuda.Device().compute_capability) >= 90:
            try:
                fn = getattr(ctypes.CDLL("libcuda.so.1"), name)
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.restype = ctypes.c_int
                fn.argtypes = argtypes
        _STATE[key] = fn
    return _STATE[key]


def _launch_ex():
    """cuLaunchKernelEx, or None: plain launches (_driver_fn)."""
    return _driver_fn("cuLaunchKernelEx", [ctypes.POINTER(_Config), ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p])


def _driver():
    """cuLaunchKernelEx where PDL is on, else None (cached)."""
    if "fn" not in _STATE:
        _STATE["fn"] = _launch_ex() if flags.PDL else None
    return _STATE["fn"]


def clusters_available() -> bool:
    """Whether a launch may ask for thread block clusters (sm_90+, cuLaunchKernelEx found)."""
    return _launch_ex() is not None


def max_active_clusters(kernel, block, shared_mem: int, cluster) -> int:
    """How many clusters of `cluster` CTAs of `kernel` (a Kernel or RawKernel) with `block`
    threads and `shared_mem` dynamic bytes the GPU holds at once (cuOccupancyMaxActiveClusters;
    clusters must fit within one GPC, so this can be fewer than blocks an SM × SMs / size);
    cached. 0 where clusters are unavailable."""
    raw = getattr(kernel, "raw", kernel)
    key = (raw.kernel.ptr, _dims(block, "block"), int(shared_mem), _dims(cluster, "cluster"))
    cache = _STATE.setdefault("occ", {})
    if key not in cache:
        n = ctypes.c_int(0)
        fn = _driver_fn("cuOccupancyMaxActiveClusters",
                        [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.POINTER(_Config)])
        if clusters_available() and fn is not None:
            attr = _attr(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, key[3])
            cfg = _Config(*key[3], *key[1], key[2], None, ctypes.pointer(attr), 1)   # grid: one cluster
            err = fn(ctypes.byref(n), ctypes.c_void_p(raw.kernel.ptr), ctypes.byref(cfg))
            if err != 0:
                raise BackendError(f"cuOccupancyMaxActiveClusters of {raw.name} failed with CUresult {err}")
        cache[key] = n.value
    return cache[key]


def is_capturing() -> bool:
    """Whether a stream capture is in progress (inside capturing())."""
    return bool(_STATE.get("capturing"))


@contextlib.contextmanager
def capturing():
    """Around a stream capture: kernels launched inside use PDL (where enabled), so the graph
    gets programmatic edges. A process-wide flag, not a driver query (asking the stream
    whether it captures costs more host time per launch than the launch): the engine
    launches from one thread, and nothing may launch on another stream meanwhile."""
    _STATE["capturing"] = _STATE.get("capturing", 0) + 1
    try:
        yield
    finally:
        _STATE["capturing"] -= 1


@contextlib.contextmanager
def plain_launches():
    """Within the block, launch without PDL (tests and benchmarks compare the two)."""
    saved = _driver()
    _STATE["fn"] = None
    try:
        yield
    finally:
        _STATE["fn"] = saved


def pdl_enabled() -> bool:
    """Whether kernels launch with programmatic dependent launch in this process."""
    return _driver() is not None


def _dims(d, what: str) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    if not 1 <= len(d) <= 3 or any(int(v) < 1 for v in d):
        raise BackendError(f"kernel {what} must be 1 to 3 positive sizes, got {d}")
    return tuple(int(v) for v in d) + (1,) * (3 - len(d))


def _arg(a, cp):
    if isinstance(a, cp.ndarray):
        return ctypes.c_void_p(a.data.ptr)
    if isinstance(a, np.generic):
        return (ctypes.c_char * a.nbytes).from_buffer_copy(a.tobytes())
    if a is None:
        return ctypes.c_void_p(0)
    raise BackendError(f"kernel arguments are CuPy arrays, NumPy scalars or None, got {type(a).__name__}")


class Kernel:
    """A compiled kernel (CuPy RawKernel) whose calls launch with PDL where available.

    Called like a RawKernel: kernel(grid, block, args, shared_mem=0). Attribute reads and
    writes (max_dynamic_shared_size_bytes, num_regs, ...) go to the RawKernel.
    """

    __slots__ = ("raw",)

    def __init__(self, raw):
        object.__setattr__(self, "raw", raw)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __setattr__(self, name, value):
        setattr(self.raw, name, value)

    def __call__(self, grid, block, args, shared_mem: int = 0, cluster=None):
        """cluster: (x, y, z) CTAs a thread block cluster (sm_90; clusters_available()), or None."""
        pdl = _driver() if _STATE.get("capturing") else None
        if pdl is None and cluster is None:
            # Eagerly the host is the bottleneck of short kernels, and this ctypes path costs
            # about twice CuPy's launch (bench/pdl_probe.py: 22 vs 11 µs): PDL in graphs only.
            return self.raw(grid, block, args, shared_mem=shared_mem)
        fn = pdl if pdl is not None else _launch_ex()
        if fn is None:
            raise BackendError(f"{self.raw.name}: thread block clusters need an sm_90 GPU and a CUDA 12 driver")
        cp = cupy_or_none()
        stream = cp.cuda.get_current_stream()
        gx, gy, gz = _dims(grid, "grid")
        bx, by, bz = _dims(block, "block")
        attrs = []
        if pdl is not None:
            attrs.append(_attr(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, (1, 0, 0)))
        if cluster is not None:
            attrs.append(_attr(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, _dims(cluster, "cluster")))
        cfg = _Config(gx, gy, gz, bx, by, bz, int(shared_mem), stream.ptr, (_Attr * len(attrs))(*attrs), len(attrs))
        held = [_arg(a, cp) for a in args]          # alive until the driver has copied them
        params = (ctypes.c_void_p * max(1, len(held)))(*[ctypes.addressof(h) for h in held])
        err = fn(ctypes.byref(cfg), self.raw.kernel.ptr, params, None)
        if err != 0:
            hint = "GEMM.wgmma_cluster_max = 0 launches split K without clusters" if cluster is not None \
                else "DGQ_PDL=0 launches without programmatic dependent launch"
            raise BackendError(f"cuLaunchKernelEx of {self.raw.name} failed with CUresult {err} "
                               f"(grid {grid}, block {block}, shared {shared_mem} B, cluster {cluster}); {hint}")
