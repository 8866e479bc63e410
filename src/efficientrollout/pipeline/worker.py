"""The wave worker: claim a wave from the queue, generate it, stream results back.

The engine is synchronous (tensor work); it runs in a worker thread and hands each result
to the async side the moment its sample finishes, which writes it to Redis at once and acks
a request together with its last sample. While the wave runs, the worker keeps renewing the
lease of every entry it holds, so only a dead worker's entries are reclaimed.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.from_thread
import anyio.to_thread

from ..engines.native import NativeEngine
from ..protocol import RolloutResult
from ..queue import Claimed, RolloutQueue


@dataclass(slots=True)
class WaveStats:
    requests: int = 0
    results: int = 0
    errors: int = 0


class WaveWorker:
    def __init__(self, engine: NativeEngine, queue: RolloutQueue, consumer: str, wave_size: int = 64):
        self.engine, self.queue, self.consumer, self.wave_size = engine, queue, consumer, wave_size

    async def run_wave(self, block_ms: int = 1000) -> WaveStats:
        """Claim up to wave_size requests and serve them; returns what was done."""
        claimed = await self.queue.claim(self.consumer, self.wave_size, block_ms=block_ms)
        stats = WaveStats(requests=len(claimed))
        valid: list[Claimed] = []
        for c in claimed:
            if c.request is None:
                await self.queue.fail(c, c.error or "malformed request", 1)
                stats.errors += 1
            else:
                valid.append(c)
        if not valid:
            return stats
        entry_of = {c.request.id: c.entry_id for c in valid}
        remaining = {c.request.id: c.request.sampling.n for c in valid}
        send, receive = anyio.create_memory_object_stream[RolloutResult](max_buffer_size=1024)

        def generate() -> None:
            with send:
                for result in self.engine.stream([c.request for c in valid]):
                    anyio.from_thread.run(send.send, result)

        async def keep_leases() -> None:
            while True:
                await anyio.sleep(self.queue.lease_ms / 3000)
                await self.queue.extend(self.consumer, [entry_of[r] for r, left in remaining.items() if left > 0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_leases)
            tg.start_soon(anyio.to_thread.run_sync, generate)
            async with receive:
                async for result in receive:
                    rid = result.request_id
                    remaining[rid] -= 1
                    await self.queue.write_results([result], ack_entry=entry_of[rid] if remaining[rid] == 0 else None)
                    stats.results += 1
                    stats.errors += result.finish_reason == "error"
            tg.cancel_scope.cancel()
        assert all(left == 0 for left in remaining.values()), remaining
        return stats
