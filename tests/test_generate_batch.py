"""LoadedModel.generate over many prompts, and the GPU's continuous batching scheduler
(engine/gpu/decode.py SlotBatch) driven on the CPU through a NumPy stand-in for the GPU model."""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from engine.api import load_model
from engine.gpu import decode as decoding
from engine.model.generate import GenerationError, SeqRequest, generate, run_batch, stop_ids
from engine.model.kv_cache import KVCache
from tiny_model import make_tiny_checkpoint

PROMPTS = ["hello there", "the cat sat on the mat", "a", "one two three four five six", "the"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_batch")
    make_tiny_checkpoint(d, max_position_embeddings=96)
    return load_model(str(d), "cpu")


def test_batch_equals_one_at_a_time(lm):
    many = lm.generate(PROMPTS, max_new_tokens=12)
    ones = [lm.generate(p, max_new_tokens=12) for p in PROMPTS]
    assert many == ones
    for c, p in zip(many, PROMPTS):       # and equals the engine's generate() on the same ids
        assert c.text == lm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason in ("stop", "length")


def test_stop_strings_ids_and_errors(lm):
    full = lm.generate("the cat", max_new_tokens=16, chat=False)
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    cut = full.text[3:5]
    c = lm.generate("the cat", max_new_tokens=16, chat=False, stop=[cut])
    assert c.finish_reason == "stop" and c.text == full.text[:full.text.index(cut)]
    ids = lm.tokenizer.encode("the cat").ids
    assert lm.generate([ids], max_new_tokens=16)[0] == full
    with pytest.raises(GenerationError):
        lm.generate([], max_new_tokens=4)
    with pytest.raises(GenerationError, match="stop"):
        lm.generate("x", stop=[""])
    with pytest.raises(GenerationError, match="context"):
        lm.generate("word " * 200, chat=False)
    with pytest.raises(ValueError):
        lm.generate("x", temperature=-1)


@pytest.mark.parametrize("prompts, needle", [
    (["a", 5], r"^prompts\[1\] is int 5; each prompt must be a string or a list of token ids; to send one "
               r"prompt of token ids, wrap it: generate\(\[ids\]\)"),
    ([5, 6], r"^prompts\[0\] is int 5; .* wrap it"),
    (np.array([5, 6]), r"^prompts is a NumPy array; .* wrap it"),
    ([], r"^prompts must be a string or a non-empty list of prompts"),
    (None, r"^prompts must be .* got NoneType None"),
    (["a", b"b"], r"^prompts\[1\] is bytes b'b'; each prompt must be"),
    (["a", [1, "x"]], r"^prompts\[1\]: token ids must be ints; the one at position 1 is str 'x'"),
    ([[1, True]], r"^prompts\[0\]: token ids must be ints; the one at position 1 is bool True"),
    ([[1, [2]]], r"^prompts\[0\]: token ids must be ints; the one at position 1 is list \[2\]"),
    ([np.zeros((2, 2), np.int64)], r"^prompts\[0\]: token ids must be a 1-D integer array"),
    ([[3, 10**6]], r"^prompts\[0\]: token id 1000000 at position 1 is outside the vocabulary"),
    (["a", []], r"^prompts\[1\]: no token ids"),
    (["a", "  "], r"^prompts\[1\]: the prompt is empty"),
    (["a", "word " * 200], r"^prompts\[1\]: the prompt has \d+ tokens but the context is 96"),
])
def test_a_bad_prompt_is_named_with_what_a_prompt_may_be(lm, prompts, needle):
    """lm.generate(["a", 5]) said `forward needs a non-empty 1-D token array, got shape ()`."""
    with pytest.raises(GenerationError, match=needle):
        lm.generate(prompts, max_new_tokens=2, chat=False)


def test_token_id_prompts_as_list_tuple_or_array(lm):
    """Token ids as any sequence np.asarray makes a 1-D integer array of (a range, array.array,
    a tensor-like object with __array__), as before the prompt checks; max_batch None is the default."""
    import array
    ids = lm.tokenizer.encode("the cat").ids
    one = lm.generate([ids], max_new_tokens=4)
    assert lm.generate((tuple(ids), np.array(ids, np.int32)), max_new_tokens=4) == one * 2

    class Tensor:                                   # torch.Tensor's part of the protocol
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.a, dtype)

        def __len__(self):
            return len(self.a)
    assert lm.generate([array.array("q", ids), Tensor(ids)], max_new_tokens=4, max_batch=None) == one * 2
    top = lm.generate([ids, ids], max_new_tokens=2, seed=2**63 - 1, temperature=0.5)   # seed + 1 wraps
    assert len(top) == 2
    lo = min(ids)
    assert lm.generate([range(lo, lo + 3)], max_new_tokens=2) == lm.generate([[lo, lo + 1, lo + 2]], max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"^prompts\[0\]: token ids must be a 1-D integer array"):
        lm.generate([np.array([1.5, 2.0])], max_new_tokens=2)


def test_chat_true_needs_text_and_a_template(lm):
    """chat=True with token ids was silently ignored; without a template it said `use --raw`."""
    ids = lm.tokenizer.encode("the cat").ids
    with pytest.raises(GenerationError, match=r"^chat=True applies the chat template to text, but prompts\[1\] "
                                              r"is token ids"):
        lm.generate(["the cat", ids], max_new_tokens=2, chat=True)
    assert lm.generate([ids], max_new_tokens=2, chat=None) == lm.generate([ids], max_new_tokens=2, chat=False)
    bare = replace(lm, chat_template=None)
    with pytest.raises(GenerationError, match="^chat=True needs a chat template and this model has none"):
        bare.generate("the cat", max_new_tokens=2, chat=True)
    assert bare.generate("the cat", max_new_tokens=2) == lm.generate("the cat", max_new_tokens=2, chat=False)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=-1), "^temperature must be a finite number >= 0"),
    (dict(top_p=1.5), r"^top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "^top_k must be an integer >= 0"),
    (dict(max_new_tokens=0), "^max_new_tokens must be an integer >= 1"),
    (dict(seed="s"), "^seed must be an integer"),
    (dict(max_batch=0), "^max_batch must be an integer >= 1"),
])
def test_setting_errors_name_the_python_parameter(lm, kwargs, needle):
    """`SamplingError: --temperature must be ...` named a flag the Python caller never saw; and a
    setting is about no one prompt, so no `prompts[i]:` either."""
    with pytest.raises(ValueError, match=needle):
        lm.generate(["a", "b"], **{"max_new_tokens": 2, **kwargs})


def test_device_errors_name_the_python_parameter():
    from engine.gpu.backend import BackendError, resolve_device
    with pytest.raises(BackendError, match="^device must be one of cpu, cuda, auto, got 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(BackendError, match="^device must be one of"):
        load_model(None, device="tpu")


def test_sampled_batch_is_seeded(lm):
    a = lm.generate(PROMPTS[:2], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    b = lm.generate(PROMPTS[:2], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    assert a == b and a[0] == lm.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)


# ----------------------------------------------------------------------------- SlotBatch on a stand-in

class FakeCache:
    """GpuKVCache's interface over one NumPy KVCache a slot."""

    def __init__(self, config, capacity, batch, kv8=False, slots=None, lens=None):
        self.capacity, self.batch, self.kv8 = capacity, batch, kv8
        self.slots = slots if slots is not None else [KVCache(config, capacity, np) for _ in range(batch)]
        self.lens_host = lens if lens is not None else np.zeros(batch, np.int64)
        self.step = None

    def view(self, batch):
        return FakeCache(None, self.capacity, batch, self.kv8, self.slots, self.lens_host[:batch])

    def move(self, src, dst):
        n = int(self.lens_host[src])
        a, b = self.slots[src], self.slots[dst]
        b.k[:, :n], b.v[:, :n] = a.k[:, :n], a.v[:, :n]
        self.lens_host[dst] = n


def fake_sample(logits, seq, pos, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """cuda/sample.cu's contract on the host: argmax, or a draw fixed by (seed, seq, pos)."""
    if temperature == 0:
        return int(np.argmax(logits))
    noise = np.random.default_rng([seed, seq, pos]).gumbel(size=logits.shape[-1])
    return int(np.argmax(np.asarray(logits, np.float64) / temperature + noise))


class FakeGpuModel:
    """CudaModel's batching interface (new_cache with batch, prefill into a slot, sample_logits,
    decode) over the NumPy model; sampling by fake_sample. `fake_decode` below stands in for
    gpu/decode.py decode()."""

    def __init__(self, model):
        self.m, self.config = model, model.config
        self.buckets = []

    def new_cache(self, capacity, batch=1, kv8=False):
        return FakeCache(self.config, capacity, batch, kv8)

    def _run(self, tokens, cache, seq):
        kv = cache.slots[seq]
        kv.length = int(cache.lens_host[seq])
        logits = self.m.forward(np.asarray(tokens), kv, last_only=True)
        cache.lens_host[seq] += len(tokens)
        return logits

    def prefill(self, tokens, cache, seq=0):
        return self._run(tokens, cache, seq)

    def sample_logits(self, logits, seq, pos, temperature=0.0, top_k=0, top_p=1.0, seed=0):
        return fake_sample(logits[0], seq, pos, temperature, top_k, top_p, seed)

    def decode(self, cache, last, n_steps, temperature=0.0, top_k=0, top_p=1.0, seed=0, use_graph=True,
               on_step=None):
        """CudaModel.decode (generate() runs it: one sequence, stream 0)."""
        return fake_decode(self, cache, last, n_steps, temperature, top_k, top_p, seed, use_graph, on_step)


def fake_decode(model, cache, last, n_steps, temperature=0.0, top_k=0, top_p=1.0, seed=0, use_graph=True,
                on_step=None, seq=None):
    """decode()'s contract: n_steps for every row of the (view) cache, lens advanced at the end;
    row b draws from stream seq[b] (default b) at the position of the token it feeds."""
    assert int(cache.lens_host.max()) + n_steps <= cache.capacity
    model.buckets.append(cache.batch)
    seq = np.arange(cache.batch) if seq is None else np.asarray(seq)
    assert seq.shape == (cache.batch,)
    lens = cache.lens_host.copy()
    toks = np.asarray(last).copy()
    done = 0
    for _ in range(n_steps):
        for b in range(cache.batch):
            kv = cache.slots[b]
            kv.length = int(lens[b])
            logits = model.m.forward(np.array([toks[b]]), kv, last_only=True)[0]
            toks[b] = fake_sample(logits, int(seq[b]), int(lens[b]), temperature, top_k, top_p, seed)
            lens[b] += 1
        done += 1
        if on_step is not None and on_step(toks.copy()):
            break
    cache.lens_host += done
    return np.zeros((done, cache.batch), np.int32)


def run_with_a_cancel(batch, reqs, gone, slots: int) -> None:
    """Drive a SlotBatch: reqs[0], gone and reqs[1:4] join; once gone runs with a later slot
    taken it is cancelled (another sequence moves into its slot); the rest join mid-run; step
    until idle, never more than `slots` running. Shared by the CPU stand-in and the GPU test."""
    for r in [reqs[0], gone] + reqs[1:4]:          # gone runs, between two others
        batch.submit(r)
    for _ in range(8):                             # until gone runs with a later slot taken
        batch.step()
        if gone in batch.active[:-1]:
            break
    assert gone in batch.active[:-1] and gone.tokens and gone.finish_reason is None
    gone.cancelled = True                          # leaves while running: another moves into its slot
    for r in reqs[4:]:
        batch.submit(r)
    while not batch.idle():
        batch.step()
        assert len(batch.active) <= slots


def test_slot_batch_joins_leaves_and_equals_serial(lm, monkeypatch):
    """More requests than slots, of different lengths and budgets, one cancelled, some joining
    mid-run: every sequence equals generate() alone; buckets follow the running count."""
    monkeypatch.setattr(decoding, "decode", fake_decode)
    fake = FakeGpuModel(lm.model)
    stops = frozenset(stop_ids(lm.tokenizer, lm.config))
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS * 2]
    budgets = [3, 9, 1, 14, 6, 11, 2, 8, 5, 12]
    batch = decoding.SlotBatch(fake, slots=3, capacity=64, chunk=4, prefill_budget=10)
    batch.warm_up()
    assert fake.buckets == [1, 2, 3] and not batch.cache.lens_host.any()
    fake.buckets.clear()
    reqs = [SeqRequest(p, n, stop_ids=stops) for p, n in zip(prompts, budgets)]
    gone = SeqRequest(prompts[0], 20, on_token=lambda t: None)     # no stop id: runs until cancelled
    run_with_a_cancel(batch, reqs, gone, slots=3)
    for r, p, n in zip(reqs, prompts, budgets):
        want, _ = generate(lm.model, p, n, stop=set(stops))
        assert r.tokens == want, (p, n)
        assert r.finish_reason == ("stop" if want[-1] in stops else "length")
    assert gone.finish_reason == "cancelled"
    assert set(fake.buckets) <= {1, 2, 3} and 3 in fake.buckets and (1 in fake.buckets or 2 in fake.buckets)


def test_slot_batch_refuses_and_clips(lm, monkeypatch):
    monkeypatch.setattr(decoding, "decode", fake_decode)
    batch = decoding.SlotBatch(FakeGpuModel(lm.model), slots=2, capacity=16)
    with pytest.raises(GenerationError, match="context"):
        batch.submit(SeqRequest(list(range(5, 25)), 4))
    with pytest.raises(GenerationError, match="kv8"):
        batch.submit(SeqRequest([5, 6], 4, kv8=True))
    r = SeqRequest(list(range(5, 15)), 100)
    run_batch(batch, [r])
    assert r.max_new_tokens == 6 and len(r.tokens) <= 6


def test_slot_batch_groups_by_sampling_setting(lm, monkeypatch):
    """A request with another sampling setting waits until the running batch drains (and the
    ones behind it wait too: first come, first served)."""
    seen = []

    def spy(model, cache, last, n_steps, temperature=0.0, **kw):
        seen.append(temperature)
        return fake_decode(model, cache, last, n_steps, 0.0, **kw)
    monkeypatch.setattr(decoding, "decode", spy)
    fake = FakeGpuModel(lm.model)
    fake.sample_logits = lambda logits, seq, pos, temperature=0.0, **kw: int(np.argmax(logits[0]))
    batch = decoding.SlotBatch(fake, slots=4, capacity=64)
    a, b = SeqRequest([5, 6, 7], 6), SeqRequest([8, 9], 6, temperature=0.7)
    c = SeqRequest([10, 11], 6)
    run_batch(batch, [a, b, c])
    assert all(r.finish_reason for r in (a, b, c))
    runs = [t for i, t in enumerate(seen) if i == 0 or seen[i - 1] != t]
    assert runs == [0.0, 0.7, 0.0]            # first come, first served: c waits behind b


def test_bucket_sizes():
    assert [decoding.bucket(n, 64) for n in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 64, 64]
    assert decoding.bucket(5, 6) == 6 and decoding.bucket(300, 300) == 300


SAMPLED = dict(temperature=1.5, seed=7)


def test_slot_batch_streams_follow_the_request(lm, monkeypatch):
    """A sampled request draws from (seed, its stream, position), not from its slot: with
    stream 0 it equals generate() alone wherever it runs, among others and through the moves
    that fill a leaver's slot; two streams of one prompt and seed draw differently."""
    monkeypatch.setattr(decoding, "decode", fake_decode)
    fake = FakeGpuModel(lm.model)
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS]
    budgets = [2, 12, 5, 16, 9]
    batch = decoding.SlotBatch(fake, slots=3, capacity=64, chunk=3)
    reqs = [SeqRequest(p, n, **SAMPLED) for p, n in zip(prompts, budgets)]
    for r in reqs:
        batch.submit(r, stream=0)
    twin = SeqRequest(prompts[3], 16, **SAMPLED)
    batch.submit(twin, stream=12345)
    while not batch.idle():
        batch.step()
    for r, p, n in zip(reqs, prompts, budgets):
        assert r.tokens == generate(fake, p, n, **SAMPLED)[0], (p, n)
    assert twin.tokens != reqs[3].tokens
    plain = decoding.SlotBatch(fake, slots=2, capacity=64)   # no stream given: one per submission
    a, b = SeqRequest(prompts[3], 16, **SAMPLED), SeqRequest(prompts[3], 16, **SAMPLED)
    run_batch(plain, [a, b])
    assert a.tokens == reqs[3].tokens and b.tokens != a.tokens
    with pytest.raises(GenerationError, match="stream"):
        plain.submit(SeqRequest(prompts[0], 4), stream=-1)


def test_slot_batch_fills_holes_with_the_last_sequence(lm, monkeypatch):
    """Three of five leave at once: one move (the last running sequence into the first hole),
    not a shift of every later one; every sequence still equals generate() alone."""
    monkeypatch.setattr(decoding, "decode", fake_decode)
    fake = FakeGpuModel(lm.model)
    batch = decoding.SlotBatch(fake, slots=5, capacity=64, chunk=2)
    moves, move = [], batch.cache.move
    batch.cache.move = lambda src, dst: (moves.append((src, dst)), move(src, dst))
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS]
    budgets = [3, 20, 3, 16, 3]
    reqs = [SeqRequest(p, n) for p, n in zip(prompts, budgets)]
    for r in reqs:
        batch.submit(r)
    batch.step()                          # 1 + 2 tokens each: reqs 0, 2, 4 end
    assert moves == [(3, 0)] and batch.active == [reqs[3], reqs[1]]
    assert list(batch.cache.lens_host) == [len(prompts[3]) + 2, len(prompts[1]) + 2, 0, 0, 0]
    while not batch.idle():
        batch.step()
    for r, p, n in zip(reqs, prompts, budgets):
        assert r.tokens == generate(fake, p, n)[0], (p, n)


def test_gpu_cache_move_copies_layer_by_layer():
    """GpuKVCache.move (NumPy standing in for CuPy) copies K, V and kv8's scales of one sequence
    into another slot, one layer per assignment: a copy spanning the layers overlaps in bounds,
    and CuPy would stage it through a temporary of the sequence's whole KV."""
    from engine.gpu.cache import GpuKVCache
    from tiny_model import make_tiny_config

    class Recording(np.ndarray):
        keys = []

        def __setitem__(self, key, value):
            Recording.keys.append(key)
            super().__setitem__(key, value)

    def made(fill):
        return lambda shape, dtype: fill(shape, dtype=dtype).view(Recording)
    cp = SimpleNamespace(int8=np.int8, float16=np.float16, float32=np.float32, zeros=made(np.zeros),
                         ones=made(np.ones))
    cfg = make_tiny_config()
    for kv8 in (False, True):
        c = GpuKVCache(cp, cfg, capacity=12, batch=4, kv8=kv8)
        rng = np.random.default_rng(0)
        arrays = (c.k, c.v) + ((c.ks, c.vs) if kv8 else ())
        for a in arrays:
            np.ndarray.__setitem__(a, ..., rng.integers(-100, 100, a.shape))
        before = [np.array(a) for a in arrays]
        c.lens_host[:] = [4, 3, 7, 0]
        Recording.keys.clear()
        c.move(2, 0)
        assert Recording.keys and all(isinstance(k[0], int) for k in Recording.keys), Recording.keys
        assert len(Recording.keys) == len(arrays) * cfg.num_hidden_layers
        for a, b in zip(arrays, before):
            want = b.copy()
            want[:, 0, :7] = b[:, 2, :7]
            assert np.array_equal(np.asarray(a), want)
        assert list(c.lens_host) == [7, 3, 7, 0]


def test_slot_batch_prefill_out_of_memory_fails_that_request_only(lm, monkeypatch):
    """CuPy's OutOfMemoryError is a MemoryError: the prefill that hits it fails its own request;
    the running and the later ones go on."""
    monkeypatch.setattr(decoding, "decode", fake_decode)
    fake = FakeGpuModel(lm.model)
    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS[:4]]
    big = prompts[1]
    prefill = fake.prefill

    def prefill_or_oom(tokens, cache, seq=0):
        if list(tokens) == big:
            raise MemoryError("Out of memory allocating 268,435,456 bytes")
        return prefill(tokens, cache, seq)
    fake.prefill = prefill_or_oom
    freed = []
    pool = SimpleNamespace(free_all_blocks=lambda: freed.append(1))
    fake.cp = SimpleNamespace(get_default_memory_pool=lambda: pool)      # CuPy's pool, as CudaModel.cp
    batch = decoding.SlotBatch(fake, slots=2, capacity=64, chunk=2)
    reqs = [SeqRequest(p, 6) for p in prompts]
    batch.submit(reqs[0])
    batch.step()
    for r in reqs[1:]:
        batch.submit(r)
    while not batch.idle():
        batch.step()
    assert reqs[1].finish_reason == "error" and "out of GPU memory" in reqs[1].error and not reqs[1].tokens
    assert freed == [1]
    for r, p in zip(reqs, prompts):
        if r is not reqs[1]:
            assert r.finish_reason == "length" and r.tokens == generate(fake, p, 6)[0]


def test_host_prefill_goes_by_chunks_through_the_cache(lm, monkeypatch):
    """A prompt longer than PREFILL_CHUNK runs a chunk at a time through the cache, reports its
    progress, and continues as the whole prompt in one forward does (the last logits within
    float rounding, the greedy tokens the same)."""
    from engine.model import generate as gen
    ids = np.random.default_rng(4).integers(0, lm.config.vocab_size, 37)
    cache = lm.model.new_cache(64)
    whole = lm.model.forward(ids, cache, last_only=True)
    want, _ = generate(lm.model, ids, 6)
    for chunk in (5, 16, 36):
        monkeypatch.setattr(gen, "PREFILL_CHUNK", chunk)
        seen = []
        got, st = generate(lm.model, ids, 6, on_prefill=lambda done, total: seen.append((done, total)))
        assert got == want and st.prompt_tokens == 37
        assert seen == [(min(37, c + chunk), 37) for c in range(0, 37, chunk)]
        cache = lm.model.new_cache(64)
        for c in range(0, 37, chunk):
            last = lm.model.forward(ids[c:c + chunk], cache, last_only=True)
        np.testing.assert_allclose(last, whole, rtol=1e-5, atol=1e-5 * float(np.abs(whole).max()))


def test_a_request_cancelled_during_its_prompt_stops_at_the_next_chunk(lm, monkeypatch):
    """The CPU server's SerialBatch checks `cancelled` between prefill chunks, not only once
    tokens flow: a client gone during a long prompt frees the model a chunk later."""
    from engine.model import generate as gen
    from engine.model.generate import SerialBatch
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 4)
    req = SeqRequest(prompt_ids=list(range(5, 30)), max_new_tokens=5)
    calls, forward = [], lm.model.forward

    def counting(tokens, *a, **kw):
        calls.append(len(tokens))
        req.cancelled = True                                   # the client leaves during chunk 1
        return forward(tokens, *a, **kw)
    monkeypatch.setattr(lm.model, "forward", counting)
    run_batch(SerialBatch(lm.model), [req])
    assert calls == [4] and req.finish_reason == "cancelled" and req.tokens == []
