"""The Redis Streams queue against a real redis-server: round trip, at-most-once results,
reclaim of a dead worker's entries, dead-lettering, malformed entries, restart with AOF."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from efficientrollout.protocol import RolloutRequest, RolloutResult, SamplingParams
from efficientrollout.queue import RedisServer, RolloutQueue


@pytest.fixture()
def redis_server(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


def result(request_id: str, i: int, text: str = "ok") -> RolloutResult:
    return RolloutResult(request_id=request_id, sample_index=i, policy_version=0, prompt_token_ids=[1],
                         output_token_ids=[2], text=text, logprobs=[-0.1], finish_reason="stop")


def run(coro):
    return asyncio.run(coro)


async def _queue(url: str, **kw) -> RolloutQueue:
    q = RolloutQueue(url, **kw)
    await q.setup()
    return q


def test_round_trip_and_no_duplicate_results(redis_server):
    async def main():
        q = await _queue(redis_server.url)
        await q.submit(RolloutRequest(id="a", prompt="hi", sampling=SamplingParams(n=2)))
        [c] = await q.claim("w1", 8, block_ms=100)
        assert c.request.id == "a" and c.error is None
        assert await q.write_results([result("a", 0)], [c.entry_id]) == 1
        # the same sample written again (a redelivered request) is dropped
        assert await q.write_results([result("a", 0, "again"), result("a", 1)], [c.entry_id] * 2, acks=[c.entry_id]) == 1
        _, results = await q.read_results(block_ms=100)
        assert sorted((r.request_id, r.sample_index, r.text) for r in results) == [("a", 0, "ok"), ("a", 1, "ok")]
        assert (await q.redis.xpending(q.requests, q.group))["pending"] == 0
        await q.close()

    run(main())


def test_dead_workers_entries_are_reclaimed_then_dead_lettered(redis_server):
    async def main():
        q = await _queue(redis_server.url, lease_ms=50, max_deliveries=2)
        await q.submit(RolloutRequest(id="b", prompt="hi", sampling=SamplingParams(n=3)))
        assert len(await q.claim("dies-1", 8, block_ms=100)) == 1  # worker dies: no ack
        await asyncio.sleep(0.1)
        [again] = await q.claim("dies-2", 8, block_ms=100)  # reclaimed after the lease
        assert again.request.id == "b"
        await asyncio.sleep(0.1)
        assert await q.claim("w3", 8, block_ms=100) == []  # third delivery exceeds the limit
        _, results = await q.read_results(block_ms=100)
        assert [(r.request_id, r.finish_reason) for r in results] == [("b", "error")] * 3
        assert "dead-lettered" in results[0].error
        assert await q.redis.xlen(q.dead) == 1
        await q.close()

    run(main())


def test_a_live_worker_extends_its_lease(redis_server):
    async def main():
        q = await _queue(redis_server.url, lease_ms=200)
        await q.submit(RolloutRequest(id="c", prompt="hi"))
        [c] = await q.claim("w1", 8, block_ms=100)
        for _ in range(4):
            await asyncio.sleep(0.1)
            await q.extend("w1", [c.entry_id])
        assert await q.claim("w2", 8, block_ms=50) == []  # still leased by w1
        await q.close()

    run(main())


def test_malformed_entries_become_error_results(redis_server):
    async def main():
        q = await _queue(redis_server.url)
        bad = [b"\xff\x00garbage", msgspec.msgpack.encode({"id": "neg", "prompt": "x", "sampling": {"max_new_tokens": -1}}),
               msgspec.msgpack.encode({"id": "unk", "prompt": "x", "surprise": 1}), msgspec.msgpack.encode([1, 2, 3])]
        for payload in bad:
            await q.submit_raw(payload)
        await q.submit(RolloutRequest(id="good", prompt="hi"))
        claimed = await q.claim("w1", 16, block_ms=100)
        assert [c.request is None for c in claimed] == [True, True, True, True, False]
        for c in claimed[:4]:
            await q.fail(c, c.error, 1)
        ids = {r.request_id for r in (await q.read_results(block_ms=100))[1]}
        assert {"neg", "unk"} <= ids and len(ids) == 4
        await q.close()

    run(main())


def test_queued_requests_survive_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        async def submit():
            q = await _queue(server.url)
            for i in range(20):
                await q.submit(RolloutRequest(id=f"r{i}", prompt="hi"))
            await q.close()

        run(submit())
        server.stop()
        server.start()

        async def drain():
            q = await _queue(server.url)
            claimed = await q.claim("w1", 50, block_ms=100)
            await q.close()
            return sorted(c.request.id for c in claimed)

        assert run(drain()) == sorted(f"r{i}" for i in range(20))
    finally:
        server.stop()


def test_acl_user_and_password_in_the_url(redis_server):
    import redis as sync_redis

    admin = sync_redis.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "engine", "on", ">s3cret", "~er:*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")  # nobody gets in without a password now
    admin.close()
    authed = redis_server.url.replace("redis://", "redis://engine:s3cret@")

    async def main():
        q = await _queue(authed)
        await q.submit(RolloutRequest(id="acl", prompt="hi"))
        [c] = await q.claim("w1", 8, block_ms=100)
        await q.write_results([result("acl", 0)], [c.entry_id], acks=[c.entry_id])
        assert [r.request_id for r in (await q.read_results(block_ms=100))[1]] == ["acl"]
        await q.close()
        with pytest.raises(sync_redis.exceptions.AuthenticationError):
            await _queue(redis_server.url.replace("redis://", "redis://engine:wrong@"))

    run(main())
