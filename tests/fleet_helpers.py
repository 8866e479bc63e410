"""Synchronous helpers for tests that drive real engine processes through a real Redis."""

from __future__ import annotations

import time

import msgspec
import redis

from efficientrollout.protocol import RolloutRequest, RolloutResult


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Redis:
    """Producer-side view of the queue keys (prefix 'er'), with reconnects left to the caller."""

    def __init__(self, url: str):
        self.r = redis.Redis.from_url(url)

    def submit(self, request: RolloutRequest | bytes) -> str:
        payload = request if isinstance(request, bytes) else msgspec.msgpack.encode(request)
        return self.r.xadd("er:requests", {"data": payload}).decode()

    def results(self) -> list[RolloutResult]:
        return [msgspec.msgpack.decode(f[b"data"], type=RolloutResult) for _, f in self.r.xrange("er:results")]

    def traces(self) -> list[dict]:
        return [msgspec.msgpack.decode(f[b"data"]) for _, f in self.r.xrange("er:trace")]

    def pending(self, consumer: str | None = None) -> int:
        if consumer is None:
            return self.r.xpending("er:requests", "engines")["pending"]
        return sum(c["pending"] for c in self.r.xpending("er:requests", "engines")["consumers"] if c["name"].decode() == consumer)

    def engine_version(self, engine: str) -> int | None:
        import json

        raw = self.r.get(f"er:engines:{engine}")
        return json.loads(raw)["version"] if raw else None
