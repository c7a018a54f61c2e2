"""How fast can one decode-step-sized kernel read its weights? The read roofline of the GEMVs.

    python bench/read_roofline.py [--json PATH]

A probe kernel that only streams bytes (16-byte no-L1 loads, U loads in flight a thread, an
XOR that the compiler cannot drop) reads buffers of the 7B decode GEMVs' sizes (o 8.4 MB, down
22.5, q|k|v 25.2, gate|up 45.1 MB of A8W4 weights). Timed three ways, each 32 launches on 32
different buffers (no L2 reuse), replayed as one CUDA graph:
  - plain: stream-ordered launches;
  - pdl: programmatic dependent launch, each kernel reading before its griddepcontrol.wait
    (what a GEMV may do with weights) and waiting at its end;
  - one: a single launch over the 32 buffers back to back (no launch boundaries at all).
Printed: µs per buffer and TB/s read. The gap between "one" and the others is what any
per-kernel design loses at launch boundaries; the gap between "one" and the copy bandwidth is
what the memory system leaves.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from engine.gpu import launch
from engine.gpu.backend import cupy_or_none

SRC = r'''
template <int U, bool PDL>
__global__ void __launch_bounds__(256) read_probe(const uint4* __restrict__ p, long long n16, unsigned* out) {
    if (PDL) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (U - 1) * stride < n16; i += U * stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p + i + u * stride));
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) { uint4 v = p[i]; acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    if (PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (acc == 0x9e3779b9u) out[0] = acc;
}
'''
NAMES = [f"read_probe<{u},{p}>" for u in (4, 8) for p in ("false", "true")]
SIZES = {"o": 8.39e6, "down": 22.5e6, "qkv": 25.2e6, "gate|up": 45.1e6}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON lines")
    args = ap.parse_args(argv)
    cp = cupy_or_none()
    if cp is None:
        raise SystemExit("read_roofline needs a GPU")
    mod = cp.RawModule(code=SRC, options=("--gpu-architecture=sm_90a", "-std=c++17"), name_expressions=NAMES)
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    out = cp.zeros((1,), cp.uint32)
    rows = []
    n_buf = 32
    for what, nbytes in SIZES.items():
        n16 = int(nbytes) // 16
        big = cp.empty((n_buf * n16 * 4,), dtype=cp.uint32)        # contents do not matter
        bufs = [big[b * n16 * 4:(b + 1) * n16 * 4] for b in range(n_buf)]
        for u in (4, 8):
            for bps in (4, 8, 16):
                grid = sms * bps
                for mode in ("plain", "pdl", "one"):
                    pdl = mode == "pdl"
                    k = launch.Kernel(mod.get_function(f"read_probe<{u},{'true' if pdl else 'false'}>"))
                    stream = cp.cuda.Stream(non_blocking=True)

                    def chain():
                        if mode == "one":
                            k((grid,), (256,), (big, np.int64(n_buf * n16), out))
                            return
                        for b in bufs:
                            k((grid,), (256,), (b, np.int64(n16), out))
                    with (launch.capturing() if pdl else launch.plain_launches()), stream:
                        stream.begin_capture()
                        chain()
                        g = stream.end_capture()
                    for _ in range(2):
                        g.launch(stream)
                    stream.synchronize()
                    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                    reps = 10
                    e0.record(stream)
                    for _ in range(reps):
                        g.launch(stream)
                    e1.record(stream)
                    e1.synchronize()
                    us = cp.cuda.get_elapsed_time(e0, e1) * 1e3 / reps / n_buf
                    row = dict(buffer=what, mb=round(nbytes / 1e6, 1), unroll=u, blocks_per_sm=bps, mode=mode,
                               us=round(us, 2), tb_s=round(n16 * 16 / us / 1e6, 3))
                    rows.append(row)
                    print(f"{what:8s} {row['mb']:5.1f} MB U={u} {bps:2d} blocks/SM {mode:5s} "
                          f"{row['us']:7.2f} us {row['tb_s']:.2f} TB/s", flush=True)
        del big, bufs
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
