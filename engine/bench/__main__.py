"""Benchmarks: `python -m engine.bench <subcommand>` (`-h` lists them).

  gemm, gemm-tune, gemm-pick, gemm-one   the A8W4 GEMM family (engine/bench/gemm.py)
  gemm-summary LOG                       its geometric means per M range, from a `gemm --json` log
                                         (or a `gemv-wb --json` log: PoT against INT and A8W4 at M = 1)
  gemv-wb                                weight-only pot / int GEMVs (engine/bench/wb.py)
  e2e                                    prefill / decode tokens/s of the GPU engine against our
                                         FP16 path (engine/bench/e2e.py); --context: decode at
                                         long contexts against the bytes roofline
  perf collect | fit | report            the learned runtime/power/energy model of the A8W4 GEMMs
                                         (engine/bench/perf.py; fit and report run without a GPU)
  quantize                               dgq-quantize on a random TinyLlama / Llama-7B-shaped checkpoint:
                                         time per phase and peak RSS (engine/bench/quantize.py; CPU)
  serve                                  dgq-serve under N concurrent streaming clients: requests/s,
                                         output tokens/s, TTFT and inter-token latency (engine/bench/serve.py)

Each prints a table; bench/results/ keeps the dated ones that docs cite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..gpu import kernels
from ..gpu import ops as ops_cuda
from . import gemm, perf, quantize, serve, wb
from .common import BenchError, cp_or_fail, ints
from .e2e import MODELS, format_context_table, format_table, parse_ab, read_patch_files, run_context, run_e2e


def cmd_e2e(args) -> int:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    bad = set(models) - set(MODELS)
    if bad:
        raise BenchError(f"--models: unknown {', '.join(sorted(bad))}; choose from {', '.join(MODELS)}")
    if args.fp16 and not args.context:
        raise BenchError("--fp16 adds the FP16 path to the context table: give --context too "
                         "(without it e2e runs the FP16 path anyway)")
    if args.context:                    # the context table (engine/bench/e2e.py run_context)
        from ..gpu.attention import DECODE_KERNELS  # noqa: PLC0415
        attn = tuple(k.strip() for k in args.attn.split(",") if k.strip())
        if set(attn) - set(DECODE_KERNELS):
            raise BenchError(f"--attn: choose from {', '.join(DECODE_KERNELS)}, got {args.attn!r}")
        if args.steps < 1:
            raise BenchError(f"--steps must be at least 1, got {args.steps}")
        try:
            ab = [parse_ab(item) for item in args.ab]
            patches = read_patch_files(args.patch)
        except ValueError as e:
            raise BenchError(str(e)) from None
        rows = run_context(ints(args.context, "--context"), models, ints(args.batches, "--batches"),
                           args.steps, attn, args.json, args.qfile, ab, patches, args.fp16)
        if args.md:
            Path(args.md).write_text(format_context_table(rows) + "\n")
        return 0
    pot = tuple(b.strip() for b in args.pot_bits.split(",") if b.strip())
    if set(pot) - {"2", "3", "4", "3a8"}:
        raise BenchError(f"--pot-bits: choose from 2, 3, 4 and 3a8 (W3 with INT8 activations), got {args.pot_bits!r}")
    pot = tuple(b if b == "3a8" else int(b) for b in pot)
    try:
        ab = [parse_ab(item) for item in args.ab]
        patches = read_patch_files(args.patch)
    except ValueError as e:
        raise BenchError(str(e)) from None
    rows = run_e2e(qfile=args.qfile, json_out=args.json, quick=args.quick, models=models, pot_bits=pot,
                   ab=ab, patches=patches)
    if args.md:
        Path(args.md).write_text(format_table(rows) + "\n")
    return 0


def cmd_gemm_summary(args) -> int:
    """The per-M-range summary of a `gemm --json` log, or the M = 1 PoT summary of a
    `gemv-wb --json` log (engine/bench/wb.py summary)."""
    rows, wb_rows = [], []
    with open(args.log) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{args.log}:{i}: not a JSON row ({e.msg})") from None
                if isinstance(r, dict) and "m" in r and "x_fp16" in r:
                    rows.append(r)
                elif isinstance(r, dict) and "m" in r and "vs_a8w4" in r:
                    wb_rows.append(r)
    if not rows and not wb_rows:
        raise SystemExit(f"{args.log}: no `python -m engine.bench gemm --json` (or gemv-wb --json) rows in it")
    if rows:
        devices = sorted({r.get("device", "?") for r in rows})
        print(f"{len(rows)} rows of {args.log} ({', '.join(devices)})\n")
        print(gemm.summary_table(rows))
    if wb_rows:
        print(f"{len(wb_rows)} gemv-wb rows of {args.log}\n")
        print(wb.summary_table(wb_rows) or "(no M = 1 PoT rows)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description="Benchmarks of the GPU engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gemm", help="A8W4 GEMM vs cuBLAS FP16 / INT8 / tinygemm over M x (K x N)")
    g.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    g.add_argument("--quick", action="store_true", help="2 shapes x 5 M instead of 7 x 11")
    g.add_argument("--md", metavar="PATH", help="also write the markdown table to PATH")
    g.add_argument("--reps", type=int, default=50, help="timed calls per measurement (median; default 50)")
    g.add_argument("--tune-json", metavar="PATH", help="dispatch choices from `gemm-pick` (else engine/gpu/tuning.py GEMM)")
    g.add_argument("--policy", choices=("table", "learned"), default="table",
                   help="the kernel choice the rows run: the table (default) or, as the engine does where its "
                   "device has a model file, the learned model (docs/PERFMODEL.md)")
    g.set_defaults(func=gemm.cmd_gemm)
    gs = sub.add_parser("gemm-summary", help="geometric means per M range of a `gemm --json` log "
                        "(or issue 15's M = 1 PoT summary of a `gemv-wb --json` log)")
    gs.add_argument("log")
    gs.set_defaults(func=cmd_gemm_summary, reps=1, needs_gpu=False)
    pk = sub.add_parser("gemm-pick", help="choose tuning.GEMM values from a gemm-tune log")
    pk.add_argument("tune_log")
    pk.add_argument("--out", metavar="PATH")
    pk.set_defaults(func=gemm.cmd_gemm_pick, reps=1)
    t = sub.add_parser("gemm-tune", help="time kernel variants to choose tuning.GEMM")
    t.add_argument("--reps", type=int, default=50)
    t.add_argument("--cases", default="", help="M:K:N,... instead of the built-in TUNE_CASES")
    t.add_argument("--splits", default="", help="comma-separated split-K counts timed beside auto and 1 (M <= 512)")
    t.add_argument("--tails", default="", help="comma-separated split counts of the last, partial wave timed beside "
                   "the automatic one (wgmma without a K split; 1: none)")
    t.add_argument("--tiles", default="", metavar="BT/STAGES/NWG/WPF/OVL,...",
                   help="only these wgmma tiles (no GEMV or mma.sync variants)")
    t.add_argument("--ab", action="append", default=[], metavar="FIELD=INT[,FIELD=INT]",
                   help="each variant again with these tuning settings (as e2e --ab), rows named by \"setting\"")
    t.add_argument("--patch", metavar="FILE.json", action="append", default=[],
                   help="each variant again for kernels compiled from edited source (as e2e --patch; "
                   "repeatable), e.g. bench/patches/wgmma-splitk.json")
    t.set_defaults(func=gemm.cmd_gemm_tune)
    o = sub.add_parser("gemm-one", help="time one shape and kernel configuration (also for profilers)")
    o.add_argument("--m", type=int, required=True)
    o.add_argument("--k", type=int, required=True)
    o.add_argument("--n", type=int, required=True)
    o.add_argument("--kernel", default="auto", choices=("auto", "gemv", "mma", "wgmma"))
    o.add_argument("--cfg", default="", help='JSON overrides, e.g. \'{"bt": 128, "nwg": 4}\'')
    o.add_argument("--reps", type=int, default=50)
    o.set_defaults(func=gemm.cmd_gemm_one)
    w = sub.add_parser("gemv-wb", help="weight-only pot2..4 / int2..4 GEMVs vs our A8W4 GEMV and cuBLAS FP16")
    w.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    w.add_argument("--md", metavar="PATH", help="also write the markdown table to PATH")
    w.add_argument("--reps", type=int, default=50)
    w.add_argument("--ms", default="", help="comma-separated M (default 1,4,16,64,256,1024)")
    w.add_argument("--shapes", default="", help="comma-separated KxN (default 4096x4096,4096x11008,11008x4096,"
                   "8192x8192), e.g. 8192x8192 for one profiled kernel")
    w.add_argument("--kinds", default="", help="comma-separated of pot2..4, int2..4 (default all), and pot3a8 (the W3-PoT × INT8 dp4a GEMV, M = 1)")
    w.add_argument("--ab", action="append", default=[], metavar="FIELD=INT[,FIELD=INT]",
                   help="each pot/int row again with these settings (as e2e --ab; wb.FIELD: tuning.WB_TUNE), "
                   "same process and buffers, e.g. --ab wb.resident=0")
    w.add_argument("--patch", metavar="FILE.json", action="append", default=[],
                   help="each pot/int row again for kernels compiled from edited source (as e2e --patch; repeatable)")
    w.set_defaults(func=wb.cmd_gemv_wb)
    e = sub.add_parser("e2e", help="end-to-end prefill/decode tokens/s of the GPU engine vs our FP16 path")
    e.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    e.add_argument("--quick", action="store_true", help="512-token prefill, batch 1 and 8 only")
    e.add_argument("--qfile", metavar="PATH", help="a q.safetensors of any shape (dgq-quantize's output), benchmarked instead of --models")
    e.add_argument("--models", default="smollm2,llama7b", help="comma-separated: smollm2, llama7b, llama3-8b")
    e.add_argument("--context", default="", help="comma-separated contexts, e.g. 128,1024,2048,4096,8192: the "
                   "decode context table (batches x fp16/INT8 KV, bytes a step reads, %% of copy bandwidth) instead")
    e.add_argument("--batches", default="1,8,32", help="the context table's batches (default 1,8,32)")
    e.add_argument("--fp16", action="store_true", help="with --context: each model's FP16 path too (the same "
                   "graphed step with float linears), for the A8W4 / FP16 ratio at each row")
    e.add_argument("--steps", type=int, default=32, help="the context table's timed decode steps a row")
    e.add_argument("--attn", default="", help="the context table's decode attention kernels, e.g. heads,gqa "
                   "(default: the engine's, DGQ_ATTN_DECODE)")
    e.add_argument("--ab", action="append", default=[], metavar="FIELD=INT[,FIELD=INT]",
                   help="with --context: the context table again with these settings; else a batch-1 decode "
                   "row (and its per-launch profile) and prefill rows with these "
                   "tuning.GEMM fields (or wb.FIELD of tuning.WB_TUNE, also on the PoT rows, rows.FIELD of "
                   "tuning.ROWS, prefill.FIELD of tuning.PREFILL or decode.FIELD of tuning.DECODE) set, beside the "
                   "default's, where the step runs with PDL (sm_90); repeatable, "
                   "e.g. --ab gemv_dp4a=0 --ab wb.resident=0 --ab rows.act_per=32")
    e.add_argument("--patch", metavar="FILE.json", action="append", default=[],
                   help="(repeatable) the same A/B rows (with --context: the context table again) for kernels compiled from "
                   "edited source, beside the landed ones in one process: a JSON list of {\"name\": ..., \"edits\": [[\"gemm_a8w4.cu\", old text, new "
                   "text], ...]} (each old must occur in that module's inlined source, checked before the run; a row for "
                   "each model that runs an edited kernel; needs PDL (sm_90), as --ab; bench/patches/ has examples)")
    e.add_argument("--pot-bits", default="4,3,2", help="decode rows of random W<b>-PoT models ('' for none; 3a8: W3 with INT8 activations)")
    e.add_argument("--md", metavar="PATH", help="also write the markdown table to PATH")
    e.set_defaults(func=cmd_e2e, reps=1)
    perf.add_parser(sub)
    quantize.add_parser(sub)
    serve.add_parser(sub)
    args = p.parse_args(argv)
    if args.reps < 1:
        raise BenchError("--reps must be at least 1")
    if args.cmd != "gemm-pick" and getattr(args, "needs_gpu", True):
        cp_or_fail()
    return args.func(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, ops_cuda.CudaOpError, kernels.KernelError, perf.perfmodel.PerfModelError) as e:
        print(f"engine.bench: {e}", file=sys.stderr)
        sys.exit(2)
