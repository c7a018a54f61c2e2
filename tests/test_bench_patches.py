"""`python -m engine.bench e2e --patch FILE.json`: kernels compiled from edited source beside the
landed ones in one process (kargs.patched, kernels.EDITS). No GPU: a fake CuPy records what would
compile; the example patches in bench/patches/ must still apply to today's sources."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.bench.e2e import decode_variants, read_patches
from engine.gpu import backend, kargs, kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "patches").glob("*.json")), ids=lambda p: p.name)
def test_example_patches_apply_to_todays_sources(path):
    for name, edits in read_patches(path):
        for edit in edits:
            code = kernels.source(edit[0])
            assert kernels.apply_edits(edit[0], code, [edit]) != code, (path.name, name, edit)


def test_apply_edits_replaces_every_occurrence_of_its_file_only():
    code = "a x b x"
    assert kernels.apply_edits("f.cu", code, [("f.cu", "x", "y"), ("g.cu", "a", "z")]) == "a y b y"
    with pytest.raises(kernels.KernelError, match="not in its inlined source"):
        kernels.apply_edits("f.cu", code, [("f.cu", "nowhere", "y")])


@pytest.mark.parametrize("bad, match", [
    ("{}", "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ('[{"name": "a"}]', "item 0"),
    ('[{"name": "a", "edits": [["common.cuh", "x", "y"]]}]', "item 0"),
    ('[{"name": "a", "edits": [["f.cu", "", "y"]]}]', "item 0"),
    ('[{"name": "a", "edits": [["f.cu", "x", "y"]]}, {"name": "", "edits": [["f.cu", "x", "y"]]}]', "item 1"),
    ("not json", "cannot read"),
])
def test_read_patches_refuses_bad_files(tmp_path, bad, match):
    p = tmp_path / "p.json"
    p.write_text(bad)
    with pytest.raises(ValueError, match=match):
        read_patches(p)
    with pytest.raises(ValueError, match="cannot read"):
        read_patches(tmp_path / "missing.json")


class FakeModule:
    def __init__(self, code, options, name_expressions):
        self.code = code

    def compile(self):
        pass

    def get_function(self, expr):
        return ("fn", expr, self.code)


class FakeCupy:
    RawModule = FakeModule


def test_patched_compiles_edited_modules_beside_the_landed_ones(monkeypatch):
    monkeypatch.setattr(backend, "cupy_or_none", lambda: FakeCupy)
    monkeypatch.setattr(kernels, "arch_flag", lambda: "sm_90a")
    monkeypatch.setattr(kernels, "source", lambda name: f"// {name}\nint v = 1;\n")
    monkeypatch.setattr(kernels, "_MODULES", {})
    monkeypatch.setattr(kernels, "_FUNCS", {})
    monkeypatch.setattr(kernels.launch, "Kernel", lambda raw: raw)
    exprs = ("k",)
    landed = kernels.function("fused.cu", "k", exprs)
    kargs._LAUNCHES[("sentinel",)] = None
    with kargs.patched([("fused.cu", "v = 1", "v = 2")]):
        assert kernels.EDITS == (("fused.cu", "v = 1", "v = 2"),)
        assert not kargs._LAUNCHES                              # launches look their kernels up again
        edited = kernels.function("fused.cu", "k", exprs)
        assert "v = 2" in edited[2] and "v = 1" not in edited[2]
        assert kernels.function("attention.cu", "k", exprs)[2].endswith("v = 1;\n")   # another file: as landed
        assert kernels.function("fused.cu", "k", exprs) is edited
    assert kernels.EDITS == ()
    assert kernels.function("fused.cu", "k", exprs) is landed   # the landed kernel again, not recompiled
    assert kernels.source_hash("fused.cu") is not None
    with pytest.raises(RuntimeError):                           # restored on an error too
        with kargs.patched([("fused.cu", "v = 1", "v = 3")]):
            raise RuntimeError
    assert kernels.EDITS == ()
    with pytest.raises(ValueError, match="source edit"):
        with kargs.patched([("common.cuh", "a", "b")]):
            pass


def test_patch_rows_in_the_ab_variants(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"name": "w-l1", "edits": [["gemm_a8w4.cu", "a", "b"]]}]))
    rows = decode_variants(patches=read_patches(p))
    assert [r[0] for r in rows] == ["patch w-l1"]
    with rows[0][1]():
        assert kernels.EDITS == (("gemm_a8w4.cu", "a", "b"),)
    assert kernels.EDITS == ()
