"""One OS thread for everything an engine computes in a serving process.

Why: PyTorch's CPU parallelism is OpenMP (libgomp), and every thread that runs a parallel
region gets a worker team of its own. As soon as libgomp manages more threads than there are
cores it throttles their spin-waiting, so each parallel region starts with a futex wake-up
(~35 us). An engine loaded on the main thread and stepped on anyio's worker threads paid that
on every op: its decode ran 1.75x slower in the `engine` process than in a plain script
(2 cores, measured). So a serving process loads, steps and updates its engine on this one
thread, and no other thread runs tensor work.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def call(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the engine thread and wait for it (from any other thread)."""
        return self._executor.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Await `fn(*args)` on the engine thread from an event loop."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))


@functools.cache
def engine_thread() -> EngineThread:
    """The process's engine thread."""
    return EngineThread()
