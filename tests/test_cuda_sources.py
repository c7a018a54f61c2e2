"""Constants the Python launchers mirror from cuda/*.cu, *.cuh, read from the sources (no GPU).

Tile and chunk sizes, block sizes, the activation modes, shared-memory sizes and the
instantiations the launchers may name: a change on one side without the other fails here.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from engine.gpu import attention, fused, kargs, kernels, ops, pot_a8, tuning, wb

ROOT = Path(__file__).resolve().parent.parent


def text(name: str) -> str:
    return (ROOT / "cuda" / name).read_text()


def defines(name: str) -> dict[str, int]:
    """`#define NAME <integer>` of one source file."""
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(0x[0-9a-fA-F]+|\d+)\b", text(name), re.M)}


def test_layout_constants():
    d = defines("common.cuh")
    assert (d["DGQ_TILE_N"], d["DGQ_CHUNK_K"], d["DGQ_K_ALIGN"]) == (ops.TILE_N, ops.CHUNK_K, ops.K_ALIGN)


def test_row_modes_and_variants():
    d = defines("rows.cuh")
    assert fused.MODE == {"static": d["MODE_STATIC"], "dynamic": d["MODE_DYNAMIC"], "fp16": d["MODE_FP16"]}
    for k in fused.ROW_KERNELS:       # the three row kernels are templated <PER, CL, VEC>
        assert re.search(rf"template <int PER, int CL, int VEC>\s*__global__[^;{{]*?\b{k}\(", text("fused.cu")), k
    # rows.cuh: a Pack<T, N> moves sizeof(T)·N bytes in one access, and the prefill launches'
    # VEC (max_vec) is documented there as so many bytes a fp16 load and an int8 store
    src = text("rows.cuh")
    assert re.search(r"struct alignas\(sizeof\(T\) \* N\) Pack \{ T e\[N\]; \};", src)
    vec, fp16_bytes, int8_bytes = (int(g) for g in re.search(
        r"VEC = (\d+) \((\d+)-byte fp16 loads, (\d+)-byte int8 stores\)", src).groups())
    max_vec = tuning.ROW_VARIANTS.max_vec
    assert vec == max_vec
    assert fp16_bytes == max_vec * np.dtype(np.float16).itemsize and int8_bytes == max_vec * np.dtype(np.int8).itemsize
    assert tuning.ROWS.vec in (1, tuning.ROW_VARIANTS.max_vec)


def test_attention_constants():
    d = defines("attention.cu")
    a = tuning.ATTENTION
    assert (d["FA_BM"], d["FA_BN"], d["FA_THREADS"]) == (a.prefill_bm, a.prefill_bn, a.threads)
    assert d["DEC_CHUNK"] == a.decode_chunk and d["DEC_WARPS"] * 32 == a.threads
    assert 2 * d["DEC_MAX_D2"] >= max(a.head_dims)
    src = text("attention.cu")
    assert re.search(rf"__launch_bounds__\({a.threads}\) rope_qkv_cache", src)
    assert f"head = blockIdx.y * {a.rope_heads} + (threadIdx.x >> 5)" in src    # a warp a head
    assert a.rope_heads * 32 == a.threads


@pytest.mark.parametrize("d", tuning.ATTENTION.head_dims)
@pytest.mark.parametrize("kv8", [False, True])
def test_flash_attention_shared_memory(d, kv8):
    """attention.prefill_smem against FaSmem<D, KV>::BYTES, evaluated from its constexprs."""
    body = re.search(r"struct FaSmem \{(.*?)\};", text("attention.cu"), re.S).group(1)
    env = {"D": d, "FA_BN": defines("attention.cu")["FA_BN"]}
    for name, expr in re.findall(r"static constexpr int (\w+) = ([^;]+);", body):
        expr = expr.replace("sizeof(KV)", "1" if kv8 else "2")
        expr = re.sub(r"(.+?) \? (.+?) : (.+)", r"(\2) if (\1) else (\3)", expr)
        env[name] = eval(expr, {}, dict(env))  # noqa: S307  (a constexpr of our own source)
    assert env["BYTES"] == attention.prefill_smem(d, kv8)


def test_mma_shared_memory():
    body = text("gemm_a8w4.cu")
    body = body[body.index("gemm_a8w4_mma("):]
    for bm, st in tuning.MMA_CFGS:
        env = {"BM": bm}
        for name, expr in re.findall(r"constexpr int (\w+) = ([^;]+);", body[:body.index("extern __shared__")]):
            if name in ("BK", "X_BYTES", "W_BYTES", "M_BYTES", "STAGE"):
                env[name] = eval(expr, {}, dict(env))  # noqa: S307
        assert st * env["STAGE"] == ops.mma_smem(bm, st)


def test_gemv_f16_buckets_and_block():
    src = text("fused.cu")
    for entry in ("GEMV_F16_ENTRY", "GEMV_W8_ENTRY"):
        mts = tuple(int(m) for m in re.findall(rf"^{entry}\((\d+), \d+\)", src, re.M))
        assert mts == tuning.GEMV_F16.mts, entry
    assert re.search(rf"__launch_bounds__\({tuning.GEMV_F16.threads}\) gemv_f16_m##MT", src)
    assert tuning.GEMV_F16.threads // 32 == tuning.GEMV_F16.rows_per_block     # one output row a warp


def test_wb_constants():
    """gemv_wb.cu's tile is the tile layout's, its blocks the launcher's."""
    from engine.formats import tiles
    d = defines("gemv_wb.cu")
    assert (d["WB_TILE_K"], d["WB_ROWS"]) == (tuning.WB.tile_k, tuning.WB.rows) == (tiles.TILE_K, tiles.TILE_ROWS)
    assert d["WB_STEPS"] == tiles.STEPS
    assert (d["WB_WARPS"], d["WB_GEMM_WARPS"], d["WB_GEMM_NT"]) == (tuning.WB.warps, tuning.WB.gemm_warps,
                                                                   tuning.WB.gemm_nt)


def test_pot_a8_constants():
    """gemv_pot_a8.cu's chunk, step, tile and code table are formats/pot_a8.py's."""
    from engine.formats import pot_a8 as fmt
    d = defines("gemv_pot_a8.cu")
    assert (d["PA8_CHUNK"], d["PA8_WORDS"], d["PA8_STEP"], d["PA8_GROUP"], d["PA8_TILE_ROWS"]) == (
        fmt.CHUNK, fmt.WORDS, fmt.STEP, fmt.GROUP, fmt.TILE_ROWS)
    assert (d["PA8_LUT_LO"], d["PA8_LUT_HI"], d["PA8_LOW3"]) == (fmt.LUT_LO, fmt.LUT_HI, fmt.LOW3)
    assert all(fmt.TILE_ROWS % rb == 0 for rb, _ in pot_a8.VARIANTS) and pot_a8.DEFAULT in pot_a8.VARIANTS


def test_sample_block():
    assert defines("sample.cu")["SAMPLE_THREADS"] == ops.SAMPLE_THREADS


@pytest.mark.parametrize("kf", [fused.FUSED, attention.ATTN, ops.GEMV_FILE, ops.MMA_FILE, ops.WGMMA_FILE,
                                ops.QUANT_FILE, wb.WB_FILE, pot_a8.POT_A8_FILE], ids=lambda kf: kf.exprs[0])
def test_every_instantiation_names_a_kernel_of_its_file(kf):
    names = kargs.parse_kernels(kernels.source(kf.file))
    src = text(kf.file)
    for expr in kf.exprs:
        name = expr.split("<")[0].strip()
        assert name in names, expr
        if "<" not in expr:                            # a plain kernel: no template to instantiate
            assert not re.search(rf"template\s*<[^>]*>\s*__global__[^;{{]*?\b{name}\(", src, re.S), expr
            continue
        targs = expr[expr.index("<") + 1:-1]
        tmpl = re.search(rf"template\s*<([^>]*)>\s*__global__[^;{{]*?\b{name}\(", src, re.S)
        assert tmpl, f"{name} is not a template kernel of cuda/{kf.file}"
        nparams = len(tmpl.group(1).split(","))
        defaults = tmpl.group(1).count("=")
        assert nparams - defaults <= len(targs.split(",")) <= nparams, expr
