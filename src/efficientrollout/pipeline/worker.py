"""The wave worker: claim a wave from the queue, generate it, stream results back.

The engine is synchronous (tensor work); it runs in a worker thread and hands each result
to the async side the moment its sample finishes. The async side writes whatever results are
ready in one atomic script call and acks each request with its last sample. While the wave
runs, the worker keeps renewing the lease of every entry it holds, so only a dead worker's
entries are reclaimed. A request that needs a newer policy than the engine holds is put back
at the tail of the queue (never served with older weights). `stop` ends a wave early: the
engine stops after its current step and the unfinished entries are released at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.to_thread
import redis.exceptions

from ..protocol import RolloutRequest, RolloutResult
from ..queue import Claimed, RolloutQueue

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def redis_down(exc: BaseException) -> bool:
    """An outage, however it surfaced: raised directly or from inside a task group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(REDIS_DOWN)[1] is None
    return isinstance(exc, REDIS_DOWN)


class Engine(Protocol):
    """What a worker needs from an engine (NativeEngine; later SGLang)."""

    engine_id: str
    version: int

    def stream(self, requests: Iterable[RolloutRequest]) -> Iterator[RolloutResult]: ...

    def abort(self) -> None: ...


@dataclass(slots=True)
class WaveStats:
    requests: int = 0  # entries claimed
    results: int = 0  # results written (errors included)
    errors: int = 0
    tokens: int = 0  # output tokens generated
    deferred: int = 0  # requests put back: they need a newer policy version
    released: int = 0  # entries given back unfinished (stopped mid-wave)
    seconds: float = 0.0
    served: list[str] = field(default_factory=list)  # ids of the requests generated (all with one version)


class WaveWorker:
    def __init__(self, engine: Engine, queue: RolloutQueue, consumer: str, wave_size: int = 64, write_retry_s: float = 60.0):
        self.engine, self.queue, self.consumer, self.wave_size = engine, queue, consumer, wave_size
        self.write_retry_s = write_retry_s
        self.stop = anyio.Event()  # set it to end the current wave early and release the rest

    async def run_wave(self, block_ms: int = 1000, gather_ms: int = 20) -> WaveStats:
        """Claim up to wave_size requests and serve them; returns what was done."""
        claimed = await self.queue.claim(self.consumer, self.wave_size, block_ms=block_ms, gather_ms=gather_ms)
        t0 = anyio.current_time()
        stats = WaveStats(requests=len(claimed))
        valid: list[Claimed] = []
        for c in claimed:
            if c.request is None:
                await self.queue.fail(c, c.error or "malformed request", 1)
                stats.errors += 1
            elif c.request.min_policy_version > self.engine.version:
                await self.queue.requeue(c)
                stats.deferred += 1
            else:
                valid.append(c)
        if valid:
            stats.served = [c.request.id for c in valid]
            await self._generate(valid, stats)
        stats.seconds = anyio.current_time() - t0
        return stats

    async def _generate(self, valid: list[Claimed], stats: WaveStats) -> None:
        entry_of = {c.request.id: c.entry_id for c in valid}
        remaining = {c.request.id: c.request.sampling.n for c in valid}
        # The engine thread never waits for the event loop (redis.asyncio ties us to asyncio):
        # results pile up while a write is in flight and the next write takes them all.
        loop = asyncio.get_running_loop()
        finished: asyncio.Queue[RolloutResult | None] = asyncio.Queue()  # None: the wave ended

        def generate() -> None:
            try:
                for result in self.engine.stream([c.request for c in valid]):
                    loop.call_soon_threadsafe(finished.put_nowait, result)
            finally:
                loop.call_soon_threadsafe(finished.put_nowait, None)

        async def keep_leases() -> None:
            while True:
                await anyio.sleep(self.queue.lease_ms / 3000)
                try:
                    await self.queue.extend(self.consumer, [entry_of[r] for r, left in remaining.items() if left > 0])
                except REDIS_DOWN:
                    pass  # Redis is away: a missed renewal at worst lets another worker redo (deduplicated) work

        async def stop_on_request() -> None:
            await self.stop.wait()
            self.engine.abort()

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_leases)
            tg.start_soon(stop_on_request)
            tg.start_soon(anyio.to_thread.run_sync, generate)
            ended = False
            while not ended:
                batch = [await finished.get()]
                while not finished.empty():
                    batch.append(finished.get_nowait())
                if batch[-1] is None:
                    batch.pop()
                    ended = True
                acks = []
                for r in batch:
                    remaining[r.request_id] -= 1
                    if remaining[r.request_id] == 0:
                        acks.append(entry_of[r.request_id])
                    stats.errors += r.finish_reason == "error"
                    stats.tokens += len(r.output_token_ids)
                if not batch:
                    continue
                try:
                    await self._write(batch, acks, [entry_of[r.request_id] for r in batch])
                except BaseException:
                    self.engine.abort()  # nobody will take its results: free the thread now
                    raise
                stats.results += len(batch)
            tg.cancel_scope.cancel()
        unfinished = [entry_of[r] for r, left in remaining.items() if left > 0]
        assert not unfinished or self.stop.is_set(), remaining
        await self.queue.release(self.consumer, unfinished)
        stats.released = len(unfinished)

    async def _write(self, results: list[RolloutResult], acks: list[str], entries: list[str]) -> None:
        """Write, riding out a Redis restart of up to `write_retry_s` (the results are the
        wave's work; unwritten ones would only come back after the lease expires)."""
        delay, deadline = 0.1, anyio.current_time() + self.write_retry_s
        while True:
            try:
                await self.queue.write_results(results, entries, acks=acks)
                return
            except REDIS_DOWN:
                if anyio.current_time() > deadline:
                    raise
                await anyio.sleep(delay)
                delay = min(2.0, delay * 2)
