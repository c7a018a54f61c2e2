"""`python -m engine.parallel [WEIGHTS | --shape NAME] --tp N [--check T]`: how a model splits over N ranks.

Prints what each rank would hold (query and KV heads, FFN channels, vocabulary rows) and its
weight bytes, or the one error that says why the model cannot be split that way. With --check T,
runs T tokens through the CPU simulation of the sharded forward (sim.TPModel) and through the
unsharded NumPy model, and prints how far their logits are apart and whether every rank agrees
on the greedy token. WEIGHTS: anything dgq-run reads (a q.safetensors, a GGUF, an HF directory);
none = the embedded default model. --shape NAME (engine/io/shapes.py: llama70b, llama3-405b, ...)
sizes a published shape from its config alone, A8W4 (dg, group 128) unless --kind / --group say
otherwise, with --context and --batch its KV cache per rank. The GPU run over several processes
is not built yet (docs/PARALLEL.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..io.layout import ModelError, ModelWeights, WeightsError


def rank_bytes(w: ModelWeights) -> int:
    """Bytes of a rank's weights: its linears (codes and scales), norms, biases, embedding and head."""
    total = w.embed.nbytes + w.norm.nbytes
    if w.lm_head is not w.embed:
        total += w.lm_head.nbytes if w.lm_head_q is None else sum(a.nbytes for a in w.lm_head_q)
    for L in w.layers:
        for lin in L.linears().values():
            total += lin.nbytes() if callable(getattr(lin, "nbytes", None)) else lin.nbytes
        floats = L.floats()
        total += sum(b.nbytes for b in floats.pop("bias").values())
        total += sum(a.nbytes for a in floats.values() if a is not None)
    return total


def check(weights: ModelWeights, tp: int, n_tokens: int, seed: int = 0) -> dict:
    """The simulated TP forward against the unsharded model on n_tokens random ids."""
    from ..model import Model  # noqa: PLC0415
    from .sim import TPModel  # noqa: PLC0415
    c = weights.config
    n_tokens = min(n_tokens, c.max_position_embeddings)
    tokens = np.random.default_rng(seed).integers(0, c.vocab_size, n_tokens)
    ref = Model(weights).forward(tokens)
    got, picks = TPModel(weights, tp).forward_greedy(tokens)
    scale = float(np.abs(ref).max()) or 1.0
    top2 = np.sort(ref[-1])[-2:]
    return {"tokens": n_tokens, "max_abs_diff": float(np.abs(got - ref).max()), "logit_scale": scale,
            "greedy_ref": int(ref[-1].argmax()), "greedy_ranks": picks, "top_gap": float(top2[1] - top2[0])}


GIB = 2**30


def shape_report(name: str, tp: int, kind: str, group: int, context: int, batch: int, kv8: bool) -> None:
    """Per-rank weight and KV-cache GiB of a named shape, from its config alone."""
    from ..io.shapes import shape_config  # noqa: PLC0415
    from .shard import kv_bytes, plan, planned_bytes  # noqa: PLC0415
    c = shape_config(name)
    pl = plan(c, tp, o_align=group, down_align=group)
    per = [(planned_bytes(c, p, kind, group), kv_bytes(c, p, context * batch, kv8)) for p in pl.ranks]
    whole = planned_bytes(c, plan(c, 1).ranks[0], kind, group)
    print(f"{name} ({c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
          f"{c.num_key_value_heads} KV heads), {kind} g{group}: {whole / GIB:.1f} GiB of weights, "
          f"over {tp} rank{'s' * (tp != 1)}; KV cache for {batch} × {context} positions, {'INT8' if kv8 else 'fp16'}")
    for line, (wb, kb) in zip(pl.describe().splitlines(), per):
        print(f"{line}; weights {wb / GIB:.2f} GiB + KV {kb / GIB:.2f} GiB = {(wb + kb) / GIB:.2f} GiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.parallel", description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", nargs="?", help="q.safetensors, GGUF or HF directory (default: the embedded model)")
    ap.add_argument("--tp", type=int, required=True, help="ranks (GPUs) to split the model over")
    ap.add_argument("--check", type=int, default=0, metavar="T",
                    help="also run T random tokens through the simulated sharded forward and compare")
    ap.add_argument("--shape", help="size a published shape instead of a file (engine/io/shapes.py)")
    ap.add_argument("--kind", default="dg", help="--shape: the linears' weight kind (default dg: A8W4)")
    ap.add_argument("--group", type=int, default=128, help="--shape: the quantization group (default 128)")
    ap.add_argument("--context", type=int, default=4096, help="--shape: cached positions a sequence (default 4096)")
    ap.add_argument("--batch", type=int, default=1, help="--shape: sequences (default 1)")
    ap.add_argument("--kv8", action="store_true", help="--shape: INT8 KV cache")
    args = ap.parse_args(argv)
    if args.check < 0:
        ap.error("--check must be 0 or more tokens")
    if args.shape is not None:
        if args.weights is not None or args.check:
            ap.error("--shape sizes a shape without weights: give no WEIGHTS and no --check")
        if min(args.group, args.context, args.batch) < 1:
            ap.error("--group, --context and --batch must be at least 1")
        try:
            shape_report(args.shape, args.tp, args.kind, args.group, args.context, args.batch, args.kv8)
        except ValueError as e:                         # ModelError, FormatError, an unknown shape
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
        return 0
    from ..io.checkpoint import default_model_path, load_checkpoint, model_weights  # noqa: PLC0415
    from .shard import shard  # noqa: PLC0415
    try:
        weights = model_weights(load_checkpoint(args.weights or default_model_path()))
        plan, shards = shard(weights, args.tp)
        whole = rank_bytes(weights)
        print(f"{args.weights or 'the default model'}: {weights.config.num_hidden_layers} layers, "
              f"{whole / 2**20:.1f} MiB of weights, over {plan.tp} rank{'s' * (plan.tp != 1)}")
        for line, w in zip(plan.describe().splitlines(), shards):
            print(f"{line}; {rank_bytes(w) / 2**20:.1f} MiB")
        if args.check:
            r = check(weights, plan.tp, args.check)
            agree = len(set(r["greedy_ranks"])) == 1 and r["greedy_ranks"][0] == r["greedy_ref"]
            print(f"simulated TP={plan.tp} against TP=1 on {r['tokens']} tokens: max |logit difference| "
                  f"{r['max_abs_diff']:.3g} (logits up to {r['logit_scale']:.3g}); greedy token "
                  f"{'agreed by every rank and TP=1' if agree else 'DIFFERS'}: {r['greedy_ranks']} vs {r['greedy_ref']}"
                  + ("" if agree else f" (TP=1's top two logits are {r['top_gap']:.3g} apart: a gap near the "
                                      "logit difference is a near-tie, not a fault)"))
            return 0 if agree else 1
    except (ModelError, WeightsError) as e:
        if os.environ.get("DGQ_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
