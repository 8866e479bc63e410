"""RolloutClient against a real Redis and a real wave worker: ordered results, back-pressure."""

from __future__ import annotations

import anyio

from efficientrollout.pipeline import RolloutClient, WaveWorker
from efficientrollout.protocol import SamplingParams
from efficientrollout.queue import RedisServer, RolloutQueue


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
                    async def serve():
                        while True:
                            await worker.run_wave(block_ms=50)

                    tg.start_soon(serve)
                    results = await client.generate(prompts, sampling, timeout=120)
                    tg.cancel_scope.cancel()
            assert [[r.sample_index for r in group] for group in results] == [[0, 1]] * 5
            for prompt, group in zip(prompts, results):
                assert all(len(r.output_token_ids) == 4 and r.finish_reason == "length" for r in group)
                assert group[0].output_token_ids == group[1].output_token_ids  # greedy
                assert tiny_engine.tokenizer.decode(group[0].prompt_token_ids) == prompt
            await engine_queue.close()

        anyio.run(main)
