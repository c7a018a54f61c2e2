"""Launchers of cuda/fused.cu: the row kernels (cuda/rows.cuh) and the fp16 / INT8 GEMVs.

Name triplets (reference ↔ kernel ↔ launcher): the NumPy model's RMSNorm + formats.quantize_act_ref ↔
add_rmsnorm_quant; silu·up + quantize ↔ silu_mul_quant; quantize_act_ref ↔ quant_rows,
quant_amax; x @ w.T ↔ gemv_f16_m<MT> (matmul_f16) and gemv_w8_m<MT> (matmul_w8).
The families' extras (engine/model/llama.py layer_forward, compiled only for a model that uses
them: FAMILY): gelu_tanh·up + quantize ↔ gelu_mul_quant; the sandwich norm h + rmsnorm(y)·w ↔
norm_add_rows; y + b ↔ add_bias; embed_tokens with config.embed_scale ↔ embed_rows.

A row kernel handles one row of `width` values per CTA, or per cluster of CTAs on sm_90
(cuda/rows.cuh RowTeam); `row_launch` picks the instantiation <PER, CL, VEC> and the block.
The launchers take the kernel's parameters as keywords (gpu/kargs.py checks the names).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import cublas, kargs, kernels
from .backend import BackendError, cupy_or_none
from .tuning import GEMV_F16, ROW_VARIANTS, ROWS

MODE = {"static": 0, "dynamic": 1, "fp16": 2}     # cuda/rows.cuh MODE_STATIC, MODE_DYNAMIC, MODE_FP16
ROW_KERNELS = ("add_rmsnorm_quant", "silu_mul_quant", "quant_rows")
ACT_ROW_KERNELS = ("silu_mul_quant", "gelu_mul_quant")     # the MLP's activation·up rows (ROWS.act_per)
_V = ROW_VARIANTS
FUSED_EXPRS = tuple(f"{k}<{p}, {cl}, 1>" for k in ROW_KERNELS for cl in _V.clusters
                    for p in (_V.pers if cl == 1 else _V.cluster_pers)) + tuple(
    f"{k}<{p}, 1, {min(p, _V.max_vec)}>" for k in ROW_KERNELS for p in _V.pers if p >= 4
) + ("quant_amax<float>", "quant_amax<__half>")
FUSED = kargs.KernelFile("fused.cu", FUSED_EXPRS)
# The families' kernels: a second module of fused.cu, compiled on the first launch (a Llama model
# never builds it). The row kernels come in the instantiations of ROW_KERNELS.
FAMILY_ROW_KERNELS = ("gelu_mul_quant", "norm_add_rows")
FAMILY_EXPRS = tuple(f"{k}<{p}, {cl}, 1>" for k in FAMILY_ROW_KERNELS for cl in _V.clusters
                     for p in (_V.pers if cl == 1 else _V.cluster_pers)) + tuple(
    f"{k}<{p}, 1, {min(p, _V.max_vec)}>" for k in FAMILY_ROW_KERNELS for p in _V.pers if p >= 4
) + ("add_bias<__half>", "embed_rows<__half>")
FAMILY = kargs.KernelFile("fused.cu", FAMILY_EXPRS)

# the parameter holding each row kernel's width, and the arrays it reads or writes row by
# row (wide accesses need each to start 32-byte aligned; sx and the like are read or
# written one value at a time)
ROW_WIDTH = {"add_rmsnorm_quant": "H", "silu_mul_quant": "I", "quant_rows": "K",
             "gelu_mul_quant": "I", "norm_add_rows": "H"}
ROW_ARRAYS = {"add_rmsnorm_quant": ("h", "y", "w", "x8", "xh", "emb"), "silu_mul_quant": ("gu", "x8", "mh"),
              "quant_rows": ("x", "x8"), "gelu_mul_quant": ("gu", "x8", "mh"),
              "norm_add_rows": ("h", "y", "w", "acc", "s8")}


@dataclass(frozen=True)
class RowShape:
    """A row kernel launch chosen by hand (tests): clusters of cl CTAs, at most cap threads a
    row where cap < 1024, and wide accesses where possible (row_launch)."""
    cl: int = 1
    cap: int = 1024
    vec: bool = False


def row_cluster(width: int, cta_width: int | None = None) -> int:
    """CTAs per row for a row kernel on sm_90: the smallest cluster that leaves each CTA at
    most `cta_width` (default ROWS.cta_width) values."""
    cta_width = ROWS.cta_width if cta_width is None else cta_width
    for cl in _V.clusters:
        if -(-width // cl) <= cta_width:
            return cl
    return _V.clusters[-1]


def row_launch(name: str, width: int, cl: int = 1, cap: int = 1024, vec: bool = False) -> tuple[str, int]:
    """(kernel expression, block size) of a row kernel (cuda/rows.cuh) for rows of `width`
    shared by clusters of `cl` CTAs: the smallest PER with PER · cap ≥ ⌈width / cl⌉, and
    ⌈width / (cl · PER)⌉ threads in whole warps. cap < 1024 (many rows: prefill) takes PER up
    to ROWS.per_many, past which the 1024-thread rule applies (or, for ACT_ROW_KERNELS,
    ROWS.act_per where set). vec (one CTA a row, and the
    caller has checked that every row starts 32-byte aligned): VEC = min(PER, ROWS.vec) when
    PER ≥ 4 and VEC divides the width, else 1."""
    per, threads, v = row_dims(name, width, cl, cap, vec)
    return f"{name}<{per}, {cl}, {v}>", threads


def row_dims(name: str, width: int, cl: int = 1, cap: int = 1024, vec: bool = False) -> tuple[int, int, int]:
    """(PER, threads, VEC) of row_launch."""
    if cl not in _V.clusters:
        raise BackendError(f"{name} runs on clusters of {_V.clusters} CTAs, not {cl}")
    share = -(-width // cl)
    pers = _V.pers if cl == 1 else _V.cluster_pers
    per = next((p for p in pers if p * cap >= share and p <= ROWS.per_many), None) if cap < 1024 else None
    if per is None and cap < 1024 and name in ACT_ROW_KERNELS and ROWS.act_per in pers \
            and ROWS.act_per * 1024 >= share:
        per = ROWS.act_per
    per = per or next((p for p in pers if p * 1024 >= share), None)
    if per is None:
        raise BackendError(f"the GPU row kernels take rows of up to {pers[-1] * 1024 * cl} values on "
                           f"clusters of {cl}, got {width}")
    threads = min(1024, 32 * -(-share // (32 * per)))
    v = min(per, ROWS.vec) if vec and cl == 1 and per >= 4 else 1
    v = v if width % v == 0 else 1
    return per, threads, v


_ROW_LAUNCHES: dict[tuple, tuple[str, int]] = {}


def _row_launch(name: str, width: int, cl: int, cap: int, vec: bool) -> tuple[str, int]:
    """row_launch, memoized on its arguments and the tuning fields it reads (a launch's host
    time: ~1 µs of Python per call otherwise; ROW_VARIANTS is frozen, ROWS may be patched)."""
    key = (name, width, cl, cap, vec, ROWS.per_many, ROWS.vec, ROWS.act_per)
    hit = _ROW_LAUNCHES.get(key)
    if hit is None:
        hit = _ROW_LAUNCHES[key] = row_launch(name, width, cl, cap, vec)
    return hit


def _row_shape(name: str, rows: int, shape: RowShape | None, args: dict) -> tuple[int, int, bool]:
    """(cl, cap, vec) of a row kernel over `rows` rows. shape None: the engine's choice. A
    cluster shares a row while the rows alone leave SMs idle (decode); a prefill's thousands of
    rows fill the GPU one CTA each (H100, 7B, 2048 tokens: silu_mul_quant on clusters of 8 took
    293 µs a launch, 7.7× its bytes at copy bandwidth), with wide accesses where every array
    starts 32-byte aligned and every int8 row 8-byte aligned."""
    if shape is not None:
        return shape.cl, shape.cap, shape.vec
    width = args[ROW_WIDTH[name]]
    info = kernels.device_info()
    few = rows < info["sm_count"]
    cl = row_cluster(width, ROWS.cta_width_by_kernel.get(name)) if info["cc"] >= 90 and few else 1
    # fp16 mode (and a kernel without modes) writes no int8 row
    ld = None if args.get("mode", MODE["fp16"]) == MODE["fp16"] else args["ld"]
    cp = cupy_or_none()
    vec = not few and (ld is None or ld % 8 == 0) and all(
        args[a].data.ptr % 32 == 0 for a in ROW_ARRAYS[name] if isinstance(args[a], cp.ndarray))
    return cl, 1024 if few else ROWS.threads_many, vec


def _row(name: str, rows: int, shape: RowShape | None, args: dict):
    """One row kernel over `rows` rows (_row_shape)."""
    cl, cap, vec = _row_shape(name, rows, shape, args)
    expr, threads = _row_launch(name, args[ROW_WIDTH[name]], cl, cap, vec)
    kargs.launch(FUSED, expr, (rows * cl,), (threads,), **args)


def _family_row(name: str, rows: int, shape: RowShape | None, args: dict) -> tuple[int, int, int, int]:
    """(PER, CL, VEC, threads) of a FAMILY row kernel, chosen as _row chooses."""
    cl, cap, vec = _row_shape(name, rows, shape, args)
    per, threads, v = row_dims(name, args[ROW_WIDTH[name]], cl, cap, vec)
    return per, cl, v, threads


@kargs.launcher("add_rmsnorm_quant")
def add_rmsnorm_quant(rows: int, shape: RowShape | None = None, **args):
    """h += y (y None: no add; tok given: h = emb[tok]), then RMSNorm(h)·w quantized into
    x8/sx (modes static, dynamic) or written to xh (fp16); zero: a (rows,) uint32 array set to 0."""
    _row("add_rmsnorm_quant", rows, shape, args)


@kargs.launcher("silu_mul_quant")
def silu_mul_quant(rows: int, shape: RowShape | None = None, **args):
    """silu(gate)·up of gu (rows, 2I) (il: gate|up interleaved per 16 columns), quantized into
    x8/sx, or written to mh (fp16 mode)."""
    _row("silu_mul_quant", rows, shape, args)


@kargs.launcher("quant_rows")
def quant_rows(rows: int, shape: RowShape | None = None, **args):
    """x (rows, K) fp16 quantized into x8 (rows, ld) / sx."""
    _row("quant_rows", rows, shape, args)


@kargs.launcher("quant_amax")
def quant_amax(rows: int, **args):
    """x (rows, K) fp32 or fp16 quantized into x8 (rows, ld) / sx with a known absmax: `amax`
    holds float bits of each row's max |x| (the dynamic scale's source; in static mode it only
    tells a non-finite row), `static_scale` the static scale. No reduction."""
    kind = "float" if args["x"].dtype == np.float32 else "__half"
    kargs.launch(FUSED, f"quant_amax<{kind}>", (-(-args["ld"] // 1024), rows), (256,), **args)


# ------------------------------------------------------------------ the families' kernels (FAMILY)
# Plain functions, not @kargs.launcher: each launch names its keywords (gpu/kargs.py checks them).

def gelu_mul_quant(rows: int, gu, I: int, mode: int, static_scale, x8, ld: int, sx, mh, il: int,
                   shape: RowShape | None = None):
    """silu_mul_quant with GELU (tanh) for SiLU: gelu_tanh(gate)·up of gu (rows, 2I), quantized
    into x8/sx or written to mh (fp16 mode): Gemma's GeGLU."""
    per, cl, v, threads = _family_row("gelu_mul_quant", rows, shape, {"I": I, "mode": mode, "ld": ld, "gu": gu,
                                                                        "x8": x8, "mh": mh})
    kargs.launch(FAMILY, f"gelu_mul_quant<{per}, {cl}, {v}>", (rows * cl,), (threads,), gu=gu, I=I, mode=mode,
                 static_scale=static_scale, x8=x8, ld=ld, sx=sx, mh=mh, il=il)


def norm_add_rows(rows: int, h, y, w, H: int, eps: float, shape: RowShape | None = None, acc=None, sx=None,
                  s8=None):
    """h (rows, H) float32 += RMSNorm(y)·w for y (rows, H) fp16: a sublayer output's norm
    before the residual add (config.sandwich_norm). acc (rows, H) int32 with sx (rows,) and s8
    (≥ H,) float32 instead of y: y = (float(acc)·sx)·s8 in float32, the A8W4 GEMM's output unrounded."""
    args = {"H": H, "h": h, "y": y, "w": w, "acc": acc, "s8": s8}
    per, cl, v, threads = _family_row("norm_add_rows", rows, shape, args)
    kargs.launch(FAMILY, f"norm_add_rows<{per}, {cl}, {v}>", (rows * cl,), (threads,), h=h, y=y, acc=acc, sx=sx,
                 s8=s8, w=w, H=H, eps=eps)


def add_bias(rows: int, y, bias, N: int):
    """y (rows, N) fp16 += bias (N,) float32."""
    kargs.launch(FAMILY, "add_bias<__half>", (rows, -(-N // 256)), (256,), y=y, bias=bias, N=N)


def embed_rows(rows: int, h, emb, tok, H: int, scale: float):
    """h (rows, H) float32 = emb[tok] (fp16 table (V, H)) · scale (config.embed_scale)."""
    kargs.launch(FAMILY, "embed_rows<__half>", (rows, -(-H // 256)), (256,), h=h, emb=emb, tok=tok, H=H,
                 scale=scale)


def f16_capturable(m: int, k: int) -> bool:
    """Whether matmul_f16 of M rows of width K can be captured in a CUDA graph: our GEMV's
    rows, or cuBLAS called through gpu/cublas.py."""
    return (m <= GEMV_F16.max_m and k % 8 == 0) or cublas.available()


def matmul_f16(cp, x, w, out):
    """out (M, N) fp16 = x (M, K) · w (N, K)ᵀ: our GEMV below GEMV_F16.blas_from rows, else
    cuBLAS (gpu/cublas.py, capturable); where that cannot load, the GEMV up to 8 rows and
    cp.matmul past them (eager only).

    Used for the lm_head and the FP16 path's linears, which sit inside the captured decode step.
    w must be a weight (no kernel of the step writes it): the GEMV reads its first rows before
    its PDL wait (cuda/pdl.cuh).
    """
    m, k = x.shape
    n = w.shape[0]
    if m <= GEMV_F16.max_m and k % 8 == 0 and (m < GEMV_F16.blas_from or not cublas.available()):
        mt = next(t for t in GEMV_F16.mts if t >= m)
        kargs.launch(FUSED, f"gemv_f16_m{mt}", (-(-n // GEMV_F16.rows_per_block),), (GEMV_F16.threads,),
                     x=x, w=w, out=out, M=m, N=n, K=k)
    elif not cublas.gemm_f16(cp, x, w, out):
        cp.matmul(x, w.T, out=out)
    return out


def matmul_w8(cp, x, w8, scale, out):
    """out (M, N) fp16 = (x (M, K) fp16 · w8 (N, K)ᵀ int8) · scale[n]: the INT8 lm_head
    (ModelWeights.with_int8_lm_head), our GEMV in slices of up to 8 rows (graph-capturable).
    Each slice streams the whole head: past 8 rows the fp16 head through cuBLAS reads fewer
    bytes (a cuBLAS route for large M is not written yet)."""
    m, k = x.shape
    n = w8.shape[0]
    for r0 in range(0, m, GEMV_F16.max_m):
        r = min(GEMV_F16.max_m, m - r0)
        mt = next(t for t in GEMV_F16.mts if t >= r)
        kargs.launch(FUSED, f"gemv_w8_m{mt}", (-(-n // GEMV_F16.rows_per_block),), (GEMV_F16.threads,),
                     x=x[r0:], w=w8, scale=scale, out=out[r0:], M=r, N=n, K=k)
    return out
