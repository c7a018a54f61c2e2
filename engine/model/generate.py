"""Text generation: prompt building (chat template or raw), prefill, decode loop, streaming.

Works with any model object that has `new_cache(capacity)` and
`forward(tokens, cache, last_only=True) -> (1, V) logits` (NumPy or CuPy).

Many sequences: a SeqRequest describes one (prompt ids, budget, sampling, stop ids, a token
callback); SerialBatch runs them one after another (the CPU path); engine/gpu/decode.py
SlotBatch runs the same requests as one continuously batched GPU decode. Both have
submit / step / idle, so engine/api.py (LoadedModel.generate) and the server drive either.
Text: TextStream detokenizes incrementally, StopText holds back a possible stop string.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import sampling
from ..util.arrays import to_numpy
from ..util.errors import param_error

# Prompt tokens a forward on the host path (the GPU prefills in one go): a long prompt goes
# through the cache in chunks, so the attention holds a chunk's scores, not the whole prompt's
# (a 5527-token prompt on SmolLM2: peak RSS 2.1 -> 0.8 GB), and a caller can show progress.
PREFILL_CHUNK = 512

# Tokens that end a turn in the chat formats we know; used when present in the vocabulary.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>")


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


def check_text(prompt, what: str = "the prompt") -> str:
    """prompt as str: bytes must be UTF-8; lone surrogates (undecodable argv bytes) refused."""
    if isinstance(prompt, (bytes, bytearray)):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GenerationError(f"{what} is not valid UTF-8 text (invalid byte at offset {e.start})") from None
    if not isinstance(prompt, str):
        raise GenerationError(f"{what} must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")            # a command line's undecodable bytes arrive as lone surrogates
    except UnicodeEncodeError as e:
        raise GenerationError(f"{what} is not valid UTF-8 text (undecodable byte at character {e.start}); "
                              "pass the prompt in UTF-8") from None
    return prompt


def encode_prompt(tokenizer, prompt: str, chat_template: str | None, chat: bool, config=None) -> list[int]:
    """Token ids for a prompt: through the model's chat template when `chat`, else as is."""
    prompt = check_text(prompt)
    if not prompt.strip():
        raise GenerationError("the prompt is empty: give some text to continue")
    if tokenizer is None:
        raise GenerationError("this model file carries no tokenizer")
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}], chat_template, config)
    return tokenizer.encode(prompt).ids


def encode_messages(tokenizer, messages, chat_template: str | None, config=None) -> list[int]:
    """Token ids of a conversation ([{"role", "content"}, ...]) rendered by the chat template,
    ending with the assistant's turn opened (add_generation_prompt)."""
    if tokenizer is None:
        raise GenerationError("this model file carries no tokenizer")
    if not chat_template:
        raise GenerationError("this model has no chat template; encode the prompt without it (chat=False)")
    from ..io.tokenizer import render_chat, token_string  # noqa: PLC0415
    special = {}
    if config is not None:   # templates that write {{ bos_token }} need the strings
        special = dict(bos_token=token_string(tokenizer, config.bos_token_id),
                       eos_token=token_string(tokenizer, config.eos_token_id))
    text = render_chat(chat_template, messages, add_generation_prompt=True, **special)
    return tokenizer.encode(text, add_special_tokens=False).ids


class Conversation:
    """A multi-turn chat kept within the context: messages, and the prompt ids of the next turn
    with the oldest turns dropped (a system message stays) until `reserve` new tokens fit."""

    def __init__(self, tokenizer, chat_template, config, reserve: int, system: str | None = None):
        self.tokenizer, self.template, self.config = tokenizer, chat_template, config
        self.reserve = reserve
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def reset(self) -> None:
        self.turns = []

    def prompt(self, user_text: str) -> tuple[list[int], int]:
        """(ids for the conversation plus user_text, number of earlier messages dropped to fit).
        GenerationError when user_text alone does not fit."""
        turns = self.turns + [{"role": "user", "content": check_text(user_text, "the message")}]
        ctx, dropped = self.config.max_position_embeddings, 0
        while True:
            ids = encode_messages(self.tokenizer, self.system + turns, self.template, self.config)
            if len(ids) + min(self.reserve, ctx // 2) <= ctx or len(turns) == 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]     # a user + assistant pair
            dropped += 2
        if len(ids) >= ctx:            # the history is kept as it was
            raise GenerationError(f"the message is {len(ids)} tokens with the template; the model's "
                                  f"context is {ctx}: shorten it")
        self.turns = turns
        return ids, dropped

    def reply(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def cancel(self) -> None:
        """Forget the last user message (its answer was interrupted)."""
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()


class TextStream:
    """Turns a growing list of token ids into newly printable text (whole UTF-8 characters only).

    Incremental: each push decodes a short window (the ids since the last emitted text plus the
    few before it, for tokenizers whose pieces depend on their left neighbour), not the whole
    sequence; the concatenated output equals decode(ids, skip_special_tokens=True)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0        # window start: ids before it are settled
        self.read = 0          # ids before it have been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):   # nothing new, or a character incomplete
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """What push held back at the end (an incomplete character, as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


class StopText:
    """Stop strings over streamed text: feed() returns the text that is safe to show (a tail
    that could begin a stop string is held back) and whether a stop string was met, in which
    case the text ends before it."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.stopped = self.buf[:cut], "", True
            return out, True
        keep = len(self.buf) - self.hold
        out, self.buf = (self.buf[:keep], self.buf[keep:]) if keep > 0 else ("", self.buf)
        return out, False

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


def generate(model, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = 0,
             stop: set[int] | None = None, on_token=None, kv8: bool = False, on_prefill=None):
    """Generate up to max_new_tokens after prompt_ids; returns (new ids, GenerationStats).

    kv8 keeps the KV cache in INT8 with per-(token, kv head) scales (engine/model/kv_cache.py).

    A model with decode() (the GPU engine) samples on the device in graph-replayed steps;
    others run the host loop with engine/model/sampling.py. seed None draws a fresh seed.
    on_token(id) is called as each token is produced; returning True stops generation after
    that token. on_prefill(done, total) follows the host path's prompt, a PREFILL_CHUNK at a time;
    returning True stops there, with no token (a request cancelled while its prompt goes through).
    Generation stops at a stop id (which is returned but not passed on) or when the context is full.
    """
    ctx = model.config.max_position_embeddings
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise param_error(GenerationError, "max_new_tokens", f"must be an integer, got {max_new_tokens!r}")
    try:
        ids = np.asarray(prompt_ids)
    except (TypeError, ValueError) as e:          # ragged or nested lists
        raise GenerationError(f"prompt_ids must be a 1-D sequence of integer token ids ({e})") from None
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
        raise param_error(GenerationError, "max_new_tokens", f"must be at least 1, got {max_new_tokens}")
    sampling.check_args(temperature, top_k, top_p)
    check_seed(seed)
    try:
        stop = set() if stop is None else set(stop.tolist() if isinstance(stop, np.ndarray) else stop)
    except TypeError:                                          # not a collection (stop=5)
        raise GenerationError(f"stop must be a set of integer token ids, got {stop!r:.80}") from None
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in stop):
        raise GenerationError(f"stop must be a set of integer token ids, got {stop!r:.80}")
    budget = min(max_new_tokens, ctx - n)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(n + budget, kv8=kv8)
    if hasattr(model, "decode"):
        seed = int(rng.integers(2**63)) if seed is None else seed
        return _generate_gpu(model, cache, prompt_ids, budget, stop, on_token,
                             dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))

    t0 = time.perf_counter()
    ids = ids.astype(np.int64, copy=False)
    for c0 in range(0, n, PREFILL_CHUNK):
        logits = model.forward(ids[c0:c0 + PREFILL_CHUNK], cache, last_only=True)
        if on_prefill is not None and on_prefill(min(n, c0 + PREFILL_CHUNK), n) is True:
            return [], GenerationStats(n, 0, time.perf_counter() - t0, 0.0)
    tok = sampling.sample(to_numpy(logits[0]), temperature, top_k, top_p, rng)
    t1 = time.perf_counter()
    out = [tok]
    halt = tok in stop or (on_token is not None and on_token(tok) is True)
    while not halt and len(out) < budget:
        logits = model.forward(np.asarray([tok], dtype=np.int64), cache, last_only=True)
        tok = sampling.sample(to_numpy(logits[0]), temperature, top_k, top_p, rng)
        out.append(tok)
        halt = tok in stop or (on_token is not None and on_token(tok) is True)
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
    if first not in stop and not (on_token is not None and on_token(first) is True):

        def step(ids):
            tok = int(ids[0])
            out.append(tok)
            if tok in stop:
                return True
            return on_token is not None and on_token(tok) is True

        if budget > 1:
            model.decode(cache, [first], budget - 1, on_step=step, **sampling_kw)
    t2 = time.perf_counter()
    return out, GenerationStats(n, len(out), t1 - t0, t2 - t1)


# ----------------------------------------------------------------------------- many sequences

@dataclass(eq=False)
class SeqRequest:
    """One sequence to generate. on_token(id) sees each new token except a stop id and may
    return True to end the sequence there (a stop string, a client gone). `cancelled` may be
    set from another thread; the batch drops the sequence at its next step. The batch fills
    tokens (the new ids; a final stop id included, as generate() returns it) and
    finish_reason: "stop" (a stop id or on_token's True), "length" (max_new_tokens or the
    context), "cancelled", or "error" with `error` saying why."""
    prompt_ids: list
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset = frozenset()
    on_token: object = None
    kv8: bool = False
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False

    @property
    def sampling_key(self) -> tuple:
        """Requests decoded together share this (the GPU step samples every row alike)."""
        if self.temperature == 0:
            return ("greedy", self.kv8)
        return (float(self.temperature), int(self.top_k), float(self.top_p), int(self.seed), self.kv8)

    @property
    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)


def check_request(req: SeqRequest, context: int) -> None:
    """GenerationError for a request that cannot run within `context` positions."""
    n = len(req.prompt_ids)
    if n == 0:
        raise GenerationError("the prompt encodes to no tokens")
    if n >= context:
        raise GenerationError(f"the prompt has {n} tokens but the context is {context}; shorten the prompt")
    if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, (int, np.integer)) \
            or req.max_new_tokens < 1:
        raise param_error(GenerationError, "max_new_tokens", f"must be an integer >= 1, got {req.max_new_tokens!r}")
    sampling.check_args(req.temperature, req.top_k, req.top_p)
    check_seed(req.seed, none_ok=False)


def check_seed(seed, none_ok: bool = True) -> None:
    """GenerationError unless seed is an integer in [0, 2^63) (or None, where a fresh one is drawn)."""
    if seed is None and none_ok:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise param_error(GenerationError, "seed", f"must be an integer in [0, 2^63), got {seed!r}")


class SerialBatch:
    """One sequence at a time through generate(): the CPU path of LoadedModel.generate and of
    the server. step() runs the oldest waiting request to its end; after_token() (if given)
    is called after each token, for a caller that passes tokens on in groups."""

    def __init__(self, model, after_token=None):
        self.model = model
        self.after_token = after_token
        self.waiting: deque[SeqRequest] = deque()
        self.context = model.config.max_position_embeddings

    def submit(self, req: SeqRequest) -> None:
        check_request(req, self.context)
        self.waiting.append(req)

    def idle(self) -> bool:
        return not self.waiting

    def drop_all(self, error: str) -> None:
        """End every request with finish_reason "error" (after a failure of the batch itself)."""
        for req in self.waiting:
            req.finish_reason, req.error = req.finish_reason or "error", req.error or error
        self.waiting.clear()

    def step(self) -> None:
        if not self.waiting:
            return
        req = self.waiting.popleft()
        if req.cancelled:
            req.finish_reason = "cancelled"
            return
        asked = [False]

        def on_token(tok):
            stop = req.on_token is not None and req.on_token(tok) is True
            if self.after_token is not None:
                self.after_token()
            asked[0] = stop or req.cancelled
            return asked[0]

        try:
            out, _ = generate(self.model, req.prompt_ids, req.max_new_tokens, req.temperature, req.top_k,
                              req.top_p, req.seed, set(req.stop_ids), on_token=on_token, kv8=req.kv8,
                              on_prefill=lambda done, total: req.cancelled)
        except (ValueError, ArithmeticError) as e:      # ModelError, SamplingError: say why
            req.finish_reason, req.error = "error", " ".join(str(e).split())
            return
        req.tokens = [int(t) for t in out]
        if req.cancelled:
            req.finish_reason = "cancelled"
        elif (out and out[-1] in req.stop_ids) or asked[0]:
            req.finish_reason = "stop"
        else:
            req.finish_reason = "length"


def run_batch(batch, requests) -> list[SeqRequest]:
    """Submit every request to a SerialBatch or SlotBatch and step until all are done."""
    for r in requests:
        batch.submit(r)
    while not batch.idle():
        batch.step()
    return list(requests)


@dataclass
class Completion:
    """One generated sequence: the text (stop strings and stop ids cut off), the new token ids
    (a final stop id not included), why it ended ("stop", "length", "cancelled", "error") and
    the prompt's length in tokens."""
    text: str
    token_ids: list
    finish_reason: str
    prompt_tokens: int
    error: str | None = None


class TextCollector:
    """The text side of one SeqRequest: detokenizes each new token, applies stop strings and
    keeps the text; push() returns (new text, True when a stop string ended the sequence)."""

    def __init__(self, tokenizer, stops=()):
        self.stream = TextStream(tokenizer)
        self.stop = StopText(stops)
        self.parts: list[str] = []

    def push(self, tok: int) -> tuple[str, bool]:
        piece, hit = self.stop.feed(self.stream.push(tok))
        self.parts.append(piece)
        return piece, hit

    def finish(self) -> str:
        """The held-back tail (call once, at the end); returns it."""
        tail = "" if self.stop.stopped else self.stop.feed(self.stream.flush())[0]
        tail += self.stop.flush()
        self.parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        return "".join(self.parts)


def check_stop_strings(stop) -> tuple[str, ...]:
    """stop: None, a string or a list of strings (each non-empty)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise GenerationError("stop must be a non-empty string or a list of non-empty strings")
    return tuple(stop)
