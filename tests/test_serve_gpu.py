"""dgq-serve on the GPU engine (gpu-marked): continuous batching behind real HTTP clients;
greedy answers equal LoadedModel.generate's and the engine's one-sequence generate()."""
import asyncio
import json
import time

import pytest

from engine.gpu.backend import has_gpu

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)

for _extra in ("starlette", "uvicorn"):       # dgq-serve's optional stack: pip install -e '.[serve]'
    pytest.importorskip(_extra, reason="dgq-serve needs the serve extras (pip install -e '.[serve]')")
import httpx  # noqa: E402

from engine.api import LoadedModel  # noqa: E402
from engine.model.generate import generate, stop_ids  # noqa: E402
from engine.serve.server import ServerThread  # noqa: E402
from test_model_cuda import quantized_tiny  # noqa: E402
from tiny_model import TINY_CHAT_TEMPLATE, TINY_VOCAB, make_tiny_tokenizer  # noqa: E402

PROMPTS = ["hello there", "the cat sat on the mat", "one two three", "a", "the other one", "on and on",
           "then", "at the center"]


@pytest.fixture(scope="module")
def lm():
    from engine.gpu.model import CudaModel
    mw = quantized_tiny("dynamic", seed=12, vocab_size=TINY_VOCAB, head_dim=64, hidden_size=64,
                        intermediate_size=96, max_position_embeddings=256)
    return LoadedModel(CudaModel(mw), mw.config, make_tiny_tokenizer(), TINY_CHAT_TEMPLATE, "tiny", "cuda")


async def ask(c, prompt, stream, max_tokens=24, path="/v1/completions"):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        r = await c.post(path, json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = ""
    async with c.stream("POST", path, json=body | {"stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def run_clients(url, prompts, **kw):
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(ask(c, p, i % 2 == 0, **kw) for i, p in enumerate(prompts)))
    return asyncio.run(main())


@pytest.mark.parametrize("kv8", [False, True])
def test_concurrent_clients_equal_one_at_a_time(lm, kv8):
    """24 clients on 4 slots (the rest queue; sequences join and leave between steps)."""
    prompts = PROMPTS * 3
    with ServerThread(lm, max_batch=4, context=64, chunk=8, kv8=kv8, model_id="tiny") as url:
        got = run_clients(url, prompts)
        with httpx.Client(base_url=url, timeout=30) as c:
            h = c.get("/health").json()
    assert h["slots"] == 4 and h["running_or_queued"] == 0
    want = {p: w.text for p, w in zip(PROMPTS, lm.generate(PROMPTS, max_new_tokens=24, chat=False, kv8=kv8))}
    assert got == [want[p] for p in prompts]
    stops = set(stop_ids(lm.tokenizer, lm.config))
    for p in PROMPTS[:3]:
        ids, _ = generate(lm.model, lm.tokenizer.encode(p).ids, 24, stop=stops, kv8=kv8)
        assert want[p] == lm.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)


def test_disconnect_frees_the_slot(lm):
    """Three streaming clients that leave after their first event: each sequence is cancelled
    (not run to its 240 tokens, ~60 chunks of 4 each), and the later clients get their answers."""
    st = ServerThread(lm, max_batch=2, context=256, chunk=4, model_id="tiny")
    with st as url:
        worker = st.server.config.app.state.server.worker
        submitted, submit = [], worker.batch.submit
        worker.batch.submit = lambda req, *a: (submitted.append(req), submit(req, *a))
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(3):
                with c.stream("POST", "/v1/completions", json={"prompt": "the cat", "max_tokens": 240,
                                                               "temperature": 0, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            break
            got = run_clients(url, PROMPTS[:4])
            for _ in range(200):
                if c.get("/health").json()["running_or_queued"] == 0:
                    break
                time.sleep(0.01)
            assert c.get("/health").json()["running_or_queued"] == 0
        steps = worker.steps
    assert len(submitted) == 7
    for req in submitted[:3]:
        assert req.finish_reason == "cancelled" and len(req.tokens) < 120, (req.finish_reason, len(req.tokens))
    assert steps < 60, steps          # 3 × 240 tokens run out would take ~120 batch steps
    want = [c.text for c in lm.generate(PROMPTS[:4], max_new_tokens=24, chat=False)]
    assert got == want


def test_sampled_requests_batch_by_setting(lm):
    """Requests with two sampling settings and greedy ones at once: all answer; the greedy ones
    still equal generate()'s."""
    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            async def one(i):
                body = {"prompt": PROMPTS[i % 8], "max_tokens": 16, "temperature": [0, 0.8, 1.0][i % 3], "seed": 1}
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(i) for i in range(12)))
    with ServerThread(lm, max_batch=4, context=64, model_id="tiny") as url:
        got = asyncio.run(main(url))
    want = {p: w.text for p, w in zip(PROMPTS, lm.generate(PROMPTS, max_new_tokens=16, chat=False))}
    for i in range(0, 12, 3):
        assert got[i] == want[PROMPTS[i % 8]]
