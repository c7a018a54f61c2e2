"""Batched generation and continuous batching on the GPU engine (gpu-marked): every sequence
equals the same prompt generated alone (greedy), whatever joins or leaves around it."""
import pytest

from engine.gpu.backend import has_gpu

pytestmark = pytest.mark.gpu
if not has_gpu():
    pytest.skip("no GPU", allow_module_level=True)

from engine.api import LoadedModel  # noqa: E402
from engine.gpu import decode as decoding  # noqa: E402
from engine.model.generate import SeqRequest, generate, run_batch, stop_ids  # noqa: E402
from test_generate_batch import run_with_a_cancel  # noqa: E402
from test_model_cuda import quantized_tiny  # noqa: E402
from tiny_model import TINY_CHAT_TEMPLATE, TINY_VOCAB, make_tiny_tokenizer  # noqa: E402

PROMPTS = ["hello there", "the cat sat on the mat", "a", "one two three four five six", "the", "on"]


@pytest.fixture(scope="module")
def lm():
    from engine.gpu.model import CudaModel
    mw = quantized_tiny("dynamic", seed=11, vocab_size=TINY_VOCAB, head_dim=64, hidden_size=64,
                        intermediate_size=96, max_position_embeddings=160)
    return LoadedModel(CudaModel(mw), mw.config, make_tiny_tokenizer(), TINY_CHAT_TEMPLATE, "tiny", "cuda")


def test_generate_batch_equals_one_at_a_time(lm):
    many = lm.generate(PROMPTS, max_new_tokens=20, chat=False)
    ones = [lm.generate(p, max_new_tokens=20, chat=False) for p in PROMPTS]
    assert [c.token_ids for c in many] == [c.token_ids for c in ones]
    assert many == ones
    stops = set(stop_ids(lm.tokenizer, lm.config))
    for c, p in zip(many, PROMPTS):          # and the engine's single-sequence generate()
        want, _ = generate(lm.model, lm.tokenizer.encode(p).ids, 20, stop=stops)
        assert c.token_ids == [t for t in want if t not in stops]


def test_generate_batch_past_max_batch_and_kv8(lm):
    many = lm.generate(PROMPTS, max_new_tokens=12, chat=False, max_batch=2)
    assert many == lm.generate(PROMPTS, max_new_tokens=12, chat=False)
    k8 = lm.generate(PROMPTS, max_new_tokens=12, chat=False, kv8=True)
    assert k8 == [lm.generate(p, max_new_tokens=12, chat=False, kv8=True) for p in PROMPTS]


def test_sampled_batch_is_reproducible(lm):
    a = lm.generate(PROMPTS, max_new_tokens=12, chat=False, temperature=0.9, top_p=0.95, seed=5)
    assert a == lm.generate(PROMPTS, max_new_tokens=12, chat=False, temperature=0.9, top_p=0.95, seed=5)


@pytest.mark.parametrize("kv8", [False, True])
def test_slot_batch_join_leave_equals_serial(lm, kv8):
    """Three slots, twelve requests of different lengths and budgets, one cancelled mid-run, more
    arriving while others decode: the running set changes bucket (1, 2, 3 rows; compaction moves
    KV, and with kv8 its scales, between slots), and every sequence equals generate() of its
    prompt alone."""
    stops = frozenset(stop_ids(lm.tokenizer, lm.config))
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS] * 2
    budgets = [3, 9, 1, 14, 6, 11, 2, 8, 5, 12, 7, 4]
    batch = decoding.SlotBatch(lm.model, slots=3, capacity=64, chunk=4, kv8=kv8)
    reqs = [SeqRequest(p, n, stop_ids=stops, kv8=kv8) for p, n in zip(prompts, budgets)]
    gone = SeqRequest(prompts[1], 30, kv8=kv8)          # no stop id: runs until cancelled
    run_with_a_cancel(batch, reqs, gone, slots=3)
    assert gone.finish_reason == "cancelled"
    assert {1, 2, 3} & set(batch.views) and 3 in batch.views
    for r, p, n in zip(reqs, prompts, budgets):
        want, _ = generate(lm.model, p, n, stop=set(stops), kv8=kv8)
        assert r.tokens == want, (p, n)


def test_slot_batch_many_slots_past_the_fp16_gemv(lm):
    """Ten running sequences: the bucket of 16 rows (the lm_head past the fp16 GEMV runs after
    each graph replay)."""
    stops = frozenset(stop_ids(lm.tokenizer, lm.config))
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS] + [[5 + i, 9, 12 + i] for i in range(4)]
    reqs = [SeqRequest(p, 10, stop_ids=stops) for p in prompts]
    run_batch(decoding.SlotBatch(lm.model, slots=16, capacity=48), reqs)
    for r, p in zip(reqs, prompts):
        assert r.tokens == generate(lm.model, p, 10, stop=set(stops))[0]


def test_seeded_request_draws_as_generate_alone_in_any_slot(lm):
    """Sampling follows the request's stream, not its slot: seeded requests with stream 0 (as
    the server submits them) in slots 0..2, one leaving early so another moves, each equal
    generate() of its prompt alone with that seed."""
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS[:4]]
    budgets = [3, 14, 10, 12]
    kw = dict(temperature=0.9, top_p=0.95, seed=5)
    batch = decoding.SlotBatch(lm.model, slots=3, capacity=64, chunk=4)
    reqs = [SeqRequest(p, n, **kw) for p, n in zip(prompts, budgets)]
    for r in reqs:
        batch.submit(r, stream=0)
    while not batch.idle():
        batch.step()
    for r, p, n in zip(reqs, prompts, budgets):
        assert r.tokens == generate(lm.model, p, n, **kw)[0], (p, n)


@pytest.mark.parametrize("kv8", [False, True])
def test_slot_batch_past_16_rows_equals_serial(lm, kv8):
    """Twenty-four sequences of different budgets on 32 slots: the bucket of 32 rows, then
    smaller ones as they leave (moves at every size), each equal to generate() alone."""
    stops = frozenset(stop_ids(lm.tokenizer, lm.config))
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS] + [[5 + i, 9 + i % 7, 12 + i] for i in range(18)]
    budgets = [4 + (7 * i) % 13 for i in range(len(prompts))]
    reqs = [SeqRequest(p, n, stop_ids=stops, kv8=kv8) for p, n in zip(prompts, budgets)]
    batch = decoding.SlotBatch(lm.model, slots=32, capacity=48, chunk=4, kv8=kv8)
    run_batch(batch, reqs)
    assert 32 in batch.views and len(batch.views) > 1
    for r, p, n in zip(reqs, prompts, budgets):
        assert r.tokens == generate(lm.model, p, n, stop=set(stops), kv8=kv8)[0], (p, n)
