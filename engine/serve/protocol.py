"""The OpenAI request bodies of /v1/chat/completions and /v1/completions, validated.

Every refusal is an ApiError carrying the HTTP status and one sentence naming the field, in
OpenAI's error shape ({"error": {"message", "type", "param", "code"}}). Fields this server
cannot honour (n > 1, penalties, logprobs, tools, ...) are refused, not silently ignored;
unknown fields are ignored, as OpenAI's own server does with fields it does not know.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_STOP = 4                 # stop strings a request may give (OpenAI's limit)
MAX_STOP_CHARS = 256
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Limits:
    max_body: int = 4 << 20          # bytes of one request body
    max_messages: int = 1024
    max_tokens: int = 4096           # the most max_tokens a request may ask for (also capped by the context)
    default_max_tokens: int = 512    # when a request gives none
    max_queue: int = 512             # requests waiting or running before new ones get 503


@dataclass
class Params:
    """What both endpoints share."""
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple = ()
    stream: bool = False
    include_usage: bool = False
    extra: dict = field(default_factory=dict)


def _bad(msg: str, param: str | None = None, status: int = 400):
    return ApiError(status, msg, param)


def _number(body, name, default, lo, hi, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"'{name}' must be a number", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _int(body, name, lo, hi):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer", name)
    if not lo <= v <= hi:
        raise _bad(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return v


def parse_common(body, limits: Limits) -> Params:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise _bad("'n' must be 1: this server returns one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"'{name}' is not supported (give 0 or leave it out)", name)
    for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "echo", "suffix"):
        if body.get(name) not in (None, False, {}, [], 0):
            raise _bad(f"'{name}' is not supported by this server", name)
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise _bad("'response_format' must be {\"type\": \"text\"}: structured output is not supported",
                   "response_format")
    best = body.get("best_of")
    if best not in (None, 1):
        raise _bad("'best_of' must be 1", "best_of")
    mt = _int(body, "max_completion_tokens", 1, limits.max_tokens)
    if mt is None:
        mt = _int(body, "max_tokens", 1, limits.max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1, 1 << 20)
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise _bad(f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings of at most "
                   f"{MAX_STOP_CHARS} characters", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
            raise _bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
        if not stream:
            raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = so.get("include_usage", False)
    return Params(max_tokens=mt, temperature=temperature, top_p=top_p, top_k=max(top_k or 0, 0),
                  seed=None if seed is None else seed & (2**63 - 1), stop=tuple(stop), stream=stream,
                  include_usage=include_usage)


def _content(c, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise _bad(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                           "supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_chat(body, limits: Limits) -> tuple[list[dict], Params]:
    params = parse_common(body, limits)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    if len(msgs) > limits.max_messages:
        raise _bad(f"'messages' holds {len(msgs)} messages; the limit is {limits.max_messages}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), i)})
    if not any(m["content"].strip() for m in out):
        raise _bad("every message is empty", "messages")
    return out, params


def parse_completion(body, limits: Limits) -> tuple[str | list[int], Params]:
    params = parse_common(body, limits)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                    # a batch of one
    if isinstance(p, str):
        if not p.strip():
            raise _bad("'prompt' is empty", "prompt")
        return p, params
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p, params
    raise _bad("'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
