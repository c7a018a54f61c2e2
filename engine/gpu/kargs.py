"""Kernel launches by keyword: each kernel's parameter list is read from its .cu source once.

`launch(KernelFile, expr, grid, block, shared_mem, name=value, ...)` looks up the kernel's
parameters (names and C types, parsed from cuda/<file> by `parse_kernels`), checks that the
keywords are exactly those names, and passes the values in the parameter order, scalars
converted by C type (int -> np.int32, float -> np.float32, long long -> np.int64, ...; a
None pointer -> a null np.uint64(0)). The first launch of a kernel with a given tuple of
keyword names is checked in full; then the order, the converters and the kernel function are
cached under (file, expr, names) (a call site passes its keywords in one order), so a later
launch from that call site costs one dict lookup and a tuple build (add_rmsnorm_quant's 14
parameters, 4 of them scalars: 1.5 µs on the CPU, 3.4 µs checked each time). Any other tuple
of names, a wrong one included, is another key and is checked in full
(tests/test_kernel_args.py). Launches go through kernels.function, i.e. launch.Kernel:
programmatic dependent launch inside `launch.capturing()`; eagerly one packed parameter buffer
and cuLaunchKernel (`Bound.values`, `launch.ParamLayout`; CuPy's launch with `Bound.build`'s
NumPy scalars where that cannot be used).

Named launchers (the row and attention kernels, gpu/fused.py and gpu/attention.py) are
marked with `@launcher(kernel)`; they choose a grid and pass their keywords through.
tests/test_kernel_args.py checks statically that every call of `launch` and of a named
launcher in engine/, tests/ and bench/ passes exactly the kernel's parameter names.

`intercepted(wrap)` routes every keyword launch through wrap(expr, run) (run() launches):
how benchmarks time, record or leave out launches by kernel. `patched(edits)` compiles the
kernels launched within it from edited sources (kernels.EDITS): how a benchmark times a kernel
change beside the landed one in one process (python -m engine.bench e2e --patch).
"""
from __future__ import annotations

import contextlib
import operator
import re
from dataclasses import dataclass

import numpy as np

from . import kernels
from .backend import require_cupy
from .launch import ParamLayout

# C scalar type -> the NumPy scalar CuPy and launch.py marshal with that type's bytes
SCALARS = {"int": np.int32, "unsigned": np.uint32, "unsigned int": np.uint32, "float": np.float32,
           "long long": np.int64, "unsigned long long": np.uint64, "double": np.float64}


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str          # qualifiers dropped: "int", "float", "__half*", "KV*", "unsigned*"

    @property
    def pointer(self) -> bool:
        return self.ctype.endswith("*")


@dataclass(frozen=True)
class KernelFile:
    """A .cu file and the template instantiations compiled from it (one RawModule)."""
    file: str
    exprs: tuple


class KernelArgError(TypeError):
    """A launch whose keywords are not the kernel's parameter names."""


_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_DEFINE_RE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)\(([^)]*)\)(.*)$", re.M)
_IDENT_RE = re.compile(r"[A-Za-z_][\w#]*")


def _balanced(text: str, i: int) -> int:
    """Index past the parenthesis group that opens at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError("unbalanced parentheses")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _split_params(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"(": 1, "<": 1, ")": -1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur] if cur.strip() else out


def _param(decl: str) -> Param:
    decl = decl.replace("*", " * ")
    words = [w for w in decl.split() if w not in ("const", "__restrict__", "volatile")]
    name, ctype = words[-1], " ".join(words[:-1]).replace(" *", "*")
    if not name.isidentifier() or not ctype:
        raise ValueError(f"cannot read the kernel parameter {decl.strip()!r}")
    return Param(name, ctype)


def _globals(text: str) -> list[tuple[str, tuple[Param, ...]]]:
    """(name, params) of every __global__ function in text (comments and macros removed):
    after `__global__` come `void` and attributes such as `__launch_bounds__(...)`; the last
    `name(...)` before the body (or `;`) is the kernel and its parameter list."""
    found = []
    for m in re.finditer(r"\b__global__\b", text):
        i, groups = m.end(), []
        while True:
            w = _IDENT_RE.match(text, _skip_ws(text, i))
            if w is None:
                break
            j = _skip_ws(text, w.end())
            if text[j:j + 1] != "(":
                i = w.end()
                continue
            i = _balanced(text, j)
            groups.append((w.group(), text[j + 1:i - 1]))
            if text[_skip_ws(text, i):][:1] in ("{", ";"):
                break
        if not groups:
            raise ValueError(f"cannot read the __global__ declaration at offset {m.start()}")
        name, plist = groups[-1]
        found.append((name, tuple(_param(p) for p in _split_params(plist))))
    return found


def parse_kernels(text: str) -> dict[str, tuple[Param, ...]]:
    """Kernel name -> its parameters, for every __global__ function of a CUDA source. Kernels
    defined by a function-like macro (`gemv_f16_m##MT`) are expanded at each use of the macro."""
    text = _COMMENT_RE.sub("", text.replace("\\\n", " "))
    out: dict[str, tuple[Param, ...]] = {}
    macros = []
    for m in _DEFINE_RE.finditer(text):
        if "__global__" in m.group(3):
            macros.append((m.group(1), [a.strip() for a in m.group(2).split(",")], m.group(3)))
    body = _DEFINE_RE.sub("", text)
    for name, params in _globals(body):
        out.setdefault(name, params)
    for mname, margs, mbody in macros:
        for use in re.finditer(rf"^[ \t]*{mname}\(([^)]*)\)", body, re.M):
            vals = [v.strip() for v in use.group(1).split(",")]
            for name, params in _globals(mbody):
                for a, v in zip(margs, vals):
                    name = name.replace(f"##{a}", v)
                out[name] = params
    return out


_PARSED: dict[str, dict] = {}


def signature(file: str, kernel: str) -> tuple[Param, ...]:
    """The parameters of `kernel` in cuda/<file> (read and parsed once per file)."""
    sigs = _PARSED.get(file)
    if sigs is None:
        sigs = _PARSED[file] = parse_kernels(kernels.source(file))
    if kernel not in sigs:
        raise KernelArgError(f"cuda/{file} defines no kernel {kernel!r}")
    return sigs[kernel]


# the null pointer of a None argument: a NumPy scalar is immutable, so one serves every launch
_NULL = np.uint64(0)


def _binding(file: str, expr: str) -> tuple:
    """((name, converter), ...) in parameter order for the kernel of `expr`; converter None for
    a pointer (passed through, None as _NULL)."""
    out = []
    for p in signature(file, expr.split("<")[0].strip()):
        if p.pointer:
            out.append((p.name, None))
        elif p.ctype in SCALARS:
            out.append((p.name, SCALARS[p.ctype]))
        else:
            raise KernelArgError(f"cuda/{file} {expr}: no NumPy scalar for parameter {p.name} of type {p.ctype}")
    return tuple(out)


class Bound:
    """One call site's arguments for a kernel (a tuple of keyword names, checked once):
    build(args) the tuple CuPy and cuLaunchKernelEx take (scalars as NumPy scalars, None as a null
    pointer), values(args) those of the packed parameter buffer (pointers as integers, scalars as
    given), layout the kernel's launch.ParamLayout."""

    __slots__ = ("build", "values", "layout")

    def __init__(self, build, values, layout):
        self.build, self.values, self.layout = build, values, layout


def _builder(order: tuple) -> Bound:
    """The Bound for keywords already checked against `order`."""
    names = tuple(n for n, _ in order)
    get = operator.itemgetter(*names) if len(names) > 1 else lambda a: tuple(a[n] for n in names)
    scalars = tuple((i, conv) for i, (_, conv) in enumerate(order) if conv is not None)
    pointers = tuple(i for i, (_, conv) in enumerate(order) if conv is None)

    def build(args: dict) -> tuple:
        vals = list(get(args))
        for i, conv in scalars:
            vals[i] = conv(vals[i])
        for i in pointers:
            if vals[i] is None:
                vals[i] = _NULL
        return tuple(vals)

    def values(args: dict) -> list:
        vals = list(get(args))
        for i in pointers:
            v = vals[i]
            vals[i] = 0 if v is None else v.data.ptr
        return vals
    kinds = tuple("ptr" if conv is None else _CTYPE[conv] for _, conv in order)
    return Bound(build, values, ParamLayout(kinds))


_CTYPE = {conv: ctype for ctype, conv in SCALARS.items()}      # the converter's C type (any of equals)
_ORDER: dict[tuple, tuple] = {}       # (file, expr) -> ((name, converter), ...)
_BOUND: dict[tuple, Bound] = {}       # (file, expr, keyword names in call order) -> its Bound
_LAUNCHES: dict[tuple, tuple] = {}    # the same key -> (kf.exprs, Bound, kernel function, its launch_bound)
_WRAP: list = []


def _checked(kf: KernelFile, expr: str, args: dict):
    """The builder for this tuple of keyword names, after checking that they are exactly the
    kernel's parameter names (KernelArgError otherwise); cached only once checked."""
    order = _ORDER.get((kf.file, expr))
    if order is None:
        order = _ORDER[(kf.file, expr)] = _binding(kf.file, expr)
    if len(args) != len(order) or not all(n in args for n, _ in order):
        names = [n for n, _ in order]
        missing, extra = [n for n in names if n not in args], [n for n in args if n not in names]
        raise KernelArgError(f"{expr} (cuda/{kf.file}) takes {', '.join(names)}; "
                             f"missing {missing or 'none'}, unknown {extra or 'none'}")
    bound = _BOUND[(kf.file, expr, tuple(args))] = _builder(order)
    return bound


def bind(kf: KernelFile, expr: str, args: dict) -> tuple:
    """The kernel's argument tuple from keywords: exactly its parameter names, in its order."""
    bound = _BOUND.get((kf.file, expr, tuple(args)))
    if bound is None:
        bound = _checked(kf, expr, args)
    return bound.build(args)


_RESIDENT: dict = {}     # (launch.Kernel, threads, dynamic shared memory, device) -> blocks held at once


def resident_grid(fn, row_tiles: int, threads: int, smem: int = 0, cap: int = 0) -> int:
    """The grid of a kernel whose block b takes row tiles b, b + gridDim.x, ... (cuda/gemv_wb.cu
    gemv_wb_body): one block a row tile where they all fit, else no more blocks than the GPU holds
    at once (the driver's occupancy query for fn as compiled, with this block and shared memory) nor
    than cap where cap > 0, and of those as few as keep the most row tiles a block (768 row tiles on
    528 slots: 384 blocks of two, not 240 of two and 288 of one)."""
    key = (fn, threads, smem, kernels.device_info()["name"])
    if key not in _RESIDENT:
        per_sm = require_cupy().cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.raw.kernel.ptr, threads, smem)
        _RESIDENT[key] = max(1, int(per_sm)) * kernels.device_info()["sm_count"]
    slots = min(_RESIDENT[key], cap) if cap > 0 else _RESIDENT[key]
    if row_tiles <= slots:
        return row_tiles
    return -(-row_tiles // -(-row_tiles // slots))


def function(kf: KernelFile, expr: str):
    """The launch.Kernel of `expr` (for attributes such as max_dynamic_shared_size_bytes)."""
    return kernels.function(kf.file, expr, kf.exprs)


def check_edits(edits) -> tuple:
    """edits as a tuple of (file.cu, old, new), checked on the CPU before any GPU time is spent:
    each file exists, each old occurs in its inlined source and differs from new, and the edited
    source declares the same kernels with the same parameters (launches pass the landed source's
    argument list). ValueError naming the edit otherwise."""
    edits = tuple(tuple(e) for e in edits)
    for e in edits:
        if len(e) != 3 or not all(isinstance(x, str) for x in e) or not e[0].endswith(".cu") or not e[1] \
                or e[1] == e[2]:
            raise ValueError(f"a source edit is (file.cu, old text, new text), old non-empty and not new, not {e!r}")
    for file in dict.fromkeys(e[0] for e in edits):
        try:
            landed = kernels.source(file)
            edited = kernels.apply_edits(file, landed, edits)
        except kernels.KernelError as err:
            raise ValueError(str(err)) from None
        if parse_kernels(edited) != parse_kernels(landed):
            raise ValueError(f"source edits of cuda/{file} change a kernel's name or parameters; launches would "
                             "pass the landed argument list")
    return edits


@contextlib.contextmanager
def patched(edits):
    """Within the block, cuda/<file> compiles with each (file, old, new) edit applied to its
    inlined source (kernels.apply_edits: every occurrence of old; check_edits first). The launch
    cache is emptied on entry and exit, so launches pick the edited kernels inside and the landed
    ones after; a CUDA graph captured inside keeps the edited kernels (modules live for the
    process). Yields the set of files whose edited kernels were looked up in the block (empty:
    nothing the block ran came from an edited file, so its timing says nothing about the edit)."""
    edits = check_edits(edits)
    saved, saved_used = kernels.EDITS, kernels.EDITS_USED
    kernels.EDITS, kernels.EDITS_USED = saved + edits, set()
    _LAUNCHES.clear()
    try:
        yield kernels.EDITS_USED
    finally:
        kernels.EDITS, kernels.EDITS_USED = saved, saved_used
        _LAUNCHES.clear()


def launch(kf: KernelFile, expr: str, grid, block, shared_mem: int = 0, cluster=None, **args):
    """Launch kernel `expr` of kf with keyword arguments (module docstring); cluster: the CTAs of
    a thread block cluster (x, y, z), sm_90 (launch.Kernel). Eagerly one packed parameter buffer
    (launch.Kernel.launch_bound)."""
    key = (kf.file, expr, tuple(args))
    hit = _LAUNCHES.get(key)
    if hit is None or hit[0] is not kf.exprs:   # first launch with these names (or another KernelFile)
        bound = _BOUND.get(key) or _checked(kf, expr, args)
        fn = function(kf, expr)
        hit = _LAUNCHES[key] = (kf.exprs, bound, fn, getattr(fn, "launch_bound", None))
    if _WRAP:
        return _WRAP[-1](expr, lambda: _run(hit, grid, block, shared_mem, cluster, args))
    return _run(hit, grid, block, shared_mem, cluster, args)


def _run(hit, grid, block, shared_mem, cluster, args):
    _, bound, fn, bound_launch = hit
    if bound_launch is not None:
        return bound_launch(grid, block, bound, args, shared_mem, cluster)
    return fn(grid, block, bound.build(args), shared_mem=shared_mem, cluster=cluster)   # a plain callable (fakes)


def launcher(kernel: str):
    """Marks a named launcher of `kernel` (its keywords are checked by tests/test_kernel_args.py)."""
    def mark(fn):
        fn.kernel = kernel
        return fn
    return mark


@contextlib.contextmanager
def intercepted(wrap):
    """Within the block, every keyword launch calls wrap(expr, run) instead; run() launches."""
    _WRAP.append(wrap)
    try:
        yield
    finally:
        _WRAP.pop()
