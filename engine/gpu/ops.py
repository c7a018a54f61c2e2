"""Launchers for the CUDA kernels in cuda/ and the GPU weight layout they read.

Name triplets (reference ↔ kernel ↔ launcher): formats.quantize_act_ref ↔ cuda/quant_act.cu ↔ quantize_act_*;
formats.gemm_a8w4_ref + epilogue_ref ↔ cuda/gemm_a8w4.cu, cuda/gemm_a8w4_sm90.cu ↔ gemm_a8w4;
sampling.sample ↔ cuda/sample.cu ↔ sample_rows. Every launch passes the kernel's parameters
by name (gpu/kargs.py); the dispatch choices are tuning.GEMM, the instantiations tuning.*_CFGS.

The GPU layout of a "dg" layer (documented in full in cuda/common.cuh) is built
here once, in NumPy, by `pack_host`; `unpack_host` inverts it and is what the
CPU test round-trips. Everything that touches CuPy is imported lazily, so this
module imports (and the layout code runs) on a machine without a GPU.

Public API (all arrays CuPy unless noted):
  pack_for_gpu(ql)                         -> PackedA8W4   (upload once at load time)
  quantize_act_static(x, scale, k_pad=)    -> x8 (M, k_pad) int8
  quantize_act_dynamic(x, k_pad=)          -> x8 (M, k_pad) int8, sx (M,) f32
  quantize_act(x, layer)                   -> x8, sx        (layer.act decides)
  gemm_a8w4(x8, sx, layer, kernel=)        -> y (M, N) fp16
  gemm_a8w4_acc(x8, layer, kernel=)        -> acc (M, N) int32   (tests)
  linear_a8w4(x, layer)                    -> y (M, N) fp16   (quantize + GEMM)
  gemv_a8w4_silu(x8, sx, layer, out, amax) -> out (1, N/2) f32 = silu(gate)·up, amax (gate|up rows
                                              interleaved by interleave_rows at load)
  sample_rows(logits, params, seq, pos, out, lens=, rows=)  out (B,) int32 ids  (sample_params packs)
Kernels are chosen by M (`choose_kernel`): "gemv" (M ≤ 8 on sm_90, else 16: gemv_max_m), "wgmma" (sm_90),
"mma" (any sm_80+), and their configurations by tuning.GEMM, unless gpu/choice.py's policy is
learned or exhaustive (`_learned`; docs/PERFMODEL.md). One CUDA stream at a time may use the
split-K workspace.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .. import formats
from ..formats import dg
from ..model import sampling
from . import backend, choice, kargs, kernels, launch, perfmodel, tuning
from .tuning import (GEMM, GEMV_CFGS, GEMV_DP_CFGS, GEMV_DP_SILU, GEMV_MT, GEMV_SILU_U,  # noqa: F401
                     GEMV_WIDE, MMA_CFGS, WGMMA_CFGS, WGMMA_KEYS, gemv_choice, gemv_targs)

TILE_N = 16          # rows per packed row tile (cuda/common.cuh DGQ_TILE_N)
CHUNK_K = 64         # k per 16-byte lane vector (DGQ_CHUNK_K)
K_ALIGN = 128        # Kp is a multiple of this and of the group (DGQ_K_ALIGN)
THREADS = 256


class CudaOpError(ValueError):
    """An input the CUDA ops cannot take: wrong dtype, shape, layer kind or group size."""


# ----------------------------------------------------------------------------- host layout

@dataclass
class PackedHost:
    """The GPU layout in NumPy (see cuda/common.cuh for the meaning of each array)."""
    n: int
    k: int
    group: int
    n_pad: int
    k_pad: int
    qw: np.ndarray      # (Np/16, Kp/64, 32, 4) uint32
    meta: np.ndarray    # (Np/16, Kp/group, 8) uint32
    s8: np.ndarray      # (Np,) float32, zero in padded rows


def padded_dims(n: int, k: int, group: int) -> tuple[int, int]:
    """(Np, Kp) of the GPU layout; the group must be 64·2^j so chunk→group is a shift."""
    if not dg.gpu_group(group):
        raise CudaOpError(f"the CUDA kernels need a group size of 64·2^j (64, 128, 256, ...), got {group}")
    ka = max(K_ALIGN, group)
    return -(-n // TILE_N) * TILE_N, -(-k // ka) * ka


def pack_host(ql: formats.QuantLinear) -> PackedHost:
    """Canonical "dg" layer -> GPU layout (NumPy). Pads K with codes = zero point."""
    if ql.kind != "dg":
        raise CudaOpError(f"the A8W4 kernels run dual-grained ('dg') layers, got kind {ql.kind!r}")
    n, k, group = ql.out_features, ql.in_features, ql.group
    n_pad, k_pad = padded_dims(n, k, group)
    G, g_pad = formats.n_groups(k, group), k_pad // group
    z = np.zeros((n_pad, g_pad), np.uint8)
    s = np.ones((n_pad, g_pad), np.uint8)
    z[:n, :G] = ql.qzeros
    s[:n, :G] = ql.gscale
    q = np.repeat(z, group, axis=1)                       # (Np, Kp) padded codes = zero point
    q[:n, :k] = ql.codes()
    R, C = n_pad // TILE_N, k_pad // CHUNK_K
    # row = 16r + 8hh + g ; k = 64c + 32s + 16half + 4t + i
    q8 = q.reshape(R, 2, 8, C, 2, 2, 4, 4)
    byte = q8[:, :, :, :, :, 0] | (q8[:, :, :, :, :, 1] << 4)   # (r, hh, g, c, s, t, i)
    byte = byte.transpose(0, 3, 2, 5, 4, 1, 6)                  # (r, c, g, t, s, hh, i)
    qw = np.ascontiguousarray(byte).reshape(R, C, 32, 16).view("<u4").reshape(R, C, 32, 4)
    zs = z.reshape(R, 2, 8, g_pad)
    ss = s.reshape(R, 2, 8, g_pad)
    mb = np.stack([ss[:, 0], zs[:, 0], ss[:, 1], zs[:, 1]], axis=-1)   # (r, g, G, 4 bytes)
    mb = mb.transpose(0, 2, 1, 3)                                      # (r, G, g, 4 bytes)
    meta = np.ascontiguousarray(mb).view("<u4").reshape(R, g_pad, 8)
    s8 = np.zeros((n_pad,), np.float32)
    s8[:n] = ql.cscale
    return PackedHost(n, k, group, n_pad, k_pad, qw, meta, s8)


def interleave_rows(n: int) -> np.ndarray:
    """Row order of a fused gate|up layer (2I rows, I % 8 == 0) for the SiLU GEMV: each 16-row
    tile holds gate channels 8r..8r+7, then up channels 8r..8r+7 (cuda/gemm_a8w4.cu SILU).
    Returns the source row of each packed row."""
    if n % 16:
        raise CudaOpError(f"gate|up interleaving takes 2I rows with I % 8 == 0, got {n}")
    half = n // 2
    c = np.arange(half).reshape(-1, 8)
    return np.concatenate([c, c + half], axis=1).reshape(-1)


def unpack_host(ph: PackedHost, crop: bool = True):
    """GPU layout -> (codes (N,K) u8, qzeros (N,G) u8, gscale (N,G) u8); crop=False keeps padding."""
    R, C = ph.n_pad // TILE_N, ph.k_pad // CHUNK_K
    g_pad = ph.k_pad // ph.group
    b = np.ascontiguousarray(ph.qw).view(np.uint8).reshape(R, C, 8, 4, 2, 2, 4)  # (r, c, g, t, s, hh, i)
    b = b.transpose(0, 5, 2, 1, 4, 3, 6)                                         # (r, hh, g, c, s, t, i)
    q = np.stack([b & 0x0F, b >> 4], axis=5)                                     # (r, hh, g, c, s, half, t, i)
    q = q.reshape(ph.n_pad, ph.k_pad)
    mb = np.ascontiguousarray(ph.meta).view(np.uint8).reshape(R, g_pad, 8, 4)
    s = np.stack([mb[..., 0], mb[..., 2]], axis=1).transpose(0, 1, 3, 2).reshape(ph.n_pad, g_pad)
    z = np.stack([mb[..., 1], mb[..., 3]], axis=1).transpose(0, 1, 3, 2).reshape(ph.n_pad, g_pad)
    if not crop:
        return q, z, s
    G = formats.n_groups(ph.k, ph.group)
    return q[:ph.n, :ph.k], z[:ph.n, :G], s[:ph.n, :G]


# ----------------------------------------------------------------------------- device layer

@dataclass
class PackedA8W4:
    """A "dg" layer resident on the GPU in the kernels' layout."""
    n: int
    k: int
    group: int
    n_pad: int
    k_pad: int
    qw: object          # cupy (Np/16, Kp/64, 32, 4) uint32
    meta: object        # cupy (Np/16, Kp/group, 8) uint32
    s8: object          # cupy (Np,) float32
    act: str = "dynamic"
    ascale: float | None = None

    @property
    def gshift(self) -> int:
        return (self.group // CHUNK_K).bit_length() - 1

    def nbytes(self) -> int:
        return int(self.qw.nbytes + self.meta.nbytes + self.s8.nbytes)


def _cp():
    cp = backend.cupy_or_none()
    if cp is None:
        raise CudaOpError("CUDA ops need a GPU and CuPy (engine.gpu.backend.has_gpu() is False)")
    return cp


def pack_for_gpu(ql: formats.QuantLinear, check: bool = True) -> PackedA8W4:
    """Repack a canonical "dg" layer into the kernel layout and upload it (once, at load time)."""
    if check:
        formats.check_no_overflow(ql)   # the dequant trick is exact only under the guard
    cp = _cp()
    ph = pack_host(ql)
    return PackedA8W4(ph.n, ph.k, ph.group, ph.n_pad, ph.k_pad, cp.asarray(ph.qw), cp.asarray(ph.meta),
                      cp.asarray(ph.s8), ql.act, ql.ascale)


def random_packed(n: int, k: int, group: int = 128, seed: int = 0, act: str = "dynamic") -> PackedA8W4:
    """A valid random layer generated directly on the GPU (benchmarks: no host packing).

    Any nibble is a valid code once S ≤ 8 (|q − z|·S ≤ 15·8 < 127); padding is not
    zero here, which only matters for bit-exactness checks, not for timing.
    """
    cp = _cp()
    n_pad, k_pad = padded_dims(n, k, group)
    R, C, g_pad = n_pad // TILE_N, k_pad // CHUNK_K, k_pad // group
    rs = cp.random.RandomState(seed)
    qw = rs.randint(0, 1 << 16, size=(R, C, 32, 8), dtype=np.int32).astype(cp.uint16).view(cp.uint32)
    sb = rs.randint(1, 9, size=(R, g_pad, 8, 2), dtype=np.int32).astype(cp.uint32)
    zb = rs.randint(0, 16, size=(R, g_pad, 8, 2), dtype=np.int32).astype(cp.uint32)
    meta = sb[..., 0] | (zb[..., 0] << 8) | (sb[..., 1] << 16) | (zb[..., 1] << 24)
    s8 = (rs.random_sample(n_pad, dtype=cp.float32) * 1e-3 + 1e-4).astype(cp.float32)
    return PackedA8W4(n, k, group, n_pad, k_pad, qw, meta.astype(cp.uint32), s8, act,
                      1.0 if act == "static" else None)


# ----------------------------------------------------------------------------- kernel registry

_B = ("false", "true")
_GEMV = tuple(f"gemm_a8w4_gemv<{gemv_targs(*a)}>" for a in
              [(mt, rw, u, 8, False, o) for mt, cfgs in GEMV_CFGS.items() for rw, u in cfgs for o in (False, True)]
              + [(mt, rw, u, 16, False, o) for mt, cfgs in GEMV_WIDE.items() for rw, u in cfgs for o in (False, True)]
              + [(1, 1, u, 8, False, False, True) for u in GEMV_SILU_U]
              + [(1, rw, u, nw, True, o) for rw, u, nw in GEMV_DP_CFGS for o in (False, True)]
              + [(1, *GEMV_DP_SILU, True, False, True)])
_MMA = tuple(f"gemm_a8w4_mma<{bm},{st},{o}>" for bm, st in MMA_CFGS for o in _B)
_WGMMA = tuple(f"gemm_a8w4_wgmma<{bt},{st},{nwg},{wpf},{ovl},{o}>"
               for bt, st, nwg, wpf, ovl in WGMMA_CFGS for o in _B)
_QUANT = ("quant_act_static<u16>", "quant_act_static<float>",
          "quant_act_dynamic<u16>", "quant_act_dynamic<float>")
GEMV_FILE = kargs.KernelFile("gemm_a8w4.cu", _GEMV)
MMA_FILE = kargs.KernelFile("gemm_a8w4.cu", _MMA)
WGMMA_FILE = kargs.KernelFile("gemm_a8w4_sm90.cu", _WGMMA)
QUANT_FILE = kargs.KernelFile("quant_act.cu", _QUANT)
SAMPLE_FILE = kargs.KernelFile("sample.cu", ())


wgmma_bucket = tuning.wgmma_bucket


def _gemv_cfg(m: int, mt: int, r: int, cfg: dict) -> tuple[int, int, int, bool]:
    """(RW, U, NW, dp4a) of a GEMV call over r row tiles (tuning.gemv_choice)."""
    few = r <= GEMM.gemv_few_tiles_per_sm * kernels.device_info()["sm_count"]
    try:
        return gemv_choice(m, mt, few, cfg)
    except ValueError as e:
        raise CudaOpError(str(e)) from None


def has_wgmma() -> bool:
    return kernels.device_info()["cc"] == 90


def gemv_mt(m: int) -> int:
    """The GEMV's token tiles (n8 each) for M rows."""
    return 1 if m <= 8 else 2 if m <= 16 else 4


def gemv_max_m() -> int:
    """The most rows `auto` runs on the GEMV on this device (tuning.gemv_bound)."""
    return tuning.gemv_bound(has_wgmma())


def choose_kernel(m: int) -> str:
    if m <= gemv_max_m():
        return "gemv"
    if GEMM.use_wgmma and has_wgmma():
        return "wgmma"
    return "mma"


def kernels_for(m: int) -> list[str]:
    """Every kernel that can run this M on this device (tests run all of them)."""
    ks = ["mma"]
    if m <= 8 * max(GEMV_MT):
        ks.insert(0, "gemv")
    if has_wgmma():
        ks.append("wgmma")
    return ks


# ----------------------------------------------------------------------------- activations

def _check_x(x, name="x"):
    cp = _cp()
    if not isinstance(x, cp.ndarray) or x.ndim != 2:
        raise CudaOpError(f"{name} must be a 2-D CuPy array, got {type(x).__name__} "
                          f"{getattr(x, 'shape', None)}")
    if x.dtype not in (np.float16, np.float32):
        raise CudaOpError(f"{name} must be float16 or float32, got {x.dtype}")
    if x.strides[1] != x.itemsize:
        x = cp.ascontiguousarray(x)
    return x


def _quant_launch(x, k_pad):
    x = _check_x(x)
    m, k = x.shape
    k_pad = k if k_pad is None else int(k_pad)
    if k_pad < k:
        raise CudaOpError(f"k_pad ({k_pad}) must be at least K ({k})")
    suffix = "u16" if x.dtype == np.float16 else "float"
    return x, m, k, k_pad, suffix, x.strides[0] // x.itemsize


def quantize_act_static(x, scale: float, k_pad: int | None = None):
    """x (M, K) fp16/fp32 -> x8 (M, k_pad) int8 = clamp(rint(x / scale)), zeros past K."""
    cp = _cp()
    x, m, k, k_pad, sfx, ldx = _quant_launch(x, k_pad)
    s = float(np.float32(scale))
    if not (np.isfinite(s) and s > 0):
        raise CudaOpError(f"the static activation scale must be positive and finite, got {scale!r}")
    out = cp.empty((m, k_pad), dtype=cp.int8)
    total = m * -(-k_pad // 4)
    if total:
        blocks = min(-(-total // THREADS), kernels.device_info()["sm_count"] * 16)
        kargs.launch(QUANT_FILE, f"quant_act_static<{sfx}>", (blocks,), (THREADS,),
                     x=x, out=out, scale=s, M=m, K=k, ldx=ldx, ldo=k_pad)
    return out


def quantize_act_dynamic(x, k_pad: int | None = None):
    """x (M, K) -> (x8 (M, k_pad) int8, sx (M,) f32) with per-token scale max|x|/127."""
    cp = _cp()
    x, m, k, k_pad, sfx, ldx = _quant_launch(x, k_pad)
    out = cp.empty((m, k_pad), dtype=cp.int8)
    sx = cp.empty((m,), dtype=cp.float32)
    if m:
        kargs.launch(QUANT_FILE, f"quant_act_dynamic<{sfx}>", (m,), (THREADS,),
                     x=x, out=out, sx=sx, M=m, K=k, ldx=ldx, ldo=k_pad)
    return out, sx


def quantize_act(x, layer: PackedA8W4):
    """Quantize per the layer's activation mode, padded to the layer's Kp."""
    cp = _cp()
    if layer.act == "static":
        x8 = quantize_act_static(x, layer.ascale, k_pad=layer.k_pad)
        return x8, cp.full((x8.shape[0],), np.float32(layer.ascale), dtype=cp.float32)
    if layer.act == "dynamic":
        return quantize_act_dynamic(x, k_pad=layer.k_pad)
    raise CudaOpError(f"activation mode {layer.act!r} has no A8W4 kernel")


# ----------------------------------------------------------------------------- GEMM

_WS: dict = {}


def _workspace(n_ints: int, n_tiles: int):
    """Split-K partials and per-tile counters (zeroed once; the kernels re-arm them)."""
    cp = _cp()
    dev = cp.cuda.Device().id
    ws = _WS.get(dev)
    if ws is None or ws[0].size < n_ints or ws[1].size < n_tiles:
        ws = (cp.empty((max(n_ints, 1 << 20),), dtype=cp.int32),
              cp.zeros((max(n_tiles, 4096),), dtype=cp.int32))
        _WS[dev] = ws
    return ws


def _prep_x8(x8, layer: PackedA8W4):
    cp = _cp()
    if not isinstance(x8, cp.ndarray) or x8.ndim != 2 or x8.dtype != np.int8:
        raise CudaOpError(f"x8 must be a 2-D int8 CuPy array, got {type(x8).__name__} "
                          f"{getattr(x8, 'dtype', None)} {getattr(x8, 'shape', None)}")
    m, k = x8.shape
    if k == layer.k_pad and x8.flags.c_contiguous:
        return x8
    if k not in (layer.k, layer.k_pad):
        raise CudaOpError(f"x8 has {k} columns; the layer takes K={layer.k} (or padded {layer.k_pad})")
    xp = cp.zeros((m, layer.k_pad), dtype=cp.int8)
    xp[:, :k] = x8
    return xp


def wgmma_cluster_tile(bt: int, nwg: int, wpf: int) -> bool:
    """Whether gemm_a8w4_wgmma<bt, ., nwg, wpf, ..> can sum split K in a cluster (cuda/
    gemm_a8w4_sm90.cu WgmmaCluster, which says why only these)."""
    return wpf == 0 and (bt <= 64 or (bt == 128 and nwg == 2))


def _split_cluster(splits: int, tail_splits: int, fn=None, threads: int = 0, smem: int = 0,
                   tiles: int = 0, tail_from: int | None = None) -> tuple | None:
    """The cluster (1, splits, 1) whose CTAs sum a wgmma tile's K splits in distributed shared
    memory (GEMM.wgmma_cluster_max), or None: the workspace turnstile. Never with a split tail
    (tail_splits > 1, or tail_from short of `tiles`). With fn given, only where all `tiles`
    clusters are resident at once (launch.max_active_clusters): a cluster's CTAs must share a
    GPC, and a grid split to one wave of blocks can need two waves of clusters."""
    if not (tail_splits == 1 and (tail_from is None or tail_from == tiles)
            and 1 < splits <= min(GEMM.wgmma_cluster_max, 8) and launch.clusters_available()):
        return None
    cluster = (1, splits, 1)
    if fn is not None and launch.max_active_clusters(fn, threads, smem, cluster) < tiles:
        return None
    return cluster


def _splits(tiles: int, kt: int, blocks_per_sm: int) -> int:
    return perfmodel.auto_splits(tiles, kt, blocks_per_sm, kernels.device_info()["sm_count"])


def mma_smem(bm: int, stages: int) -> int:
    """Dynamic shared memory of gemm_a8w4_mma<BM, STAGES>: STAGES × (X_BYTES + W_BYTES + M_BYTES),
    an activation tile of BM rows × 128 bytes, 8 row tiles × 2 chunks of weights and of meta."""
    return stages * (bm * 128 + 8 * 2 * 512 + 8 * 2 * 32)


_SMEM_SET: dict = {}


def set_smem(fn, smem: int):
    """Let kernel fn use `smem` bytes of dynamic shared memory where that and its static shared
    memory pass the 48 KiB default (once a kernel and size: the same expression compiled from
    edited source, kargs.patched, is another fn)."""
    if smem <= _SMEM_SET.get(fn, 0):
        return
    if smem + int(fn.shared_size_bytes) > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    _SMEM_SET[fn] = smem


@dataclass(frozen=True)
class Geometry:
    """The arguments R (row tiles), C (K chunks), Gp (groups), gshift and ldx (= Kp) that
    every A8W4 kernel takes, of a packed layer."""
    R: int
    C: int
    Gp: int
    gshift: int
    ldx: int


def _geometry(layer: PackedA8W4) -> Geometry:
    return Geometry(layer.n_pad // TILE_N, layer.k_pad // CHUNK_K, layer.k_pad // layer.group, layer.gshift,
                    layer.k_pad)


def _learned(x8, sx, layer: PackedA8W4, kernel: str, cfg, out_i32: bool, gemv_only: bool):
    """(kernel, cfg) from gpu/choice.py for an "auto" call without overrides when the policy
    is learned or exhaustive; the call's own (kernel, cfg) when the table decides."""
    m = x8.shape[0]
    if kernel != "auto" or cfg or out_i32 or m == 0 or not choice.active():
        return kernel, cfg
    timer = None
    if choice.STATE.policy == "exhaustive" and not launch._STATE.get("capturing") and not gemv_only:
        def timer(kern, c):
            cp = _cp()
            y = cp.empty((m, layer.n), dtype=cp.float16)
            _run_gemm(x8, sx, layer, False, kern, c, y)            # compiles, sizes the workspace
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            for _ in range(3):
                _run_gemm(x8, sx, layer, False, kern, c, y)
            e1.record()
            e1.synchronize()
            return cp.cuda.get_elapsed_time(e0, e1) / 3
    got = choice.pick(m, layer.n, layer.k, layer.group, gemv_only, timer)
    return got if got is not None else (kernel, cfg)


_PLANS: list = []     # the memos of the open plan_scope blocks, innermost last


@contextlib.contextmanager
def plan_scope():
    """Within the block, gemm_a8w4 keeps each call's launch (the kernel and its tile, the splits
    and grid, shared memory, the arguments other than x8, sx, out and resid) by the layer, M and
    the call's kernel and cfg, and later calls of the same layer and M, or of another layer of
    the same shape, reuse it: a prefill's 32 layers work out 4 launches instead of 128 (the host's
    ~20 µs a GEMM call, bench/host_gemm.py). Settings, the GEMM policy and kernel source edits
    (kargs.patched) must not change inside the block (CudaModel's prefill pass holds one)."""
    _PLANS.append({})
    try:
        yield
    finally:
        _PLANS.pop()


def _plan_key(layer: PackedA8W4, m: int, kernel: str, cfg: dict | None, resid) -> tuple:
    """A plan_scope key: what _run_gemm's choices read from a call (the layer's shape, not the
    layer: its arrays are swapped in at launch). Lists in cfg (a tail) count as tuples."""
    items = None if not cfg else tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))
    return (layer.n, layer.k, layer.group, layer.n_pad, layer.k_pad, m, kernel, items, resid is not None)


def _planned(memo, key, run, layer, x8, sx, out, resid):
    """run(layer, x8, sx, out, resid) launches a GEMM call; kept in memo under key (plan_scope)
    for the later calls of its shape."""
    run(layer, x8, sx, out, resid)
    if memo is not None:
        memo[key] = run
    return out


def _run_gemm(x8, sx, layer: PackedA8W4, out_i32: bool, kernel: str, cfg: dict | None, out=None, resid=None):
    cp = _cp()
    x8 = _prep_x8(x8, layer)
    m = x8.shape[0]
    n = layer.n
    dtype = cp.int32 if out_i32 else cp.float16
    if resid is not None:
        if not (isinstance(resid, cp.ndarray) and resid.dtype == np.float32 and resid.shape == (m, n)
                and resid.flags.c_contiguous):
            raise CudaOpError(f"resid must be a C-contiguous ({m}, {n}) float32 CuPy array")
        kernel, cfg = _learned(x8, sx, layer, kernel, cfg, out_i32, True)
        # the GEMV up to GEMM.gemv_max_m rows even where `auto` runs wgmma from fewer (gemv_max_m())
        kernel = "gemv" if kernel == "auto" and m <= GEMM.gemv_max_m else kernel
        if kernel != "gemv":
            raise CudaOpError(f"the residual add runs in the GEMV kernel (M ≤ {GEMM.gemv_max_m}), not for M={m}")
        out = resid                              # a valid pointer: with resid the kernel writes only resid
    elif out is None:
        out = cp.empty((m, n), dtype=dtype)
    elif not (isinstance(out, cp.ndarray) and out.dtype == dtype and out.shape == (m, n) and out.flags.c_contiguous):
        raise CudaOpError(f"out must be a C-contiguous ({m}, {n}) {np.dtype(dtype)} CuPy array")
    if m == 0 or n == 0:
        return out
    if out_i32:
        sx = cp.empty((1,), dtype=cp.float32)
    else:
        if not isinstance(sx, cp.ndarray) or sx.dtype != np.float32 or sx.shape != (m,):
            raise CudaOpError(f"sx must be a ({m},) float32 CuPy array, got "
                              f"{getattr(sx, 'dtype', None)} {getattr(sx, 'shape', None)}")
    memo = _PLANS[-1] if _PLANS and not out_i32 else None
    key = None
    if memo is not None:
        key = _plan_key(layer, m, kernel, cfg, resid)      # the call's own kernel and cfg
        plan = memo.get(key)
        if plan is not None:
            plan(layer, x8, sx, out, resid)
            return out
    if resid is None:
        kernel, cfg = _learned(x8, sx, layer, kernel, cfg, out_i32, False)
    cfg = dict(cfg or {})
    kernel = choose_kernel(m) if kernel == "auto" else kernel
    g = _geometry(layer)
    R, C = g.R, g.C
    o = _B[int(out_i32)]
    if kernel == "gemv":
        mt = cfg.get("mt", gemv_mt(m))
        if m > 8 * mt or mt not in GEMV_CFGS:
            raise CudaOpError(f"the GEMV kernel takes M ≤ {8 * max(GEMV_MT)}, got {m}")
        rw, u, nw, dp = _gemv_cfg(m, mt, R, cfg)
        targs = gemv_targs(mt, rw, u, nw, dp, out_i32)

        def run(layer, x8, sx, out, resid):
            kargs.launch(GEMV_FILE, f"gemm_a8w4_gemv<{targs}>", (-(-R // rw),), (32 * nw,), qw=layer.qw,
                         meta=layer.meta, x8=x8, sx=sx, s8=layer.s8, out=out, M=m, N=n, R=g.R, C=g.C, Gp=g.Gp,
                         gshift=g.gshift, ldx=g.ldx, resid=resid, amax_out=None)
        return _planned(memo, key, run, layer, x8, sx, out, resid)
    if kernel == "mma":
        bm = cfg.get("bm", GEMM.mma_bm_small if m <= GEMM.mma_small_max_m else 128)
        st = cfg.get("stages", 4)
        smem = mma_smem(bm, st)
        kf, expr = MMA_FILE, f"gemm_a8w4_mma<{bm},{st},{o}>"
        nreg, bps = (bm // 32) * 16, 2
        tile_m, tile_rt, threads = bm, 8, THREADS
    elif kernel == "wgmma":
        if not has_wgmma():
            raise CudaOpError("the wgmma kernel needs an sm_90 GPU (H100/H200)")
        cfg = {**tuning.wgmma_cfg(m, n).as_cfg(), **cfg}
        bt, st, nwg, wpf, ovl = (cfg[key] for key in WGMMA_KEYS[:5])
        if (bt, st, nwg, wpf, ovl) not in WGMMA_CFGS:
            raise CudaOpError(f"wgmma config {(bt, st, nwg, wpf, ovl)} is not instantiated (WGMMA_CFGS)")
        threads = nwg * 128
        smem = tuning.wgmma_smem(bt, st, nwg, wpf)
        kf, expr = WGMMA_FILE, f"gemm_a8w4_wgmma<{bt},{st},{nwg},{wpf},{ovl},{o}>"
        nreg, bps = bt // 2, tuning.wgmma_blocks(bt, nwg, wpf, st)
        tile_m, tile_rt = bt, nwg * 4
    else:
        raise CudaOpError(f"unknown kernel {kernel!r}; expected auto, gemv, mma or wgmma")
    tiles = -(-m // tile_m) * -(-R // tile_rt)
    splits = cfg.get("splits") or _splits(tiles, C // 2, bps)
    splits = int(max(1, min(splits, C // 2)))
    tail_from, tail_splits = tiles, 1
    if kernel == "wgmma":
        try:
            tail_from, tail_splits = perfmodel.wgmma_tail(cfg, tiles, splits, C // 2,
                                                          bps * kernels.device_info()["sm_count"])
        except perfmodel.PerfModelError as e:
            raise CudaOpError(str(e)) from None
    fn = kargs.function(kf, expr)
    set_smem(fn, smem)
    cluster = _split_cluster(splits, tail_splits, fn, threads, smem, tiles, tail_from) \
        if kernel == "wgmma" and wgmma_cluster_tile(bt, nwg, wpf) else None
    # the workspace even with a cluster: a kernel compiled without the cluster path (kargs.patched
    # source) then still reduces correctly through it
    ws, cnt = _workspace(perfmodel.split_tiles(tiles, splits, tail_from, tail_splits) * nreg * threads, tiles)
    if kernel == "mma":
        def run(layer, x8, sx, out, resid):
            kargs.launch(kf, f"gemm_a8w4_mma<{bm},{st},{o}>", (tiles, splits), (threads,), shared_mem=smem,
                         qw=layer.qw, meta=layer.meta, x8=x8, sx=sx, s8=layer.s8, out=out, ws=ws, counters=cnt,
                         M=m, N=n, R=g.R, C=g.C, Gp=g.Gp, gshift=g.gshift, ldx=g.ldx, splits=splits)
    else:
        grid = (perfmodel.wgmma_grid_x(tiles, tail_from, tail_splits), splits)

        def run(layer, x8, sx, out, resid):
            kargs.launch(kf, f"gemm_a8w4_wgmma<{bt},{st},{nwg},{wpf},{ovl},{o}>", grid, (threads,), shared_mem=smem,
                         qw=layer.qw, meta=layer.meta, x8=x8, sx=sx, s8=layer.s8, out=out, ws=ws, counters=cnt,
                         M=m, N=n, R=g.R, C=g.C, Gp=g.Gp, gshift=g.gshift, ldx=g.ldx, splits=splits,
                         tail_from=tail_from, tail_splits=tail_splits, cluster=cluster)
    return _planned(memo, key, run, layer, x8, sx, out, resid)


def gemm_a8w4(x8, sx, layer: PackedA8W4, kernel: str = "auto", cfg: dict | None = None, out=None,
              resid=None):
    """y (M, N) fp16 = fp16((float(Σ_k x8·W8) * sx[m]) * s8[n]), bit-exact to the reference.

    x8 is (M, K) or (M, Kp) int8 (Kp = layer.k_pad; quantize_act pads for free),
    sx (M,) float32. kernel: "auto" | "gemv" | "mma" | "wgmma"; cfg overrides tile
    choices (bench tuning); out: an optional preallocated (M, N) float16 array.
    resid: a (M, N) float32 array (GEMV only, M ≤ tuning.GEMM.gemv_max_m): resid += float(y)
    instead of writing y; returns resid.
    """
    return _run_gemm(x8, sx, layer, False, kernel, cfg, out, resid)


def gemv_a8w4_silu(x8, sx, layer: PackedA8W4, out, amax, dp: bool | None = None):
    """The fused gate|up layer (rows interleaved by interleave_rows) for one token: out (1, N/2)
    float32 = silu(gate)·up from the fp16-rounded gate and up, amax (1,) uint32 = max(amax, max|out|)
    as float bits (zero it first). x8 (1, Kp) int8 and sx (1,) float32 as for gemm_a8w4.
    dp: the dp4a variant or the mma one (None: tuning.GEMM.gemv_dp4a)."""
    cp = _cp()
    x8 = _prep_x8(x8, layer)
    if x8.shape[0] != 1 or layer.n % TILE_N:
        raise CudaOpError(f"the SiLU GEMV takes one token and interleaved rows (N % 16 == 0), got "
                          f"M={x8.shape[0]}, N={layer.n}")
    if not (isinstance(out, cp.ndarray) and out.dtype == np.float32 and out.shape == (1, layer.n // 2)
            and out.flags.c_contiguous):
        raise CudaOpError(f"out must be a C-contiguous (1, {layer.n // 2}) float32 CuPy array")
    if not (isinstance(amax, cp.ndarray) and amax.dtype == np.uint32 and amax.size >= 1):
        raise CudaOpError("amax must be a uint32 CuPy array of at least one element")
    if not (isinstance(sx, cp.ndarray) and sx.dtype == np.float32 and sx.shape == (1,)):
        raise CudaOpError("sx must be a (1,) float32 CuPy array")
    g = _geometry(layer)
    dp = GEMM.gemv_dp4a if dp is None else dp
    if dp:
        rw, u, nw = GEMV_DP_SILU
    else:
        rw, u, nw = 1, _gemv_cfg(1, 1, g.R, {"dp": False})[1], 8        # the mma GEMV's table U
        u = u if u in GEMV_SILU_U else GEMV_SILU_U[0]
    kargs.launch(GEMV_FILE, f"gemm_a8w4_gemv<{gemv_targs(1, rw, u, nw, dp, silu=True)}>", (g.R,), (32 * nw,),
                 qw=layer.qw, meta=layer.meta, x8=x8, sx=sx, s8=layer.s8, out=out, M=1, N=layer.n, R=g.R, C=g.C,
                 Gp=g.Gp, gshift=g.gshift, ldx=g.ldx, resid=None, amax_out=amax)
    return out


def gemm_a8w4_acc(x8, layer: PackedA8W4, kernel: str = "auto", cfg: dict | None = None, out=None):
    """acc (M, N) int32 = Σ_k x8[m,k]·W8[n,k], exactly formats.gemm_a8w4_ref."""
    return _run_gemm(x8, None, layer, True, kernel, cfg, out)


def linear_a8w4(x, layer: PackedA8W4, kernel: str = "auto"):
    """y = x · Ŵᵀ for a "dg" layer: activation quantization then the A8W4 GEMM, fp16 out."""
    x8, sx = quantize_act(x, layer)          # (M, Kp) int8, (M,) f32
    return gemm_a8w4(x8, sx, layer, kernel=kernel)


# ----------------------------------------------------------------------------- sampling

SAMPLE_THREADS = 1024    # cuda/sample.cu SAMPLE_THREADS: one block per row
SAMPLE_NONFINITE = -1    # cuda/sample.cu: the token of a row with NaN or Inf logits


def sample_params(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """The sampling kernel's settings as uint32[5] (cuda/sample.cu): T and top_p as float32 bits,
    top_k, the 64-bit seed in two words. Copy into the device array the kernel reads."""
    sampling.check_args(temperature, top_k, top_p)          # the host sampler's rules and errors
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise CudaOpError(f"seed must be an integer, got {seed!r}")
    tp = np.array([temperature, top_p], np.float32).view(np.uint32)
    s = int(seed) & (2**64 - 1)
    return np.array([tp[0], tp[1], min(int(top_k), 2**32 - 1), s & 0xFFFFFFFF, s >> 32], np.uint32)


def sample_rows(logits, params, seq, pos, out, lens=None, rows: int | None = None):
    """out[b] = a token drawn from row b of fp16 logits (B, V) by the rules of engine/model/sampling.py.

    params: device uint32[5] from sample_params; seq, pos: (B,) int32, the Philox counter of row b
    (a sequence and the position of the token the logits follow); out (B,) int32. With lens,
    pos and lens advance by one (a decode step). A 1-D logits row (V,) is drawn from `rows` times.
    """
    if logits.dtype != np.float16 or logits.ndim not in (1, 2) or logits.strides[-1] != 2:
        raise CudaOpError(f"logits must be float16 (B, V) or (V,) with unit stride, got {logits.dtype} "
                          f"{logits.shape}")
    v = int(logits.shape[-1])
    if not 0 < v < 2**23:      # uint64 fixed-point sums hold V · 2^40
        raise CudaOpError(f"the sampling kernel takes 0 < V < 2^23, got {v}")
    b = int(logits.shape[0]) if logits.ndim == 2 and rows is None else int(rows or 1)
    ld = logits.strides[0] // 2 if logits.ndim == 2 else 0
    kargs.launch(SAMPLE_FILE, "sample_rows", (b,), (SAMPLE_THREADS,), logits=logits, ld=ld, V=v, params=params,
                 seq=seq, pos=pos, lens=pos if lens is None else lens, advance=lens is not None, out=out)
    return out
