"""Every kernel launch passes exactly the kernel's parameter names (no GPU needed).

(a) gpu/kargs.py parses every __global__ kernel's parameter list out of cuda/*.cu; (b) with
`ast`, every call of the keyword launch (kargs.launch) and of a named launcher
(@kargs.launcher) in engine/, tests/ and bench/ is checked against that list: a misspelt,
missing or extra keyword fails here instead of as a wrong argument on the GPU.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

from engine.gpu import kargs, kernels, tuning

ROOT = Path(__file__).resolve().parent.parent
CUDA = sorted(p.name for p in (ROOT / "cuda").glob("*.cu"))
LAUNCH_OWN = {"shared_mem", "cluster"}       # keywords of kargs.launch itself


def all_kernels() -> dict[str, tuple[str, ...]]:
    """kernel name -> parameter names, over every .cu file (names are unique project-wide)."""
    out: dict = {}
    for f in CUDA:
        for name, params in kargs.parse_kernels(kernels.source(f)).items():
            assert name not in out, f"kernel {name} is defined twice (cuda/{f})"
            out[name] = tuple(p.name for p in params)
    return out


def test_every_global_kernel_is_parsed():
    ks, macros = all_kernels(), {}
    for f in CUDA:
        text = re.sub(r"//[^\n]*", "", (ROOT / "cuda" / f).read_text())
        parsed = kargs.parse_kernels(text)
        # each __global__ outside a macro is one kernel; a macro's is one per use of the macro,
        # counted in the text (a line opening with the macro's name and a parenthesis)
        joined = text.replace("\\\n", " ")
        defs = re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)\(([^\n]*)", joined, re.M)
        no_macros = re.sub(r"^[ \t]*#[ \t]*define[^\n]*", "", joined, flags=re.M)
        plain = len(re.findall(r"\b__global__\b", no_macros))
        macro = sum(body.count("__global__") * len(re.findall(rf"^[ \t]*{name}\(", no_macros, re.M))
                    for name, body in defs)
        macros[f] = macro
        assert len(parsed) == plain + macro, (f, len(parsed), plain, macro)
    assert macros["fused.cu"] == 2 * len(tuning.GEMV_F16.mts)     # GEMV_F16_ENTRY, GEMV_W8_ENTRY uses
    assert ks["attn_decode"][-2:] == ("out", "amax_out")
    assert ks["gemv_w8_m8"] == ("x", "w", "scale", "out", "M", "N", "K")
    assert ks["sample_rows"] == ("logits", "ld", "V", "params", "seq", "pos", "lens", "advance", "out")
    for name, params in ks.items():
        assert params and all(p.isidentifier() for p in params), name
        assert len(set(params)) == len(params), name


def _expr_kernels(node, known) -> set[str]:
    """The kernels a launch's expression argument can name: a string, or an f-string whose
    literal head reaches the '<' of the template arguments or, failing that, is the prefix of
    each kernel it may name (f"gemv_f16_m{mt}"); of `a if c else b`, both (each must be one of those)."""
    if isinstance(node, ast.IfExp):
        a, b = _expr_kernels(node.body, known), _expr_kernels(node.orelse, known)
        return a | b if a and b else set()
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value.split("<")[0].strip()}
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        head = node.values[0].value
        if "<" in head:
            return {head.split("<")[0].strip()}
        return {k for k in known if k.startswith(head)}
    return set()


def _name(func) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _launchers(trees) -> dict[str, tuple[str, set[str], int]]:
    """Named launchers: function -> (kernel, its own parameter names, its positional count)."""
    out = {}
    for path, tree in trees:
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for d in fn.decorator_list:
                if isinstance(d, ast.Call) and _name(d.func) == "launcher":
                    own = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
                    assert fn.args.kwarg is not None, f"{path}: launcher {fn.name} takes no **args"
                    assert fn.name not in out, f"two launchers named {fn.name}"
                    out[fn.name] = (d.args[0].value, set(own), len(fn.args.posonlyargs + fn.args.args))
    return out


def _enclosing(node, parents):
    fn = parents.get(node)
    while fn is not None and not isinstance(fn, ast.FunctionDef):
        fn = parents.get(fn)
    return fn


def _helper_of_launchers(name, tree, parents, launchers) -> bool:
    """Whether every call of function `name` in the module comes from a named launcher and
    passes that launcher's kernel name, a literal, first (fused.py `_row`)."""
    calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and _name(c.func) == name]
    for c in calls:
        fn = _enclosing(c, parents)
        if fn is None or fn.name not in launchers or not c.args or not isinstance(c.args[0], ast.Constant) \
                or c.args[0].value != launchers[fn.name][0]:
            return False
    return bool(calls)


def check_calls(trees, known) -> tuple[list[str], int]:
    """(problems, calls checked) over parsed modules [(path, tree)]."""
    launchers = _launchers(trees)
    problems, checked = [], 0
    for lname, (kernel, _, _) in launchers.items():
        if kernel not in known:
            problems.append(f"launcher {lname} names no kernel of cuda/: {kernel}")
    for path, tree in trees:
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            name = _name(call.func)
            is_launch = name == "launch" and (
                (isinstance(call.func, ast.Attribute) and _name(call.func.value) == "kargs")
                or (isinstance(call.func, ast.Name) and path.name == "kargs.py"))
            if not is_launch and name not in launchers:
                continue
            where = f"{path.relative_to(ROOT) if path.is_absolute() else path}:{call.lineno}"
            splat = any(k.arg is None for k in call.keywords)
            given = {k.arg for k in call.keywords if k.arg is not None}
            if is_launch:
                if path.name == "kargs.py":
                    continue                      # the definition's own plumbing
                if splat:                         # a named launcher passing its keywords through
                    fn = parents.get(call)
                    while fn is not None and not isinstance(fn, ast.FunctionDef):
                        fn = parents.get(fn)
                    if fn is not None and fn.name not in launchers and _helper_of_launchers(fn.name, tree, parents,
                                                                                     launchers):
                        continue          # a shared body, each call from the launcher of its kernel
                    if fn is None or fn.name not in launchers:
                        problems.append(f"{where}: **args passed to kargs.launch outside a named launcher")
                    elif len(call.args) > 1 and _expr_kernels(call.args[1], known) not in (
                            set(), {launchers[fn.name][0]}):
                        problems.append(f"{where}: launcher {fn.name} launches another kernel")
                    continue
                cands = _expr_kernels(call.args[1], known) if len(call.args) > 1 else set()
                if not cands or not cands <= set(known):
                    problems.append(f"{where}: cannot tell which kernel this launch names")
                    continue
                for k in sorted(cands):
                    if given - LAUNCH_OWN != set(known[k]):
                        problems.append(f"{where}: {k} takes {known[k]}, got {sorted(given - LAUNCH_OWN)}")
                checked += 1
            else:
                kernel, own, npos = launchers[name]
                if splat:
                    problems.append(f"{where}: {name} called with **kwargs (cannot be checked)")
                    continue
                if len(call.args) > npos:
                    problems.append(f"{where}: {name} takes at most {npos} positional arguments")
                got = given - own
                if got != set(known.get(kernel, ())):
                    missing = sorted(set(known.get(kernel, ())) - got)
                    extra = sorted(got - set(known.get(kernel, ())))
                    problems.append(f"{where}: {name} ({kernel}) missing {missing}, unknown {extra}")
                checked += 1
    return problems, checked


def _trees(edits=None):
    """(path, tree) of every module of engine/, tests/, bench/; edits {file name: (old, new)}
    replaces text first (the tests that show a check can fail)."""
    out = []
    for d in ("engine", "tests", "bench"):
        for p in sorted((ROOT / d).rglob("*.py")):
            text = p.read_text(encoding="utf-8")
            for old, new in (edits or {}).get(p.name, ()):
                assert old in text, (p, old)
                text = text.replace(old, new)
            out.append((p, ast.parse(text)))
    return out


def test_every_launch_passes_exactly_the_kernel_parameters():
    known = all_kernels()
    trees = _trees()
    problems, checked = check_calls(trees, known)
    assert not problems, "\n".join(problems)
    launchers = _launchers(trees)
    assert set(launchers) == {"add_rmsnorm_quant", "silu_mul_quant", "quant_rows", "quant_amax",
                              "rope_qkv_cache", "attn_prefill", "attn_decode"}
    assert checked >= 20, checked
    assert not unlaunched(trees, known), unlaunched(trees, known)


def _calls_of(name, trees) -> list[str]:
    """path:line of every call of `name` (plain or attribute) outside its own definition."""
    out = []
    for path, tree in trees:
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for c in ast.walk(tree):
            if isinstance(c, ast.Call) and _name(c.func) == name:
                fn = _enclosing(c, parents)
                if fn is None or fn.name != name:
                    out.append(f"{path}:{c.lineno}")
    return out


def engine_kernel_files() -> list:
    """The module-level KernelFile objects of engine/gpu/*.py (one per file and instantiations)."""
    import engine.gpu as gpu
    out = []
    for m in pkgutil.iter_modules(gpu.__path__):
        for v in vars(importlib.import_module(f"engine.gpu.{m.name}")).values():
            if isinstance(v, kargs.KernelFile) and v not in out:
                out.append(v)
    return out


def unlaunched(trees, known) -> list[str]:
    """What nothing calls: named launchers that no code calls, and kernels of the engine's
    KernelFiles that no kargs.launch in engine/ names and no called named launcher launches."""
    launchers = _launchers(trees)
    problems = [f"launcher {n} is never called" for n in launchers if not _calls_of(n, trees)]
    engine = [(path, tree) for path, tree in trees if Path(path).relative_to(ROOT).parts[0] == "engine"]
    launched = {k for n, (k, _, _) in launchers.items() if _calls_of(n, engine)}
    for path, tree in engine:
        for c in ast.walk(tree):
            if isinstance(c, ast.Call) and _name(c.func) == "launch" and isinstance(c.func, ast.Attribute) \
                    and _name(c.func.value) == "kargs" and len(c.args) > 1:
                launched |= _expr_kernels(c.args[1], known)
    for kf in engine_kernel_files():
        for k in sorted(kargs.parse_kernels(kernels.source(kf.file))):
            if k not in launched:
                problems.append(f"kernel {k} of cuda/{kf.file} is launched nowhere in engine/")
    return sorted(set(problems))


def test_the_launched_checks_can_fail():
    """A launcher whose only callers are gone, a kernel no launch names: both are reported
    (the launcher's own `def add_rmsnorm_quant(` line is no call)."""
    known = all_kernels()
    gone = ("fused.add_rmsnorm_quant(", "fused.other_norm(")
    trees = _trees({"model.py": [gone], "test_model_cuda.py": [gone],
                    "fused.py": [('f"gemv_w8_m{mt}"', 'f"gemv_f16_m{mt}"')]})
    problems = unlaunched(trees, known)
    assert problems == ["kernel add_rmsnorm_quant of cuda/fused.cu is launched nowhere in engine/",
                        "kernel gemv_w8_m1 of cuda/fused.cu is launched nowhere in engine/",
                        "kernel gemv_w8_m4 of cuda/fused.cu is launched nowhere in engine/",
                        "kernel gemv_w8_m8 of cuda/fused.cu is launched nowhere in engine/",
                        "launcher add_rmsnorm_quant is never called"], problems
    # called from tests only: the launcher is used, its kernel still launched nowhere in engine/
    assert unlaunched(_trees({"model.py": [gone]}), known) == [
        "kernel add_rmsnorm_quant of cuda/fused.cu is launched nowhere in engine/"]


@pytest.mark.parametrize("snippet,what", [
    ("fused.quant_rows(m, x=a, K=1, mode=0, static_scale=s, x8=b, ld=1, sx=c, extra=1)", "unknown ['extra']"),
    ("fused.quant_rows(m, x=a, K=1, mode=0, static_scale=s, x8=b, sx=c)", "missing ['ld']"),
    ("fused.quant_rows(m, x=a, k=1, mode=0, static_scale=s, x8=b, ld=1, sx=c)", "missing ['K']"),
    ("kargs.launch(F, f'gemv_f16_m{mt}', g, b, x=x, w=w, out=o, M=1, N=2)", "gemv_f16_m1 takes"),
    ("kargs.launch(F, expr, g, b, x=x)", "cannot tell"),
    ("fused.quant_rows(m, **kw)", "cannot be checked"),
])
def test_the_check_catches_bad_keywords(snippet, what):
    trees = [(p, t) for p, t in _trees() if p.name == "fused.py"] + [(Path("snippet.py"), ast.parse(snippet))]
    problems, _ = check_calls(trees, all_kernels())
    assert any(what in p for p in problems), problems


def test_bind_orders_and_converts_by_c_type():
    """The runtime side: values in parameter order, scalars by C type, None a null pointer;
    wrong names are one clear error."""
    kf = kargs.KernelFile("sample.cu", ())
    logits, params, seq, pos, out = (object() for _ in range(5))
    vals = kargs.bind(kf, "sample_rows", dict(out=out, advance=True, lens=None, pos=pos, seq=seq, params=params,
                                              V=7, ld=2**40, logits=logits))
    assert vals[0] is logits and vals[3] is params and vals[4] is seq and vals[5] is pos and vals[8] is out
    assert type(vals[1]) is np.int64 and vals[1] == 2**40
    assert type(vals[2]) is np.int32 and vals[2] == 7
    assert type(vals[6]) is np.uint64 and vals[6] == 0                 # None pointer
    assert type(vals[7]) is np.int32 and vals[7] == 1
    f = kargs.bind(kargs.KernelFile("fused.cu", ()), "add_rmsnorm_quant<1, 1, 1>",
                   dict(h=1, y=None, w=2, H=3, eps=1e-5, mode=1, static_scale=4, x8=5, ld=6, sx=7, xh=8,
                        zero=None, emb=None, tok=None))
    assert type(f[4]) is np.float32 and f[4] == np.float32(1e-5)
    with pytest.raises(kargs.KernelArgError, match=r"missing \['tok'\], unknown \['tokens'\]"):
        kargs.bind(kargs.KernelFile("fused.cu", ()), "add_rmsnorm_quant<1, 1, 1>",
                   dict(h=1, y=None, w=2, H=3, eps=1e-5, mode=1, static_scale=4, x8=5, ld=6, sx=7, xh=8,
                        zero=None, emb=None, tokens=None))
    with pytest.raises(kargs.KernelArgError, match="defines no kernel"):
        kargs.signature("fused.cu", "no_such_kernel")


def test_cached_bind_and_launch_match_the_checked_one(monkeypatch):
    """After the first, fully checked bind of a tuple of keyword names, later calls build the
    same tuple (types, values, the very array objects) from the cache; another tuple of names,
    a wrong one included, is another key and is checked in full."""
    monkeypatch.setattr(kargs, "_BOUND", {})
    monkeypatch.setattr(kargs, "_LAUNCHES", {})
    seen = []
    monkeypatch.setattr(kernels, "function", lambda file, expr, exprs: lambda g, b, vals, shared_mem=0, cluster=None:
                        seen.append(vals))
    launch = kargs.launch         # by another name: the static check reads literal keywords, these are dicts
    expr = "add_rmsnorm_quant<2, 1, 1>"
    kf = kargs.KernelFile("fused.cu", (expr,))
    h, w, x8, sx = (np.zeros(2, np.float16) for _ in range(4))
    kw = dict(h=h, y=None, w=w, H=3, eps=1e-5, mode=1, static_scale=None, x8=x8, ld=6, sx=sx, xh=None,
              zero=None, emb=None, tok=True)
    want = (h, np.uint64(0), w, np.int32(3), np.float32(1e-5), np.int32(1), np.uint64(0), x8, np.int32(6), sx,
            np.uint64(0), np.uint64(0), np.uint64(0), True)

    def same(a, b):
        return len(a) == len(b) and all(type(x) is type(y) and (x is y if isinstance(x, np.ndarray) else x == y)
                                        for x, y in zip(a, b))
    first = kargs.bind(kf, expr, kw)
    assert (kf.file, expr, tuple(kw)) in kargs._BOUND and same(first, want)
    assert same(kargs.bind(kf, expr, dict(kw)), first)                     # the cached builder
    for _ in range(2):                                                     # checked, then cached
        launch(kf, expr, (1,), (32,), **kw)
    assert len(seen) == 2 and same(seen[0], first) and same(seen[1], first)
    bad = {**{k: v for k, v in kw.items() if k != "tok"}, "tokens": None}
    for call in (lambda: kargs.bind(kf, expr, bad), lambda: launch(kf, expr, (1,), (32,), **bad)):
        with pytest.raises(kargs.KernelArgError, match=r"missing \['tok'\], unknown \['tokens'\]"):
            call()
    short = {k: v for k, v in kw.items() if k != "tok"}
    with pytest.raises(kargs.KernelArgError, match=r"missing \['tok'\], unknown none"):
        launch(kf, expr, (1,), (32,), **short)
    assert len(kargs._BOUND) == 1 and len(seen) == 2                        # nothing wrong was cached


def test_edited_source_compiles_only_the_kernel_asked_for(monkeypatch):
    """Under kargs.patched (a benchmark's A/B), kernels.function compiles the one instantiation
    it is asked for, not the file's every one; where a caller compiled the whole edited file
    already (CudaModel, up front), it takes the kernel from that module. Landed source: always the
    whole list. (A fake CuPy records what each RawModule was compiled with.)"""
    compiled = []

    class FakeModule:
        def __init__(self, code, options, name_expressions):
            self.code, self.exprs = code, tuple(name_expressions)

        def compile(self):
            compiled.append((self.exprs, "EDITED" in self.code))

        def get_function(self, expr):
            assert expr in self.exprs
            return object()

    class FakeCupy:
        RawModule = FakeModule

    monkeypatch.setattr(kernels.backend, "cupy_or_none", lambda: FakeCupy)
    monkeypatch.setattr(kernels, "arch_flag", lambda: "sm_90a")
    monkeypatch.setattr(kernels, "_MODULES", {})
    monkeypatch.setattr(kernels, "_FUNCS", {})
    file = "fused.cu"
    old = "quant_amax"                                   # occurs in fused.cu's inlined source
    assert old in kernels.source(file)
    exprs = ("quant_amax<float>", "quant_amax<__half>", "gemv_f16_m1")
    kernels.function(file, exprs[0], exprs)
    assert compiled == [(exprs, False)]                  # landed: the whole file
    with kargs.patched([(file, old, old + " /*EDITED*/")]):
        kernels.function(file, exprs[1], exprs)
        kernels.function(file, exprs[2], exprs)
        kernels.function(file, exprs[2], exprs)          # cached
    assert compiled[1:] == [((exprs[1],), True), ((exprs[2],), True)]
    compiled.clear()
    monkeypatch.setattr(kernels, "_FUNCS", {})
    with kargs.patched([(file, old, old + " /*EDITED 2*/")]):
        kernels.module(file, exprs)                      # up front, as CudaModel does
        kernels.function(file, exprs[0], exprs)
    assert compiled == [(exprs, True)]
