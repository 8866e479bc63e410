"""Synchronous helpers for tests that drive real engine processes through a real Redis."""

from __future__ import annotations

import time

import msgspec
import redis

from efficientrollout.protocol import EngineStatus, RolloutRequest, RolloutResult, WaveTrace
from efficientrollout.queue import RedisKeys

KEYS = RedisKeys()


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Redis:
    """Producer-side view of the queue keys (the default prefix), with reconnects left to the caller."""

    def __init__(self, url: str):
        self.r = redis.Redis.from_url(url)

    def submit(self, request: RolloutRequest | bytes) -> str:
        payload = request if isinstance(request, bytes) else msgspec.msgpack.encode(request)
        return self.r.xadd(KEYS.requests, {"data": payload}).decode()

    def results(self) -> list[RolloutResult]:
        return [msgspec.msgpack.decode(f[b"data"], type=RolloutResult) for _, f in self.r.xrange(KEYS.results)]

    def traces(self) -> list[WaveTrace]:
        return [msgspec.msgpack.decode(f[b"data"], type=WaveTrace) for _, f in self.r.xrange(KEYS.trace)]

    def pending(self, consumer: str | None = None) -> int:
        if consumer is None:
            return self.r.xpending(KEYS.requests, KEYS.group)["pending"]
        consumers = self.r.xpending(KEYS.requests, KEYS.group)["consumers"]
        return sum(c["pending"] for c in consumers if c["name"].decode() == consumer)

    def engine_version(self, engine: str) -> int | None:
        raw = self.r.get(KEYS.engine(engine))
        return msgspec.json.decode(raw, type=EngineStatus).version if raw else None
