"""bench/patch_from.py: a --patch file whose edits rebuild an earlier tree's inlined modules from
today's, headers included, checked against kernels.apply_edits (what the benches apply)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from engine.gpu import kargs, kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import patch_from  # noqa: E402


def write(d: Path, files: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


HEADER = "#pragma once\n__device__ int f(int x) {\n    return x + 1;\n}\n"
MODULE = '#include "h.cuh"\n__global__ void k(int* o, int n) {\n    o[0] = f(n);\n    o[1] = n;\n    o[2] = n;\n}\n'


def test_edits_rebuild_the_old_modules_through_a_header(tmp_path):
    old = write(tmp_path / "old", {"h.cuh": HEADER, "a.cu": MODULE, "b.cu": "__global__ void z() {}\n"})
    new = write(tmp_path / "new", {"h.cuh": HEADER.replace("x + 1", "x + 2"),
                                   "a.cu": MODULE.replace("o[2] = n;", "o[2] = 2 * n;"),
                                   "b.cu": "__global__ void z() {}\n"})
    item = patch_from.patch_between(new, old, "prev", "wgmma_cluster_max=0")
    assert item["name"] == "prev" and item["ab"] == "wgmma_cluster_max=0"
    assert {e[0] for e in item["edits"]} == {"a.cu"}            # a header's change is its module's
    with patch_from.cuda_dir(new):
        got = kernels.apply_edits("a.cu", kernels.source("a.cu"), item["edits"])
    with patch_from.cuda_dir(old):
        assert got == kernels.source("a.cu")
    for _, before, _ in item["edits"]:
        with patch_from.cuda_dir(new):
            assert kernels.source("a.cu").count(before) == 1


def test_refuses_no_change_and_different_modules(tmp_path):
    old = write(tmp_path / "old", {"h.cuh": HEADER, "a.cu": MODULE})
    with pytest.raises(ValueError, match="nothing to patch"):
        patch_from.patch_between(old, old, "same")
    new = write(tmp_path / "new", {"h.cuh": HEADER, "a.cu": MODULE, "c.cu": "__global__ void c() {}\n"})
    with pytest.raises(ValueError, match="different modules"):
        patch_from.patch_between(new, old, "x")


def test_a_repeated_line_gets_the_context_that_makes_it_unique(tmp_path):
    body = "".join(f"    o[{i}] = n;\n    o[9] = n;\n" for i in range(4))
    old = write(tmp_path / "old", {"a.cu": f"__global__ void k(int* o, int n) {{\n{body}}}\n"})
    new = write(tmp_path / "new", {"a.cu": f"__global__ void k(int* o, int n) {{\n"
                                          f"{body.replace('o[2] = n;', 'o[2] = 7;')}}}\n"})
    item = patch_from.patch_between(new, old, "p")
    with patch_from.cuda_dir(new):
        assert kernels.apply_edits("a.cu", kernels.source("a.cu"), item["edits"]) == (old / "a.cu").read_text()


def test_a_real_kernel_change_makes_a_valid_bench_patch(tmp_path):
    """Today's cuda/ against a copy with one line of the wgmma kernel changed: the patch passes
    kargs.check_edits (same kernels, same parameters), as `--patch` will check it."""
    old = tmp_path / "cuda"
    shutil.copytree(kernels.CUDA_DIR, old)
    src = (old / "gemm_a8w4_sm90.cu").read_text()
    assert src.count("cp_async_wait<PD - 1>();") == 1
    (old / "gemm_a8w4_sm90.cu").write_text(src.replace("cp_async_wait<PD - 1>();", "cp_async_wait<0>();"))
    item = patch_from.patch_between(kernels.CUDA_DIR, old, "wait0")
    assert [e[0] for e in item["edits"]] == ["gemm_a8w4_sm90.cu"]
    assert kargs.check_edits(item["edits"])
    out = tmp_path / "p.json"
    out.write_text(json.dumps([item]))
    from engine.bench.e2e import read_patches
    assert [p[0] for p in read_patches(out)] == ["wait0"]


def test_main_refuses_an_unknown_revision(capsys):
    assert patch_from.main(["no-such-revision-xyz"]) == 2
    assert "patch_from:" in capsys.readouterr().err
