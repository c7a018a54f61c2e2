"""Loading the CUDA sources in cuda/ as CuPy RawModules, compiled once per process.

The sources live in cuda/ at the repository root. A wheel carries them as package data,
engine/gpu/cuda/*.cu(h) (setup.cfg maps that package to cuda/); the loader reads that copy
when it is there, else cuda/ of the checkout this file sits in (an editable install).

Each .cu file is compiled with NVRTC through `cupy.RawModule(code=...)` after its
quoted `#include "..."` lines have been replaced by the header text. CuPy keys its
on-disk cache on the code string and the options but not on headers found
through -I, so inlining makes the key cover every header: editing common.cuh
can never leave a stale kernel behind. In-process, modules are cached by a
SHA-256 of (inlined code, options, name expressions).

EDITS (set by kargs.patched, for benchmarks only): (file, old, new) text edits applied to a
module's inlined source before it compiles, so a kernel change can be timed beside the landed
kernel in one process; modules and kernels are cached per edit set.

The architecture comes from the device: `sm_90a` on compute capability 9.0
(needed for wgmma), `sm_XY` elsewhere; below sm_80 there is no int8 mma.sync
and we refuse.
"""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from . import backend, launch

# The package's own copy decides when it is there: installed from a wheel, the checkout path
# below would name site-packages/cuda, which is NVIDIA's cuda-python, not ours.
_PACKAGED_CUDA = Path(__file__).resolve().parent / "cuda"      # engine/gpu/cuda/ in a wheel
_CHECKOUT_CUDA = Path(__file__).resolve().parents[2] / "cuda"  # <repo>/cuda/ in a checkout
CUDA_DIR = _PACKAGED_CUDA if _PACKAGED_CUDA.is_dir() else _CHECKOUT_CUDA
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.M)
_PRAGMA_ONCE_RE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.M)


class KernelError(backend.BackendError):
    """A CUDA source could not be found, compiled or run on this device."""


def source(name: str) -> str:
    """The text of cuda/<name> with quoted includes expanded (each header once)."""
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        if not path.is_file():
            raise KernelError(f"CUDA source {path} is missing (engine/gpu/kernels.py reads {_PACKAGED_CUDA} "
                              f"in an installed wheel, else {_CHECKOUT_CUDA} in a checkout)")
        text = _PRAGMA_ONCE_RE.sub("", path.read_text())

        def repl(m: re.Match) -> str:
            inc = (path.parent / m.group(1)).resolve()
            if inc in seen:
                return ""
            seen.add(inc)
            return f"// ---- begin {m.group(1)}\n{expand(inc)}\n// ---- end {m.group(1)}"

        return _INCLUDE_RE.sub(repl, text)

    return expand(CUDA_DIR / name)


@functools.lru_cache(maxsize=None)
def device_info() -> dict:
    """Properties of the current device that launch decisions need."""
    cp = backend.cupy_or_none()
    if cp is None:
        raise KernelError("no usable GPU: CuPy is missing or sees no CUDA device")
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    cc = int(dev.compute_capability)
    name = props["name"]
    return {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "cc": cc,
        "sm_count": int(props["multiProcessorCount"]),
        "l2_bytes": int(props["l2CacheSize"]),
        "smem_optin": int(props.get("sharedMemPerBlockOptin", 49152)),
    }


def arch_flag() -> str:
    cc = device_info()["cc"]
    if cc < 80:
        raise KernelError(f"the INT8 mma kernels need compute capability 8.0 or newer, this GPU has {cc / 10:.1f}")
    return "sm_90a" if cc == 90 else f"sm_{cc}"


_MODULES: dict[tuple, object] = {}
_FUNCS: dict[tuple, object] = {}
EDITS: tuple = ()       # ((file, old, new), ...): kargs.patched sets it; () outside benchmarks
EDITS_USED: set = set()  # the files whose edited kernels were looked up (kargs.patched yields it)


def edits_for(name: str) -> tuple:
    """The EDITS that apply to cuda/<name>; a file with some is noted in EDITS_USED."""
    edits = tuple(e for e in EDITS if e[0] == name)
    if edits:
        EDITS_USED.add(name)
    return edits


def apply_edits(name: str, code: str, edits) -> str:
    """code with each (name, old, new) edit's old replaced by new (every occurrence); an old that
    is not there is an error, so a benchmark never times an unchanged kernel under a new name."""
    for file, old, new in edits:
        if file != name:
            continue
        if old not in code:
            raise KernelError(f"source edit for cuda/{name}: {old!r} is not in its inlined source")
        code = code.replace(old, new)
    return code


def module(name: str, name_expressions: tuple[str, ...]):
    """The compiled RawModule for cuda/<name> with these template instantiations.

    Read, inlined and compiled once per process; CuPy's disk cache is keyed on the
    inlined code, so a header edit recompiles.
    """
    cp = backend.cupy_or_none()
    if cp is None:
        raise KernelError("no usable GPU: CuPy is missing or sees no CUDA device")
    arch = arch_flag()
    edits = edits_for(name)
    mkey = (name, name_expressions, arch, edits)
    mod = _MODULES.get(mkey)
    if mod is None:
        code = apply_edits(name, source(name), edits)
        options = ("--std=c++17", f"--gpu-architecture={arch}")
        try:
            mod = cp.RawModule(code=code, options=options, name_expressions=list(name_expressions))
            mod.compile()
        except Exception as e:  # CompileException carries the NVRTC log
            raise KernelError(f"compiling cuda/{name} for {arch} failed:\n{e}") from e
        _MODULES[mkey] = mod
        if not edits:
            _MODULES[("sha256", name, arch)] = hashlib.sha256(code.encode()).hexdigest()
    return mod


def source_hash(name: str) -> str | None:
    """SHA-256 of the inlined source that the loaded module was built from (for bench logs)."""
    return _MODULES.get(("sha256", name, arch_flag()))


def function(name: str, expr: str, name_expressions: tuple[str, ...]):
    """One kernel out of cuda/<name> (a launch.Kernel: a RawKernel launched with programmatic
    dependent launch where the GPU has it); `expr` must be in name_expressions."""
    edits = edits_for(name)
    key = (name, expr, name_expressions, edits)
    fn = _FUNCS.get(key)
    if fn is None:
        # edited source (a benchmark's A/B) compiles just the kernel asked for, unless a caller
        # compiled the file's every instantiation already (CudaModel does, up front): NVRTC took
        # ~30 s a patch for gemm_a8w4_sm90.cu's 42 (H200)
        whole = (name, name_expressions, arch_flag(), edits) in _MODULES
        exprs = (expr,) if edits and not whole else name_expressions
        fn = launch.Kernel(module(name, exprs).get_function(expr))
        _FUNCS[key] = fn
    return fn
