"""Batched decode of a random Llama-2-7B-shaped W3-PoT × INT8 model, tokens along the pot3-a8
GEMV's grid x against y, beside A8W4, in one process.

    python bench/pa8_batches.py [--batches 2,4,8,16] [--steps 32] [--model llama7b|smollm2]

Why: the pot3-a8 GEMV (cuda/gemv_pot_a8.cu) reads a layer's weights once a token. With the
tokens along the grid's y (WB_TUNE.pa8_tok_x = 0), every token's pass over the weights comes
from DRAM: batch 8 decoded 1063 tok/s against A8W4's 2848 (H100, session 41). With them along
x (the default), a row block's M blocks are issued together and all but the first should find
its weights in L2. Each setting builds its own CudaModel (its step graphs capture the launches
as the setting makes them) over the same weights; rows as `python -m engine.bench e2e`.
"""
import argparse

from engine.bench.common import copy_bandwidth, cp_or_fail
from engine.bench.e2e import MODELS, _setting, bench_model, format_table, random_model
from engine.gpu.tuning import WB_TUNE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="2,4,8,16", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama7b")
    a = ap.parse_args(argv)
    try:
        batches = tuple(int(b) for b in a.batches.split(","))
    except ValueError:
        ap.error(f"--batches takes comma-separated integers, got {a.batches!r}")
    if not batches or min(batches) < 1 or a.steps < 1:
        ap.error("--batches and --steps must be positive")
    cp = cp_or_fail()
    bw = copy_bandwidth() * 1e9
    shape, label = MODELS[a.model]
    rows = bench_model(cp, label + " A8W4", random_model(shape, True), prefill_lens=(), batches=batches,
                       steps=a.steps, bw=bw)
    pmw = random_model(shape, 3, act="dynamic")
    name = label.split(" (")[0] + " (random W3-PoT, INT8 activations)"
    for tok_x in (1, 0, 1):         # the default twice, around the other: drift shows
        with _setting(WB_TUNE, pa8_tok_x=bool(tok_x)):
            rows += bench_model(cp, f"{name} tok_x={tok_x}", pmw, prefill_lens=(), batches=batches,
                                steps=a.steps, bw=bw)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
