"""bench/sass_scan.py: the SASS parser and the division finder on a listing in nvdisasm's format,
and, where nvcc and nvdisasm are installed, a real compile of one kernel file."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sass_scan  # noqa: E402

LISTING = """
\t.section\t.text._Z1fPii,"ax",@progbits
.text._Z1fPii:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   I2F.U32.RP R5, R2 ;
        /*0020*/                   MUFU.RCP R5, R5 ;
        /*0030*/                   F2I.FTZ.U32.TRUNC.NTZ R3, R5 ;
.L_x_1:
        /*0040*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0050*/                   I2F.U32.RP R6, R2 ;
        /*0060*/                   MUFU.RCP R6, R6 ;
        /*0070*/                   F2I.FTZ.U32.TRUNC.NTZ R7, R6 ;
        /*0080*/                   MUFU.RCP R8, R9 ;
        /*0090*/                   ISETP.GE.AND P0, PT, R4, R2, PT ;
        /*00a0*/              @!P0 BRA `(.L_x_1) ;
        /*00b0*/                   EXIT ;
\t.section\t.text._Z1gv,"ax",@progbits
.text._Z1gv:
        /*0000*/                   EXIT ;
"""


def test_parse_and_divisions_inside_loops():
    fns = sass_scan.parse_sass(LISTING)
    assert set(fns) == {"_Z1fPii", "_Z1gv"}
    assert sum(a >= 0 for a, _ in fns["_Z1fPii"]) == 12
    # two integer divisions (MUFU.RCP of an I2F.RP's result), one inside the loop .L_x_1 .. BRA;
    # the reciprocal at 0x80 is of another register: a float division, not counted
    assert sass_scan.divisions(fns["_Z1fPii"]) == (2, 1)
    assert sass_scan.divisions(fns["_Z1gv"]) == (0, 0)


def test_longest_inner_loop_counts_its_instructions():
    fns = sass_scan.parse_sass(LISTING)
    assert sass_scan.loops(fns["_Z1fPii"]) == [(0x40, 0xa0)]
    assert sass_scan.longest_inner_loop(fns["_Z1fPii"]) == 7          # 0x40 .. 0xa0, the branch included
    assert sass_scan.longest_inner_loop(fns["_Z1gv"]) == 0


def test_serialized_wgmma_warning_names_its_kernel():
    err = ("ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are serialized "
           "due to non wgmma instructions defining input registers of a wgmma between start and end of the "
           "pipeline stage in the function '_Z15gemm_a8w4_wgmmaILi32EEvv'\nptxas info    : Used 64 registers")
    assert sass_scan._SERIAL_RE.findall(err) == ["_Z15gemm_a8w4_wgmmaILi32EEvv"]


def test_patch_items_edit_the_compiled_source():
    """--patch FILE.json:NAME: that item's edits are in the source nvcc compiles; a name the file
    lacks is one clear error."""
    root = Path(__file__).resolve().parents[1]
    edits = sass_scan.patch_edits(f"{root}/bench/patches/attn-2026-12-04.json:attn-2026-12-04")
    expr = ["attn_decode_gqa<signed char, 128>"]
    assert "mma_f16_quad" not in sass_scan.instantiation_source("attention.cu", expr, edits)
    assert "mma_f16_quad" in sass_scan.instantiation_source("attention.cu", expr)
    with pytest.raises(SystemExit, match="attn-2026-12-04"):
        sass_scan.patch_edits(f"{root}/bench/patches/attn-2026-12-04.json:nope")


def test_instantiation_source_takes_each_address():
    src = sass_scan.instantiation_source("quant_act.cu", ["quant_act_dynamic<float>", "quant_act_static<float>"])
    assert "void* __dgq_inst_0 = (void*)&quant_act_dynamic<float>;" in src
    assert "void* __dgq_inst_1 = (void*)&quant_act_static<float>;" in src


@pytest.mark.skipif(not shutil.which("nvcc") or not (shutil.which("nvdisasm") or
                    (shutil.which("nvcc") and (Path(shutil.which("nvcc")).resolve().parent / "nvdisasm").is_file())),
                    reason="needs nvcc and nvdisasm")
def test_scan_compiles_every_instantiation_of_a_file(tmp_path):
    files = {f: e for f, e in sass_scan.kernel_files().items() if f == "quant_act.cu"}
    rows = sass_scan.scan(files, "sm_90a", sass_scan.find_nvdisasm(None), tmp_path)
    assert len(rows) == len(files["quant_act.cu"])
    assert all(r["instructions"] > 0 and r["registers"] for r in rows)
