"""An engine failure that no per-request check catches never takes a wave or a worker down:
the wave's other requests complete, the request that breaks the engine on its own is released
for redelivery until it is dead-lettered with error results, and the process keeps serving.
An engine that declares itself unusable releases its wave and exits. Real processes: the
engine is `faulty_engine.py` (a real NativeEngine with an injected fault) behind the real
worker service, on a real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleet_helpers import KEYS, Redis, wait_for

from efficientrollout.protocol import RolloutRequest, SamplingParams

FAULTY = Path(__file__).with_name("faulty_engine.py")


def request(rid: str, fault: str | None = None) -> RolloutRequest:
    return RolloutRequest(id=rid, prompt=f"Count: {rid}", metadata={"fault": fault} if fault else {},
                          sampling=SamplingParams(n=2, temperature=1.0, max_new_tokens=6, ignore_eos=True, seed=1))


def start(tiny_dir, redis_url: str, tmp_path: Path, max_deliveries: int = 2) -> subprocess.Popen:
    log = open(tmp_path / "faulty.log", "wb")
    return subprocess.Popen([sys.executable, str(FAULTY), str(tiny_dir), redis_url, str(max_deliveries)],
                            stdout=log, stderr=subprocess.STDOUT)


def test_a_step_failure_spares_the_wave_and_the_poison_request_is_dead_lettered(tmp_path, tiny_dir, redis_server):
    q = Redis(redis_server.url)
    proc = start(tiny_dir, redis_server.url, tmp_path)
    try:
        # one wave: four valid requests around one that breaks every decode step it is part of
        for r in [request("ok0"), request("ok1"), request("poison", "step"), request("ok2"), request("ok3")]:
            q.submit(r)
        wait_for(lambda: len(q.results()) >= 10, 120, "a result for every sample")
        results = q.results()
        ok = [r for r in results if r.request_id.startswith("ok")]
        assert sorted((r.request_id, r.sample_index) for r in ok) == [(f"ok{i}", s) for i in range(4) for s in range(2)]
        assert all(r.finish_reason == "length" and len(r.output_token_ids) == 6 for r in ok)
        poison = [r for r in results if r.request_id == "poison"]
        assert sorted(r.sample_index for r in poison) == [0, 1]
        assert all(r.finish_reason == "error" and "dead-lettered" in r.error for r in poison)
        assert q.r.xlen(KEYS.dead) == 1 and q.pending() == 0
        # the process is still serving
        assert proc.poll() is None
        q.submit(request("after"))
        wait_for(lambda: any(r.request_id == "after" for r in q.results()), 60, "a request after the failures")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log = (tmp_path / "faulty.log").read_text()
    assert "injected engine bug" in log and "fails the engine on its own" in log


def test_an_unusable_engine_releases_its_wave_and_exits(tmp_path, tiny_dir, redis_server):
    q = Redis(redis_server.url)
    proc = start(tiny_dir, redis_server.url, tmp_path, max_deliveries=5)
    try:
        for r in [request("ok0"), request("broken", "unusable")]:
            q.submit(r)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # the wave's entries are still pending (not lost, not acked) and released: idle past the lease
    pending = q.r.xpending_range(KEYS.requests, KEYS.group, min="-", max="+", count=10)
    assert len(pending) == 2 and all(p["time_since_delivered"] > 30_000 for p in pending)
    assert "unusable" in (tmp_path / "faulty.log").read_text()
