"""Reliability of the fleet with real processes: `efficientrollout engine` workers on a tiny
model, a real redis-server, the policy server over HTTP. Workers are killed with SIGKILL,
Redis is killed and restarted, hostile requests are thrown at them, bad weights are published."""

from __future__ import annotations

import collections
import os
import re
import signal
import tempfile

import httpx
import msgspec
import pytest
import torch
from fleet_helpers import Redis, wait_for

from efficientrollout.models import read_state_dict
from efficientrollout.pipeline.fleet import Fleet
from efficientrollout.policies import PolicyError, PolicyPublisher, PolicyStore
from efficientrollout.protocol import RolloutRequest, SamplingParams

ENGINE = ["--speculation", "plain", "--max-batch-size", "8", "--max-seq-len", "512", "--dtype", "float32"]


def request(i: int, tokens: int = 40, n: int = 2, min_version: int = 0, prefix: str = "r") -> RolloutRequest:
    return RolloutRequest(id=f"{prefix}{i}", prompt=f"Count: {i}", min_policy_version=min_version,
                          sampling=SamplingParams(n=n, temperature=1.0, max_new_tokens=tokens, ignore_eos=True, seed=i))


def exactly_once(results, requests) -> None:
    counts = collections.Counter((r.request_id, r.sample_index) for r in results)
    expected = {(q.id, s) for q in requests for s in range(q.sampling.n)}
    assert set(counts) == expected, (expected - set(counts), set(counts) - expected)
    assert max(counts.values()) == 1
    assert all(r.finish_reason == "length" and len(r.output_token_ids) == next(
        q.sampling.max_new_tokens for q in requests if q.id == r.request_id) for r in results)


def fleet(tmp_path, tiny_dir, redis_url: str, engines: int, *extra: str) -> Fleet:
    return Fleet(engines, redis_url=redis_url, workdir=tmp_path / "fleet", token="t0ken",
                 engine_args=["--model", str(tiny_dir), *ENGINE, *extra], threads_per_engine=1)


def test_kill_9_mid_wave_every_request_completes_exactly_once(tmp_path, tiny_dir, redis_server):
    q = Redis(redis_server.url)
    with fleet(tmp_path, tiny_dir, redis_server.url, 2, "--wave-size", "4", "--lease-ms", "1500") as f:
        requests = [request(i, tokens=60 + 50 * (i % 8)) for i in range(24)]
        for r in requests:
            q.submit(r)
        victim = f.engines[0]
        # mid-wave: the victim has written some results and still holds entries
        wait_for(lambda: any(r.engine_id == "engine-1" for r in q.results()) and q.pending("engine-1") > 0, 120,
                 "engine-1 to be in the middle of a wave")
        held = q.pending("engine-1")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_for(lambda: len(q.results()) >= 48, 180, "every sample")
        results = q.results()
        exactly_once(results, requests)
        assert held > 0 and q.pending() == 0
        finished_by_survivor = {r.request_id for r in results if r.engine_id == "engine-2"}
        started_by_victim = {r.request_id for r in results if r.engine_id == "engine-1"}
        assert finished_by_survivor & started_by_victim or len(finished_by_survivor) > 12  # the victim's wave moved


def test_redis_killed_and_restarted_loses_nothing(tmp_path, tiny_dir, redis_server):
    with fleet(tmp_path, tiny_dir, redis_server.url, 1, "--wave-size", "4", "--lease-ms", "2000") as f:
        q = Redis(redis_server.url)
        first = [request(i, tokens=200) for i in range(12)]
        for r in first:
            q.submit(r)
        wait_for(lambda: len(q.results()) >= 2, 120, "the first results")
        redis_server.stop(kill=True)  # crash with requests queued, claimed and half-written
        redis_server.start()
        q = Redis(redis_server.url)
        second = [request(i, tokens=30, prefix="after") for i in range(6)]
        for r in second:
            q.submit(r)
        wait_for(lambda: len(q.results()) >= 36, 180, "every sample after the restart")
        exactly_once(q.results(), first + second)
        assert f.engines[0].poll() is None


def hostile_payloads() -> list[tuple[str | None, bytes]]:
    """(id the error result should carry or None for a synthetic one, payload)."""
    enc = msgspec.msgpack.encode
    out: list[tuple[str | None, bytes]] = []
    junk = [b"", b"\x00", b"\xc1", b"\xff" * 64, b'{"id": "json", "prompt": "hi"}', os.urandom(256), b"\x92\x01", b"\xdd\xff\xff\xff\xff",
            b"\x91" * 5000 + b"\x00", b"\xa3\xa5\xff\xfe", b"\x81\xa2id\xa2\xff\xfe", enc(None), enc(12), enc("text"), enc([1, 2, 3]), enc({"no": "id"})]
    out += [(None, j) for j in junk]
    bad_fields = [
        {"prompt": 5}, {"prompt": None}, {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, {},
        {"prompt": "x", "sampling": "greedy"}, {"prompt": "x", "sampling": {"n": -1}}, {"prompt": "x", "sampling": {"n": 10**9}},
        {"prompt": "x", "sampling": {"temperature": -1.0}}, {"prompt": "x", "sampling": {"temperature": float("nan")}},
        {"prompt": "x", "sampling": {"temperature": float("inf")}}, {"prompt": "x", "sampling": {"top_p": 0.0}},
        {"prompt": "x", "sampling": {"top_k": -3}}, {"prompt": "x", "sampling": {"max_new_tokens": -1}},
        {"prompt": "x", "sampling": {"max_new_tokens": 0}}, {"prompt": "x", "sampling": {"stop": [""]}},
        {"prompt": "x", "sampling": {"seed": -5}}, {"prompt": "x", "sampling": {"surprise": True}}, {"prompt": "x", "surprise": 1},
        {"prompt": "x", "min_policy_version": -1}, {"messages": [{"role": "user"}]}, {"messages": "hello"},
        {"prompt_token_ids": ["a"]}, {"prompt_token_ids": [1.5]}, {"prompt": "x", "metadata": [1]},
    ]
    for i, fields in enumerate(bad_fields * 7):
        out.append((f"bad{i}", enc({"id": f"bad{i}", **fields})))
    served_badly = [  # valid wire format, but the engine cannot serve them
        {"prompt": "word " * 5000}, {"prompt_token_ids": [10**9]}, {"prompt_token_ids": [-1]}, {"prompt_token_ids": []},
        {"prompt": ""}, {"prompt_token_ids": [1] * 600},
        {"messages": []},  # the chat template raises on an empty conversation
        {"prompt": "x", "sampling": {"temperature": 1e-45}},  # logits / T overflow: non-finite log-probs
    ]
    for i, fields in enumerate(served_badly * 6):
        out.append((f"unservable{i}", enc({"id": f"unservable{i}", **fields})))
    return out


def test_hostile_requests_become_errors_and_valid_ones_complete(tmp_path, tiny_dir, redis_server):
    payloads = hostile_payloads()
    assert len(payloads) >= 200
    q = Redis(redis_server.url)
    with fleet(tmp_path, tiny_dir, redis_server.url, 1, "--wave-size", "16") as f:
        valid = [request(i, tokens=8, n=1, prefix="ok") for i in range(20)]
        expected_ids = {}
        for i, (rid, payload) in enumerate(payloads):
            entry = q.submit(payload)
            expected_ids[rid or f"malformed:{entry}"] = i
            if i % 12 == 0:
                q.submit(valid[i // 12 % 20])
        for r in valid[len(payloads) // 12 + 1:]:
            q.submit(r)
        q.r.xadd("er:requests", {"other": b"field"})  # an entry without a data field at all
        wait_for(lambda: len(q.results()) >= len(payloads) + 21, 180, "a result for every entry")
        results = q.results()
        errors = {r.request_id: r for r in results if r.finish_reason == "error"}
        missing = [rid for rid in expected_ids if rid not in errors]
        assert not missing, missing[:10]
        assert all(r.error for r in errors.values())
        assert len([r for r in results if r.request_id.startswith("ok") and r.finish_reason == "length"]) == 20
        assert f.engines[0].poll() is None and q.pending() == 0
        [engine] = f.status()["engines"]
        health = httpx.get(engine.metrics.replace("/metrics", "/healthz"), timeout=5)
        assert health.status_code == 200 and health.json()["state"] in ("idle", "updating")


def test_bad_weights_are_rejected_and_engines_keep_serving(tmp_path, tiny_dir, redis_server):
    q = Redis(redis_server.url)
    state = read_state_dict(tiny_dir)
    with fleet(tmp_path, tiny_dir, redis_server.url, 1) as f:
        publisher = PolicyPublisher(f.policy_url, f.token)
        assert publisher.publish({k: v * 1.01 for k, v in state.items()}) == 1
        wait_for(lambda: q.engine_version("engine-1") == 1, 60, "version 1 served")  # the fleet gave it the read token
        manifest = f"{f.policy_url}/v1/versions/1/manifest"
        assert httpx.get(manifest).status_code == 401  # weights are not readable without a token
        assert httpx.get(manifest, headers={"Authorization": f"Bearer {f.read_token}"}).status_code == 200
        assert f.read_token != f.token

        with pytest.raises(PolicyError, match="401"):
            PolicyPublisher(f.policy_url, "wrong").publish(state)
        bad_sum = httpx.post(f"{f.policy_url}/v1/versions", content=b"x" * 100, headers={
            "Authorization": f"Bearer {f.token}", "X-Sha256": "0" * 64})
        corrupt = httpx.post(f"{f.policy_url}/v1/versions", content=b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage",
                             headers={"Authorization": f"Bearer {f.token}"})
        assert (bad_sum.status_code, corrupt.status_code) == (400, 400)
        assert httpx.get(f"{f.policy_url}/v1/latest").json()["version"] == 1

        log_file = tmp_path / "fleet" / "logs" / "engine-1.log"
        # a readable file that does not fit the model: stored, but the engine refuses to load it
        assert publisher.publish({"lm_head.weight": torch.zeros(3, 3)}) == 2
        wait_for(lambda: "could not load policy version 2" in log_file.read_text(), 60, "the engine to reject version 2")
        # a fitting file whose stored bytes rotted: the download fails its sha256 (the version
        # is prepared aside, corrupted, then moved into the store whole)
        aside = PolicyStore(tmp_path / "aside")
        aside.publish_state_dict({k: v * 0.99 for k, v in state.items()}, version=3)
        with open(aside.path(3), "r+b") as fh:
            fh.seek(-8, 2)
            fh.write(b"\xde\xad\xbe\xef" * 2)
        os.replace(tmp_path / "aside" / "v3", tmp_path / "fleet" / "policies" / "v3")
        wait_for(lambda: "could not load policy version 3" in log_file.read_text(), 60, "the engine to reject version 3")

        rs = [request(i, tokens=5, n=1) for i in range(4)]
        for r in rs:
            q.submit(r)
        wait_for(lambda: len(q.results()) >= 4, 60, "results after the bad versions")
        assert {r.policy_version for r in q.results()} == {1}
        log = log_file.read_text()
        assert log.count("still serving version 1") >= 2
        metrics = httpx.get(f.status()["engines"][0].metrics, timeout=5).text
        assert 'efficientrollout_weight_update_failures_total{engine="engine-1"} 2' in metrics
        assert 'efficientrollout_policy_version{engine="engine-1"} 1' in metrics

        assert publisher.publish({k: v * 1.02 for k, v in state.items()}) == 4  # a good one again
        wait_for(lambda: q.engine_version("engine-1") == 4, 60, "version 4 served")


def test_an_idle_engine_takes_an_announced_version_without_waiting_for_its_poll(tmp_path, tiny_dir, redis_server):
    q = Redis(redis_server.url)
    state = read_state_dict(tiny_dir)
    with fleet(tmp_path, tiny_dir, redis_server.url, 1, "--policy-poll-s", "600") as f:
        for version in (1, 2):  # the first poll happens at start-up; after it only the announcement tells
            assert PolicyPublisher(f.policy_url, f.token).publish({k: v * (1 + version / 100) for k, v in state.items()}) == version
            wait_for(lambda: q.engine_version("engine-1") == version, 30, f"version {version} served")


def test_an_engine_stops_rather_than_load_from_a_weight_cache_others_could_write_to(tmp_path, tiny_dir, redis_server):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    state = read_state_dict(tiny_dir)
    with fleet(tmp_path, tiny_dir, redis_server.url, 1, "--download-dir", str(shared)) as f:
        PolicyPublisher(f.policy_url, f.token).publish({k: v * 1.01 for k, v in state.items()})
        engine = f.engines[0]
        wait_for(lambda: engine.poll() is not None, 60, "the engine to stop")
        assert engine.returncode != 0
        assert "only this user can change" in (f.workdir / "logs" / "engine-1.log").read_text()


def test_two_workers_one_version_bump_results_match_the_wave_version(tmp_path, tiny_dir, redis_server):
    q = Redis(redis_server.url)
    state = read_state_dict(tiny_dir)
    with fleet(tmp_path, tiny_dir, redis_server.url, 2, "--wave-size", "3") as f:
        before = [request(i, tokens=40 + 20 * (i % 5)) for i in range(18)]
        for r in before:
            q.submit(r)
        wait_for(lambda: len(q.results()) >= 6, 120, "some results at version 0")
        PolicyPublisher(f.policy_url, f.token).publish({k: v * 1.01 for k, v in state.items()})
        after = [request(i, tokens=30, min_version=1, prefix="v1-") for i in range(12)]
        for r in after:
            q.submit(r)
        wait_for(lambda: len(q.results()) >= 60, 180, "every sample")
        results = q.results()
        exactly_once(results, before + after)
        assert all(r.policy_version == 1 for r in results if r.request_id.startswith("v1-"))
        # each wave's results carry the version its engine had loaded when it took the wave
        wave_version = {(t.engine, rid): t.version for t in q.traces() for rid in t.requests}
        for r in results:
            assert r.policy_version == wave_version[(r.engine_id, r.request_id)]
        per_engine = collections.defaultdict(list)
        for r in results:
            per_engine[r.engine_id].append(r.policy_version)
        assert set(per_engine) == {"engine-1", "engine-2"}
        assert all(v == sorted(v) for v in per_engine.values())  # versions never go back
        wait_for(lambda: {q.engine_version("engine-1"), q.engine_version("engine-2")} == {1}, 30, "both engines on version 1")
        logs = [(f.workdir / "logs" / f"engine-{i}.log").read_text() for i in (1, 2)]
        how = sorted(re.search(r"now serving policy version 1 \((download|from this host's cache) ", log)[1] for log in logs)
        assert how == ["download", "from this host's cache"]  # one download for the host


def test_a_fleet_removes_the_directory_it_made_unless_it_failed(redis_server, tmp_path, monkeypatch):
    """Without a workdir the fleet's policy store (every version kept: GBs for a real model) and
    logs live in a temporary directory: gone after a clean stop, kept (with its logs) after a failure."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes it
    with Fleet(0, redis_url=redis_server.url) as f:
        PolicyPublisher(f.policy_url, f.token).publish({"w": torch.ones(4)})
        made = f.workdir
        assert made.parent == tmp_path and any((made / "policies").iterdir())
    assert not made.exists()
    with pytest.raises(RuntimeError, match="trainer crashed"):
        with Fleet(0, redis_url=redis_server.url) as f:
            raise RuntimeError("trainer crashed")
    assert (f.workdir / "logs" / "policy-server.log").exists()
