"""`python -m engine.bench e2e --patch FILE.json`: kernels compiled from edited source beside the
landed ones in one process (kargs.patched, kernels.EDITS). No GPU: a fake CuPy records what would
compile; the example patches in bench/patches/ must still apply to today's sources."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.bench.e2e import decode_variants, read_patch_files, read_patch_item, read_patches
from engine.gpu import attention, backend, kargs, kernels, ops, tuning

ROOT = Path(__file__).resolve().parents[1]
# a real edit of today's sources (bench/patches/loads.json's first)
GEMV_L1 = ("gemm_a8w4.cu", "ld.global.nc.L1::no_allocate.L2::256B.v4.u32", "ld.global.nc.L2::256B.v4.u32")


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "patches").glob("*.json")), ids=lambda p: p.name)
def test_example_patches_apply_to_todays_sources(path):
    for name, edits, _ab in read_patches(path):
        for edit in edits:
            code = kernels.source(edit[0])
            assert kernels.apply_edits(edit[0], code, [edit]) != code, (path.name, name, edit)


def test_patch_files_repeat_and_names_stay_unique(tmp_path):
    """--patch is repeatable (e2e, gemm-tune, gemv-wb): the items of every file, in order; an item
    name that two files share is refused, since rows are named by it."""
    attn, wait = ROOT / "bench/patches/attn-2026-12-04.json", ROOT / "bench/patches/wgmma-wait-first.json"
    got = [n for n, _e, _ab in read_patch_files([str(attn), str(wait)])]
    assert got == ["attn-2026-12-04", "wgmma-wait-first"]
    assert [n for n, _e, _ab in read_patch_files(str(wait))] == ["wgmma-wait-first"]
    with pytest.raises(ValueError, match="also in"):
        read_patch_files([str(wait), str(wait)])


def test_attn_decode_ablate_variants_apply_to_todays_attention():
    """bench/attn_decode_ablate.py patches pieces of cuda/attention.cu out by exact text: each must
    still occur once (it exits naming the piece otherwise), and each variant must differ."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import attn_decode_ablate
    src = kernels.source("attention.cu")
    variants = attn_decode_ablate.variants(src)
    assert variants.pop("base") == src
    assert all(v != src for v in variants.values()), [k for k, v in variants.items() if v == src]


def test_attn_decode_ablate_takes_e2e_patch_files():
    """bench/attn_decode_ablate.py --patch: the item of bench/patches/attn-2026-12-04.json (the
    kernel before whole mma quads, the int8 bias and the step's copy addresses) becomes a variant of
    today's attention.cu whose shared-memory layout (GqLayout, which the bench sizes from today's
    source) is unchanged; a patch of another file is refused before any GPU time."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import attn_decode_ablate
    src = kernels.source("attention.cu")
    got = attn_decode_ablate.patched_variants(kernels, src, ROOT / "bench" / "patches" / "attn-2026-12-04.json")
    assert set(got) == {"attn-2026-12-04"}
    code = got["attn-2026-12-04"]
    assert code != src and attn_decode_ablate.layout_of(code) == attn_decode_ablate.layout_of(src)
    for today in ("mma_f16_quad", "const int rowb = Hkv * DT * ES;"):
        assert today in src and today not in code, today
    with pytest.raises(SystemExit, match="attention.cu alone"):
        attn_decode_ablate.patched_variants(kernels, src, ROOT / "bench" / "patches" / "loads.json")


def test_session_compiles_the_patch_dgq_test_patch_names():
    """tests/conftest.py: under DGQ_TEST_PATCH=FILE.json:NAME every kernel of the session compiles
    from that item's edited source; unset, from the landed source."""
    import os
    spec = os.environ.get("DGQ_TEST_PATCH", "")
    if not spec:
        assert kernels.EDITS == ()
        return
    want = read_patch_item(spec)[1]
    assert tuple(kernels.EDITS[-len(want):]) == tuple(want)


@pytest.mark.parametrize("spec, ok", [("bench/patches/attn-2026-12-04.json:attn-2026-12-04", True),
                                      ("bench/patches/attn-2026-12-04.json:nope", False),
                                      ("bench/patches/missing.json:attn-2026-12-04", False)])
def test_dgq_test_patch_runs_a_session_on_a_patch_item(spec, ok):
    import os
    import subprocess
    import sys
    env = {**os.environ, "DGQ_TEST_PATCH": spec}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_bench_patches.py::test_session_compiles_the_patch_dgq_test_patch_names"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    else:
        assert r.returncode != 0 and "DGQ_TEST_PATCH" in r.stdout + r.stderr, r.stdout + r.stderr


def test_apply_edits_replaces_every_occurrence_of_its_file_only():
    code = "a x b x"
    assert kernels.apply_edits("f.cu", code, [("f.cu", "x", "y"), ("g.cu", "a", "z")]) == "a y b y"
    with pytest.raises(kernels.KernelError, match="not in its inlined source"):
        kernels.apply_edits("f.cu", code, [("f.cu", "nowhere", "y")])


def item(name, *edits):
    return {"name": name, "edits": [list(e) for e in edits]}


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    ([{"name": "a"}], "item 0"),
    ([item("a", ("common.cuh", "x", "y"))], "item 0"),                      # a header: name its module
    ([item("a", ("gemm_a8w4.cu", "", "y"))], "item 0"),
    ([item("a", GEMV_L1), item("", GEMV_L1)], "item 1"),
    ([item("a", GEMV_L1), item("a", GEMV_L1)], "item 1"),                   # the same name twice
    ([item("a", ("gemm_a8w4.cu", GEMV_L1[1], GEMV_L1[1]))], "item 0"),      # no change
    ([item("a", ("gemm_a8w4_sm9.cu", "x", "y"))], "missing"),               # no such file
    ([item("a", ("gemm_a8w4.cu", "no such text", "y"))], "not in its inlined source"),
    ([item("a", ("gemm_a8w4.cu", "int M, int N, int R, int C", "int M, int N, int R, long long C"))],
     "parameters"),                                                          # launches would mis-pass C
    ("not json", "cannot read"),
])
def test_read_patches_refuses_bad_files_before_any_gpu_time(tmp_path, bad, match):
    p = tmp_path / "p.json"
    p.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ValueError, match=match):
        read_patches(p)


def test_read_patches_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_patches(tmp_path / "missing.json")


class FakeKernel:
    """A compiled kernel of the fake CuPy: remembers the source it came from and its launches."""

    def __init__(self, code):
        self.code, self.calls, self.max_dynamic_shared_size_bytes, self.num_regs = code, [], 0, 168
        self.shared_size_bytes = 8192                     # static shared memory

    def __call__(self, grid, block, args, shared_mem=0, cluster=None):
        self.calls.append(args)


class FakeModule:
    def __init__(self, code, options, name_expressions):
        self.code = code

    def compile(self):
        pass

    def get_function(self, expr):
        return FakeKernel(self.code)


@pytest.fixture
def fake_gpu(monkeypatch):
    """kernels/kargs with a fake CuPy and a one-kernel source for every file; fresh caches."""
    monkeypatch.setattr(backend, "cupy_or_none", lambda: SimpleNamespace(RawModule=FakeModule))
    monkeypatch.setattr(kernels, "arch_flag", lambda: "sm_90a")
    monkeypatch.setattr(kernels, "source", lambda name: f"// {name}\n__global__ void k(int n) {{ int v = 1; }}\n")
    monkeypatch.setattr(kernels.launch, "Kernel", lambda raw: raw)
    for mod, attr in ((kernels, "_MODULES"), (kernels, "_FUNCS"), (kargs, "_LAUNCHES"), (kargs, "_PARSED"),
                      (kargs, "_ORDER"), (kargs, "_BOUND")):
        monkeypatch.setattr(mod, attr, {})


def test_launches_go_landed_edited_landed(fake_gpu):
    kf = kargs.KernelFile("fused.cu", ("k",))       # the fake source's one kernel
    go = kargs.launch                               # (a local alias: tests/test_kernel_args.py checks real names)
    go(kf, "k", (1,), (1,), n=1)
    landed = kernels.function("fused.cu", "k", kf.exprs)
    with kargs.patched([("fused.cu", "v = 1", "v = 2")]) as used:
        assert kernels.EDITS == (("fused.cu", "v = 1", "v = 2"),) and used == set()
        go(kf, "k", (1,), (1,), n=2)
        edited = kernels.function("fused.cu", "k", kf.exprs)
        assert used == {"fused.cu"}
        assert "v = 2" in edited.code and "v = 1" not in edited.code
        assert kernels.function("attention.cu", "k", ("k",)).code.count("v = 1")     # another file: as landed
    go(kf, "k", (1,), (1,), n=3)                                          # the landed kernel again
    assert [a[0] for a in landed.calls] == [1, 3] and [a[0] for a in edited.calls] == [2]
    assert kernels.EDITS == () and kernels.function("fused.cu", "k", kf.exprs) is landed
    assert kernels.source_hash("fused.cu") == __import__("hashlib").sha256(landed.code.encode()).hexdigest()
    with pytest.raises(RuntimeError):                                               # restored on an error too
        with kargs.patched([("fused.cu", "v = 1", "v = 3")]):
            raise RuntimeError
    assert kernels.EDITS == () and kernels.EDITS_USED == set()
    go(kf, "k", (1,), (1,), n=4)
    assert [a[0] for a in landed.calls] == [1, 3, 4]


def test_edited_kernels_get_their_shared_memory_opt_in(fake_gpu, monkeypatch):
    """set_smem and attn_decode_gqa's launch cache: the edited kernel of an expression is another
    function, so it must get its own max_dynamic_shared_size_bytes."""
    a, b = FakeKernel(""), FakeKernel("")
    ops.set_smem(a, 96 * 1024)
    ops.set_smem(b, 96 * 1024)
    assert a.max_dynamic_shared_size_bytes == b.max_dynamic_shared_size_bytes == 96 * 1024
    c = FakeKernel("")                      # under 48 KiB dynamic, past it with the static 8 KiB: opted in too
    ops.set_smem(c, 44 * 1024)
    assert c.max_dynamic_shared_size_bytes == 44 * 1024
    d = FakeKernel("")
    ops.set_smem(d, 32 * 1024)
    assert d.max_dynamic_shared_size_bytes == 0
    monkeypatch.setattr(kernels, "device_info", lambda: {"name": "fake", "cc": 90, "sm_count": 132,
                                                         "l2_bytes": 50 << 20, "smem_optin": 232448})
    monkeypatch.setattr(attention, "_GQA_LAUNCH", {})
    launched = []
    monkeypatch.setattr(kargs, "launch", lambda kf, expr, grid, block, shared_mem=0, **a: launched.append(expr))
    args = dict(kc=np.zeros((1,), np.float16), D=128, Hq=32, Hkv=32)
    attention._decode_gqa("attn_decode", 1, 129, args)
    expr = "attn_decode_gqa<__half, 128>"
    landed = kernels.function("attention.cu", expr, attention.ATTN.exprs)
    with kargs.patched([("attention.cu", "v = 1", "v = 2")]):
        attention._decode_gqa("attn_decode", 1, 129, args)
        edited = kernels.function("attention.cu", expr, attention.ATTN.exprs)
    assert edited is not landed and launched == [expr, expr]
    assert landed.max_dynamic_shared_size_bytes == edited.max_dynamic_shared_size_bytes == 96 * 1024


def test_patch_rows_in_the_ab_variants(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([item("w-l1", GEMV_L1)]))
    rows = decode_variants(patches=read_patches(p))
    assert [r[0] for r in rows] == ["patch w-l1"]
    with rows[0][1]() as used:
        assert kernels.EDITS == (GEMV_L1,) and used == set()
    assert kernels.EDITS == ()


def test_a_patch_may_set_tuning_fields_too(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([dict(item("w-l1", GEMV_L1), ab="wb.resident=0")]))
    (name, edits, ab), = read_patches(p)
    assert ab == {"wb.resident": False}
    (row, ctx), = decode_variants(patches=[(name, edits, ab)])
    before = tuning.WB_TUNE.resident
    with ctx() as used:
        assert kernels.EDITS == (GEMV_L1,) and used == set() and tuning.WB_TUNE.resident is False
    assert kernels.EDITS == () and tuning.WB_TUNE.resident is before
    p.write_text(json.dumps([dict(item("w-l1", GEMV_L1), ab="no_such_field=1")]))
    with pytest.raises(ValueError, match="w-l1"):
        read_patches(p)


@pytest.mark.parametrize("heads", ["3,2,128", "8,4,96", "8,x,128"])
def test_attn_decode_ablate_refuses_a_shape_it_cannot_run(heads, monkeypatch):
    """--heads HQ,HKV,D (another attention shape than Llama-2-7B's): checked before CuPy loads."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(ROOT / "bench/attn_decode_ablate.py"), "--heads", heads],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--heads" in r.stderr and "Traceback" not in r.stderr, r.stderr
