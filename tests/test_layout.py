"""The rooms of the codebase and what each may import, enforced.

The allowed-dependency table lives in docs/ARCHITECTURE.md (rows `| room | may import |`);
this test parses it, walks every module's imports with `ast` (function-level imports
included, relative imports resolved) and fails on an import the table does not allow, on
an import cycle between modules, and on CuPy imported anywhere but engine/gpu/backend.py.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
OURS = ("engine", "converters", "dgq_cli")


def allowed_table() -> dict[str, set[str]]:
    """room -> rooms it may import, from the `| room | may import |` table of ARCHITECTURE.md."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("| room | may import |")
    table = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        room, deps = (c.strip() for c in line.strip("|").split("|")[:2])
        names = re.findall(r"`([\w.]+)`", deps)
        table[room.strip("`")] = set(names)
    return table


def modules() -> dict[str, Path]:
    """Dotted name -> file for every module of ours."""
    out = {"dgq_cli": ROOT / "dgq_cli.py"}
    for pkg in ("engine", "converters"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that `name` imports anywhere in its file (resolved to known module names)."""
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:          # a name inside a module -> that module
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in OURS and t != name:
                found.add(t)
    return found


def room_of(module: str, rooms) -> str | None:
    """The most specific room of the table that holds `module`."""
    best = None
    for r in rooms:
        if module == r or module.startswith(r + "."):
            if best is None or len(r) > len(best):
                best = r
    return best


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_table_covers_every_module(graph):
    """Every module has a room of its own: the `engine` row is the package marker alone, so a
    new engine/foo.py needs its own row (else it would inherit the marker's)."""
    rooms = allowed_table()
    assert {"engine.formats", "engine.io", "engine.model", "engine.gpu", "converters", "dgq_cli"} <= set(rooms)
    homeless = [m for m in graph if room_of(m, rooms) is None or (room_of(m, rooms) == "engine" and m != "engine")]
    assert not homeless, f"modules with no row in docs/ARCHITECTURE.md: {homeless}"


def test_imports_follow_the_table(graph):
    rooms = allowed_table()
    bad = []
    for m, deps in graph.items():
        r = room_of(m, rooms)
        for d in deps:
            rd = room_of(d, rooms)
            if rd != r and rd not in rooms[r]:
                bad.append(f"{m} imports {d} ({r} -> {rd} is not in the table)")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli(graph):
    assert not [m for m, deps in graph.items() if "dgq_cli" in deps]


def test_no_import_cycles(graph):
    """No module reaches itself through imports (a package's __init__ re-exporting its own
    submodules is not a cycle: the submodules must not import the package back)."""
    def parent_init(d, m):
        return m.startswith(d + ".")          # a module's own package __init__ runs before it
    edges = {m: {d for d in deps if not parent_init(d, m)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_only_the_backend_imports_cupy():
    offenders = []
    for m, p in modules().items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "cupy" or n.startswith("cupy.") for n in names) and m != "engine.gpu.backend":
                offenders.append(m)
    assert not offenders, f"CuPy is imported outside engine/gpu/backend.py: {offenders}"


def test_no_imports_by_string():
    """importlib.import_module / __import__ would hide an import from the checks above."""
    found = []
    for m, p in modules().items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("import_module", "__import__"):
                    found.append(f"{m}:{node.lineno}")
    assert not found, f"imports by string: {found}"


def test_the_table_rules(tmp_path):
    """The rules themselves: the package marker grants nothing, a sub-room is not its parent."""
    rooms = {"engine": set(), "engine.io": {"engine.formats"}, "engine.formats": set(), "engine.gpu": {"engine.io"}}
    assert room_of("engine.io.qfile", rooms) == "engine.io"
    assert room_of("engine.newthing", rooms) == "engine"          # -> flagged as homeless above
    assert room_of("converters.x", rooms) is None
    # engine.io may import formats but not gpu; gpu may import io but not formats directly
    assert room_of("engine.formats.dg", rooms) in rooms["engine.io"]
    assert room_of("engine.gpu.model", rooms) not in rooms["engine.io"]
    assert room_of("engine.formats.dg", rooms) not in rooms["engine.gpu"]


def test_the_checker_catches_a_forbidden_import(tmp_path):
    """The walker sees function-level and relative imports (else the tests above prove nothing)."""
    f = tmp_path / "llama.py"
    f.write_text("def f():\n    from ..gpu import model\n    from converters import dgq\n")
    known = {"engine.gpu.model", "engine.gpu", "converters.dgq", "converters"}
    assert imports_of("engine.model.llama", f, known) == {"engine.gpu.model", "converters.dgq"}
