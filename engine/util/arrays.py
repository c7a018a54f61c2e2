"""Which array module holds an array, and a copy to NumPy, without importing CuPy.

engine/gpu/backend.py is the one module that imports CuPy. Code below it (the NumPy
reference model, sampling, evaluation) still receives CuPy arrays from the GPU engine:
a CuPy array can only exist once CuPy is imported, so looking it up in sys.modules is
enough and keeps these rooms free of the GPU package.
"""
from __future__ import annotations

import sys

import numpy as np


def _cupy_if_loaded():
    return sys.modules.get("cupy")


def xp_of(a):
    """The array module that owns `a` (cupy for a CuPy array, else numpy)."""
    cp = _cupy_if_loaded()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp
    return np


def to_numpy(a) -> np.ndarray:
    """`a` as a NumPy array (a device-to-host copy for a CuPy array)."""
    cp = _cupy_if_loaded()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)
