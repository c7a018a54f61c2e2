"""GPU time per call of the sampling kernel (cuda/sample.cu) by vocabulary, batch and setting.

    python bench/sample_kernel.py [--vocab 32000 49152 151936] [--batch 1 32]

Rows of N(0, 2.5²) fp16 logits (the spread of an LLM head's output). Each case is 50
launches captured as one CUDA graph and replayed, so the figure is device time per
call without Python's launch cost. "greedy" is the argmax path every setting starts with.
"""
import argparse

import numpy as np

from engine.gpu import ops as ops_cuda
from engine.gpu.backend import cupy_or_none

SETTINGS = {"greedy": (0.0, 0, 1.0), "T=1": (1.0, 0, 1.0), "T=1 k=50": (1.0, 50, 1.0),
            "T=0.8 p=0.9": (0.8, 0, 0.9), "T=0.8 k=50 p=0.9": (0.8, 50, 0.9)}


def time_call(cp, launch, reps: int = 50, replays: int = 5) -> float:
    """Microseconds per launch() inside a replayed CUDA graph."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        launch()                                       # compile outside the capture
        stream.begin_capture()
        for _ in range(reps):
            launch()
        graph = stream.end_capture()
        graph.launch(stream)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(stream)
        for _ in range(replays):
            graph.launch(stream)
        e1.record(stream)
        e1.synchronize()
    return 1e3 * cp.cuda.get_elapsed_time(e0, e1) / (reps * replays)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152, 151936])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    a = ap.parse_args()
    cp = cupy_or_none()
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print("| V | batch | " + " | ".join(SETTINGS) + " |  (µs per call)")
    print("|---|---|" + "---|" * len(SETTINGS))
    for v in a.vocab:
        for b in a.batch:
            logits = cp.asarray(np.random.default_rng(0).normal(size=(b, v)) * 2.5, cp.float16)
            seq, pos, out = cp.arange(b, dtype=cp.int32), cp.zeros((b,), cp.int32), cp.zeros((b,), cp.int32)
            row = []
            for t, k, p in SETTINGS.values():
                params = cp.asarray(ops_cuda.sample_params(t, k, p, seed=1))
                row.append(time_call(cp, lambda pr=params: ops_cuda.sample_rows(logits, pr, seq, pos, out)))
            print(f"| {v} | {b} | " + " | ".join(f"{us:.1f}" for us in row) + " |")


if __name__ == "__main__":
    main()
