"""A wheel is a complete install: built from this checkout and installed into a fresh virtual
environment, it holds every module, the dgq-* commands and every CUDA source the kernel loader
needs (engine/gpu/cuda/ in the wheel, mapped from cuda/ by setup.cfg).

How the test builds and installs, and why:
- The build inputs are copied to a temporary folder and the wheel is built there: an in-tree
  setuptools build writes build/ and *.egg-info into the checkout, and a stale build/lib would
  carry deleted modules into the wheel.
- `pip wheel --no-deps --no-build-isolation`: the build backend is this environment's
  setuptools (with `wheel` for setuptools < 70.1; both are in the `test` extra), so the test
  downloads nothing and takes seconds. Without them it skips and says what to install.
- The virtual environment is made without pip and without system site-packages (no download,
  no copy of pip: a fraction of a second); a .pth file appends the folders that hold this
  environment's install_requires (numpy for engine.gpu, the rest for the dgq-* commands) and
  pip (which installs the wheel). A .pth line adds a folder but does not run that folder's .pth
  files, so the editable install of this very checkout stays out; the wheel goes in with
  --ignore-installed (pip would otherwise see this checkout's dgq-engine 0.1.0 through those
  folders and skip it). The venv's python then runs with -I from a folder outside the checkout
  (neither the checkout nor PYTHONPATH on sys.path), and the test asserts that engine, the
  kernel loader and the sources it reads all lie inside the venv.
- The kernel names come from the code: every "<name>.cu" literal in engine/gpu/*.py (what is
  handed to kernels.module/kernels.function) and every file of cuda/. The installed
  kernels.source() expands each one's includes, which needs no CuPy, and must give the text the
  checkout's loader gives.
"""
from __future__ import annotations

import configparser
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from engine.gpu import kernels

REPO = Path(__file__).resolve().parent.parent
CUDA = REPO / "cuda"
# Not build inputs, and possibly large (models, corpora, other venvs): left out of the copy.
_NOT_COPIED = (".*", "build", "dist", "*.egg-info", "__pycache__", "*.q.safetensors")
_NOT_COPIED_AT_ROOT = {"out", "venv", "tests", "bench", "docs"}
_CU_LITERAL = re.compile(r"""["']([\w.-]+\.cu)["']""")
_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"', re.M)


def kernel_sources() -> list[str]:
    """Every .cu the GPU package names, and every source file of cuda/ (headers included)."""
    named = {m.group(1) for py in (REPO / "engine" / "gpu").glob("*.py")
             for m in _CU_LITERAL.finditer(py.read_text())}
    assert named, "no kernel source named in engine/gpu/*.py: has the loader's calling convention changed?"
    missing = sorted(n for n in named if not (CUDA / n).is_file())
    assert not missing, f"engine/gpu names kernel sources that cuda/ lacks: {missing}"
    return sorted(named | {p.name for p in CUDA.iterdir() if p.suffix in (".cu", ".cuh")})


def _setup_cfg(section: str, key: str) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return [line.strip() for line in cfg[section][key].strip().splitlines()]


def console_scripts() -> list[str]:
    lines = _setup_cfg("options.entry_points", "console_scripts")
    return sorted(line.split("=")[0].strip() for line in lines)


def install_requires() -> list[str]:
    return [re.match(r"[\w.-]+", line).group(0) for line in _setup_cfg("options", "install_requires")]


# Modules that belong to an extra: a module-level import there needs that extra, and the command
# that imports the module says what to install when it is missing (dgq-serve).
EXTRA_MODULES = {"engine/serve/app.py": "serve"}


def _dist_names(lines: list[str]) -> set[str]:
    return {re.match(r"[\w.-]+", line).group(0).lower().replace("_", "-") for line in lines}


def test_every_module_level_import_is_a_declared_requirement():
    """What a module of the package imports at its top must come with `pip install -e .` (or
    with the extra that module belongs to): scipy, imported by converters/gptq.py, was only in
    the test extra, so `dgq-quantize` failed after the README's own install. Function-level
    imports are the optional ones (CuPy, scikit-learn) and say what to install themselves."""
    import ast
    dists_of = importlib.metadata.packages_distributions()
    base = _dist_names(_setup_cfg("options", "install_requires"))
    wrong = []
    for path in sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "converters").rglob("*.py"), REPO / "dgq_cli.py"]):
        rel = path.relative_to(REPO).as_posix()
        allowed = base | (_dist_names(_setup_cfg("options.extras_require", EXTRA_MODULES[rel]))
                          if rel in EXTRA_MODULES else set())
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top in ("__future__", "engine", "converters", "dgq_cli"):
                    continue
                dists = {d.lower().replace("_", "-") for d in dists_of.get(top, [])}
                if not dists & allowed:
                    wrong.append(f"{rel}: import {top} ({', '.join(sorted(dists)) or 'not installed'})")
    assert not wrong, "module-level imports missing from setup.cfg install_requires:\n" + "\n".join(wrong)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _can_build_without_isolation() -> bool:
    try:  # the version, without importing setuptools (it would patch distutils in this process)
        major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return False
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    if not _can_build_without_isolation():
        pytest.skip("the wheel build needs setuptools>=70.1, or wheel: pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    patterns = shutil.ignore_patterns(*_NOT_COPIED)

    def ignore(folder, names):
        return patterns(folder, names) | (_NOT_COPIED_AT_ROOT & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, src, ignore=ignore)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp / "dist", src], cwd=tmp)
    (whl,) = (tmp / "dist").glob("dgq_engine-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(built_wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(venv folder, its python) with the wheel installed and nothing of the checkout visible."""
    env = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env)
    py = env / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    where = _run([py, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    purelib = Path(where.stdout.strip())
    borrowed = {str(importlib.metadata.distribution(d).locate_file("")) for d in install_requires() + ["pip"]}
    assert str(REPO) not in borrowed
    (purelib / "_borrowed_from_test_env.pth").write_text("".join(f"{d}\n" for d in sorted(borrowed)))
    _run([py, "-I", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", built_wheel], cwd=env)
    return env, py


def test_wheel_holds_every_module_and_kernel_source(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    modules = [p.relative_to(REPO).as_posix() for top in ("engine", "converters")
               for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts]
    missing = sorted(m for m in modules + ["dgq_cli.py"] if m not in names)
    assert not missing, f"the wheel lacks {missing} (a subpackage missing from setup.cfg [options] packages?)"
    missing = sorted(n for n in kernel_sources() if f"engine/gpu/cuda/{n}" not in names)
    assert not missing, f"the wheel lacks the kernel sources {missing} (setup.cfg [options.package_data])"
    assert not any(n.startswith("cuda/") for n in names), "a top-level cuda/ would collide with cuda-python"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(built_wheel).read(entry_points).decode()
    assert all(f"{s} = " in text for s in console_scripts()), text


def test_installed_wheel_finds_every_kernel_source(installed, tmp_path):
    env, py = installed
    names = kernel_sources()
    probe = (
        "import importlib.util, json, sys\n"
        "import engine, converters\n"
        "from engine.gpu import kernels\n"
        "print(json.dumps({'files': [engine.__file__, converters.__file__, kernels.__file__,\n"
        "                            importlib.util.find_spec('dgq_cli').origin, str(kernels.CUDA_DIR)],\n"
        "                  'cupy': 'cupy' in sys.modules,\n"
        "                  'sources': {n: kernels.source(n) for n in json.loads(sys.argv[1])}}))\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = json.loads(_run([py, "-I", "-c", probe, json.dumps(names)], cwd=elsewhere).stdout)
    env_real = env.resolve()
    for f in got["files"]:
        assert Path(f).resolve().is_relative_to(env_real), f"{f} is not the wheel's copy (venv {env})"
    assert Path(got["files"][-1]).parts[-3:] == ("engine", "gpu", "cuda")
    assert not got["cupy"], "importing engine.gpu.kernels imported CuPy"
    for n in names:
        text = got["sources"][n]
        assert not _QUOTED_INCLUDE.search(text), f"{n}: a quoted #include was left unexpanded"
        assert digest(text) == digest(kernels.source(n)), f"{n}: the wheel's source differs from cuda/{n}"


def test_installed_wheel_runs_the_commands(installed, tmp_path):
    env, _ = installed
    bindir = env / ("Scripts" if os.name == "nt" else "bin")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in console_scripts():
        r = _run([bindir / script, "--help"], cwd=tmp_path, env=clean)
        assert "Usage:" in r.stdout, f"{script} --help:\n{r.stdout}"


def test_checkout_loader_reads_cuda_dir():
    """From a checkout (the editable install) the sources come from cuda/ at the root."""
    if Path(kernels.__file__).resolve().is_relative_to(REPO):
        assert kernels.CUDA_DIR == CUDA
    for n in kernel_sources():
        assert not _QUOTED_INCLUDE.search(kernels.source(n)), n


def test_missing_source_names_where_it_looked():
    with pytest.raises(kernels.KernelError) as e:
        kernels.source("no_such_kernel.cu")
    assert str(kernels.CUDA_DIR) in str(e.value) and "no_such_kernel.cu" in str(e.value)
