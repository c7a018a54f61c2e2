"""A prefill's linears alone, A8W4 against FP16, each as the prefill runs it and in graphs.

    python bench/prefill_linears.py [--tokens 512,2048] [--model llama7b|smollm2]

For each linear kind (q|k|v, o, gate|up, down) of a random Llama-2-7B-shaped DGQ model and its
FP16 copy (cuBLAS), at each length: µs a call, (hot) 32 calls of layer 0's linear captured in a
CUDA graph and replayed, (walk) layer i's for i = 0..31 the same way (each call's weights
cold, as in a prefill), (flushed) layer i's alone after 200 MB of writes. The graphs keep the
host out of the figures: bench/prefill_breakdown.py brackets eager launches with events, which
at 512 tokens (a host-bound prefill) also count the host's gaps between them. Sums of `walk`
over the kinds and layers are what the prefill's linears cost on the GPU.
"""
import argparse

import numpy as np

from engine.bench.common import warm_clocks
from engine.bench.e2e import LLAMA2_7B, SMOLLM2, dequantized_copy, random_model
from engine.gpu import launch, tuning
from engine.gpu.backend import cupy_or_none
from engine.gpu.model import CudaModel

KINDS = ("qkv", "o", "gu", "down")


def time_linears(cp, gm, m: int, flush) -> dict:
    """{kind: (hot, walk, flushed) µs a call} for m rows (after a warm prefill of m tokens)."""
    cache = gm.new_cache(m + 8)
    toks = np.random.default_rng(0).integers(0, gm.config.vocab_size, m)

    def prefill():
        cache.lens_host[:] = 0
        gm.prefill(toks, cache)
    warm_clocks(cp, prefill)                     # compiles, sizes buffers, raises the clocks
    b, layers = gm._bufs, gm.layers
    outs = {"qkv": b.qkv[:m], "o": b.y[:m], "gu": b.gu[:m], "down": b.y[:m]}
    e0, e1, st = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Stream()
    res = {}
    for kind in KINDS:
        lin0 = getattr(layers[0], kind)
        x8 = b.x8(m, lin0.kp)
        xh = b.xh(m, lin0.kp) if lin0.w16 is not None else None

        def call(L):
            getattr(L, kind)(x8, b.sx[:m], xh, outs[kind])
        got = []
        for walk in (False, True):
            with st:
                with launch.capturing():
                    st.begin_capture()
                    for L in layers if walk else [layers[0]] * len(layers):
                        call(L)
                    g = st.end_capture()
                ts = []
                for _ in range(7):
                    e0.record(st)
                    g.launch(st)
                    e1.record(st)
                    e1.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(e0, e1) / len(layers))
            got.append(1e3 * float(np.median(ts[2:])))
        ts = []
        for i, L in enumerate(layers):
            flush.fill(i)                        # also hides the host's launch behind it
            e0.record()
            call(L)
            e1.record()
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1))
        got.append(1e3 * float(np.median(ts)))
        res[kind] = tuple(got)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--model", choices=("llama7b", "smollm2"), default="llama7b")
    a = ap.parse_args()
    lens = [int(t) for t in a.tokens.split(",")]
    cp = cupy_or_none()
    tuning.PREFILL.graphs = 0                    # the warm prefills need no graphs of their own
    mw = random_model(LLAMA2_7B if a.model == "llama7b" else SMOLLM2, True)
    flush = cp.zeros(200 << 20, cp.int8)
    table = {}
    for label, weights in (("A8W4", mw), ("FP16", None)):
        gm = CudaModel(weights or dequantized_copy(mw))
        for m in lens:
            table[label, m] = time_linears(cp, gm, m, flush)
        del gm
        cp.get_default_memory_pool().free_all_blocks()
    print("| tokens | linear | A8W4 hot | A8W4 walk | A8W4 flushed | FP16 hot | FP16 walk | FP16 flushed | FP16 / A8W4 walk |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in lens:
        for kind in KINDS:
            q, f = table["A8W4", m][kind], table["FP16", m][kind]
            print(f"| {m} | {kind} | {q[0]:.1f} | {q[1]:.1f} | {q[2]:.1f} | {f[0]:.1f} | {f[1]:.1f} | {f[2]:.1f} | "
                  f"{f[1] / q[1]:.2f}× |")
        nl = len(mw.layers)
        qs, fs = (sum(table[p, m][k][1] for k in KINDS) * nl / 1e3 for p in ("A8W4", "FP16"))
        print(f"| {m} | all, {nl} layers (ms) | | {qs:.2f} | | | {fs:.2f} | | {fs / qs:.2f}× |")


if __name__ == "__main__":
    main()
