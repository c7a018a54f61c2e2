"""`python -m engine.bench serve`: a bounded load test of dgq-serve on localhost.

The server runs in a child process (spawned: its model thread and event loop do not share a
GIL with the clients), on a random model of a real shape (llama7b: Llama-2-7B-shaped DGQ A8W4,
as `python -m engine.bench e2e` builds it; smollm2; tiny: a small float model for the CPU) or
a weights file. N clients, each with its own connection, send streaming /v1/completions
requests back to back until R requests are done: prompts of P random token ids (sent as ids,
so their length is exact), answers of A tokens (the random models have no end-of-sequence
token, so every answer runs to A). Reported: requests/s and output tokens/s over the wall
time, time to first token (TTFT: request sent → first text), inter-token latency (ITL: the
gaps between streamed chunks; a chunk holds one token unless the client fell behind) and
time per output token (TPOT: (last − first chunk) / (tokens − 1), per request), as p50/p90/p99.
On the GPU the child also measures the engine's own batched decode (no server: prefill B
sequences of P + A/2 tokens, time 64 graph-replayed steps) for the ratio the server reaches.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time

import numpy as np

from .common import BenchError

MODELS = ("llama7b", "smollm2", "tiny")


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids 0..V-1 ("t<id>"), for random models without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def build_model(model: str, device: str, weights: str | None = None):
    """A LoadedModel: a weights file, or random weights of a named shape."""
    from ..api import LoadedModel, load_model  # noqa: PLC0415
    from ..gpu.backend import resolve_device  # noqa: PLC0415
    from ..io.config import ModelConfig  # noqa: PLC0415
    from .e2e import LLAMA2_7B, SMOLLM2, random_model  # noqa: PLC0415
    if weights:
        return load_model(weights, device)
    device = resolve_device(device)
    if device == "cpu" and model == "llama7b":
        raise BenchError("a 7B-shaped model on the NumPy path would take minutes a token: use a GPU, "
                         "or --model tiny / smollm2 with --device cpu")
    if model == "tiny":
        c = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64, rope_theta=10000.0,
                        max_position_embeddings=2048, tie_word_embeddings=False)
        mw = random_model(c, False)
    else:
        mw = random_model(LLAMA2_7B if model == "llama7b" else SMOLLM2, True)
    if device == "cuda":
        from ..gpu.model import CudaModel  # noqa: PLC0415
        m = CudaModel(mw)
    else:
        from ..model.llama import Model  # noqa: PLC0415
        m = Model(mw)
    return LoadedModel(m, mw.config, synthetic_tokenizer(mw.config.vocab_size), None, model, device)


def decode_baseline(model, batch: int, ctx: int, steps: int = 64) -> float:
    """The engine's batched greedy decode, tokens/s: `batch` sequences at context ctx."""
    rng = np.random.default_rng(0)
    v = model.config.vocab_size
    cache = model.new_cache(ctx + steps + 3, batch=batch)
    firsts = [int(model.prefill(rng.integers(0, v, ctx), cache, seq=i).astype(np.float32).argmax())
              for i in range(batch)]
    model.decode_greedy(cache, firsts, 2)                  # compiles and captures the step
    cache.lens_host[:] = ctx
    model.cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    model.decode_greedy(cache, firsts, steps)
    s = time.perf_counter() - t0
    del cache
    model.cp.get_default_memory_pool().free_all_blocks()
    return steps * batch / s


def _child(conn, opts: dict) -> None:
    """The server process: build, measure the baseline, report the URL, serve until killed."""
    try:
        from ..serve.protocol import Limits  # noqa: PLC0415
        from ..serve.server import make_server  # noqa: PLC0415
        t0 = time.perf_counter()
        lm = build_model(opts["model"], opts["device"], opts["weights"])
        ctx = opts["prompt_tokens"] + opts["answer_tokens"] + 1
        if ctx > lm.config.max_position_embeddings:
            raise BenchError(f"prompt + answer ({ctx} tokens) exceed the model's context of "
                             f"{lm.config.max_position_embeddings}")
        info = {"device": lm.device, "model": opts["weights"] or opts["model"], "load_s": time.perf_counter() - t0,
                "vocab": lm.config.vocab_size}
        if lm.device == "cuda" and opts["baseline_batch"]:
            info["baseline_batch"] = opts["baseline_batch"]
            info["baseline_tok_s"] = decode_baseline(lm.model, opts["baseline_batch"],
                                                     opts["prompt_tokens"] + opts["answer_tokens"] // 2)
        t1 = time.perf_counter()
        limits = Limits(max_tokens=ctx, max_queue=max(512, 2 * opts["clients"]))
        server, sock, url = make_server(lm, "127.0.0.1", 0, "bench", max_batch=opts["max_batch"], context=ctx,
                                        kv8=opts["kv8"], limits=limits, log_level="warning")
        info.update(url=url, warm_up_s=time.perf_counter() - t1, slots=server.config.app.state.server.worker.slots)
        conn.send(info)
    except Exception as e:  # noqa: BLE001  (reported by the parent as one line)
        conn.send({"error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
        return
    server.run(sockets=[sock])


async def _client(c, todo: list, opts: dict, out: list, rng) -> None:
    p, a, v = opts["prompt_tokens"], opts["answer_tokens"], opts["vocab"]
    while todo:
        todo.pop()
        body = {"model": "bench", "prompt": rng.integers(0, v, p).tolist(), "max_tokens": a, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        times, n, err = [], 0, None
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    t = time.perf_counter()
                    if line == "data: [DONE]":
                        break
                    if line.startswith('data: {"error"'):
                        err = line[6:200]
                    elif '"choices": []' in line:              # the usage chunk
                        n = json.loads(line[6:])["usage"]["completion_tokens"]
                    elif '"text": ""' not in line:              # the last chunk carries no text
                        times.append(t)
        out.append(dict(t0=t0, end=time.perf_counter(), times=times, tokens=n, error=err))


async def _load(url: str, opts: dict) -> tuple[list, float]:
    import httpx  # noqa: PLC0415
    todo = list(range(opts["requests"]))
    out: list = []
    limits = httpx.Limits(max_connections=opts["clients"] + 4, max_keepalive_connections=opts["clients"] + 4)
    async with httpx.AsyncClient(base_url=url, timeout=opts["timeout"], limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(_client(c, todo, opts, out, np.random.default_rng(i))
                                                for i in range(opts["clients"]))), opts["timeout"])
        return out, time.perf_counter() - t0


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(out: list, wall: float, opts: dict, info: dict) -> dict:
    ok = [r for r in out if r["error"] is None and r["times"]]
    ttft = [1e3 * (r["times"][0] - r["t0"]) for r in ok]
    itl = [1e3 * g for r in ok for g in np.diff(r["times"])]
    tpot = [1e3 * (r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in ok)
    row = dict(model=info["model"], device=info["device"], clients=opts["clients"], slots=info["slots"],
               requests=len(out), failed=len(out) - len(ok), prompt_tokens=opts["prompt_tokens"],
               answer_tokens=opts["answer_tokens"], wall_s=wall, req_s=len(ok) / wall, out_tok_s=tokens / wall,
               mean_answer_tokens=tokens / max(len(ok), 1))
    for name, xs in (("ttft_ms", ttft), ("itl_ms", itl), ("tpot_ms", tpot)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}"] = pct(xs, q)
    if "baseline_tok_s" in info:
        row["baseline_batch"] = info["baseline_batch"]
        row["baseline_tok_s"] = info["baseline_tok_s"]
        row["pct_of_baseline"] = 100 * row["out_tok_s"] / info["baseline_tok_s"]
    errors = [r["error"] for r in out if r["error"]]
    if errors:
        row["first_error"] = errors[0]
    return row


def format_row(row: dict) -> str:
    lines = [f"dgq-serve load test: {row['model']} on {row['device']}, {row['clients']} clients, "
             f"{row['slots']} slots, {row['requests']} requests ({row['failed']} failed) of "
             f"{row['prompt_tokens']} prompt + {row['answer_tokens']} answer tokens", "",
             "| metric | value |", "|---|---|",
             f"| wall time | {row['wall_s']:.2f} s |",
             f"| requests/s | {row['req_s']:.2f} |",
             f"| output tokens/s | {row['out_tok_s']:.0f} |"]
    if "baseline_tok_s" in row:
        lines.append(f"| engine decode at batch {row['baseline_batch']} (no server) | "
                     f"{row['baseline_tok_s']:.0f} tok/s (server: {row['pct_of_baseline']:.0f} %) |")
    for name, label in (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"),
                        ("tpot_ms", "time per output token")):
        lines.append(f"| {label} p50 / p90 / p99 | {row[name + '_p50']:.1f} / {row[name + '_p90']:.1f} / "
                     f"{row[name + '_p99']:.1f} ms |")
    if row.get("first_error"):
        lines.append(f"\nfirst error: {row['first_error']}")
    return "\n".join(lines)


def run_serve(opts: dict) -> dict:
    """Start the server child, run the load, stop the child; the summary row."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, opts), daemon=True)
    proc.start()
    try:
        if not parent.poll(opts["timeout"]):
            raise BenchError(f"the server did not start within {opts['timeout']} s")
        info = parent.recv()
        if "error" in info:
            raise BenchError(f"the server failed: {info['error']}")
        if opts["vocab"] is None:
            opts["vocab"] = info["vocab"]
        out, wall = asyncio.run(_load(info["url"], opts))
        return summarize(out, wall, opts, info)
    finally:
        proc.terminate()
        proc.join(timeout=30)


def cmd_serve(args) -> int:
    for name in ("clients", "prompt_tokens", "answer_tokens"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if args.model not in MODELS and not args.weights:
        raise BenchError(f"--model: choose from {', '.join(MODELS)} (or give --weights)")
    opts = dict(model=args.model, weights=args.weights, device=args.device, clients=args.clients,
                requests=args.requests or 2 * args.clients, prompt_tokens=args.prompt_tokens,
                answer_tokens=args.answer_tokens, max_batch=args.max_batch or args.clients, kv8=args.kv8,
                baseline_batch=args.baseline_batch, timeout=args.timeout, vocab=args.vocab)
    row = run_serve(opts)
    if args.json:
        print(json.dumps(row))
    text = format_row(row)
    print(text)
    if args.md:
        from pathlib import Path  # noqa: PLC0415
        Path(args.md).write_text(text + "\n")
    return 0 if row["failed"] == 0 else 1


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="load test of dgq-serve on localhost: requests/s, tokens/s, TTFT, ITL")
    s.add_argument("--model", default="llama7b", help=f"random weights of a shape: {', '.join(MODELS)}")
    s.add_argument("--weights", default=None, help="a weights file or directory instead of random weights "
                                                   "(give --vocab if its prompts should use fewer ids)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    s.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    s.add_argument("--requests", type=int, default=0, help="requests in all (default 2 x clients)")
    s.add_argument("--prompt-tokens", type=int, default=512)
    s.add_argument("--answer-tokens", type=int, default=256)
    s.add_argument("--max-batch", type=int, default=0, help="server sequences at a time (default: clients)")
    s.add_argument("--kv8", action="store_true", help="the server's INT8 KV cache")
    s.add_argument("--baseline-batch", type=int, default=32, help="GPU: the engine's decode batch to compare "
                                                                   "against (0: skip)")
    s.add_argument("--vocab", type=int, default=None, help="prompt ids are drawn from [0, vocab)")
    s.add_argument("--timeout", type=float, default=900, help="seconds for the whole run (default 900)")
    s.add_argument("--json", action="store_true", help="also one JSON object on stdout")
    s.add_argument("--md", metavar="PATH", help="also write the markdown table to PATH")
    s.set_defaults(func=cmd_serve, reps=1, needs_gpu=False)
