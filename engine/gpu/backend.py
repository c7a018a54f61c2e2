"""Device selection: the only module of the project that imports CuPy (lazily).

`cupy_or_none()` is cupy when it imports and sees a CUDA device, else None; `resolve_device`
turns the --device choice into "cpu" or "cuda". Code outside engine/gpu never imports CuPy:
it meets CuPy arrays only through engine/util/arrays.py.
"""
from __future__ import annotations

import functools

import numpy as np

from . import flags
from ..util.errors import param_error

DEVICES = ("cpu", "cuda", "auto")


class BackendError(RuntimeError):
    """The requested device is not available."""


@functools.lru_cache(maxsize=1)
def cupy_or_none():
    """cupy if it imports and a CUDA device is visible, else None."""
    if flags.DISABLE_CUDA:
        return None
    try:
        import cupy  # noqa: PLC0415  (the one import of cupy in the project)
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return None


def require_cupy():
    """cupy, or BackendError saying why the GPU engine cannot run here."""
    cp = cupy_or_none()
    if cp is None:
        raise BackendError("the GPU engine needs CuPy and a CUDA device")
    return cp


def has_gpu() -> bool:
    return cupy_or_none() is not None


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cuda' without a GPU is an error."""
    if device not in DEVICES:
        raise param_error(BackendError, "device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if has_gpu() else "cpu"
    if device == "cuda" and not has_gpu():
        raise param_error(BackendError, "device", "cuda: no usable GPU (CuPy missing or no CUDA device); "
                                                  "install the 'cuda' extra on a GPU machine, or choose cpu instead")
    return device


def get_xp(device: str = "cpu"):
    return cupy_or_none() if resolve_device(device) == "cuda" else np
