"""Array-module selection: the only place that imports CuPy (lazily).

Model code is written once against `xp`; `get_xp("cuda")` returns cupy,
`get_xp("cpu")` numpy, `get_xp("auto")` cupy when it imports and sees a GPU.
"""
from __future__ import annotations

import functools
import os

import numpy as np

DEVICES = ("cpu", "cuda", "auto")


class BackendError(RuntimeError):
    """The requested device is not available."""


@functools.lru_cache(maxsize=1)
def _cupy():
    """cupy if it imports and a CUDA device is visible, else None."""
    if os.environ.get("DGQ_DISABLE_CUDA"):
        return None
    try:
        import cupy  # noqa: PLC0415  (the one lazy import of cupy in the engine)
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return None


def has_gpu() -> bool:
    return _cupy() is not None


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cuda' without a GPU is an error."""
    if device not in DEVICES:
        raise BackendError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if has_gpu() else "cpu"
    if device == "cuda" and not has_gpu():
        raise BackendError("--device cuda: no usable GPU (CuPy missing or no CUDA device); "
                           "install the 'cuda' extra on a GPU machine or use --device cpu")
    return device


def get_xp(device: str = "cpu"):
    return _cupy() if resolve_device(device) == "cuda" else np


def xp_of(a):
    """The array module that owns `a`."""
    cp = _cupy()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp
    return np


def to_numpy(a) -> np.ndarray:
    cp = _cupy()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)
