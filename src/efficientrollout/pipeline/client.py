"""The trainer's side of the queue: submit requests, stream results back, with back-pressure.

    async with RolloutClient(redis_url) as client:
        results = await client.generate(["2+2=", "3+5="], SamplingParams(n=4, temperature=1.0))

`submit` blocks while `max_in_flight` samples are outstanding; `results()` yields this
client's results in completion order; `generate` returns them grouped per prompt, in order.
`start` enqueues a batch and returns at once with a `Rollout` whose `groups()` waits for it:
several batches can be in flight while the trainer trains (asynchronous RL, see the README).
Works from plain asyncio code (anyio underneath).
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence

import anyio

from ..protocol import ChatMessage, RolloutRequest, RolloutResult, SamplingParams
from ..queue import RolloutQueue


class RolloutClient:
    def __init__(self, redis_url: str, prefix: str = "er", max_in_flight: int = 1024):
        self.queue = RolloutQueue(redis_url, prefix=prefix)
        self.max_in_flight = max_in_flight
        self._slots = anyio.Semaphore(max_in_flight)  # one per sample in flight
        self._outstanding: dict[str, int] = {}  # request id → samples not yet returned
        self._cursor = "$"
        self._reading = anyio.Lock()  # one reader of the results stream at a time
        self._held: dict[str, list[RolloutResult]] = {}  # results of requests a Rollout waits for
        self._inbox: deque[RolloutResult] = deque()  # the others, for results()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    async def __aenter__(self) -> "RolloutClient":
        await self.queue.setup()
        # read results from "now": remember the current end of the results stream
        last = await self.queue.redis.xrevrange(self.queue.results, count=1)
        self._cursor = last[0][0].decode() if last else "0"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.queue.close()

    async def submit(self, request: RolloutRequest) -> str:
        """Enqueue; waits while max_in_flight samples are outstanding (consume results())."""
        await self.submit_many([request])
        return request.id

    async def submit_many(self, requests: Sequence[RolloutRequest]) -> None:
        """Enqueue several requests in as few round trips as back-pressure allows."""
        batch: list[RolloutRequest] = []
        for request in requests:
            n = request.sampling.n
            if n > self.max_in_flight:
                raise ValueError(f"n={n} exceeds max_in_flight={self.max_in_flight}")
            if batch and self._slots.value < n:  # about to wait for results: send what we have
                await self._flush(batch)
            for _ in range(n):
                await self._slots.acquire()
            batch.append(request)
        await self._flush(batch)

    async def _flush(self, batch: list[RolloutRequest]) -> None:
        for r in batch:
            self._outstanding[r.id] = r.sampling.n
        await self.queue.submit_many(batch)
        batch.clear()

    async def _read(self) -> None:
        """Read the next results from the stream (waiting up to 200 ms) and file them: a Rollout's
        in its buffer, the rest in the inbox that results() empties."""
        async with self._reading:
            self._cursor, batch = await self.queue.read_results(self._cursor, block_ms=200)
        for r in batch:
            left = self._outstanding.get(r.request_id)
            if left is None:
                continue  # another client's result
            if left == 1:
                del self._outstanding[r.request_id]
            else:
                self._outstanding[r.request_id] = left - 1
            self._slots.release()
            held = self._held.get(r.request_id)
            (self._inbox.append if held is None else held.append)(r)

    async def results(self, timeout: float | None = None) -> AsyncIterator[RolloutResult]:
        """This client's results as they arrive, until nothing is outstanding (the results of
        requests sent with start() go to their Rollout instead)."""
        with anyio.fail_after(timeout):
            while True:
                while self._inbox:
                    yield self._inbox.popleft()
                if all(rid in self._held for rid in self._outstanding):
                    return
                await self._read()

    def _requests(self, prompts: Sequence[str | list[ChatMessage] | RolloutRequest], sampling: SamplingParams | None) -> list[RolloutRequest]:
        sampling = sampling or SamplingParams()
        return [p if isinstance(p, RolloutRequest) else RolloutRequest(
            id=f"{self._prefix}-{next(self._ids)}", sampling=sampling,
            **({"prompt": p} if isinstance(p, str) else {"messages": list(p)})) for p in prompts]

    async def start(self, prompts: Sequence[str | list[ChatMessage] | RolloutRequest], sampling: SamplingParams | None = None) -> "Rollout":
        """Enqueue a batch and return as soon as it is enqueued (past back-pressure, reading
        earlier results meanwhile); `await rollout.groups()` later collects it."""
        requests = self._requests(prompts, sampling)
        if len({r.id for r in requests}) < len(requests) or any(r.id in self._held or r.id in self._outstanding for r in requests):
            raise ValueError("request ids must be unique among the requests in flight")
        for r in requests:
            self._held[r.id] = []
        if self._slots.value >= sum(r.sampling.n for r in requests):
            await self.submit_many(requests)
        else:
            enqueued = False

            async def submit() -> None:
                nonlocal enqueued
                await self.submit_many(requests)
                enqueued = True

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit)
                while not enqueued:  # submit_many waits for slots that only reading frees
                    await self._read()
        return Rollout(self, requests)

    async def generate(self, prompts: Sequence[str | list[ChatMessage] | RolloutRequest], sampling: SamplingParams | None = None,
                       timeout: float | None = None) -> list[list[RolloutResult]]:
        """Submit every prompt, wait for all samples; results[i] are prompt i's samples in order."""
        with anyio.fail_after(timeout):
            rollout = await self.start(prompts, sampling)
            return await rollout.groups()


class Rollout:
    """A batch in flight (RolloutClient.start)."""

    def __init__(self, client: RolloutClient, requests: list[RolloutRequest]):
        self.client, self.requests = client, requests

    @property
    def done(self) -> bool:
        """Every sample is in (as far as the client has read the stream)."""
        return all(len(self.client._held[r.id]) >= r.sampling.n for r in self.requests)

    async def groups(self, timeout: float | None = None) -> list[list[RolloutResult]]:
        """Wait for every sample; groups[i] are request i's samples in order (call it once)."""
        with anyio.fail_after(timeout):
            while not self.done:
                await self.client._read()
        return [sorted(self.client._held.pop(r.id), key=lambda x: x.sample_index) for r in self.requests]
