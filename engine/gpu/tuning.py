"""Every launch choice of the GPU engine, as named records, in one place.

Two kinds of record. Frozen ones say what cuda/*.cu is compiled for (the template
instantiations the launchers may name) and mirror constants of the sources: changing them
means changing the kernels, and tests/test_cuda_sources.py reads the sources to check them.
Mutable ones (module-level instances) are the dispatch choices: benchmarks and tests set
their fields for an A/B run (`monkeypatch.setattr(tuning.ROWS, "cta_width", 256)`), and
the launchers read them at every launch. Environment switches are read in flags.py only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..formats.planes import PLANE_BITS
from ..formats.tiles import TILE_K, TILE_ROWS
from . import flags

# ----------------------------------------------------------------------------- row kernels
# cuda/fused.cu add_rmsnorm_quant, silu_mul_quant, quant_rows <PER, CL, VEC> on cuda/rows.cuh


@dataclass(frozen=True)
class RowVariants:
    """The row kernels' instantiations (gpu/fused.py FUSED_EXPRS)."""
    pers: tuple = (1, 2, 4, 8, 16, 32)     # row elements a thread holds
    clusters: tuple = (1, 2, 4, 8)         # CTAs sharing a row (thread block clusters, sm_90)
    cluster_pers: tuple = (1, 2, 4)        # PER instantiated with clusters of 2 or more
    max_vec: int = 8                       # widest access (cuda/rows.cuh Pack; 16-byte fp16 loads):
    #                                        VEC = min(PER, 8) for PER >= 4, one CTA a row


@dataclass
class RowTuning:
    """How the row kernels are launched (gpu/fused.py row_launch, row_cluster)."""
    # on sm_90, a row wider than this is split over a cluster (H100, 7B decode:
    # 2048 / 4096 / none = 2.56 / 2.46 / 2.55 ms a step)
    cta_width: int = 4096
    # 11008 wide: 8 CTAs 3.4 µs, 4 CTAs 3.8 µs
    cta_width_by_kernel: dict = field(default_factory=lambda: {"silu_mul_quant": 2048, "gelu_mul_quant": 2048})
    threads_many: int = 256    # threads a row when the rows fill the GPU (prefill): 4× the rows in flight
    per_many: int = 16         # ... up to this many values a thread (PER = 32 spills at 64 registers)
    # PER of silu_mul_quant / gelu_mul_quant in those launches where rows are wider than
    # per_many · threads_many (0: the rule above). The 7B's 11008-wide rows take PER 16 by the
    # rule: 704 threads at 44 registers, one CTA an SM (22 warps). PER 32 (60 registers, no
    # spill, sass_scan) takes 352 threads, two CTAs an SM with twice the loads in flight a
    # thread. H200, 7B prefill of 2048 tokens, same process (bench/prefill_breakdown.py
    # --act-per 0,32, 2026-12-04): silu_mul_quant 2.509 -> 2.141 ms, the prefill 41.94 -> 41.49 ms
    act_per: int = 32
    # elements a thread moves in one access in the many-row (prefill) launches, 4 where PER = 4;
    # 8 or 1 (the element stride everywhere): the values FUSED_EXPRS instantiates. The few-row
    # (decode) launches of one CTA a row stay element-strided.
    vec: int = 8


ROW_VARIANTS = RowVariants()
ROWS = RowTuning()

# ----------------------------------------------------------------------------- b-bit weight-only GEMV / GEMM
# cuda/gemv_wb.cu gemv_pot<BITS, NT, XS>, gemv_int<BITS, NT, XS>, gemm_pot<BITS>, gemm_int<BITS>


@dataclass(frozen=True)
class WbVariants:
    """The weight-only kernels' instantiations (gpu/wb.py WB_EXPRS) and launch shapes."""
    bits: tuple = PLANE_BITS     # every width of the b-bit kinds
    nts: tuple = (1, 2)          # GEMV 8-column tiles of x: NT = 1 up to M = 8, 2 up to 16; the GEMM above
    rows: int = TILE_ROWS        # output rows a tile (WB_ROWS, the mma's M)
    tile_k: int = TILE_K         # channels a tile (WB_TILE_K)
    warps: int = 8               # GEMV: warps a block, splitting one row tile's k tiles (WB_WARPS)
    gemm_warps: int = 4          # GEMM: warps a block, one row tile each (WB_GEMM_WARPS)
    gemm_nt: int = 8             # GEMM: 8-row tiles of x a block (WB_GEMM_NT)

    @property
    def gemv_max_m(self) -> int:
        return 8 * self.nts[-1]


WB = WbVariants()


@dataclass
class WbTuning:
    """How gpu/wb.py runs M above WB.gemv_max_m: "dequant" writes Ŵ in fp16 (dequant_*) and
    multiplies with cuBLAS; "mma" runs gemm_* (in-register dequantization, 64 rows of x a block).
    H200, 2026-12-02, K×N 4096×11008, pot3: M = 64 / 256 / 1024 took 0.156 / 0.306 / 0.918 ms
    with "mma" against cuBLAS FP16 alone 0.027 / 0.036 / 0.126 ms."""
    large_m: str = "dequant"
    # the GEMV stages x in shared memory for M ≤ xs_max_rows when M·KT·128·2 bytes fit in
    # xs_max_bytes (else it prefetches x a tile ahead into registers). H200, M = 1, W3-PoT
    # 8192×8192: 26.9 µs from registers, 22.6 µs from shared memory (18.8 µs with no x loads at
    # all, bench/wb_sweep.py "no-x"); 7B W3-PoT decode b=1 342 -> 415 tok/s. Every block stages all
    # of x, M·K·2 bytes against its 16 rows' 2·b·K bytes of weights, so more rows cost more than
    # they save: with staging up to M = 16, decode at b=8 fell from 2387 to 1662 tok/s.
    xs_max_rows: int = 1
    xs_max_bytes: int = 96 * 1024
    # the GEMV's grid: no more blocks than are resident at once, each taking every gridDim-th row
    # tile with its ring of weights running on (gpu/wb.py gemv_grid); False: a block a row tile
    resident: bool = True
    max_blocks: int = 0          # the resident grid's cap (0: what the occupancy query allows; tests set it)
    # the W3-PoT × INT8 GEMV (gpu/pot_a8.py) launches RB = 4 rows a block instead of its DEFAULT's 8
    # for layers with K ≤ pa8_rb4_max_k (0: never; the SiLU variant keeps 8). RB leaves each row's
    # order of sums, so the bits, as they are. H100, M = 1, (4, 4) against (8, 4), ms: 4096² 0.0070
    # / 0.0073, 4096×11008 0.0105-0.0108 / 0.0111, 8192² 0.0133-0.0136 / 0.0143-0.0144, but
    # 11008×4096 0.0112-0.0116 / 0.0111-0.0112 (bench/results/2026-12-05-pot3-a8-h100.md); the 7B
    # decode with (4, 4) for every plain layer, down included, 604 tok/s against 620. With 8192
    # (`e2e --pot-bits 3a8 --ab wb.pa8_rb4_max_k=8192`, one process, H100): 615 against 641 tok/s
    # (bench/results/2026-12-05-pot3-a8-fold-h100.md), so it stays off.
    pa8_rb4_max_k: int = 0
    # several tokens through the pot3-a8 GEMV (batched decode up to pa8_gemv_max_m): tokens along
    # the grid's x, so a row block's blocks run together and the later ones may find its weights
    # in L2 (gpu/pot_a8.py; False: tokens along y, each token's pass far from the others'). H100, 7B, one
    # process (bench/pa8_batches.py): batch 2, 8, 16 at 939, 1381, 1488 tok/s against 799, 1065, 1130.
    pa8_tok_x: bool = True
    # the most tokens a block of the pot3-a8 GEMV with several tokens (1, 2 or 4; gpu/pot_a8.py
    # token_block takes the largest of 1, 2, 4 up to min(M, this)): each chunk's weights are decoded
    # once for those tokens (each token's sums as alone: the same bits); a launch's last M % MT
    # tokens take a block each. H200, 7B, one process (bench/pa8_batches.py): batch 2 with blocks
    # of 2 tokens 1075 tok/s against 1008 one a block; batch 8 with 4 1857 against 1414 (2: 1699);
    # batch 16 with 4 2052 against 1520 (A8W4 987, 3042, 4914).
    pa8_mt: int = 4
    # the pot3-a8 GEMV reads the weights once a token: above this many tokens (a prefill, a large
    # batch) a layer with fp16-exact scales runs Ŵ in fp16 and cuBLAS instead (gpu/pot_a8.py
    # gemm_pot_a8). H100, 7B, one process: 512 tokens 26.2 ms this way against 408.8 through the
    # GEMV; 4 instead of 16 the same at batch 1 (bench/results/2026-12-05-pot3-a8-fold-h100.md).
    # Session 40's vectorized row kernels: 23.2 ms (another run; 2026-12-05-pot3-a8-prefill-h100.md);
    # session 41's staged Ŵ stores: 19.1 ms (H100), 16.2 against 20.5 before (H200, one machine;
    # 2026-12-05-pot3-a8-session41-h200-h100.md).
    # Between 17 and 511 tokens, and batch 8 on the GEMM, not timed: 16 stays a guess there.
    pa8_gemv_max_m: int = 16


WB_TUNE = WbTuning()

# ----------------------------------------------------------------------------- attention
# cuda/attention.cu rope_qkv_cache, attn_decode, attn_prefill


@dataclass(frozen=True)
class AttentionShape:
    head_dims: tuple = (64, 128)              # attn_prefill<D, KV> instantiations
    # wide heads (WIDE_D, cuda/attention.cu: Gemma 3's 256): their own module (attention.ATTN_WIDE);
    # decode always on attn_decode_gqa (attn_decode holds a key's row in registers, D ≤ 128)
    wide_head_dims: tuple = (256,)
    kv_types: tuple = ("__half", "signed char")   # the cache element types the kernels take
    prefill_bm: int = 64       # query rows per block of attn_prefill (FA_BM)
    prefill_bn: int = 64       # keys per tile (FA_BN)
    threads: int = 128         # every attention kernel's block (FA_THREADS, DEC_WARPS · 32)
    rope_heads: int = 4        # heads a rope_qkv_cache block rotates (one warp each)
    decode_chunk: int = 64     # keys per flash-decoding block (DEC_CHUNK)
    # attn_decode's splits of a head as one cluster (sm_90, nsplit ≤ 8); 0: merge through memory
    decode_clusters: tuple = (1, 2, 4, 8)
    # attn_decode_gqa (flags.ATTN_DECODE "gqa"): a block serves ≤ gqa_heads query heads of one kv
    # head (GQ_HEADS), its warps take gqa_step keys a step (GQ_STEP); the grid's splits fill
    # gqa_waves waves of the SMs (blocks an SM holds from the shared memory), at most
    # gqa_max_splits (≤ GQ_MAX_SPLITS): the last block merges that many partials alone
    gqa_heads: int = 8
    gqa_step: int = 16
    gqa_max_splits: int = 32
    gqa_waves: int = 1
    # DGQ_ATTN_DECODE=auto: attn_decode_gqa for caches of at least this many positions, attn_decode
    # below (H200, 7B shape, batch 1: heads 490 vs gqa 479 tok/s at 512 keys, 437 vs 465 at 1024;
    # again after INT8 K/V went through L1, 2026-12-03: 579 vs 571 fp16, 577 vs 553 INT8 at 512)
    gqa_min_keys: int = 1024
    # ... and from gqa_batch sequences a step, for caches of at least gqa_min_keys_batch positions
    # (H200, 7B, 512 keys, heads → gqa tok/s: batch 8 fp16 2350 → 2519, INT8 2319 → 2756; batch 32
    # 4676 → 5053, 4168 → 5707; at 128 keys within ±2 %; bench/results/2026-12-03-attn-threshold-h200.md)
    gqa_batch: int = 8
    gqa_min_keys_batch: int = 512


ATTENTION = AttentionShape()


@dataclass
class DecodeTuning:
    # one-token steps: SiLU in the gate|up GEMV, no absmax reductions (gpu/model.py fold_quant)
    fold_quant: bool = True
    # attn_decode_gqa with more (sequence, kv head) units than block slots (one split each, so
    # several waves): two splits a unit where that takes fewer waves per unit of work. Off: measured
    # mixed (H200, Llama-2-7B, batches 10/12/20, one process): fp16 K/V at 4096 positions +5-11 %
    # tok/s, at 1024 -3 to +2 %, INT8 K/V -3 to -13 % (bench/results/2026-12-04-gemv-cut-h200.md;
    # `e2e --context 1024,4096 --batches 10,12,20 --ab decode.gqa_wave_fit=1` times it)
    gqa_wave_fit: bool = False


DECODE = DecodeTuning()


@dataclass
class PrefillTuning:
    """Captured prefills (gpu/model.py CudaModel.prefill): the second prefill of one shape (same
    length, start position, sequence and cache: a perplexity window, a fixed-size chunk, a
    benchmark's repeats) is captured as a CUDA graph and later ones replay it, so the host's
    ~320 launches (11-19 ms at 7B, which bound a 512-token prefill) become one. `graphs`: how
    many shapes a model keeps captured (0: every prefill launches eagerly)."""
    graphs: int = 4


PREFILL = PrefillTuning()


# ----------------------------------------------------------------------------- fp16 / int8 GEMV
# cuda/fused.cu gemv_f16_m<MT>, gemv_w8_m<MT>: the lm_head and the FP16 path's linears


@dataclass(frozen=True)
class GemvF16Shape:
    mts: tuple = (1, 4, 8)     # M buckets (GEMV_F16_ENTRY, GEMV_W8_ENTRY)
    threads: int = 256
    rows_per_block: int = 8    # output rows a block computes (one a warp)
    # fp16 products of this many rows or more run cuBLAS (gpu/cublas.py, capturable) where it
    # loads, not the GEMV: in graphs on the H200 (4096², 11008×4096, 4096×11008, 32000×4096)
    # cuBLAS took 12.6-65.4 µs at M = 2 against the GEMV's 14.8-72.2, 12.8-65.6 at M = 8 against
    # 35.9-135.6; at M = 1 they are within 9 % (the GEMV ahead on 4096² and 32000×4096).
    # Measured 2026-12-04; tests/test_model_cuda.py's GEMV buckets passed with it on the H200
    blas_from: int = 2

    @property
    def max_m(self) -> int:
        return self.mts[-1]


GEMV_F16 = GemvF16Shape()

# ----------------------------------------------------------------------------- A8W4 GEMM
# cuda/gemm_a8w4.cu gemm_a8w4_gemv, gemm_a8w4_mma; cuda/gemm_a8w4_sm90.cu gemm_a8w4_wgmma.
# The instantiation tables are template-argument lists in the order of the `<...>`.

GEMV_CFGS = {                                             # MT -> (RW, U) instantiated
    1: ((1, 2), (1, 3), (1, 4), (2, 2), (2, 4), (4, 2)),
    2: ((1, 2), (1, 4), (2, 2), (2, 4), (4, 2)),
    4: ((1, 2), (2, 2)),                                  # bigger ones spill (255 registers)
}
GEMV_WIDE = {1: ((1, 2),)}          # MT -> (RW, U) also instantiated with 16 warps a block (NW)
GEMV_MT = tuple(GEMV_CFGS)
GEMV_SILU_U = (2, 3)                                      # U of the SiLU GEMV (RW = MT = 1)
# dp4a GEMV (RW, U, NW), and its SiLU variant's. Measured slower and dropped (H200, 7B b=1,
# 635 tok/s with these): NW = 4 for q|k|v and gate|up 625, NW = 4 for gate|up alone 635 (a tie).
GEMV_DP_CFGS = ((1, 2, 8), (1, 4, 8), (1, 2, 16))
GEMV_DP_SILU = (1, 2, 8)
MMA_CFGS = ((64, 4), (128, 4))                            # (BM, STAGES)
WGMMA_CFGS = (                                            # (BT, STAGES, NWG, WPF, OVL)
    (32, 4, 2, 2, 2), (32, 6, 2, 4, 2),                   # M = 17-32 (the tiny bucket; BT = 16 measured slower)
    (64, 4, 2, 2, 2), (64, 6, 2, 4, 1), (64, 6, 2, 4, 2),
    (128, 4, 2, 2, 0), (128, 4, 2, 2, 1), (128, 4, 2, 2, 2), (128, 5, 2, 2, 2), (128, 6, 2, 4, 2),
    (256, 4, 2, 2, 2),
    # one warpgroup a block (64 channels): twice the blocks of the two-warpgroup tile, so split K
    # fills the SMs with fewer, longer splits (H200, 2026-12-03, M = 64: 6-11 % faster on the 7B
    # linears; bench/results/2026-12-03-gemm-nwg1-h200.md)
    (64, 4, 1, 2, 2), (64, 6, 1, 4, 2), (128, 4, 1, 2, 2),
    # WPF = 0: the weights travel through the shared-memory ring with the activations (more of
    # them in flight than the register ring's one or two stages; faster at every M > 16 timed)
    (32, 4, 2, 0, 2), (32, 5, 2, 0, 2), (64, 4, 1, 0, 2),
    (64, 4, 2, 0, 2), (128, 4, 1, 0, 2), (128, 4, 2, 0, 2), (256, 4, 2, 0, 2),
)   # measured and dropped (slower everywhere, docs/KERNELS-HISTORY.md): NWG=4, OVL 0/1 at BT=64, BT=256 OVL=1,
   # 256/5/2/0/2 (0-2 % slower than 256/4/2/0/2 at M = 256-4096, 2026-12-04)
# Instantiated, tested and timed by `gemm-tune`, but not offered to the learned choice
# (choice.candidates, which `perf collect` also times): the WPF = 0 tiles, until `perf collect`
# + `perf fit` have let the shipped model weigh them.
WGMMA_UNMODELED = tuple(c for c in WGMMA_CFGS if c[3] == 0)


@dataclass(frozen=True)
class GemvCfg:
    """One gemm_a8w4_gemv choice for an MT bucket: RW row tiles a warp, U chunks unrolled."""
    rw: int
    u: int


@dataclass(frozen=True)
class WgmmaCfg:
    """One gemm_a8w4_wgmma choice: the template arguments and the K splits (None: split K
    to one wave, perfmodel.auto_splits)."""
    bt: int
    stages: int
    nwg: int
    wpf: int
    ovl: int
    splits: int | None = None

    @property
    def tile(self) -> tuple:
        """(BT, STAGES, NWG, WPF, OVL): the instantiation (WGMMA_CFGS)."""
        return (self.bt, self.stages, self.nwg, self.wpf, self.ovl)

    def as_cfg(self) -> dict:
        """The cfg dict of gpu/ops.py gemm_a8w4 (dataclasses.asdict's, without its recursive
        copy: 19 of a GEMM call's ~160 µs of host time under cProfile, a 7B prefill)."""
        return {"bt": self.bt, "stages": self.stages, "nwg": self.nwg, "wpf": self.wpf, "ovl": self.ovl,
                "splits": self.splits}


WGMMA_KEYS = tuple(f.name for f in fields(WgmmaCfg))      # the cfg-dict keys of the wgmma kernel


WGMMA_WSM_WARP = 2 * 512 + 2 * 32      # WPF = 0: a warp's weight + meta bytes a stage (gemm_a8w4_sm90.cu WW)
SM_SMEM = 233472                         # shared memory an sm_90 SM holds for its blocks (228 KB)


def wgmma_smem(bt: int, stages: int, nwg: int, wpf: int = 2) -> int:
    """Dynamic shared memory of gemm_a8w4_wgmma: the activation stages (with WPF = 0 the weight
    stages too) or the epilogue's staging rows, whichever is larger, and 1 KB to align the
    swizzle atoms."""
    stage = bt * 128 + (nwg * 4 * WGMMA_WSM_WARP if wpf == 0 else 0)
    return max(stages * stage, bt * (nwg * 64 + 8) * 2) + 1024


def wgmma_blocks(bt: int, nwg: int, wpf: int, stages: int = 4) -> int:
    """Resident blocks an SM of gemm_a8w4_wgmma<BT, STAGES, NWG, WPF, ..> as compiled (registers,
    and for the one-warpgroup 128-token tile and the WPF = 0 tiles their shared memory): split K
    fills this many a SM. tests/test_kernels_gpu.py holds it to the driver's occupancy query for
    every WGMMA_CFGS entry, so a compiler that allocates more registers (the 64-token tile with
    WPF = 4 is not bounded to 2 blocks, cuda/gemm_a8w4_sm90.cu WgmmaMinBlocks) fails a test
    instead of mis-splitting."""
    if wpf == 0:                        # registers as the 2-stage register ring, or shared memory
        by_smem = SM_SMEM // (wgmma_smem(bt, stages, nwg, wpf) + 1024)
        return min(wgmma_blocks(bt, nwg, 2), by_smem)
    if nwg == 1 and bt <= 128:          # 128 threads: 106 / 120 / 128 registers (nvcc 13.0, sm_90a; 94
        return 4 if bt <= 64 else 3     # kept 64/4/1/2/2 five blocks before the split tail); BT = 128: 67 KB of stages
    if nwg != 2 or bt >= 256:
        return 1
    if bt <= 32:
        return 3 if wpf <= 2 else 2
    return 2 if bt <= 64 or wpf <= 2 else 1


@dataclass
class GemmTuning:
    """Dispatch knobs: `python -m engine.bench gemm-pick` over the 2026-11-25 H100 tuning log
    (bench/results/2026-11-25-gemm-tune-h100.jsonl) chose these, except the tiny wgmma bucket
    (H200 sweep of 2026-12-03, bench/results/2026-12-03-gemm-small-m-h200.md); the bench table of that run
    used exactly them. wgmma buckets by M (wgmma_bucket): tiny ≤ wgmma_bounds[0] < small ≤
    wgmma_bounds[1] < mid ≤ wgmma_bounds[2] < large."""
    gemv_max_m: int = 16                                 # M at or below this runs the GEMV (no wgmma: sm_80/89)
    # ... and where the wgmma GEMM runs (sm_90): from 9 rows its 32-token tile beats the GEMV, whose
    # second token tile (MT = 2) costs as much as the first. H200, same process, µs at M = 12 / 16
    # (GEMV → wgmma): q|k|v 24.2 → 18.4 / 25.1 → 18.5, gate|up 33.3 → 26.1 / 34.9 → 26.4, o 13.6 →
    # 12.9 / 14.0 → 12.8, down 24.9 → 20.1 / 25.4 → 20.3; at M = 8 the GEMV still wins (17.4 against
    # 18.3 for q|k|v); 7B batch-16 decode +14-22 % (`e2e --context 128,1024 --batches 12,16 --ab
    # gemv_max_m_wgmma=16` times the old cut; bench/results/2026-12-04-gemv-cut-h200.md)
    gemv_max_m_wgmma: int = 8
    gemv: dict = field(default_factory=lambda: {1: GemvCfg(1, 2), 2: GemvCfg(4, 2), 4: GemvCfg(2, 2)})
    # with at most gemv_few_tiles_per_sm row tiles per SM (N = 4096: 256 tiles) a block runs
    # gemv_few: more bytes in flight per warp beats occupancy there (2026-11-25 H100 sweep,
    # graphed, U = 2 / 3 / 4: o 6.52 / 5.83 / 6.22 us, down 13.84 / 11.23 / 11.68 us; qkv and
    # gate|up are fastest at U = 2: 11.99 / 14.74 / 14.38 and 19.70 / 25.96 / 25.57 us).
    # 16 warps a block there, U = 2 (GEMV_WIDE): 2 blocks an SM hold 32 warps of loads in flight
    # instead of 16 (7B b=1 step 2.049 → 2.030 ms, same process; U = 3 at 8 warps before)
    gemv_few: dict = field(default_factory=lambda: {1: GemvCfg(1, 2)})
    gemv_few_tiles_per_sm: int = 2
    gemv_few_nw: int = 16
    # M = 1: the GEMV multiplies the 4-bit codes with dp4a, S·(Σx·q − z·Σx), instead of
    # widening them for mma (cuda/gemm_a8w4.cu DP); the same bits. H200, 7B b=1 step
    # 1.915 → 1.586 ms (522 → 631 tok/s, same process; docs/KERNELS.md)
    gemv_dp4a: bool = True
    # its U where the row tiles are more than gemv_few_tiles_per_sm an SM (q|k|v of 7B; not the SiLU
    # GEMV, which runs U = 2, nor the few-tile shapes, which take gemv_few): 4 measured 618 tok/s
    gemv_dp_u: int = 2
    # tiny (M = 17-32, batched decode): 32-token tiles, 3 blocks an SM (H200, 2026-12-03, same
    # process, 7B shapes at M = 32: q|k|v 26.8 → 20.4 µs, gate|up 41.6 → 31.6, o 16.1 → 14.1,
    # down 23.9 → 22.6 against the small bucket's tile; bench/results/2026-12-03-gemm-small-m-h200.md)
    # small (M = 33-64): one warpgroup a block (H200, 2026-12-03, M = 64, 7B linears and 8192²:
    # 6-11 % faster than the two-warpgroup tile; bench/results/2026-12-03-gemm-nwg1-h200.md)
    wgmma_bounds: tuple = (32, 64, 512)
    wgmma: dict = field(default_factory=lambda: {"tiny": WgmmaCfg(32, 4, 2, 2, 2, None),
                                                 "small": WgmmaCfg(64, 6, 1, 4, 2, None),
                                                 "mid": WgmmaCfg(128, 4, 2, 2, 2, None),
                                                 "large": WgmmaCfg(128, 4, 2, 2, 2, 1)})
    # With wgmma_wsm every M above the GEMV runs a WPF = 0 tile (weights through the shared-memory
    # ring), wsm_tiles' first entry whose bound M does not exceed (None: any M), and the learned
    # policy leaves those M to this table (choice.wsm_defers) until its model has timed them.
    # H200, same process (docs/KERNELS.md, bench/results/2026-12-04-gemm-wsm-h200.md and
    # 2026-12-04-gemm-wsm-mid-h200.md), register ring -> shared memory: M = 32 q|k|v 20.0 -> 18.4 µs,
    # gate|up 30.6 -> 26.8, o 13.9 -> 13.4, down 21.8 -> 20.2; M = 64 gate|up 37.9 -> 31.7; M = 128
    # 6-15 % faster on the 7B linears and 8192², M = 256-4096 with the 256-token tile 11-25 %
    # (8192² M = 4096 0.686 -> 0.539 ms). Batch-32 decode, tok/s: context 128 fp16 7196 -> 7468,
    # INT8 6722 -> 7014; 1024 fp16 3757 -> 3854, INT8 4776 -> 4918. The tiny tile's 52 KB a block
    # keep three blocks an SM within the shared-memory carveout INT8 attention runs under (73 KB
    # tiles took its L1: INT8 at 1024 lost 16 %). `e2e --ab wgmma_wsm=0`: without.
    # M = 129-255 was not timed; the 256-token tile, as either tile there pays for its padded rows
    # (the 128-token one two passes over the weights, which at M = 256 took 0.0464 ms against the
    # 256-token tile's 0.0397 on 4096×11008). `gemm-tune --cases 192:K:N` times both.
    wgmma_wsm: bool = True
    wgmma_wsm_tiles: tuple = ((32, WgmmaCfg(32, 4, 2, 0, 2, None)),
                              (64, WgmmaCfg(64, 4, 1, 0, 2, None)),
                              (128, WgmmaCfg(128, 4, 2, 0, 2, None)),
                              (512, WgmmaCfg(256, 4, 2, 0, 2, None)),   # 129-255 untimed (above)
                              (None, WgmmaCfg(256, 4, 2, 0, 2, 1)))
    # ... except where a tile of 128 tokens or more leaves fewer than wgmma_few_tiles output tiles
    # (N = 4096 at M = 128 or 256: 32): one warpgroup a block, 128 tokens, more blocks (same runs:
    # M = 128 4096² 0.0216 -> 0.0175 ms, 11008×4096 0.0305 -> 0.0272; M = 256 4096² 0.0236 -> 0.0215)
    wgmma_wsm_few: WgmmaCfg = WgmmaCfg(128, 4, 1, 0, 2, None)
    wgmma_few_tiles: int = 64
    # buckets whose GEMM.wgmma entry runs even with wgmma_wsm: those `gemm --tune-json` picked
    wgmma_wsm_skip: frozenset = frozenset()
    mma_bm_small: int = 64
    mma_small_max_m: int = 64
    split_target: float = 1.0   # split K while tiles*splits <= split_target * SMs * blocks/SM (perfmodel.auto_splits)
    # wgmma with more tiles than one wave and no K split: the last, partial wave's tiles split K as
    # many ways as fit one round (perfmodel.tail_split), at most wgmma_tail_max (1: never; 6: the
    # most timed, H200 M = 4096 5120×13824, 12 tiles in the tail: 0.606 -> 0.578 ms)
    wgmma_tail_max: int = 6
    # wgmma split K (no tail) of 2..wgmma_cluster_max ways runs a tile's splits as one thread block
    # cluster that sums the partials through distributed shared memory (cuda/common.cuh
    # cluster_split_reduce) instead of the workspace turnstile (splitk_reduce), on the tiles of
    # ops.wgmma_cluster_tile and where every cluster is resident at once; 0: never. H200, same
    # process against the kernel before it: GEMM at M = 32 / 64 / 128 1.05 / 1.07 / 1.03x (7-shape
    # geomeans), 7B batch-32 decode +1.6-2.9 % (bench/results/2026-12-04-gemm-cluster-unroll-h200.md)
    wgmma_cluster_max: int = 8
    # sm_90 only; the portable mma.sync path is the fallback. DGQ_NO_WGMMA=1 turns it off (flags.py)
    use_wgmma: bool = flags.WGMMA


GEMM = GemmTuning()

WGMMA_BUCKETS = ("tiny", "small", "mid", "large")


def wgmma_bucket(m: int) -> str:
    """The GEMM.wgmma entry for M rows (GEMM.wgmma_bounds)."""
    for name, hi in zip(WGMMA_BUCKETS, GEMM.wgmma_bounds):
        if m <= hi:
            return name
    return WGMMA_BUCKETS[-1]


def wsm_tile(m: int) -> WgmmaCfg | None:
    """The WPF = 0 tile GEMM.wgmma_wsm_tiles gives M rows (None: wgmma_wsm off, M's bucket in
    GEMM.wgmma_wsm_skip, or no entry)."""
    if not GEMM.wgmma_wsm or wgmma_bucket(m) in GEMM.wgmma_wsm_skip:
        return None
    for hi, c in GEMM.wgmma_wsm_tiles:
        if hi is None or m <= hi:
            return c
    return None


def wgmma_cfg(m: int, n: int | None = None, modeled: bool = False) -> WgmmaCfg:
    """The table's wgmma configuration for an (M, ·) × (N, ·)ᵀ product: with GEMM.wgmma_wsm the
    WPF = 0 tile of wsm_tile(M), or GEMM.wgmma_wsm_few where N (when given) leaves fewer than
    GEMM.wgmma_few_tiles of a 128- or 256-token tile; else (or with modeled: the table among the
    tiles the performance model knows) GEMM.wgmma of M's bucket (wgmma_bucket)."""
    c = None if modeled else wsm_tile(m)
    if c is None:
        return GEMM.wgmma[wgmma_bucket(m)]
    if c.bt >= 128 and n is not None and -(-m // c.bt) * -(-n // (64 * c.nwg)) < GEMM.wgmma_few_tiles:
        return GEMM.wgmma_wsm_few
    return c


def gemv_targs(mt: int, rw: int, u: int, nw: int, dp: bool, out_i32: bool = False, silu: bool = False) -> str:
    """The template arguments of a gemm_a8w4_gemv<MT, RW, U, OUT_I32, SILU, NW, DP>, as gpu/ops.py
    instantiates and launches it (gpu/perfmodel.py mirrors the launches)."""
    tail = f",{nw},true" if dp else "" if nw == 8 else f",{nw}"
    return f"{mt},{rw},{u},{'true' if out_i32 else 'false'},{'true' if silu else 'false'}{tail}"


def gemv_bound(wgmma: bool) -> int:
    """The most rows the table runs on the A8W4 GEMV: GEMM.gemv_max_m_wgmma where the wgmma GEMM
    takes the rows above (sm_90 and GEMM.use_wgmma), else GEMM.gemv_max_m."""
    return GEMM.gemv_max_m_wgmma if wgmma and GEMM.use_wgmma else GEMM.gemv_max_m


def gemv_choice(m: int, mt: int, few: bool, cfg: dict) -> tuple[int, int, int, bool]:
    """(RW, U, NW, dp4a) of a GEMV call for M rows in MT token tiles, `few` when its row tiles are
    at most GEMM.gemv_few_tiles_per_sm an SM: cfg's keys where given, else GEMM's (gemv_few or
    gemv for MT; at M = 1 the dp4a GEMV, with gemv_dp_u where the tiles are not few). gpu/ops.py
    launches what this returns; gpu/choice.py and gpu/perfmodel.py use it to mirror ops. An
    explicit (RW, U, NW) that the dp4a GEMV lacks runs the mma GEMV, unless cfg asks for dp.
    Raises ValueError for a configuration that is not instantiated."""
    fewc = few and mt in GEMM.gemv_few
    base = GEMM.gemv_few[mt] if fewc else GEMM.gemv[mt]
    explicit = any(key in cfg for key in ("rw", "u", "nw"))
    rw, u = cfg.get("rw", base.rw), cfg.get("u", base.u)
    nw = cfg.get("nw", (GEMM.gemv_few_nw if fewc else 8) if "rw" not in cfg and "u" not in cfg else 8)
    dp = cfg.get("dp")
    if dp and not (m == 1 and mt == 1):
        raise ValueError(f"the dp4a GEMV takes M = 1, got M={m} (MT={mt})")
    if dp is None:
        dp = GEMM.gemv_dp4a and m == 1 and mt == 1
    if dp and not explicit and not fewc:
        rw, u, nw = 1, GEMM.gemv_dp_u, 8
    if dp and (rw, u, nw) not in GEMV_DP_CFGS:
        if explicit and "dp" not in cfg:
            dp = False                                   # an mma configuration asked for by name
        else:
            raise ValueError(f"dp4a GEMV config RW={rw} U={u} NW={nw} is not instantiated (GEMV_DP_CFGS; "
                             f"tuning.GEMM.gemv_dp_u, gemv_few)")
    if not dp and (rw, u) not in (GEMV_CFGS[mt] if nw == 8 else GEMV_WIDE.get(mt, ()) if nw == 16 else ()):
        raise ValueError(f"GEMV config MT={mt} RW={rw} U={u} NW={nw} is not instantiated (GEMV_CFGS, GEMV_WIDE)")
    return rw, u, nw, dp
