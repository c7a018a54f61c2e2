"""dgq-serve against real HTTP clients (httpx; the openai package when installed), on a tiny
random model on the CPU: the OpenAI endpoints, streaming and not, concurrent clients, malformed
requests, clients that go away, the queue bound; greedy answers equal dgq-run's."""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner

from dgq_cli import run
from engine.api import load_model
from engine.serve.protocol import Limits
from engine.serve.server import ServeError, ServerThread, check_deps
from tiny_model import make_tiny_checkpoint

PROMPTS = ["hello there", "the cat sat on the mat", "one two three", "a", "the other one", "on and on"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_serve")
    make_tiny_checkpoint(d, max_position_embeddings=96)
    return d


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(str(tiny_dir), "cpu")


@pytest.fixture(scope="module")
def url(lm):
    with ServerThread(lm, model_id="tiny", limits=Limits(max_body=64 * 1024, default_max_tokens=16)) as u:
        yield u


@pytest.fixture()
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def chat(client, content, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0} | kw
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines):
    """The JSON objects of an event stream, checking the framing and the final [DONE]."""
    data = [ln[len("data: "):] for ln in lines if ln]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def test_health_and_models(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["device"] == "cpu" and h["context"] == 96
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "tiny"


def test_greedy_answers_equal_dgq_run(client, tiny_dir):
    """Chat through the template and a raw completion: the text dgq-run prints, and the usage."""
    for prompt in PROMPTS[:3]:
        r = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", prompt, "--max-new-tokens", "10",
                                     "--device", "cpu"])
        assert r.exit_code == 0, r.output
        got = chat(client, prompt, max_tokens=10)
        assert r.stdout == got["choices"][0]["message"]["content"] + "\n"
        assert got["object"] == "chat.completion" and got["choices"][0]["finish_reason"] in ("stop", "length")
        raw = CliRunner().invoke(run, ["--weights", str(tiny_dir), "--prompt", prompt, "--raw",
                                       "--max-new-tokens", "10", "--device", "cpu"])
        c = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                 "temperature": 0}).json()
        assert raw.stdout == c["choices"][0]["text"] + "\n"
        assert c["usage"]["prompt_tokens"] > 0 and c["usage"]["completion_tokens"] <= 10


def test_greedy_answers_equal_generate(client, lm):
    want = lm.generate(PROMPTS, max_new_tokens=12)
    for p, w in zip(PROMPTS, want):
        got = chat(client, p, max_tokens=12)
        assert got["choices"][0]["message"]["content"] == w.text
        assert got["choices"][0]["finish_reason"] == w.finish_reason


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streaming_equals_non_streaming(client, endpoint):
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat"}]}
    else:
        path, body = "/v1/completions", {"prompt": "the cat"}
    body |= {"model": "tiny", "max_tokens": 14, "temperature": 0}
    whole = client.post(path, json=body).json()
    with client.stream("POST", path, json=body | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage == whole["usage"]
    chunks = events[:-1]
    assert len({e["id"] for e in events}) == 1
    if endpoint == "chat":
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
        assert text == whole["choices"][0]["message"]["content"]
        assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    else:
        text = "".join(e["choices"][0]["text"] for e in chunks)
        assert text == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])


def test_usage_counts_tokens_without_the_stop_id(client, lm):
    """completion_tokens counts the tokens of the answer (Completion.token_ids), not the final
    end-of-turn id, streaming or not."""
    ended = [(p, c) for p in PROMPTS + ["hello there"]
             for c in [lm.generate(p, max_new_tokens=16, chat=False)] if c.finish_reason == "stop"]
    assert ended, "no prompt ends at a stop id within 16 tokens"
    for p, c in ended[:2]:
        body = {"model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0}
        whole = client.post("/v1/completions", json=body).json()
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert whole["usage"]["completion_tokens"] == len(c.token_ids), (p, c.token_ids)
        with client.stream("POST", "/v1/completions",
                           json=body | {"stream": True, "stream_options": {"include_usage": True}}) as r:
            assert sse_events(list(r.iter_lines()))[-1]["usage"] == whole["usage"]


def test_stop_strings(client):
    full = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 16, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text[4:6]
    cut = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 16, "temperature": 0,
                                               "stop": [stop, "never-there"]}).json()
    assert cut["choices"][0]["text"] == text[:text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={"prompt": "the cat", "max_tokens": 16, "temperature": 0,
                                                        "stop": stop, "stream": True}) as r:
        events = sse_events(list(r.iter_lines()))
    assert "".join(e["choices"][0]["text"] for e in events) == text[:text.index(stop)]


def test_sampling_with_a_seed_is_reproducible(client):
    a = chat(client, "the cat", max_tokens=12, temperature=0.9, top_p=0.9, seed=4)
    b = chat(client, "the cat", max_tokens=12, temperature=0.9, top_p=0.9, seed=4)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_concurrent_clients(url, lm):
    """Eight clients at once, streaming and not: each gets its own prompt's greedy answer."""
    want = {p: w.text for p, w in zip(PROMPTS, lm.generate(PROMPTS, max_new_tokens=12))}

    async def one(c, i):
        p = PROMPTS[i % len(PROMPTS)]
        body = {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 12, "temperature": 0}
        if i % 2:
            r = await c.post("/v1/chat/completions", json=body)
            return p, r.json()["choices"][0]["message"]["content"]
        text = ""
        async with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        return p, text

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    for p, text in asyncio.run(main()):
        assert text == want[p], p


LONG = "word " * 200


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", [], 400, "JSON object"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 95}, 400, "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "'n'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": {}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, 400,
     "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "context"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 999999]}, 400, "token ids"),
    ("/v1/completions", {"prompt": {"x": 1}}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "context"),
])
def test_malformed_requests_get_clear_4xx(client, path, body, status, needle):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_bad_bodies_methods_and_routes(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", content=b"x=1", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():                                 # no Content-Length: counted as it streams in
        for _ in range(100):
            yield b" " * 1024
    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    deep = b"[" * 100_00 + b"]" * 100_00
    r = client.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert client.get("/v1/chat/completions").status_code == 405
    assert client.get("/v2/nothing").status_code == 404
    assert client.get("/health").json()["status"] == "ok"          # still serving


class SlowModel:
    """The NumPy model, 20 ms a forward: time for a client to leave mid-answer."""

    def __init__(self, m):
        self.m, self.config, self.calls = m, m.config, 0

    def new_cache(self, *a, **kw):
        return self.m.new_cache(*a, **kw)

    def forward(self, *a, **kw):
        self.calls += 1
        time.sleep(0.02)
        return self.m.forward(*a, **kw)


@pytest.fixture()
def slow(lm):
    from engine.api import LoadedModel
    model = SlowModel(lm.model)
    slm = LoadedModel(model, lm.config, lm.tokenizer, lm.chat_template, "tiny", "cpu")
    with ServerThread(slm, limits=Limits(max_queue=2)) as u:
        yield u, model


def wait_idle(c, seconds=5.0):
    t = time.time()
    while time.time() - t < seconds:
        if c.get("/health").json()["running_or_queued"] == 0:
            return True
        time.sleep(0.02)
    return False


def test_disconnecting_streaming_client_is_cancelled(slow):
    url, model = slow
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 70, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            it = r.iter_lines()
            while not next(it).startswith("data: {"):
                pass
        # the response is closed after the first event: the sequence must stop well before 70 tokens
        assert wait_idle(c)
        assert model.calls < 45, model.calls
        assert chat(c, "the cat", max_tokens=3)["choices"][0]["finish_reason"] in ("stop", "length")


def test_disconnecting_non_streaming_client_is_cancelled(slow):
    url, model = slow
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 70, "temperature": 0}
    with httpx.Client(base_url=url, timeout=0.3) as c:
        with pytest.raises(httpx.TimeoutException):
            c.post("/v1/chat/completions", json=body)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert wait_idle(c)
        assert model.calls < 45, model.calls


def test_queue_bound_answers_503(slow):
    url, _ = slow
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "temperature": 0}
    codes = []

    def post():
        with httpx.Client(base_url=url, timeout=30) as c:
            codes.append(c.post("/v1/chat/completions", json=body).status_code)
    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 200, 503, 503], codes


def test_openai_client(url, lm):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=url + "/v1", api_key="none")
    assert [m.id for m in c.models.list().data] == ["tiny"]
    want = lm.generate("hello there", max_new_tokens=10)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                  max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text
    s = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                  max_tokens=10, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == want.text
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[], max_tokens=10)


def test_dgq_serve_command(tiny_dir):
    """The console command: starts on a free port, says where, answers, stops on SIGTERM."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", "from dgq_cli import serve_main; serve_main()", "--weights",
                          str(tiny_dir), "--port", "0", "--device", "cpu", "--log-level", "warning"],
                         cwd=root, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line
        u = line.rsplit(" ", 1)[1].strip()
        with httpx.Client(base_url=u, timeout=30) as c:
            assert c.get("/health").json()["status"] == "ok"
            assert chat(c, "hi", max_tokens=2)["usage"]["completion_tokens"] <= 2
    finally:
        p.terminate()
        assert p.wait(timeout=20) in (0, -15)         # uvicorn re-raises the signal after shutting down


def test_missing_dependencies_are_named(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "uvicorn" else real(n, *a))
    with pytest.raises(ServeError, match=r"pip install 'dgq-engine\[serve\]'.*uvicorn"):
        check_deps()


def test_serve_flag_errors(tiny_dir):
    from dgq_cli import serve
    r = CliRunner().invoke(serve, ["--weights", str(tiny_dir), "--port", "70000"])
    assert r.exit_code == 2 and "--port" in r.output
    r = CliRunner().invoke(serve, ["--weights", "/nonexistent/x", "--device", "cpu"])
    assert r.exit_code == 1 and "/nonexistent/x" in r.output


def test_bench_serve_runs_on_the_cpu():
    """`python -m engine.bench serve` end to end on a tiny random model: a child process serves,
    clients stream, the row has every figure."""
    from engine.bench.serve import format_row, run_serve
    opts = dict(model="tiny", weights=None, device="cpu", clients=3, requests=6, prompt_tokens=16, answer_tokens=8,
                max_batch=3, kv8=False, baseline_batch=0, timeout=120, vocab=None)
    row = run_serve(opts)
    assert row["failed"] == 0 and row["requests"] == 6 and row["mean_answer_tokens"] == 8
    assert row["out_tok_s"] > 0 and row["ttft_ms_p50"] > 0
    assert "output tokens/s" in format_row(row)


# ----------------------------------------------------------------------------- the GPU worker on a stand-in

def fake_gpu_worker(lm, monkeypatch, **kw):
    """A Worker driving SlotBatch over the NumPy stand-in of tests/test_generate_batch.py (no
    thread, no loop: the test takes and steps)."""
    from types import SimpleNamespace

    from engine.gpu import decode as decoding
    from engine.serve.worker import Worker
    from test_generate_batch import FakeGpuModel, fake_decode
    monkeypatch.setattr(decoding, "decode", fake_decode)
    fake = FakeGpuModel(lm.model)
    w = Worker(SimpleNamespace(model=fake, config=lm.config), warm_up=False, **kw)
    w.loop = SimpleNamespace(call_soon_threadsafe=lambda *a: None)
    assert w.on_gpu
    return w, fake


def run_jobs(w, jobs):
    for j in jobs:
        w.submit(j)
    assert w._take(block=False)
    while not w.batch.idle():
        w.batch.step()


def test_gpu_worker_samples_per_request_not_per_slot(lm, monkeypatch):
    """Unseeded requests share the server's seed but not its random stream: the same prompt
    alone twice gets two draws. A seeded one draws what generate() draws for its seed, in
    whatever slot it runs."""
    from engine.model.generate import generate
    w, fake = fake_gpu_worker(lm, monkeypatch, max_batch=3, context=64)
    ids = lm.tokenizer.encode("the cat").ids
    alone = [w.new_job(ids, 16, 1.5, 0, 1.0, None, ()) for _ in range(2)]
    for j in alone:
        run_jobs(w, [j])                 # each alone, in slot 0
    assert alone[0].req.tokens != alone[1].req.tokens
    ahead = w.new_job(lm.tokenizer.encode("one two three").ids, 3, 1.5, 0, 1.0, 7, ())
    seeded = w.new_job(ids, 16, 1.5, 0, 1.0, 7, ())
    run_jobs(w, [ahead, seeded])         # slot 1, then slot 0 once `ahead` leaves
    assert seeded.req.tokens == generate(fake, ids, 16, temperature=1.5, seed=7)[0]


def test_gpu_worker_arrival_ends_the_decode_chunk(lm, monkeypatch):
    """A request arriving while a slot is free ends the running chunk (of 32 steps) at the next
    step, so it waits one decode step for its prefill, not a chunk."""
    from engine.model.generate import generate
    w, fake = fake_gpu_worker(lm, monkeypatch, max_batch=2, context=96, chunk=32)
    a_ids, b_ids = lm.tokenizer.encode("the cat").ids, lm.tokenizer.encode("one two").ids
    a, b = w.new_job(a_ids, 40, 0.0, 0, 1.0, None, ()), w.new_job(b_ids, 8, 0.0, 0, 1.0, None, ())
    w.submit(a)
    assert w._take(block=False)
    hand_over, steps = w.batch.after_step, []

    def arrive():                        # b arrives during a's second decode step
        steps.append(1)
        if len(steps) == 3:
            w.submit(b)
        hand_over()
    w.batch.after_step = arrive
    w.batch.step()
    assert len(a.req.tokens) <= 4, len(a.req.tokens)
    assert w._take(block=False) and w.incoming.empty()
    while not w.batch.idle():
        w.batch.step()
    assert a.req.tokens == generate(fake, a_ids, 40)[0] and b.req.tokens == generate(fake, b_ids, 8)[0]
