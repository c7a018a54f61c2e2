"""The model's thread: requests in through a queue, tokens out to the event loop.

One thread owns the model and its batch (SlotBatch on the GPU: continuous batching; SerialBatch
on the CPU: one request at a time). The event loop submits Jobs; the thread admits them
between decode steps, and after each step hands every job's new tokens to the loop in one
call_soon_threadsafe (not one per token: at batch 64 that would be thousands of wakeups a
second). A job's handler on the loop turns tokens into text (engine.model.generate
TextCollector) and may cancel it (stop string met, client gone): the thread drops it at its
next step.
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time

import numpy as np

from ..model.generate import GenerationError, SerialBatch, SeqRequest, check_request

_STOP = object()


class Job:
    """One request between the loop and the model thread."""

    def __init__(self, req: SeqRequest, worker, stream: int = 0):
        self.req, self.worker = req, worker
        self.stream = stream           # its random stream on the GPU (SlotBatch.submit)
        self.events: asyncio.Queue = asyncio.Queue()
        self.new: list[int] = []       # tokens produced since the last hand-over (model thread)
        self.submitted = time.perf_counter()
        self.done = False              # the model thread is finished with it

    def cancel(self) -> None:
        self.req.cancelled = True


class Worker:
    """max_batch sequences of up to `context` positions on the GPU (the KV cache, allocated
    here once, is the memory bound: the rest queue); the CPU serves one at a time."""

    def __init__(self, lm, max_batch: int = 32, context: int | None = None, kv8: bool = False, chunk: int = 32,
                 max_queue: int = 512, warm_up: bool = True):
        self.lm, self.kv8, self.max_queue = lm, kv8, max_queue
        ctx = lm.config.max_position_embeddings
        self.context = ctx if context is None else min(int(context), ctx)
        self.on_gpu = hasattr(lm.model, "decode")
        if self.on_gpu:
            from ..gpu.decode import SlotBatch  # noqa: PLC0415
            self.batch = SlotBatch(lm.model, max_batch, self.context, kv8=kv8, chunk=chunk,
                                   after_step=self._hand_over, pending=lambda: not self.incoming.empty())
            self.slots = max_batch
            if warm_up:
                self.batch.warm_up()
        else:
            self.batch = SerialBatch(lm.model, after_token=self._hand_over)
            self.slots = 1
        self.default_seed = int(np.random.default_rng().integers(2**62))
        self.incoming: queue.Queue = queue.Queue()
        self.live: set[Job] = set()             # model thread: submitted, not yet finished
        self.dirty: list[Job] = []              # model thread: jobs with new tokens
        self.count = 0                          # jobs accepted and not finished (loop thread)
        self.loop = None
        self.thread = None
        self.steps = 0

    # ------------------------------------------------------------------ the loop's side
    def start(self, loop) -> None:
        """Start the model thread. Also shortens the interpreter's GIL switch interval (process-wide,
        5 ms → 0.5 ms): the model thread comes back from each decode step's synchronize needing
        the GIL for a fraction of a millisecond, and must not wait up to 5 ms for the event loop
        thread, busy streaming the previous step's tokens, to give it up (the GPU idles meanwhile)."""
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="dgq-model", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.incoming.put(_STOP)
            self.thread.join(timeout=30)

    def new_job(self, ids, max_tokens: int, temperature: float, top_k: int, top_p: float, seed, stop_ids) -> Job:
        """A Job for prompt ids (GenerationError when it cannot run; the caller answers 400)."""
        stream = 0         # seeded: the stream generate() draws from, so a seed replays alone
        if seed is None:   # the GPU batches rows of one seed together: unseeded requests share one,
            rng = np.random.default_rng()            # each with a random stream of its own
            seed = self.default_seed if self.on_gpu else int(rng.integers(2**62))
            stream = int(rng.integers(1, 2**31))
        n = len(ids)
        if n >= self.context:
            raise GenerationError(f"the prompt is {n} tokens; this server's context is {self.context}")
        req = SeqRequest(list(ids), min(max_tokens, self.context - n), temperature, top_k, top_p, seed,
                         frozenset(stop_ids), kv8=self.kv8)
        check_request(req, self.context)
        job = Job(req, self, stream)
        req.on_token = lambda tok, job=job: self._on_token(job, tok)
        return job

    def submit(self, job: Job) -> None:
        self.count += 1                     # back down when the model thread is done with it
        self.incoming.put(job)

    # ------------------------------------------------------------------ the model thread
    def _on_token(self, job: Job, tok: int):
        if not job.new:
            self.dirty.append(job)
        job.new.append(tok)
        return job.req.cancelled

    def _hand_over(self) -> None:
        """Every job's new tokens to the loop, in one callback."""
        if not self.dirty:
            return
        batch = [(job, job.new) for job in self.dirty]
        for job in self.dirty:
            job.new = []
        self.dirty = []
        self.loop.call_soon_threadsafe(_deliver, batch)

    def _finish(self) -> None:
        ended = [j for j in self.live if j.req.finish_reason is not None]
        if ended:
            self._hand_over()
            for j in ended:
                self.live.discard(j)
            self.loop.call_soon_threadsafe(_deliver, [(j, None) for j in ended])

    def _take(self, block: bool) -> bool:
        """Move queued jobs into the batch; False when asked to stop."""
        while True:
            try:
                job = self.incoming.get(block=block)
            except queue.Empty:
                return True
            block = False
            if job is _STOP:
                return False
            try:
                if self.on_gpu:
                    self.batch.submit(job.req, job.stream)
                else:
                    self.batch.submit(job.req)
                self.live.add(job)
            except (GenerationError, ValueError) as e:
                job.req.finish_reason, job.req.error = "error", " ".join(str(e).split())
                self.loop.call_soon_threadsafe(_deliver, [(job, None)])

    def _run(self) -> None:
        while True:
            if not self._take(block=self.batch.idle()):
                break
            try:
                self.batch.step()
                self.steps += 1
            except Exception as e:  # noqa: BLE001  (a bug must fail the requests, not the server)
                msg = f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                for j in self.live:
                    if j.req.finish_reason is None:
                        j.req.finish_reason, j.req.error = "error", msg
                self.batch.drop_all(msg)
            self._hand_over()
            self._finish()
        for j in list(self.live):        # shutting down: whoever still waits gets an answer
            if j.req.finish_reason is None:
                j.req.finish_reason, j.req.error = "error", "the server is shutting down"
        self._finish()


def _deliver(batch) -> None:
    """On the loop: (job, tokens) puts tokens, (job, None) the end."""
    for job, toks in batch:
        if toks is None:
            job.done = True
            job.worker.count -= 1
            job.events.put_nowait(("done", None))
        else:
            job.events.put_nowait(("tokens", toks))
