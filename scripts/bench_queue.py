"""Queue overhead: what the Redis queue itself costs, with an engine that does no work.

A trivial engine answers every sample at once with a fixed 32-token result (with log-probs,
so results are realistically sized). Throughput: the producer (RolloutClient, one process)
submits --requests requests and streams their results back while --workers wave workers
(separate processes) serve them; requests/s counts from the first submit to the last result.
Latency: one request at a time, submit → result, at the default 20 ms wave-gathering window
and without it. Everything runs on this machine: Redis, producer and workers share its cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import anyio

from efficientrollout.pipeline import RolloutClient, WaveWorker
from efficientrollout.protocol import RolloutRequest, RolloutResult, SamplingParams
from efficientrollout.queue import RedisServer, RolloutQueue


class TrivialEngine:
    engine_id, version = "trivial", 0

    def stream(self, requests):
        for r in requests:
            for i in range(r.sampling.n):
                yield RolloutResult(request_id=r.id, sample_index=i, policy_version=0, prompt_token_ids=[1, 2, 3, 4],
                                    output_token_ids=list(range(32)), text="x" * 100, logprobs=[-0.5] * 32, finish_reason="length",
                                    engine_id=self.engine_id)

    def abort(self) -> None:
        pass


def serve(url: str, consumer: str, wave_size: int, gather_ms: int) -> None:
    async def main():
        queue = RolloutQueue(url)
        await queue.setup()
        worker = WaveWorker(TrivialEngine(), queue, consumer, wave_size)
        while True:
            await worker.run_wave(block_ms=100, gather_ms=gather_ms)

    anyio.run(main)


def start_workers(url: str, n: int, wave_size: int, gather_ms: int) -> list[mp.Process]:
    procs = [mp.Process(target=serve, args=(url, f"w{i}-{gather_ms}", wave_size, gather_ms), daemon=True) for i in range(n)]
    for p in procs:
        p.start()
    return procs


async def throughput(url: str, n_requests: int) -> float:
    run = time.time_ns()  # ids are unique forever: the queue drops a result whose id was seen before
    requests = [RolloutRequest(id=f"t{run}-{i}", prompt="hi", sampling=SamplingParams(max_new_tokens=32)) for i in range(n_requests)]
    async with RolloutClient(url, max_in_flight=4096) as client:
        t0 = time.perf_counter()
        got = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.submit_many, requests)
            while got < n_requests:
                async for _ in client.results(timeout=120):
                    got += 1
                await anyio.sleep(0)
        return n_requests / (time.perf_counter() - t0)


async def latency(url: str, n: int) -> list[float]:
    out = []
    async with RolloutClient(url) as client:
        for i in range(n):
            t0 = time.perf_counter()
            await client.generate([RolloutRequest(id=f"l{time.time_ns()}", prompt="hi")], timeout=30)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--wave-size", type=int, default=256)
    ap.add_argument("--latency-samples", type=int, default=200)
    a = ap.parse_args()
    with RedisServer() as server:
        row = {"bench": "queue", "workers": a.workers, "wave_size": a.wave_size, "requests": a.requests}
        for gather_ms in (20, 0):
            procs = start_workers(server.url, a.workers, a.wave_size, gather_ms)
            anyio.run(throughput, server.url, 500)  # warm-up
            rates = [anyio.run(throughput, server.url, a.requests) for _ in range(2)]
            lat = anyio.run(latency, server.url, a.latency_samples)
            for p in procs:
                p.terminate()
            lat.sort()
            row[f"gather_{gather_ms}ms"] = {
                "requests_per_s": round(max(rates), 0), "all_requests_per_s": [round(r) for r in rates],
                "latency_p50_ms": round(statistics.median(lat), 2), "latency_p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2)}
            print(json.dumps({f"gather_{gather_ms}ms": row[f"gather_{gather_ms}ms"]}), flush=True)
        row["target_requests_per_s"] = 5000
    print(json.dumps(row))


if __name__ == "__main__":
    main()
