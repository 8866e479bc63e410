"""A wave worker on a real Redis with a real (tiny) engine: results stream back, every request
is acked, malformed entries and bad requests become error results and the worker goes on."""

from __future__ import annotations

import asyncio

from efficientrollout.pipeline import WaveWorker
from efficientrollout.protocol import RolloutRequest, SamplingParams
from efficientrollout.queue import RedisServer, RolloutQueue


def test_worker_serves_a_wave_with_bad_entries_mixed_in(tiny_engine, tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        async def main():
            q = RolloutQueue(server.url)
            await q.setup()
            good = [RolloutRequest(id=f"g{i}", prompt="Hello there", sampling=SamplingParams(
                n=2, temperature=0.0, max_new_tokens=3 + i, ignore_eos=True)) for i in range(4)]
            for r in good[:2]:
                await q.submit(r)
            await q.submit_raw(b"\x92garbage")
            await q.submit(RolloutRequest(id="too-long", prompt_token_ids=[5] * 10_000))
            for r in good[2:]:
                await q.submit(r)
            stats = await WaveWorker(tiny_engine, q, "w1", wave_size=16).run_wave(block_ms=100)
            assert stats.requests == 6 and stats.results == 9
            _, results = await q.read_results(block_ms=100, count=100)
            ok = {(r.request_id, r.sample_index): len(r.output_token_ids) for r in results if r.finish_reason != "error"}
            assert ok == {(f"g{i}", s): 3 + i for i in range(4) for s in range(2)}
            errors = [r for r in results if r.finish_reason == "error"]
            assert len(errors) == 2 and any(r.request_id == "too-long" for r in errors)
            assert (await q.redis.xpending(q.requests, q.group))["pending"] == 0
            await q.close()

        asyncio.run(main())


def test_a_reused_request_id_in_a_later_submission_still_gets_its_results(tiny_engine, tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        async def main():
            q = RolloutQueue(server.url)
            await q.setup()
            worker = WaveWorker(tiny_engine, q, "w1", wave_size=4)
            request = RolloutRequest(id="same", prompt="Hello", sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
            for _ in range(2):  # e.g. a trainer restarted with the same id scheme
                await q.submit(request)
                assert (await worker.run_wave(block_ms=100)).results == 1
            _, results = await q.read_results(block_ms=100)
            assert [r.request_id for r in results] == ["same", "same"]
            await q.close()

        asyncio.run(main())


def test_the_wave_log_line_says_how_speculation_went():
    from efficientrollout.pipeline.service import _speculation_summary
    from efficientrollout.protocol import StepRecord

    trace = [StepRecord(0.0, 8, 0, 0, 0, 8, 0.5), StepRecord(0.5, 3, 4, 12, 9, 12, 0.25), StepRecord(0.8, 1, 2, 2, 0, 1, 0.125)]
    assert _speculation_summary(trace) == "; 2/3 steps speculative (acceptance 0.64, mean K 3.0), 0.4s with <= 4 running"
    assert _speculation_summary([StepRecord(0.0, 2, 0, 0, 0, 2, 0.5)]) == "; 0/1 steps speculative, 0.5s with <= 4 running"
    assert _speculation_summary([]) == ""
