"""Batched decode of a random Llama-2-7B-shaped W3-PoT × INT8 model under WB_TUNE settings of the
pot3-a8 GEMV (tokens along the grid's x or y, tokens a block), beside A8W4, in one process.

    python bench/pa8_batches.py [--batches 2,4,8,16] [--steps 32] [--model llama7b|smollm2]
                                [--settings "pa8_tok_x=0;pa8_mt=4;pa8_mt=4,pa8_rb4_max_k=65536"]

Why: the pot3-a8 GEMV (cuda/gemv_pot_a8.cu) reads a layer's weights once a token. With the
tokens along the grid's y (WB_TUNE.pa8_tok_x = 0), every token's pass over the weights comes
from DRAM: batch 8 decoded 1063 tok/s against A8W4's 2848 (H100, session 41). With them along
x (the default), a row block's M blocks are issued together and the later ones should find its
weights in L2. With WB_TUNE.pa8_mt > 1 a block decodes each chunk's weights once for MT tokens.
The W3 rows run as landed, then under each of --settings (';' between settings, ',' between
FIELD=INT of one), then as landed again (drift shows). Each builds its own CudaModel (its step
graphs capture the launches as the setting makes them) over the same weights; rows as
`python -m engine.bench e2e`.
"""
import argparse

from engine.bench.common import copy_bandwidth, cp_or_fail
from engine.bench.e2e import MODELS, _ab_setting, bench_model, format_table, parse_ab, random_model
from engine.gpu import pot_a8

DEFAULT_SETTINGS = "pa8_mt=1;pa8_tok_x=0,pa8_mt=1;pa8_mt=2;pa8_mt=4;pa8_mt=2,pa8_rb4_max_k=65536"


def parse_settings(text: str) -> list[dict]:
    """';'-separated settings, each ','-separated FIELD=INT of WB_TUNE's int or bool fields (pa8_mt
    1 or one of pot_a8.MTS), checked before any GPU time by e2e's --ab parser (as wb.FIELD);
    ValueError names a bad one. Each dict is parse_ab's, keys wb.FIELD."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        d = parse_ab(",".join("wb." + kv.strip() for kv in item.split(",")))
        if d.get("wb.pa8_mt", 1) not in (1, *pot_a8.MTS):
            raise ValueError(f"pa8_mt={d['wb.pa8_mt']}: 1 or one of {pot_a8.MTS}")
        out.append(d)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="2,4,8,16", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama7b")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="WB_TUNE settings to compare (module docstring)")
    a = ap.parse_args(argv)
    try:
        settings = parse_settings(a.settings)
    except ValueError as e:
        ap.error(str(e))
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
    for d in [{}] + settings + [{}]:  # as landed first and last: drift shows
        with _ab_setting(d):
            suffix = ",".join(f"{k[len('wb.'):]}={int(v)}" for k, v in d.items()) or "as landed"
            rows += bench_model(cp, f"{name} {suffix}", pmw, prefill_lens=(), batches=batches,
                                steps=a.steps, bw=bw)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
