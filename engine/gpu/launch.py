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

Eager keyword launches (kargs.launch, `Kernel.launch_bound`) pack their arguments into one
parameter buffer with `struct` (ParamLayout: the kernel's parameters at their C offsets) and hand
it to cuLaunchKernel as CU_LAUNCH_PARAM_BUFFER_POINTER: no NumPy scalar and no ctypes object is
made per launch, where CuPy's launch converts every argument (a prefill is ~320 launches, and at
512 tokens of a 7B model the host, not the GPU, bounds it). The layout is checked once per kernel
against the driver's own (cuFuncGetParamInfo, CUDA 12.4+); a kernel whose layout differs, or a
driver without that call, launches through CuPy as before. DGQ_PACKED=0 turns the packed path
off (`unpacked_launches()` within a block): the A/B switch. A launch the driver refuses goes
through CuPy again, which sets up a thread's context or raises CuPy's own error.
"""
from __future__ import annotations

import contextlib
import ctypes
import struct

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


def _driver_fn(name: str, argtypes: list, min_cc: int = 90):
    """libcuda's `name` (CUresult-returning) on a GPU of compute capability ≥ min_cc, else None:
    no CuPy, an older GPU, or a driver without that entry point (cached)."""
    key = "drv:" + name
    if key not in _STATE:
        fn = None
        cp = cupy_or_none()
        if cp is not None and int(cp.cuda.Device().compute_capability) >= min_cc:
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


# ----------------------------------------------------------------------------- packed eager launches
CU_LAUNCH_PARAM_END, CU_LAUNCH_PARAM_BUFFER_POINTER, CU_LAUNCH_PARAM_BUFFER_SIZE = 0, 1, 2
# struct format character and size of each parameter kind ("ptr": a device pointer)
PACK_CHARS = {"ptr": ("Q", 8), "int": ("i", 4), "unsigned": ("I", 4), "unsigned int": ("I", 4),
              "float": ("f", 4), "long long": ("q", 8), "unsigned long long": ("Q", 8), "double": ("d", 8)}


class ParamLayout:
    """The parameter buffer of a kernel whose parameters have these kinds (PACK_CHARS keys):
    each at the next multiple of its size, as the CUDA ABI lays them out. `pack(values)` writes
    them (pointers as integers) into one reusable buffer that `extra` points the driver at; the
    driver copies it when the launch is issued, so the next launch may overwrite it (the engine
    launches from one thread)."""

    __slots__ = ("kinds", "offsets", "sizes", "size", "_st", "_buf", "_size", "extra")

    def __init__(self, kinds: tuple):
        fmt, off, offsets, sizes = "=", 0, [], []
        for k in kinds:
            ch, n = PACK_CHARS[k]
            pad = -off % n
            fmt += "x" * pad + ch
            off += pad
            offsets.append(off)
            sizes.append(n)
            off += n
        self.kinds, self.offsets, self.sizes, self.size = tuple(kinds), tuple(offsets), tuple(sizes), off
        self._st = struct.Struct(fmt)
        self._buf = (ctypes.c_char * max(8, off))()
        self._size = ctypes.c_size_t(off)
        self.extra = (ctypes.c_void_p * 5)(CU_LAUNCH_PARAM_BUFFER_POINTER, ctypes.addressof(self._buf),
                                           CU_LAUNCH_PARAM_BUFFER_SIZE, ctypes.addressof(self._size),
                                           CU_LAUNCH_PARAM_END)

    def pack(self, values) -> None:
        self._st.pack_into(self._buf, 0, *values)

    def packed(self) -> bytes:
        return bytes(self._buf)[:self.size]


def _cu_launch():
    """cuLaunchKernel (any GPU), or None without CuPy / libcuda."""
    return _driver_fn("cuLaunchKernel", [ctypes.c_void_p] + [ctypes.c_uint] * 7
                      + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], min_cc=0)


def _param_info():
    """cuFuncGetParamInfo (CUDA 12.4+ drivers), or None."""
    return _driver_fn("cuFuncGetParamInfo", [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)], min_cc=0)


def layout_matches(fptr: int, layout: ParamLayout) -> bool:
    """Whether the driver lays out the kernel at fptr's parameters as `layout` does: the same
    offset and size for each, and no parameter past the last (cuFuncGetParamInfo)."""
    info = _param_info()
    if info is None:
        return False
    off, size = ctypes.c_size_t(0), ctypes.c_size_t(0)
    for i, (o, n) in enumerate(zip(layout.offsets, layout.sizes)):
        if info(ctypes.c_void_p(fptr), i, ctypes.byref(off), ctypes.byref(size)) != 0 \
                or (off.value, size.value) != (o, n):
            return False
    return info(ctypes.c_void_p(fptr), len(layout.offsets), ctypes.byref(off), ctypes.byref(size)) != 0


def packed_enabled() -> bool:
    """Whether eager keyword launches pack their arguments (DGQ_PACKED, unpacked_launches())."""
    return _STATE.get("packed", flags.PACKED)


@contextlib.contextmanager
def unpacked_launches():
    """Within the block, eager keyword launches go through CuPy (the packed path's A/B)."""
    saved = packed_enabled()
    _STATE["packed"] = False
    try:
        yield
    finally:
        _STATE["packed"] = saved


def _dims3(d) -> tuple:
    """_dims for the packed launch path: a tuple of 1-3 sizes (the launchers' form) padded with
    ones, without the general checks (launch_bound checks the limits); anything else goes through
    _dims."""
    if type(d) is tuple and 1 <= len(d) <= 3:
        if len(d) == 3:
            return d
        return d + (1, 1) if len(d) == 1 else d + (1,)
    return _dims(d, "grid or block")


class Kernel:
    """A compiled kernel (CuPy RawKernel) whose calls launch with PDL where available.

    Called like a RawKernel: kernel(grid, block, args, shared_mem=0). Attribute reads and
    writes (max_dynamic_shared_size_bytes, num_regs, ...) go to the RawKernel.
    """

    __slots__ = ("raw", "_packed")

    def __init__(self, raw):
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "_packed", {})     # (device, layout kinds) -> (CUfunction, cuLaunchKernel or None)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __setattr__(self, name, value):
        setattr(self.raw, name, value)

    def launch_bound(self, grid, block, bound, args: dict, shared_mem: int = 0, cluster=None):
        """A keyword launch (kargs.launch; `bound`: the call site's kargs.Bound). Eager, without a
        cluster, with packed launches on and the driver's layout the same: one cuLaunchKernel with
        the packed buffer. Otherwise as __call__ with bound.build(args): for values the buffer
        cannot hold (a Python float for an int, a float past float32), sizes past the launch
        limits, and any launch the driver refuses (no context current in this thread yet, too
        much shared memory, an earlier kernel's fault), so that CuPy's launch sets the context up
        or raises its own error."""
        if cluster is None and not _STATE.get("capturing") and packed_enabled():
            cp = cupy_or_none()
            dev = cp.cuda.runtime.getDevice()
            layout = bound.layout
            hit = self._packed.get((dev, layout.kinds))
            if hit is None:                          # once per device and layout: is the driver's the same?
                fptr, fn = int(self.raw.kernel.ptr), _cu_launch()
                hit = self._packed[(dev, layout.kinds)] = (fptr, fn if fn is not None and layout_matches(fptr, layout)
                                                           else None)
            if hit[1] is not None:
                try:
                    layout.pack(bound.values(args))
                    gx, gy, gz = _dims3(grid)
                    bx, by, bz = _dims3(block)
                    ok = 0 < gx < 1 << 31 and 0 < gy < 1 << 16 and 0 < gz < 1 << 16 and 0 < bx * by * bz <= 1024 \
                        and 0 <= shared_mem < 1 << 31
                except (struct.error, AttributeError, OverflowError, TypeError, BackendError):
                    ok = False
                if ok and hit[1](hit[0], gx, gy, gz, bx, by, bz, shared_mem, cp.cuda.get_current_stream().ptr, None,
                                 layout.extra) == 0:
                    return None
        return self(grid, block, bound.build(args), shared_mem=shared_mem, cluster=cluster)

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
