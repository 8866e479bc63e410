"""The rollout queue on Redis Streams with one consumer group of engines.

Requests go to `<prefix>:requests`; an engine claims a wave with XREADGROUP, streams each
result to `<prefix>:results` as its sample finishes and acknowledges the request with its
last result, all inside one Lua script (atomic). A result is written at most once per
(queue entry, sample index): a request delivered twice (its first worker died after writing
some results) never yields a duplicate. Entries idle past their lease are reclaimed with
XAUTOCLAIM by a live worker; one delivered more than `max_deliveries` times goes to
`<prefix>:dead` and its client gets error results instead of waiting forever.

Bounded memory: acked entries are deleted from the request stream, the results stream is
capped (approximately) at `results_maxlen`, and the dedupe keys (a sorted set scored by write
time) are dropped after `dedupe_ttl_s`, far longer than any redelivery can take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis

from ..protocol import RolloutRequest, RolloutResult, error_result
from .keys import RedisKeys

_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(RolloutRequest).decode
_decode_result = msgspec.msgpack.Decoder(RolloutResult).decode

# KEYS: requests, results, done (sorted set); ARGV: group, now, dedupe ttl, results maxlen,
# number of entries to ack, those entry ids, then (dedupe key, payload)*
_WRITE_RESULTS = """
local now, n_ack = tonumber(ARGV[2]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[3]))
local written = 0
for i = 6 + n_ack, #ARGV, 2 do
  if redis.call('ZADD', KEYS[3], 'NX', now, ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[i + 1])
    written = written + 1
  end
end
for i = 6, 5 + n_ack do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return written
"""

# KEYS: requests; ARGV: group, entry id, payload. Put a request back at the tail of the queue.
_REQUEUE = """
redis.call('XADD', KEYS[1], '*', 'data', ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
"""


@dataclass(slots=True)
class Claimed:
    """One claimed queue entry: a valid request, or the reason it is not one."""

    entry_id: str
    request: RolloutRequest | None
    error: str | None = None
    raw_id: str = ""  # best-effort request id of a malformed entry


class RolloutQueue:
    def __init__(self, url: str, prefix: str = "er", group: str = "engines", max_deliveries: int = 3, lease_ms: int = 30_000,
                 results_maxlen: int = 100_000, dedupe_ttl_s: float = 86_400.0):
        self.redis = aioredis.from_url(url)  # redis://user:password@host:port/db, rediss:// for TLS
        self.keys = k = RedisKeys(prefix, group)
        self.requests, self.results, self.dead, self.done, self.group = k.requests, k.results, k.dead, k.done, k.group
        self.max_deliveries, self.lease_ms = max_deliveries, lease_ms
        self.results_maxlen, self.dedupe_ttl_s = results_maxlen, dedupe_ttl_s
        self._write = self.redis.register_script(_WRITE_RESULTS)
        self._requeue = self.redis.register_script(_REQUEUE)

    async def setup(self) -> None:
        try:
            await self.redis.xgroup_create(self.requests, self.group, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        await self.redis.aclose()

    # ---- producer side -------------------------------------------------------------------

    async def submit(self, request: RolloutRequest) -> str:
        return (await self.redis.xadd(self.requests, {"data": _encode(request)})).decode()

    async def submit_many(self, requests: list[RolloutRequest]) -> list[str]:
        """Enqueue several requests in one round trip (pipelined XADDs)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for request in requests:
                pipe.xadd(self.requests, {"data": _encode(request)})
            return [entry_id.decode() for entry_id in await pipe.execute()]

    async def submit_raw(self, payload: bytes) -> str:
        """Enqueue bytes as they are (used to prove that malformed entries cannot hurt engines)."""
        return (await self.redis.xadd(self.requests, {"data": payload})).decode()

    async def read_results(self, last_id: str = "0", count: int = 100, block_ms: int = 1000) -> tuple[str, list[RolloutResult]]:
        """Results after `last_id`; returns the new cursor and the results."""
        reply = await self.redis.xread({self.results: last_id}, count=count, block=block_ms)
        out: list[RolloutResult] = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                out.append(_decode_result(fields[b"data"]))
        return last_id, out

    # ---- engine side ---------------------------------------------------------------------

    async def claim(self, consumer: str, count: int, block_ms: int = 1000, gather_ms: int = 0) -> list[Claimed]:
        """A wave: first entries whose lease expired (their worker died), then new ones. Once
        something arrived, wait up to `gather_ms` more for the wave to fill (a producer's
        burst lands in one wave, not in a first wave of one request)."""
        claimed = await self._reclaim(consumer, count)
        if len(claimed) < count:
            claimed += await self._read_new(consumer, count - len(claimed), block_ms if not claimed else None)
        if claimed and len(claimed) < count and gather_ms:
            # a plain sleep: Redis times out blocked reads on its 100 ms clock, too coarse here
            await asyncio.sleep(gather_ms / 1000)
            claimed += await self._read_new(consumer, count - len(claimed), None)
        return claimed

    async def _read_new(self, consumer: str, count: int, block_ms: int | None) -> list[Claimed]:
        reply = await self.redis.xreadgroup(self.group, consumer, {self.requests: ">"}, count=count, block=block_ms)
        return [self._parse(e, f) for _, entries in reply or [] for e, f in entries]

    async def extend(self, consumer: str, entry_ids: list[str]) -> None:
        """Renew the lease of entries this worker is still generating."""
        if entry_ids:
            await self.redis.xclaim(self.requests, self.group, consumer, 0, entry_ids, justid=True)

    async def write_results(self, results: list[RolloutResult], entries: list[str], acks: Sequence[str] = ()) -> int:
        """Write results and ack finished entries, atomically. `entries[i]` is the queue entry
        result i answers: each (entry, sample) is written at most once ever, so a redelivered
        entry never yields a duplicate while a request id reused in a later submission (a new
        entry) still gets its results."""
        args: list[bytes | str | float | int] = [self.group, time.time(), self.dedupe_ttl_s, self.results_maxlen, len(acks), *acks]
        for entry, r in zip(entries, results, strict=True):
            args += [f"{entry}/{r.sample_index}", _encode(r)]
        return int(await self._write(keys=[self.requests, self.results, self.done], args=args))

    async def release(self, consumer: str, entry_ids: list[str]) -> None:
        """Give entries back (a worker shutting down mid-wave): their lease is marked expired,
        so the next claim by any worker takes them at once. Written results stay written."""
        if entry_ids:
            await self.redis.xclaim(self.requests, self.group, consumer, 0, entry_ids, idle=self.lease_ms + 1, justid=True)

    async def requeue(self, claimed: Claimed) -> None:
        """Put a valid request back at the tail (e.g. it needs a newer policy than this worker's)."""
        assert claimed.request is not None
        await self._requeue(keys=[self.requests], args=[self.group, claimed.entry_id, _encode(claimed.request)])

    async def backlog(self) -> tuple[int, int, float]:
        """(requests waiting, requests being generated, seconds the oldest waiting one has waited)."""
        length = await self.redis.xlen(self.requests)  # acked entries are deleted: waiting + pending
        pending = (await self.redis.xpending(self.requests, self.group))["pending"]
        groups = {g["name"].decode(): g for g in await self.redis.xinfo_groups(self.requests)}
        last = groups[self.group]["last-delivered-id"]
        oldest = await self.redis.xrange(self.requests, min=b"(" + last, count=1)
        lag = max(0.0, time.time() - int(oldest[0][0].split(b"-")[0]) / 1000) if oldest else 0.0
        return length - pending, pending, lag

    async def fail(self, claimed: Claimed, error: str, samples: int) -> None:
        """Error results for every sample of an entry, then ack it."""
        request_id = claimed.request.id if claimed.request else claimed.raw_id
        metadata = claimed.request.metadata if claimed.request else {}
        results = [error_result(request_id, i, error, -1, metadata) for i in range(samples)]
        await self.write_results(results, [claimed.entry_id] * samples, acks=[claimed.entry_id])

    # ---- internals -----------------------------------------------------------------------

    def _parse(self, entry_id: bytes, fields: dict) -> Claimed:
        eid = entry_id.decode()
        data = fields.get(b"data")
        try:
            return Claimed(eid, _decode_request(data))
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:  # ValueError: invalid UTF-8
            raw_id = f"malformed:{eid}"
            try:  # keep the client's id where one can be read, so its waiter is answered
                loose = msgspec.msgpack.decode(data)
                if isinstance(loose, dict) and isinstance(loose.get("id"), str) and loose["id"]:
                    raw_id = loose["id"]
            except Exception:  # noqa: BLE001 - any undecodable payload keeps the synthetic id
                pass
            return Claimed(eid, None, f"malformed request: {exc}", raw_id)

    async def _reclaim(self, consumer: str, count: int) -> list[Claimed]:
        _, entries, *_ = await self.redis.xautoclaim(self.requests, self.group, consumer, self.lease_ms, "0-0", count=count)
        claimed: list[Claimed] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted meanwhile
                continue
            c = self._parse(entry_id, fields)
            pending = await self.redis.xpending_range(self.requests, self.group, min=entry_id, max=entry_id, count=1)
            deliveries = pending[0]["times_delivered"] if pending else 1
            if deliveries > self.max_deliveries:
                await self.redis.xadd(self.dead, {"data": fields.get(b"data", b""), "entry": entry_id, "deliveries": deliveries})
                samples = c.request.sampling.n if c.request else 1
                await self.fail(c, f"dead-lettered after {deliveries - 1} deliveries without a result", samples)
                continue
            claimed.append(c)
        return claimed
