"""The wave worker: claim a wave from the queue, generate it, stream results back.

The engine is synchronous (tensor work); it runs in a worker thread and hands each result
to the async side the moment its sample finishes. The async side writes whatever results are
ready in one atomic script call and acks each request with its last sample. While the wave
runs, the worker keeps renewing the lease of every entry it holds, so only a dead worker's
entries are reclaimed. A request that needs a newer policy than the engine holds is put back
at the tail of the queue (never served with older weights). `stop` ends a wave early: the
engine stops after its current step and the unfinished entries are released at once.

Failures: the engine turns what one request breaks into that request's error results. Anything
else it raises is handled here (see `_generate`), and the worker keeps serving unless the
engine declares itself unusable (`EngineUnusable`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import anyio
import redis.exceptions

from ..engines import Engine, EngineUnusable
from ..engines.thread import engine_thread
from ..protocol import RolloutResult
from ..queue import Claimed, RolloutQueue

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

log = logging.getLogger("efficientrollout.engine")


def redis_down(exc: BaseException) -> bool:
    """An outage, however it surfaced: raised directly or from inside a task group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(REDIS_DOWN)[1] is None
    return isinstance(exc, REDIS_DOWN)


@dataclass(slots=True)
class WaveStats:
    requests: int = 0  # entries claimed
    results: int = 0  # results written (errors included)
    errors: int = 0
    tokens: int = 0  # output tokens generated
    deferred: int = 0  # requests put back: they need a newer policy version
    released: int = 0  # entries given back unfinished (stopped mid-wave, or the engine failed on them)
    engine_failures: int = 0  # engine waves that raised (the wave's requests were retried apart)
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
        """Serve the wave. If the engine fails part-way (a bug, or a request that breaks a step
        in a way no per-request check caught), the unfinished requests are served again in
        halves, so one poison request cannot take its wave-mates down with it; a request that
        still fails on its own is released for redelivery, which counts toward max_deliveries
        and ends it in the dead-letter stream with error results."""
        todo = {c.entry_id: set(range(c.request.sampling.n)) for c in valid}  # samples without a written result
        failure = await self._engine_wave(valid, todo, stats)
        if failure is not None and not self.stop.is_set():
            stats.engine_failures += 1
            log.error("the engine failed during a wave of %d requests (%s: %s); serving its unfinished requests again apart",
                      len(valid), type(failure).__name__, failure, exc_info=failure)
            await self._isolate([c for c in valid if todo[c.entry_id]], todo, stats)
        unfinished = [c.entry_id for c in valid if todo[c.entry_id]]
        await self.queue.release(self.consumer, unfinished)
        stats.released = len(unfinished)

    async def _isolate(self, group: list[Claimed], todo: dict[str, set[int]], stats: WaveStats) -> None:
        if len(group) < 2 or self.stop.is_set():
            for c in group:
                log.error("request %r (entry %s) fails the engine on its own: released for redelivery", c.request.id, c.entry_id)
            return
        half = len(group) // 2
        for part in (group[:half], group[half:]):
            failure = await self._engine_wave(part, todo, stats)
            if failure is not None:
                stats.engine_failures += 1
                await self._isolate([c for c in part if todo[c.entry_id]], todo, stats)

    async def _engine_wave(self, wave: list[Claimed], todo: dict[str, set[int]], stats: WaveStats) -> Exception | None:
        """One engine wave over `wave`, writing each result as it comes (and acking each entry
        with its last sample); returns the engine's exception, if it raised one."""
        entry_of = {c.request.id: c.entry_id for c in wave}
        # The engine thread never waits for the event loop (redis.asyncio ties us to asyncio):
        # results pile up while a write is in flight and the next write takes them all.
        loop = asyncio.get_running_loop()
        finished: asyncio.Queue[RolloutResult | _WaveEnd] = asyncio.Queue()
        halted = False  # set when nobody will take the results any more

        def generate() -> None:
            end = _WaveEnd()
            try:
                for result in self.engine.stream([c.request for c in wave], stop=lambda: halted or self.stop.is_set()):
                    loop.call_soon_threadsafe(finished.put_nowait, result)
            except Exception as exc:  # noqa: BLE001 - handed to the event loop, which decides
                end.failure = exc
            finally:
                loop.call_soon_threadsafe(finished.put_nowait, end)

        async def keep_leases() -> None:
            while True:
                await anyio.sleep(self.queue.lease_ms / 3000)
                try:
                    await self.queue.extend(self.consumer, [c.entry_id for c in wave if todo[c.entry_id]])
                except REDIS_DOWN:
                    pass  # Redis is away: a missed renewal at worst lets another worker redo (deduplicated) work

        end: _WaveEnd | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_leases)
            tg.start_soon(engine_thread().run, generate)
            while end is None:
                batch = [await finished.get()]
                while not finished.empty():
                    batch.append(finished.get_nowait())
                if isinstance(batch[-1], _WaveEnd):
                    end = batch.pop()
                new, acks = [], []
                for r in batch:
                    entry = entry_of[r.request_id]
                    if r.sample_index not in todo[entry]:
                        continue  # written by an earlier attempt at this entry
                    todo[entry].discard(r.sample_index)
                    new.append(r)
                    if not todo[entry]:
                        acks.append(entry)
                    stats.errors += r.finish_reason == "error"
                    stats.tokens += len(r.output_token_ids)
                if not new:
                    continue
                try:
                    await self._write(new, acks, [entry_of[r.request_id] for r in new])
                except BaseException:
                    halted = True  # nobody will take its results: free the engine thread now
                    raise
                stats.results += len(new)
            tg.cancel_scope.cancel()
        if isinstance(end.failure, EngineUnusable):
            await self.queue.release(self.consumer, [c.entry_id for c in wave if todo[c.entry_id]])
            raise end.failure
        if end.failure is None and not self.stop.is_set() and any(todo[c.entry_id] for c in wave):
            return RuntimeError("the engine ended the wave without a result for every sample")
        return end.failure

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


@dataclass(slots=True)
class _WaveEnd:
    """Sent by the engine thread after its last result."""

    failure: Exception | None = None
