"""The trainer's side of the queue: submit requests, stream results back, with back-pressure.

    async with RolloutClient(redis_url) as client:
        results = await client.generate(["2+2=", "3+5="], SamplingParams(n=4, temperature=1.0))

`submit` blocks while `max_in_flight` samples are outstanding; `results()` yields this
client's results in completion order; `generate` returns them grouped per prompt, in order.
Works from plain asyncio code (anyio underneath).
"""

from __future__ import annotations

import itertools
import uuid
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

    async def results(self, timeout: float | None = None) -> AsyncIterator[RolloutResult]:
        """This client's results as they arrive, until nothing is outstanding."""
        with anyio.fail_after(timeout):
            while self._outstanding:
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
                    yield r

    async def generate(self, prompts: Sequence[str | list[ChatMessage] | RolloutRequest], sampling: SamplingParams | None = None,
                       timeout: float | None = None) -> list[list[RolloutResult]]:
        """Submit every prompt, wait for all samples; results[i] are prompt i's samples in order."""
        sampling = sampling or SamplingParams()
        requests = [p if isinstance(p, RolloutRequest) else RolloutRequest(
            id=f"{self._prefix}-{next(self._ids)}", sampling=sampling,
            **({"prompt": p} if isinstance(p, str) else {"messages": list(p)})) for p in prompts]
        collected: dict[str, list[RolloutResult]] = {r.id: [] for r in requests}
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.submit_many, requests)
            total = sum(r.sampling.n for r in requests)
            with anyio.fail_after(timeout):
                # results() ends whenever nothing is outstanding; back-pressured submissions
                # may still be coming, so keep reading until every sample is in
                while sum(map(len, collected.values())) < total:
                    await anyio.sleep(0)
                    async for result in self.results():
                        collected[result.request_id].append(result)
        return [sorted(collected[r.id], key=lambda x: x.sample_index) for r in requests]
