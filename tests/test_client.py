"""RolloutClient against a real Redis and a real wave worker: ordered results, back-pressure,
batches in flight together."""

from __future__ import annotations

import anyio
import pytest

from efficientrollout.pipeline import RolloutClient, WaveWorker
from efficientrollout.protocol import RolloutRequest, SamplingParams
from efficientrollout.queue import RedisServer, RolloutQueue


async def serve(worker: WaveWorker) -> None:
    while True:
        await worker.run_wave(block_ms=50)


def test_generate_through_the_queue_with_back_pressure(tiny_engine, tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        async def main():
            engine_queue = RolloutQueue(server.url)
            await engine_queue.setup()
            worker = WaveWorker(tiny_engine, engine_queue, "w1", wave_size=4)
            prompts = ["Hello there", "1 2 3", "Once upon a time", "The quick brown fox", "a"]
            sampling = SamplingParams(n=2, temperature=0.0, max_new_tokens=4, ignore_eos=True)
            async with RolloutClient(server.url, max_in_flight=4) as client:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(serve, worker)
                    results = await client.generate(prompts, sampling, timeout=120)
                    tg.cancel_scope.cancel()
            assert [[r.sample_index for r in group] for group in results] == [[0, 1]] * 5
            for prompt, group in zip(prompts, results):
                assert all(len(r.output_token_ids) == 4 and r.finish_reason == "length" for r in group)
                assert group[0].output_token_ids == group[1].output_token_ids  # greedy
                assert tiny_engine.tokenizer.decode(group[0].prompt_token_ids) == prompt
            await engine_queue.close()

        anyio.run(main)


def test_batches_in_flight_are_collected_in_any_order_past_back_pressure(tiny_engine, tmp_path):
    """start() returns once its batch is enqueued, reading earlier batches' results while it
    waits for slots; each Rollout gets exactly its own samples; results() gets the rest."""
    with RedisServer(tmp_path / "redis") as server:
        async def main():
            engine_queue = RolloutQueue(server.url)
            await engine_queue.setup()
            worker = WaveWorker(tiny_engine, engine_queue, "w1", wave_size=8)
            sampling = SamplingParams(n=2, temperature=0.0, max_new_tokens=3, ignore_eos=True)
            async with RolloutClient(server.url, max_in_flight=6) as client:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(serve, worker)
                    first = await client.start(["Hello there", "1 2 3"], sampling)  # 4 of 6 slots
                    second = await client.start(["Once upon a time", "a", "The quick brown fox"], sampling)  # waits for first
                    assert first.done  # its results were read while second waited for slots
                    with pytest.raises(ValueError, match="unique"):
                        await client.start([second.requests[0]])
                    await client.submit(RolloutRequest(id="loose", prompt="xyz", sampling=SamplingParams(max_new_tokens=2)))
                    late = await second.groups(timeout=120)
                    early = await first.groups(timeout=120)
                    loose = [r async for r in client.results(timeout=120)]
                    tg.cancel_scope.cancel()
            assert [[(r.request_id, r.sample_index) for r in g] for g in early] == [[(q.id, 0), (q.id, 1)] for q in first.requests]
            assert [[(r.request_id, r.sample_index) for r in g] for g in late] == [[(q.id, 0), (q.id, 1)] for q in second.requests]
            assert [(r.request_id, len(r.output_token_ids)) for r in loose] == [("loose", 2)]
            for prompt, group in zip(["Once upon a time", "a", "The quick brown fox"], late):
                assert tiny_engine.tokenizer.decode(group[0].prompt_token_ids) == prompt
            await engine_queue.close()

        anyio.run(main)
