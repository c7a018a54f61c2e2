"""Text generation: prompt building (chat template or raw), prefill, decode loop, streaming.

Works with any model object that has `new_cache(capacity)` and
`forward(tokens, cache, last_only=True) -> (1, V) logits` (NumPy or CuPy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import sampling
from ..util.arrays import to_numpy

# Tokens that end a turn in the chat formats we know; used when present in the vocabulary.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class GenerationError(ValueError):
    """A prompt or generation setting that cannot be run."""


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tps(self) -> float:
        # the first new token comes out of the prefill; decode steps produce the rest
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def stop_ids(tokenizer, config) -> set[int]:
    ids = set()
    if config.eos_token_id is not None:
        ids.add(int(config.eos_token_id))
    if tokenizer is not None:
        for t in END_OF_TURN:
            i = tokenizer.token_to_id(t)
            if i is not None:
                ids.add(i)
    return ids


def encode_prompt(tokenizer, prompt: str, chat_template: str | None, chat: bool, config=None) -> list[int]:
    """Token ids for a prompt: through the model's chat template when `chat`, else as is."""
    if isinstance(prompt, (bytes, bytearray)):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GenerationError(f"--prompt is not valid UTF-8 text (invalid byte at offset {e.start})") from None
    if not isinstance(prompt, str):
        raise GenerationError(f"--prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")            # a command line's undecodable bytes arrive as lone surrogates
    except UnicodeEncodeError as e:
        raise GenerationError(f"--prompt is not valid UTF-8 text (undecodable byte at character {e.start}); "
                              "pass the prompt in UTF-8") from None
    if not prompt.strip():
        raise GenerationError("--prompt is empty: give some text to continue")
    if tokenizer is None:
        raise GenerationError("this model file carries no tokenizer")
    if chat:
        if not chat_template:
            raise GenerationError("this model has no chat template; use --raw")
        from ..io.tokenizer import render_chat, token_string  # noqa: PLC0415
        special = {}
        if config is not None:   # templates that write {{ bos_token }} need the strings
            special = dict(bos_token=token_string(tokenizer, config.bos_token_id),
                           eos_token=token_string(tokenizer, config.eos_token_id))
        text = render_chat(chat_template, [{"role": "user", "content": prompt}],
                           add_generation_prompt=True, **special)
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(prompt).ids


class TextStream:
    """Turns a growing list of token ids into newly printable text (whole UTF-8 characters only)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):      # a multi-byte character is still incomplete
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new


def generate(model, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = 0,
             stop: set[int] | None = None, on_token=None, kv8: bool = False):
    """Generate up to max_new_tokens after prompt_ids; returns (new ids, GenerationStats).

    kv8 keeps the KV cache in INT8 with per-(token, kv head) scales (engine/model/kv_cache.py).

    A model with decode() (the GPU engine) samples on the device in graph-replayed steps;
    others run the host loop with engine/model/sampling.py. seed None draws a fresh seed.
    on_token(id) is called as each token is produced. Generation stops at a stop id
    (which is returned but not passed on) or when the context is full.
    """
    ctx = model.config.max_position_embeddings
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise GenerationError(f"--max-new-tokens must be an integer, got {max_new_tokens!r}")
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise GenerationError(f"prompt_ids must be a 1-D sequence of integer token ids, got "
                              f"{ids.dtype} {ids.shape}")
    n = len(prompt_ids)
    if n == 0:
        raise GenerationError("the prompt encodes to no tokens")
    if n >= ctx:
        raise GenerationError(f"the prompt has {n} tokens but the model's context is {ctx}; "
                              "shorten the prompt")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampling.check_args(temperature, top_k, top_p)
    budget = min(max_new_tokens, ctx - n)
    rng = np.random.default_rng(seed)
    stop = stop or set()
    cache = model.new_cache(n + budget, kv8=kv8)
    if hasattr(model, "decode"):
        seed = int(rng.integers(2**63)) if seed is None else seed
        return _generate_gpu(model, cache, prompt_ids, budget, stop, on_token,
                             dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))

    t0 = time.perf_counter()
    logits = model.forward(np.asarray(prompt_ids, dtype=np.int64), cache, last_only=True)
    tok = sampling.sample(to_numpy(logits[0]), temperature, top_k, top_p, rng)
    t1 = time.perf_counter()
    out = [tok]
    if on_token and tok not in stop:
        on_token(tok)
    while tok not in stop and len(out) < budget:
        logits = model.forward(np.asarray([tok], dtype=np.int64), cache, last_only=True)
        tok = sampling.sample(to_numpy(logits[0]), temperature, top_k, top_p, rng)
        out.append(tok)
        if on_token and tok not in stop:
            on_token(tok)
    t2 = time.perf_counter()
    return out, GenerationStats(n, len(out), t1 - t0, t2 - t1)


def _generate_gpu(model, cache, prompt_ids, budget, stop, on_token, sampling_kw):
    """Decoding on the GPU engine: graph-replayed steps that sample on the device, so only
    token ids reach the host."""
    n = len(prompt_ids)
    t0 = time.perf_counter()
    logits = model.prefill(np.asarray(prompt_ids), cache)                  # (1, V) on the GPU
    first = model.sample_logits(logits, 0, n - 1, **sampling_kw)            # one id crosses
    t1 = time.perf_counter()
    out = [first]
    if first not in stop:
        if on_token:
            on_token(first)

        def step(ids):
            tok = int(ids[0])
            out.append(tok)
            if tok in stop:
                return True
            if on_token:
                on_token(tok)
            return False

        if budget > 1:
            model.decode(cache, [first], budget - 1, on_step=step, **sampling_kw)
    t2 = time.perf_counter()
    return out, GenerationStats(n, len(out), t1 - t0, t2 - t1)
