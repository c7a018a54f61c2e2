"""Does TMA (cp.async.bulk rows into a per-warp ring, mbarrier waits) stream the 7B decode K/V
faster than cp.async, at attn_decode_gqa's grid and shared memory?

    python bench/kv_stream_probe.py > out.jsonl

Load-only kernels (no math): grid (8 or 16 splits, 32 heads), 4 warps a block, 16 keys a warp
step (a K and a V row of 256 bytes each), a ring of ST steps a warp: tma_stream (a lane a row,
one bulk copy each; row pitch 256 or 272 bytes in shared memory) and lane_stream (16-byte
cp.async.cg pieces, each instruction two whole rows). One JSON line per (keys, splits, kernel,
ST, pitch): µs a launch, TB/s. The same buffers serve every launch, so at 2048 keys (34 MB) they
sit in L2 and the figure is L2's; 8192 keys (134 MB) measure DRAM. docs/KERNELS.md cites the H200
run (bench/results/2026-12-03-kv-stream-probe-h200.jsonl).
"""
import json

import cupy as cp
import numpy as np

SRC = r'''
typedef unsigned int u32;
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// TMA: lane r < 16 copies the K row of key kb + r, lane 16 + r its V row (ROWB bytes each) into
// the slot's rows (PITCH apart); lane 0 arms the slot's mbarrier with the byte count first.
template <int ST, int ROWB, int PITCH>
__global__ void __launch_bounds__(128) tma_stream(const char* __restrict__ kc, const char* __restrict__ vc,
                                                   int per, int Hkv, unsigned* out) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) unsigned long long bars[4][ST];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, h = blockIdx.y;
    const int c0 = blockIdx.x * per, nsteps = per / 16;
    const int mine = nsteps > warp ? (nsteps - warp + 3) / 4 : 0;
    constexpr int STEP = 32 * PITCH;
    unsigned char* ring = smem + warp * ST * STEP;
    if (lane < ST) asm volatile("mbarrier.init.shared.b64 [%0], 1;" :: "r"(smem_u32(&bars[warp][lane])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
    auto issue = [&](int i) {
        const int slot = i % ST, kb = c0 + (warp + i * 4) * 16;
        const u32 bar = smem_u32(&bars[warp][slot]);
        if (lane == 0) asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" :: "r"(bar), "n"(32 * ROWB) : "memory");
        __syncwarp();
        const int key = kb + (lane & 15);
        const char* src = (lane < 16 ? kc : vc) + ((size_t)key * Hkv + h) * ROWB;
        const u32 dst = smem_u32(ring + slot * STEP + lane * PITCH);
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(dst), "l"(src), "n"(ROWB), "r"(bar) : "memory");
    };
    for (int i = 0; i < ST - 1 && i < mine; ++i) issue(i);
    u32 acc = 0;
    for (int i = 0; i < mine; ++i) {
        __syncwarp();
        if (i + ST - 1 < mine) issue(i + ST - 1);
        const u32 bar = smem_u32(&bars[warp][i % ST]), parity = (i / ST) & 1;
        asm volatile("{\n\t.reg .pred p;\n\tW: mbarrier.try_wait.parity.shared.b64 p, [%0], %1;\n\t@!p bra W;\n\t}"
                     :: "r"(bar), "r"(parity) : "memory");
        acc ^= *reinterpret_cast<const u32*>(ring + (i % ST) * STEP + lane * PITCH + 4 * (i & 7));
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}

// The same stream with attn_decode_gqa's copies: each lane 16-byte cp.async.cg pieces.
template <int ST, int ROWB>
__global__ void __launch_bounds__(128) lane_stream(const char* __restrict__ kc, const char* __restrict__ vc,
                                                    int per, int Hkv, unsigned* out) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, h = blockIdx.y;
    const int c0 = blockIdx.x * per, nsteps = per / 16;
    const int mine = nsteps > warp ? (nsteps - warp + 3) / 4 : 0;
    constexpr int STEP = 32 * ROWB, PIECES = STEP / 16 / 32;     // 16-byte pieces a lane a step
    unsigned char* ring = smem + warp * ST * STEP;
    auto issue = [&](int i) {
        const int slot = i % ST, kb = c0 + (warp + i * 4) * 16;
#pragma unroll
        for (int j = 0; j < PIECES; ++j) {
            const int x = j * 32 + lane, row = x / (ROWB / 16), piece = x % (ROWB / 16);
            const char* src = (row < 16 ? kc : vc) + ((size_t)(kb + (row & 15)) * Hkv + h) * ROWB + piece * 16;
            const u32 dst = smem_u32(ring + slot * STEP + x * 16);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
        }
    };
    for (int i = 0; i < ST - 1; ++i) {
        if (i < mine) issue(i);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    u32 acc = 0;
    for (int i = 0; i < mine; ++i) {
        if (i + ST - 1 < mine) issue(i + ST - 1);
        asm volatile("cp.async.commit_group;" ::: "memory");
        asm volatile("cp.async.wait_group %0;" :: "n"(ST - 1) : "memory");
        acc ^= *reinterpret_cast<const u32*>(ring + (i % ST) * STEP + lane * 16 + 4 * (i & 3));
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
'''


def main():
    heads, rowb = 32, 256
    kinds = [("tma", st, rowb + 16 * p) for st in (2, 3, 4) for p in (0, 1)] + [("lane", st, rowb) for st in (2, 3)]
    exprs = [f"tma_stream<{st}, {rowb}, {pitch}>" for k, st, pitch in kinds if k == "tma"] + \
            [f"lane_stream<{st}, {rowb}>" for k, st, _ in kinds if k == "lane"]
    mod = cp.RawModule(code=SRC, options=("-std=c++17", "--gpu-architecture=sm_90a"), name_expressions=exprs)
    out = cp.zeros(1, cp.uint32)
    for keys in (2048, 8192):
        kc = cp.ones(keys * heads * rowb // 4, cp.uint32)
        vc = cp.ones(keys * heads * rowb // 4, cp.uint32)
        nbytes = 2 * keys * heads * rowb
        for splits in (8, 16):
            per = keys // splits
            for kind, st, pitch in kinds:
                name = f"tma_stream<{st}, {rowb}, {pitch}>" if kind == "tma" else f"lane_stream<{st}, {rowb}>"
                f = mod.get_function(name)
                smem = 4 * st * 32 * pitch
                f.max_dynamic_shared_size_bytes = smem
                args = (kc, vc, np.int32(per), np.int32(heads), out)
                for _ in range(3):
                    f((splits, heads), (128,), args, shared_mem=smem)
                s, e = cp.cuda.Event(), cp.cuda.Event()
                s.record()
                for _ in range(50):
                    f((splits, heads), (128,), args, shared_mem=smem)
                e.record()
                e.synchronize()
                us = cp.cuda.get_elapsed_time(s, e) * 1e3 / 50
                print(json.dumps(dict(keys=keys, splits=splits, kernel=kind, st=st, pitch=pitch, smem_kb=smem / 1024,
                                      regs=f.num_regs, us=round(us, 2), tbs=round(nbytes / us / 1e6, 2))), flush=True)


if __name__ == "__main__":
    main()
