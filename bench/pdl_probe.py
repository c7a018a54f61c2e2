"""Does programmatic dependent launch overlap kernels inside a CUDA graph?

    python bench/pdl_probe.py

A chain of probe kernels, each stamping %globaltimer at entry (before its griddepcontrol.wait),
after the wait, and at its end (after spinning a few microseconds). With PDL the next kernel's
entry comes before the previous kernel's end; without it, after. Printed per setting: the median
of entry(i+1) - end(i) (negative: the next kernel was resident while this one ran) and of
post-wait(i+1) - end(i) (the dependency's resolution latency), in microseconds. Eager chains
are timed too: engine/gpu/launch.py uses PDL only under stream capture, so there they show CuPy's
plain launches both ways (the host-side launch cost).
"""
import numpy as np

from engine.gpu import launch
from engine.gpu.backend import cupy_or_none

SRC = r'''
extern "C" __global__ void probe(unsigned long long* t, int i, long long spin_ns) {
    unsigned long long t0, t1, t2;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t2)); } while ((long long)(t2 - t1) < spin_ns);
    if (threadIdx.x == 0 && blockIdx.x == 0) { t[3 * i] = t0; t[3 * i + 1] = t1; t[3 * i + 2] = t2; }
}
'''


def main():
    cp = cupy_or_none()
    mod = cp.RawModule(code=SRC, options=("--gpu-architecture=sm_90a",))
    k = launch.Kernel(mod.get_function("probe"))
    n = 24
    for blocks in (1, 132):
        for spin_us in (2, 8):
            for graph in (False, True):
                for pdl in (True, False):
                    t = cp.zeros((3 * n,), cp.uint64)
                    stream = cp.cuda.Stream(non_blocking=True)

                    def chain():
                        for i in range(n):
                            k((blocks,), (128,), (t, np.int32(i), np.int64(spin_us * 1000)))
                    ctx = launch.plain_launches() if not pdl else _null()
                    with ctx, stream:
                        if graph:
                            with launch.capturing():
                                stream.begin_capture()
                                chain()
                                g = stream.end_capture()
                            g.launch(stream)
                            stream.synchronize()
                            g.launch(stream)
                        else:
                            chain()
                            stream.synchronize()
                            chain()
                        stream.synchronize()
                    s = t.get().astype(np.int64).reshape(n, 3)
                    entry_gap = np.median(s[1:, 0] - s[:-1, 2]) / 1e3
                    wait_gap = np.median(s[1:, 1] - s[:-1, 2]) / 1e3
                    per = (s[-1, 2] - s[0, 0]) / 1e3 / n
                    print(f"blocks {blocks:3d} spin {spin_us} us {'graph' if graph else 'eager'} "
                          f"PDL {'on ' if pdl else 'off'}: entry-end {entry_gap:7.2f} us, "
                          f"wait-end {wait_gap:6.2f} us, per kernel {per:6.2f} us")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
