"""Dynamic batching: requests queue, ONE device loop (a thread) encodes the inputs of many together.

A request hands its token ids to `Batcher.embed` and awaits its rows. The loop takes the oldest
request, then waits for more until the queued inputs hold `max_batch_tokens` tokens or `max_wait`
has passed since that oldest request arrived, takes whole requests (in arrival order) up to
max_batch_tokens (the first one always), and encodes them in one call of the encoder, which packs them
into its compiled length buckets. Each request gets exactly its own rows back (unit vectors and the
norms of the pooled vectors they come from), in its own order; the requests of one encode are
answered together, with one wake-up of the event loop, not one each. An
error in an encode fails the requests of that encode only; the loop goes on. The queue holds at most
`max_queue` inputs: past that a request is refused at once (429 with Retry-After), not queued.
`close()` stops taking requests (503), encodes those queued, then ends the loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from diffemb_jax.serve.errors import ApiError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Job:
    ids: list[list[int]]
    embed_lengths: list[int]
    tokens: int
    arrived: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _settle(answers: list[tuple[asyncio.Future, object, BaseException | None]]) -> None:
    """(future, value, error) of each request of an encode, on the event loop's thread."""
    for future, value, error in answers:
        if future.done():  # the client went away and the request was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _answer(jobs: list[_Job], values: list, error: BaseException | None = None) -> None:
    """Hand each job its value (or all the error), one call per event loop (the server has one)."""
    by_loop = collections.defaultdict(list)
    for job, value in zip(jobs, values):
        by_loop[job.loop].append((job.future, value, error))
    for loop, answers in by_loop.items():
        loop.call_soon_threadsafe(_settle, answers)


class Batcher:
    def __init__(self, encode: Callable[[list, list], tuple[np.ndarray, np.ndarray]], *, max_batch_tokens: int, max_wait_s: float,
                 max_queue: int, metrics=None):
        self._encode, self.max_batch_tokens, self.max_wait_s = encode, max_batch_tokens, max_wait_s
        self.max_queue, self._metrics = max_queue, metrics
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_inputs = self._queued_tokens = 0
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="diffemb-device-loop", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def embed(self, ids: list[list[int]], embed_lengths: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """(unit vectors [len(ids), D] in order, the pooled vectors' norms [len(ids)], seconds the
        request waited in the queue)."""
        loop = asyncio.get_running_loop()
        job = _Job(ids, embed_lengths, sum(map(len, ids)), time.monotonic(), loop.create_future(), loop)
        with self._cond:
            if self._closing or not self._thread.is_alive():
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if self._queued_inputs + len(ids) > self.max_queue:
                raise ApiError(429, f"the queue is full ({self._queued_inputs} inputs waiting, at most "
                               f"{self.max_queue}); retry shortly", type="server_error", code="queue_full",
                               headers={"Retry-After": "1"})
            self._jobs.append(job)
            self._queued_inputs += len(ids)
            self._queued_tokens += job.tokens
            self._gauge()
            self._cond.notify()
        return await job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, encode the queued ones, stop the loop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queued_inputs)

    def _take(self) -> list[_Job] | None:
        """The next requests to encode together (None: closed and drained)."""
        with self._cond:
            while not self._jobs:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = self._jobs[0].arrived + self.max_wait_s
            while not self._closing and self._queued_tokens < self.max_batch_tokens:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs, tokens = [], 0
            while self._jobs and (not jobs or tokens + self._jobs[0].tokens <= self.max_batch_tokens):
                job = self._jobs.popleft()
                jobs.append(job)
                tokens += job.tokens
                self._queued_inputs -= len(job.ids)
                self._queued_tokens -= job.tokens
            self._gauge()
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            started = time.monotonic()
            try:
                vectors, norms = self._encode([r for j in jobs for r in j.ids],
                                              [n for j in jobs for n in j.embed_lengths])
            except Exception as e:  # the loop survives; these requests fail
                log.exception("encoding a batch of %d requests failed", len(jobs))
                error = ApiError(500, f"encoding failed: {type(e).__name__}: {e}", type="server_error")
                _answer(jobs, [None] * len(jobs), error)
                continue
            if self._metrics is not None:
                self._metrics.encode_time.observe(time.monotonic() - started)
                self._metrics.batch_inputs.observe(len(vectors))
                self._metrics.batch_tokens.observe(sum(j.tokens for j in jobs))
            values, start = [], 0
            for job in jobs:
                end = start + len(job.ids)
                values.append((vectors[start:end], norms[start:end], started - job.arrived))
                start = end
            _answer(jobs, values)
