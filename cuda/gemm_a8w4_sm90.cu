// gemm_a8w4_sm90.cu — dual-grained A8W4 GEMM on Hopper warpgroup MMA (wgmma, sm_90a).
//
// Same function and layouts as gemm_a8w4.cu (see there and common.cuh), for
// prefill-sized M on H100/H200. It computes Y^T = W8 * X8^T so that the
// dequantized weights are the *register* A operand of
//   wgmma.mma_async.m64n{BT}k32.s32.s8.s8   (A: 64 channels x 32 k from registers,
//                                            B: BT tokens x 32 k from shared memory)
// (the approach of vLLM's Machete): the packed int4 weights go
// from global memory straight into registers (16-byte loads, prefetched WPF
// stages ahead), are widened to int8 with the IMAD trick of common.cuh, and
// never touch shared memory. Only the activations are staged: a STAGES-deep
// cp.async pipeline of BT x 128-byte tiles in the 128-byte-swizzled K-major
// layout that the wgmma shared-memory descriptor reads directly.
// Block = NWG warpgroups; warp w owns row tile rt0 + w (16 channels), so a block
// covers NWG*64 channels x BT tokens. Measured on H100 (docs/KERNELS.md): the
// kernel is bound by how many wgmmas each warpgroup keeps in flight, not by L2
// (44 %) or issue slots (50 %); OVL=2 (4 k-steps in flight) with 2 blocks per SM
// is the fastest variant, NWG=4 and BT=256 (one block per SM) are slower.
// wgmma runs at twice the int8 rate of mma.sync on H100, which is what makes this
// path worth the extra file (M=4096: 814 vs 550 TOP/s for the mma.sync kernel).
// The fp16 epilogue is staged through shared memory for 16-byte coalesced
// stores (the fragment holds 2 tokens x 1 channel per register pair).
#include "common.cuh"

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Pin a register so the compiler cannot read an accumulator before wgmma_wait.
__device__ __forceinline__ void reg_fence(int& r) { asm volatile("" : "+r"(r) :: "memory"); }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 B apart.
__device__ __forceinline__ u64 desc_sw128(u32 addr) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// Small-M tiles (decode batches of 17-32): N = 32 holds 16 accumulators a thread.
__device__ __forceinline__ void wgmma_m64n32k32_rs(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ void wgmma_m64n64k32_rs(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ void wgmma_m64n128k32_rs(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
          "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
          "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
          "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
          "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ void wgmma_m64n256k32_rs(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, {%128, %129, %130, %131}, %132, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
          "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
          "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
          "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
          "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
          "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
          "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
          "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
          "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
          "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
          "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
          "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
          "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

template <int BT> struct WgmmaRS;
template <> struct WgmmaRS<32> {
    static __device__ __forceinline__ void run(int* d, const u32 (&a)[4], u64 desc) {
        wgmma_m64n32k32_rs(d, a[0], a[1], a[2], a[3], desc);
    }
};
template <> struct WgmmaRS<64> {
    static __device__ __forceinline__ void run(int* d, const u32 (&a)[4], u64 desc) {
        wgmma_m64n64k32_rs(d, a[0], a[1], a[2], a[3], desc);
    }
};
template <> struct WgmmaRS<128> {
    static __device__ __forceinline__ void run(int* d, const u32 (&a)[4], u64 desc) {
        wgmma_m64n128k32_rs(d, a[0], a[1], a[2], a[3], desc);
    }
};
template <> struct WgmmaRS<256> {
    static __device__ __forceinline__ void run(int* d, const u32 (&a)[4], u64 desc) {
        wgmma_m64n256k32_rs(d, a[0], a[1], a[2], a[3], desc);
    }
};

// Launch bounds: 2 blocks per SM need <= 128 registers: 2 warpgroups and a
// 2-stage weight prefetch ring; deeper rings or 4 warpgroups are not bounded (the 64-token tile
// with WPF = 4 still compiles to 108-127 registers and fits 2; bounding it changes its schedule,
// unmeasured). BT = 32 (16 accumulators a thread) with the 2-stage ring: 3 blocks, 24 warps an
// SM, within 80 registers (WPF = 4 spills there: 2 blocks). What fits in the end is
// engine/gpu/tuning.py wgmma_blocks, held to the driver's occupancy query by a GPU test.
template <int BT, int NWG, int WPF>
struct WgmmaMinBlocks {
    static constexpr int value = (BT <= 32 && NWG == 2 && WPF <= 2) ? 3
                               : (NWG == 2 && (BT <= 32 || (BT <= 128 && WPF <= 2))) ? 2
                               : (NWG == 1 && BT <= 128) ? (WPF <= 2 ? 4 : 3) : 1;
};

// Whether a tile sums split K through a cluster (the host's rule: engine/gpu/ops.py _split_cluster):
// the WPF = 0 tiles where that measured faster (H200, same process, against the kernel without the
// cluster code). Compiled into the 256-token tile the code took 6-10 % off its main loop, into the
// one-warpgroup 128-token tile 0-11 % (it also spilled 12 bytes in its main loop at 128 registers).
template <int BT, int NWG, int WPF>
struct WgmmaCluster { static constexpr bool value = WPF == 0 && (BT <= 64 || (BT == 128 && NWG == 2)); };

// Whether the WPF = 0 main loop unrolls its STAGES stages, so that each stage's shared-memory
// buffer offsets are constants: the 256-token and the one-warpgroup 128-token tiles, whose stage
// shrank from 508 / 446 to ~345 / ~342 instructions (nvcc 13.0 SASS) and ran 5-8 % / 3-5 % faster
// (H200, same process, M = 128-4096). The other tiles lost 1-4 % unrolled and loop.
template <int BT, int NWG>
struct WgmmaUnrollStages { static constexpr bool value = BT == 256 || (BT == 128 && NWG == 1); };

__device__ __forceinline__ void reg_fence4(u32 (&a)[4]) {
    asm volatile("" : "+r"(a[0]), "+r"(a[1]), "+r"(a[2]), "+r"(a[3]) :: "memory");
}

// A fragment of k-step s (0..3) of a stage from the two 16-byte weight vectors:
// chunk s/2, words .x/.y (k-step 0 of the chunk) or .z/.w (k-step 1).
__device__ __forceinline__ void dq_kstep(const u32x4 (&w)[2], const DqConst (&lo)[2], const DqConst (&hi)[2],
                                         int s, u32 (&a)[4]) {
    const int cl = s >> 1;
    if (s & 1) {
        dq_word(w[cl].z, lo[cl], a[0], a[2]);
        dq_word(w[cl].w, hi[cl], a[1], a[3]);
    } else {
        dq_word(w[cl].x, lo[cl], a[0], a[2]);
        dq_word(w[cl].y, hi[cl], a[1], a[3]);
    }
}

// What a block computes. Tiles below tail_from run whole (or `splits` ways along grid y); the
// last, partial wave's tiles from tail_from on run tail_splits ways each, split-major along
// grid x, their partials in a workspace of their own (slot: the tile's place in the tail; the
// host never sets both splits > 1 and a tail, engine/gpu/perfmodel.py wgmma_tail). Against the
// kernel before the tail (H200, same process): -2 % (256-token tile) to +2.6 % (128/4/1/0/2),
// and 0-15 more registers, which took 64/4/1/2/2's fifth block an SM (tuning.wgmma_blocks).
// Re-reading %ctaid through asm volatile at the epilogue, so as not to hold the job through the
// main loop, ran 2.5-7 % slower.
struct TileJob { int tile, split, nsplit, slot, nslots; };
__device__ __forceinline__ TileJob tile_job(int num_tiles, int splits, int tail_from, int tail_splits) {
    const u32 bx = blockIdx.x, by = blockIdx.y;
    TileJob j{(int)bx, (int)by, splits, (int)bx, num_tiles};
    if (j.tile >= tail_from) {
        const int tail = num_tiles - tail_from, i = j.tile - tail_from;
        j.slot = i % tail;
        j.tile = tail_from + j.slot;
        j.split = i / tail;
        j.nsplit = tail_splits;
        j.nslots = tail;
    }
    return j;
}

// BT     tokens per block (wgmma N: 32, 64, 128 or 256)
// STAGES activation pipeline depth (shared memory buffers)
// NWG    warpgroups per block; block = NWG*64 output channels, warp w owns row tile rt0+w
// WPF    weight prefetch distance in stages (register ring of WPF buffers); 0: the weights
//        and their meta words travel with the activations through the STAGES-deep cp.async
//        ring in shared memory instead (each lane copies and reads back its own 16-byte words;
//        lane t = 0 copies its row's meta word for the four lanes t), so PD stages of weights
//        are in flight a warp, not one or two: at M = 17-64 the register ring left the warps
//        waiting on their weight loads (Nsight Compute, H200, M = 32, 4096x12288: 18 % of all
//        stall samples on the first use of a stage's meta word).
// OVL    0: dequantize a whole stage, 4 wgmmas, wait for all (v1/v2).
//        1: k-step pipeline — dequantize k-step s+1 while wgmma s runs (wait_group 1),
//           the last k-step of a stage stays in flight across the barrier, so the
//           activation prefetch is STAGES-2 deep (the buffer it refills is two stages old).
//        2: k-step ring of 4 A buffers — up to 4 wgmmas of one warpgroup in flight
//           (wait_group 3 before refilling the oldest buffer); same STAGES-2 prefetch.
template <int BT, int STAGES, int NWG, int WPF, int OVL, bool OUT_I32>
__global__ void __launch_bounds__(NWG * 128, (WgmmaMinBlocks<BT, NWG, WPF>::value)) gemm_a8w4_wgmma(
    const u32x4* __restrict__ qw, const u32* __restrict__ meta, const i8* __restrict__ x8,
    const float* __restrict__ sx, const float* __restrict__ s8, void* __restrict__ out,
    int* __restrict__ ws, int* __restrict__ counters,
    int M, int N, int R, int C, int Gp, int gshift, int ldx, int splits, int tail_from, int tail_splits) {
    pdl_trigger();
    constexpr int BK = 128;
    constexpr int NT = NWG * 128;       // threads
    constexpr int RTB = NWG * 4;        // row tiles per block
    constexpr int NACC = BT / 2;        // m64nBT int32 accumulators per thread
    constexpr int XS = BT * BK;         // bytes of one activation stage
    constexpr int OS = RTB * 16 + 8;    // epilogue staging row stride in halves (bank spread)
    constexpr int PD = OVL ? STAGES - 2 : STAGES - 1;   // activation stages in flight
    constexpr bool WSM = WPF == 0;      // weights through the shared-memory ring (see above)
    constexpr int WW = 2 * 512 + 2 * 32;                // a warp's weight + meta bytes a stage
    constexpr int WST = WSM ? NWG * 4 * WW : 0;         // bytes of one weight stage (after the x stages)
    static_assert(OVL >= 0 && OVL <= 2, "OVL is 0, 1 or 2");
    constexpr int NLX = (BT * 8) / NT;  // 16-byte activation copies per thread per stage
    static_assert(PD >= 1 && (WPF == 0 || WPF == 2 || WPF == 4), "bad pipeline shape");
    static_assert((BT * 8) % NT == 0, "activation tile must split evenly over the threads");
    extern __shared__ unsigned char smem_raw[];
    const u32 raw = smem_u32(smem_raw);
    const u32 sbase = (raw + 1023u) & ~1023u;   // swizzle atoms need 1024-byte alignment
    unsigned char* smem = smem_raw + (sbase - raw);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int num_m = (M + BT - 1) / BT, num_n = (R + RTB - 1) / RTB;
    const TileJob job = tile_job(num_m * num_n, splits, tail_from, tail_splits);
    const int split = job.split;
    int tm, tn;
    raster(job.tile, num_m, num_n, 8, tm, tn);
    const int m0 = tm * BT, rt0 = tn * RTB;
    const int rt = rt0 + warp;
    const bool rt_ok = rt < R;
    const int KT = C / 2;
    const int kt0 = (int)((long long)KT * split / job.nsplit);
    const int nkt = (int)((long long)KT * (split + 1) / job.nsplit) - kt0;

    // Addresses that do not change from stage to stage, computed once.
    // Copy i of a thread takes row tid/8 + i*NT/8, 16-byte chunk tid%8: NT/8 is a multiple of 8, so
    // every copy has the same swizzle and lands XROW bytes after the one before (an immediate offset).
    static_assert((NT / 8) % 8 == 0, "a thread's activation copies must share their swizzle");
    constexpr u32 XROW = (NT / 8) * 128;
    const i8* xsrc[NLX];
    u32 xdst[NLX];      // the register-ring tiles' offsets (as their register allocation was timed)
    bool xok[NLX];
#pragma unroll
    for (int i = 0; i < NLX; ++i) {
        const int idx = tid + i * NT;
        const int row = idx >> 3, ch = idx & 7;
        xok[i] = m0 + row < M;
        xsrc[i] = x8 + (size_t)(xok[i] ? m0 + row : 0) * ldx + ch * 16;
        xdst[i] = row * 128 + ((ch ^ (row & 7)) << 4);
    }
    const u32 xdst0 = (tid >> 3) * 128 + (((tid & 7) ^ ((tid >> 3) & 7)) << 4);   // = xdst[0]
    const u32x4* wptr = qw + (size_t)(rt_ok ? rt : 0) * C * 32 + lane;
    const u32* mptr = meta + (size_t)(rt_ok ? rt : 0) * Gp * 8 + g;
    const u64 dbase = desc_sw128(sbase);

    auto load_x = [&](int kt, int buf) {
#pragma unroll
        for (int i = 0; i < NLX; ++i)
            cp_async16(sbase + buf * XS + (WSM ? xdst0 + i * XROW : xdst[i]), xsrc[i] + (size_t)kt * BK, xok[i]);
    };
    // WSM: this lane's weight words (chunk cl at +cl*512) and its row's meta words (+1024 + cl*32) of a
    // stage; the four lanes t of a row read the word lane t = 0 copied, after the stage barrier
    const u32 wdst = sbase + STAGES * XS + warp * WW + lane * 16;
    const u32 mdst = sbase + STAGES * XS + warp * WW + 1024 + g * 4;   // row g's word, copied by lane t = 0
    auto load_ws = [&](int kt, int buf) {
#pragma unroll
        for (int cl = 0; cl < 2; ++cl) {
            cp_async16(wdst + buf * WST + cl * 512, wptr + (2 * kt + cl) * 32, rt_ok);
            if (t == 0) cp_async_ca<4>(mdst + buf * WST + cl * 32, mptr + ((2 * kt + cl) >> gshift) * 8, rt_ok);
        }
    };
    auto read_ws = [&](int buf, u32x4 (&w)[2], u32 (&mt)[2]) {
#pragma unroll
        for (int cl = 0; cl < 2; ++cl) {
            w[cl] = *reinterpret_cast<const u32x4*>(smem + (wdst - sbase) + buf * WST + cl * 512);
            mt[cl] = *reinterpret_cast<const u32*>(smem + (mdst - sbase) + buf * WST + cl * 32);
        }
    };
    auto load_w = [&](int kt, u32x4 (&w)[2], u32 (&mt)[2]) {
#pragma unroll
        for (int cl = 0; cl < 2; ++cl) {
            if (rt_ok) {
                w[cl] = ldg_stream(wptr + (2 * kt + cl) * 32);
                mt[cl] = ldg_u32(mptr + ((2 * kt + cl) >> gshift) * 8);
            } else {
                w[cl].x = w[cl].y = w[cl].z = w[cl].w = 0u;
                mt[cl] = 0u;   // S = 0: dequantizes to 0
            }
        }
    };

    int acc[NACC];
#pragma unroll
    for (int r = 0; r < NACC; ++r) acc[r] = 0;

    // The first WPF stages of weights (no kernel writes them) stream before the PDL wait
    // (cuda/pdl.cuh), in the shadow of the kernels before this one; the activations after it.
    u32x4 wb[WSM ? 1 : WPF][2];
    u32 mb[WSM ? 1 : WPF][2];
    if constexpr (WSM) {
#pragma unroll
        for (int s = 0; s < PD; ++s)
            if (s < nkt) load_ws(kt0 + s, s);     // in the first commit group below
    } else {
#pragma unroll
        for (int p = 0; p < WPF; ++p)
            if (p < nkt) load_w(kt0 + p, wb[p], mb[p]);
    }
    pdl_wait();
#pragma unroll
    for (int s = 0; s < PD; ++s) {
        if (s < nkt) load_x(kt0 + s, s);
        cp_async_commit();
    }

    u32 aring[4][4];   // OVL == 2: A fragments of the last 4 k-steps (read by in-flight wgmmas)

    // One 128-k stage = 4 wgmma k-steps. The registers that held stage i's weights are
    // refilled with stage i+WPF right after they are dequantized.
    // b = i % STAGES (a constant where the caller unrolls the stages)
    auto step = [&](int i, int b, u32x4 (&w)[2], u32 (&mt)[2]) {
        cp_async_wait<PD - 1>();
        fence_proxy_async();
        __syncthreads();   // stage i landed for all threads; the buffer refilled below is free
        {
            const int nx = i + PD;
            const int nb = b + PD < STAGES ? b + PD : b + PD - STAGES;
            if (nx < nkt) {
                load_x(kt0 + nx, nb);
                if constexpr (WSM) load_ws(kt0 + nx, nb);
            }
            cp_async_commit();
        }
        if constexpr (WSM) read_ws(b, w, mt);
        DqConst lo[2], hi[2];
        dq_meta(mt[0], lo[0], hi[0]);
        dq_meta(mt[1], lo[1], hi[1]);
        const u64 dstage = dbase + (u64)((b * XS) >> 4);
        if (OVL == 2) {
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                wgmma_wait<3>();       // the wgmma that last read aring[s] (4 k-steps ago) is done
                dq_kstep(w, lo, hi, s, aring[s]);
                reg_fence4(aring[s]);
                wgmma_fence();
                WgmmaRS<BT>::run(acc, aring[s], dstage + 2 * s);
                wgmma_commit();
            }
            if (!WSM && i + WPF < nkt) load_w(kt0 + i + WPF, w, mt);
        } else if (OVL == 1) {
            u32 a[2][4];
            dq_kstep(w, lo, hi, 0, a[0]);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                reg_fence4(a[s & 1]);
                wgmma_fence();
                WgmmaRS<BT>::run(acc, a[s & 1], dstage + 2 * s);
                wgmma_commit();
                if (s < 3) {
                    wgmma_wait<1>();   // k-step s-1 is done: its A registers are free
                    dq_kstep(w, lo, hi, s + 1, a[(s + 1) & 1]);
                }
            }
            if (!WSM && i + WPF < nkt) load_w(kt0 + i + WPF, w, mt);
            wgmma_wait<1>();           // only this stage's last k-step stays in flight
        } else {
            u32 a[4][4];
#pragma unroll
            for (int s = 0; s < 4; ++s) dq_kstep(w, lo, hi, s, a[s]);
            if (!WSM && i + WPF < nkt) load_w(kt0 + i + WPF, w, mt);
#pragma unroll
            for (int s = 0; s < 4; ++s) reg_fence4(a[s]);
            wgmma_fence();
#pragma unroll
            for (int s = 0; s < 4; ++s) WgmmaRS<BT>::run(acc, a[s], dstage + 2 * s);
            wgmma_commit();
            wgmma_wait<0>();
        }
    };
    if constexpr (WSM) {
        if constexpr (WgmmaUnrollStages<BT, NWG>::value) {
            for (int i0 = 0; i0 < nkt; i0 += STAGES) {   // the stages unrolled: buffer offsets are constants
#pragma unroll
                for (int b = 0; b < STAGES; ++b)
                    if (i0 + b < nkt) step(i0 + b, b, wb[0], mb[0]);
            }
        } else {
            for (int i = 0; i < nkt; ++i) step(i, i % STAGES, wb[0], mb[0]);
        }
    } else {
        for (int i = 0; i < nkt; i += WPF) {
#pragma unroll
            for (int p = 0; p < WPF; ++p)
                if (i + p < nkt) step(i + p, (i + p) % STAGES, wb[p], mb[p]);
        }
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
#pragma unroll
    for (int r = 0; r < NACC; ++r) reg_fence(acc[r]);

    // D fragment (per warp 16 channels x BT tokens): acc[4i+e] is channel
    // 16*rt + g + 8*(e>>1), token m0 + 8i + 2t + (e&1). This block finishes token groups
    // i in [ilo, ihi): all of them, or with split K over a cluster its share (cluster_split_reduce;
    // the tiles of WgmmaCluster only).
    int ilo = 0, ihi = BT / 8;
    static_assert(!WgmmaCluster<BT, NWG, WPF>::value || NACC * NT * 4 <= STAGES * XS,
                  "the cluster's partials reuse the stages' shared memory");
    if (WgmmaCluster<BT, NWG, WPF>::value && cluster_size() > 1) {
        __syncthreads();   // every warp is done with the stages
        cluster_split_reduce<NACC, NT>(acc, smem, ilo, ihi);
    } else if (!splitk_reduce<NACC, NT>(acc, ws, counters, job.slot, split, job.nsplit, job.nslots)) {
        return;
    }

    const int nb = DGQ_TILE_N * rt;
    if (OUT_I32) {
#pragma unroll
        for (int i = 0; i < BT / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (i < ilo || i >= ihi) continue;
                const int m = m0 + 8 * i + 2 * t + (e & 1), n = nb + g + 8 * (e >> 1);
                if (m < M && n < N) static_cast<int*>(out)[(size_t)m * N + n] = acc[4 * i + e];
            }
        return;
    }
    __syncthreads();   // everyone is done with the activation buffers: reuse them
    u16* o = reinterpret_cast<u16*>(smem);
    const float s8lo = (nb + g < N) ? s8[nb + g] : 0.f;
    const float s8hi = (nb + g + 8 < N) ? s8[nb + g + 8] : 0.f;
#pragma unroll
    for (int i = 0; i < BT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (i < ilo || i >= ihi) continue;
            const int ml = 8 * i + 2 * t + e;
            const float sm = (m0 + ml < M) ? sx[m0 + ml] : 0.f;
            o[ml * OS + 16 * warp + g] = f32_to_f16_bits(dg_epilogue(acc[4 * i + e], sm, s8lo));
            o[ml * OS + 16 * warp + g + 8] = f32_to_f16_bits(dg_epilogue(acc[4 * i + 2 + e], sm, s8hi));
        }
    __syncthreads();
    for (int idx = tid + 8 * ilo * RTB * 2; idx < 8 * ihi * RTB * 2; idx += NT) {
        const int ml = idx / (RTB * 2), v = idx % (RTB * 2);
        const int m = m0 + ml, n = DGQ_TILE_N * rt0 + 8 * v;
        if (m >= M || n >= N) continue;
        const u16* src = o + ml * OS + 8 * v;
        u16* dst = static_cast<u16*>(out) + (size_t)m * N + n;
        if (n + 8 <= N && (N & 7) == 0) {
            *reinterpret_cast<u32x4*>(dst) = *reinterpret_cast<const u32x4*>(src);
        } else {
            for (int q = 0; q < 8 && n + q < N; ++q) dst[q] = src[q];
        }
    }
}
