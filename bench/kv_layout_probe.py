"""Does the K/V cache layout cost decode attention bandwidth?

    python bench/kv_layout_probe.py > out.jsonl

Streams one layer's K of the Llama-2-7B shape (fp16, D = 128: 256-byte rows, 32 kv heads) with
one block per (split of the keys, kv head), as attn_decode_gqa's grid does, in two layouts:
token-major rows (row = key·Hkv + h, the engine's cache: a head's rows 8 KB apart) and
head-major rows (row = h·keys + key, contiguous). The probe only loads (16-byte no-L1 loads,
U in flight a thread) and XORs; 8 buffers, 5 rounds, plain launches, µs a launch and TB/s.
One JSON line per (keys, splits, threads, U). docs/KERNELS.md cites the H200 run.
"""
import json

import cupy as cp

SRC = r'''
template <int MODE, int U>
__global__ void probe(const uint4* __restrict__ p, int keys, int heads, int per, unsigned* out) {
    const int h = blockIdx.y, k0 = blockIdx.x * per;
    unsigned acc = 0;
    const int n = per * 16;
    for (int i = threadIdx.x; i < n; i += blockDim.x * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int idx = min(i + u * (int)blockDim.x, n - 1);
            int key = k0 + idx / 16, piece = idx % 16;
            size_t row = MODE == 0 ? (size_t)key * heads + h : (size_t)h * keys + key;
            const uint4* a = p + row * 16 + piece;
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(a));
        }
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
'''


def main():
    mod = cp.RawModule(code=SRC, options=("-std=c++17",), name_expressions=[f"probe<{m},{u}>" for m in (0, 1) for u in (4, 8)])
    out = cp.zeros(1, cp.uint32)
    heads = 32
    for keys in (2048, 8192):
        nbytes = keys * heads * 256
        bufs = [cp.ones(nbytes // 4, cp.uint32) for _ in range(8)]
        for splits in (8, 16, 32):
            for threads in (128, 256):
                for u in (4, 8):
                    res = {}
                    for mode in (0, 1):
                        f = mod.get_function(f"probe<{mode},{u}>")
                        per = keys // splits
                        args = lambda b: (b, cp.int32(keys), cp.int32(heads), cp.int32(per), out)
                        for b in bufs: f((splits, heads), (threads,), args(b))
                        s, e = cp.cuda.Event(), cp.cuda.Event()
                        s.record()
                        for r in range(5):
                            for b in bufs: f((splits, heads), (threads,), args(b))
                        e.record(); e.synchronize()
                        us = cp.cuda.get_elapsed_time(s, e) * 1e3 / 40
                        res["token-major" if mode == 0 else "head-major"] = round(us, 2)
                    print(json.dumps(dict(keys=keys, MB=round(nbytes / 1e6, 1), splits=splits, threads=threads, U=u,
                                          us=res, tbs={k: round(nbytes / v / 1e6, 2) for k, v in res.items()})), flush=True)
        del bufs


if __name__ == "__main__":
    main()
