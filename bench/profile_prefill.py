"""Where a prefill's time goes: GPU-bound or host-bound, and the host's top functions.

    python bench/profile_prefill.py [--model smollm2|llama7b] [--tokens 512]

Times the prefill (median of 5 after 0.5 s of warm-up) and the host's time to issue its launches
(engine.bench.e2e.prefill_host_ms: near the total, the host bounds it), then runs one under
cProfile and prints the functions with the most host time. Prefill launches eagerly, through CuPy (no PDL):
captured prefills (tuning.PREFILL) are off unless --graphs, which times the replays instead.
"""
import argparse
import cProfile
import pstats

import numpy as np

from engine.gpu.backend import cupy_or_none
from engine.bench.e2e import LLAMA2_7B, SMOLLM2, _timed, dequantized_copy, prefill_host_ms, random_model
from engine.gpu import tuning
from engine.gpu.model import CudaModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("llama7b", "smollm2"), default="smollm2")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--row-cta-width", type=int, default=None, help="tuning.ROWS.cta_width for this run")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="replay captured prefills (tuning.PREFILL) as the engine does")
    a = ap.parse_args()
    if not a.graphs:
        tuning.PREFILL.graphs = 0
    if a.row_cta_width:
        tuning.ROWS.cta_width = a.row_cta_width
    cp = cupy_or_none()
    mw = random_model(LLAMA2_7B if a.model == "llama7b" else SMOLLM2, True)
    gm = CudaModel(dequantized_copy(mw) if a.fp16 else mw)
    cache = gm.new_cache(a.tokens)
    toks = np.random.default_rng(0).integers(0, mw.config.vocab_size, a.tokens)

    def run():
        cache.lens_host[:] = 0
        gm.prefill(toks, cache)
    total = _timed(cp, run, 5)                      # after 0.5 s of warm-up
    host = prefill_host_ms(cp, run)
    print(f"{a.model} {'FP16' if a.fp16 else 'A8W4'} prefill {a.tokens}: {1e3 * total:.2f} ms "
          f"({a.tokens / total:.0f} tok/s); the host issues its launches in {host:.2f} ms")
    if a.no_profile:
        return
    prof = cProfile.Profile()
    prof.enable()
    run()
    cp.cuda.Device().synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
