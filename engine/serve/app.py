"""The HTTP side: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, and /health,
as a Starlette app; streaming answers are server-sent events (`data: {json}` per chunk, then
`data: [DONE]`). A bad request gets a 4xx with OpenAI's error body; a client that goes away
cancels its request (its sequence leaves the batch at the next decode step).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..io.tokenizer import TokenizerError
from ..model.generate import GenerationError, TextCollector, encode_messages, stop_ids
from .protocol import ApiError, Limits, parse_chat, parse_completion
from .worker import Job, Worker


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request, limit: int):
    """The body as JSON, refused past `limit` bytes (declared or streamed) or when not JSON."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ApiError(415, f"the body must be application/json, got {ctype}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client went away while sending the body") from None
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {' '.join(str(e).split())[:200]}") from None


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The routes over one Worker."""

    def __init__(self, lm, worker: Worker, model_id: str, limits: Limits):
        self.lm, self.worker, self.model_id, self.limits = lm, worker, model_id, limits
        self.stop_ids = frozenset(stop_ids(lm.tokenizer, lm.config))
        self.created = int(time.time())

    # ------------------------------------------------------------------ routes
    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_id, "device": self.lm.device,
                             "running_or_queued": self.worker.count, "slots": self.worker.slots,
                             "context": self.worker.context})

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dgq",
             "max_model_len": self.worker.context}]})

    async def chat(self, request: Request):
        try:
            body = await read_json(request, self.limits.max_body)
            messages, p = parse_chat(body, self.limits)
            if not self.lm.chat_template:
                raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
            try:
                ids = encode_messages(self.lm.tokenizer, messages, self.lm.chat_template, self.lm.config)
            except (GenerationError, TokenizerError) as e:
                raise ApiError(400, str(e), "messages") from None
            return await self._answer(request, ids, p, chat=True)
        except ApiError as e:
            return error_response(e)

    async def completions(self, request: Request):
        try:
            body = await read_json(request, self.limits.max_body)
            prompt, p = parse_completion(body, self.limits)
            if isinstance(prompt, str):
                ids = self.lm.tokenizer.encode(prompt).ids     # as dgq-run --raw encodes it
            else:
                vocab = self.lm.config.vocab_size
                if min(prompt) < 0 or max(prompt) >= vocab:
                    raise ApiError(400, f"token ids must lie in [0, {vocab})", "prompt")
                ids = prompt
            return await self._answer(request, ids, p, chat=False)
        except ApiError as e:
            return error_response(e)

    # ------------------------------------------------------------------ generation
    def _job(self, ids, p) -> Job:
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        if self.worker.count >= self.limits.max_queue:
            raise ApiError(503, f"the server is busy ({self.worker.count} requests running or queued); "
                                "retry later", kind="server_busy")
        max_tokens = p.max_tokens
        if max_tokens is None:
            max_tokens = self.limits.default_max_tokens
        elif len(ids) + max_tokens > self.worker.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed this "
                                f"server's context of {self.worker.context} tokens", "max_tokens")
        try:
            return self.worker.new_job(ids, max_tokens, p.temperature, p.top_k, p.top_p, p.seed, self.stop_ids)
        except (GenerationError, ValueError) as e:
            raise ApiError(400, " ".join(str(e).split())) from None

    async def _answer(self, request: Request, ids, p, chat: bool):
        job = self._job(ids, p)
        self.worker.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if p.stream:
            return StreamingResponse(self._stream(job, p, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events = asyncio.ensure_future(self._collect(job, p))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not events.done():            # the client left: free its slot
                job.cancel()
                events.cancel()
            gone.cancel()
        if not events.done() or events.cancelled():
            return Response(status_code=499)
        text, reason, n_out, error = events.result()
        if error is not None:
            return error_response(ApiError(500, error, kind="server_error"))
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": self.model_id,
                             "choices": [choice], "usage": usage})

    async def _pieces(self, job: Job, p):
        """(text, finish_reason or None, completion tokens, error or None) as the tokens arrive;
        the last one has a finish_reason (or an error). Queued token groups are taken together,
        so a client that reads slowly gets fewer, larger chunks."""
        col = TextCollector(self.lm.tokenizer, p.stop)
        n = 0
        try:
            while True:
                kind, toks = await job.events.get()
                groups = [toks] if kind == "tokens" else []
                while kind == "tokens" and not job.events.empty():
                    kind, toks = job.events.get_nowait()
                    if kind == "tokens":
                        groups.append(toks)
                text, hit = "", False
                for g in groups:
                    for t in g:
                        n += 1
                        piece, hit = col.push(t)
                        text += piece
                        if hit:
                            break
                    if hit:
                        break
                if hit:
                    job.cancel()
                    yield text, "stop", n, None
                    return
                if kind == "done":
                    req = job.req
                    if req.finish_reason == "error":
                        yield text, None, n, req.error or "generation failed"
                        return
                    text += col.finish()
                    reason = "length" if req.finish_reason == "length" else "stop"
                    yield text, reason, n, None      # the tokens passed on: a final stop id is not
                    return
                if text:
                    yield text, None, n, None
        finally:
            if not job.done:
                job.cancel()

    async def _collect(self, job: Job, p):
        parts, reason, n, err = [], None, 0, None
        async for text, reason, n, err in self._pieces(job, p):
            parts.append(text)
        return "".join(parts), reason, n, err

    async def _stream(self, job: Job, p, rid: str, chat: bool):
        created = int(time.time())

        def chunk(text, reason, role=False):
            if chat:
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                c = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
                return {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_id, "choices": [c]}
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                    "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

        if chat:
            yield sse(chunk("", None, role=True))
        n_prompt = len(job.req.prompt_ids)
        async for text, reason, n, err in self._pieces(job, p):
            if err is not None:
                yield sse(ApiError(500, err, kind="server_error").body())
                return
            if reason is None:
                yield sse(chunk(text, None))
                continue
            if text:
                yield sse(chunk(text, None))
            yield sse(chunk("", reason))
            if p.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": self.model_id, "choices": [],
                           "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                     "total_tokens": n_prompt + n}})
        yield "data: [DONE]\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def create_app(lm, worker: Worker, model_id: str, limits: Limits | None = None) -> Starlette:
    """The Starlette app; its lifespan starts and stops the worker's model thread."""
    import contextlib  # noqa: PLC0415
    srv = Server(lm, worker, model_id, limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            worker.stop()

    async def not_found(request, exc):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                                            "/v1/chat/completions, /v1/completions, /health", kind="not_found"))

    async def bad_method(request, exc):
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    routes = [Route("/health", srv.health, methods=["GET"]), Route("/v1/models", srv.models, methods=["GET"]),
              Route("/v1/chat/completions", srv.chat, methods=["POST"]),
              Route("/v1/completions", srv.completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method})
    app.state.server = srv
    return app
