"""`efficientrollout demo`: the whole rollout pipeline on one machine, measured.

For the chosen speculation mode, then `plain` as the baseline, a fresh fleet is started
(embedded Redis, the policy server, N engine processes) and RL-shaped work runs through it: a
producer enqueues a built-in prompt set with n samples each at temperature 1; when a round's
results are in, a trainer stand-in nudges the weights and publishes them as the next version,
and the next round asks for that version (`min_policy_version`): engines load it between waves.

Response lengths follow the shape RL rollouts have (published traces: most responses short, a
few very long ones taking most of the step's time): per round, lengths are log-normal around 48
tokens and two samples run to --max-new-tokens (`workloads.long_tail_lengths`). Each sample is
fixed to its length (`ignore_eos`) and both runs generate exactly the same lengths from the same
prompts and seeds, so they have the same tail and the speed-up is not a lottery of sampled
lengths. The summary compares the runs (throughput, latency, versions served,
acceptance, fraction of steps speculated) and a timeline PNG shows batch size, draft length
and step time over both.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import redis
from tqdm import tqdm

from ..protocol import ChatMessage, RolloutRequest, SamplingParams, WaveTrace
from .client import RolloutClient
from .fleet import Fleet
from .workloads import long_tail_lengths

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain in one sentence why the sky is blue.",
    "Give me three tips for learning to cook.", "What is 12 times 7?", "Name three planets of the solar system.",
    "Write a short poem about autumn leaves.", "How do I boil an egg?", "Tell me a short story about a dragon.",
    "Explain how a car engine works.", "What are the benefits of exercise?", "Describe the water cycle.",
    "How do computers store data?", "Write a letter to a friend.", "What is machine learning?", "How do airplanes fly?",
]


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=1, help="engine processes (they share this machine's cores)")
    p.add_argument("--prompts", type=int, default=8, help=f"prompts per round (up to {len(PROMPTS)})")
    p.add_argument("-n", type=int, default=4, help="samples per prompt")
    p.add_argument("--rounds", type=int, default=2, help="rollout rounds; a new policy version is published after each")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the tail's length (two samples per round)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculation", default="adaptive", help="the mode to show; compared against plain")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding run")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="out", help="where the timeline PNG and the JSON summary go")


def run_demo(a: argparse.Namespace) -> dict:
    if not 1 <= a.prompts <= len(PROMPTS):
        raise SystemExit(f"--prompts must be in 1..{len(PROMPTS)}")
    modes = [a.speculation] + ([] if a.no_baseline or a.speculation == "plain" else ["plain"])
    lengths = {(rnd, k // a.n, k % a.n): length for rnd in range(a.rounds)
               for k, length in enumerate(long_tail_lengths(a.prompts * a.n, a.max_new_tokens, a.seed * 1000 + rnd))}
    print(f"RL-shaped lengths per round: median {statistics.median(lengths.values()):.0f} tokens, "
          f"2 of {a.prompts * a.n} samples at {a.max_new_tokens}", flush=True)
    phases = {}
    for mode in modes:
        print(f"\n== {mode}: starting a fleet of {a.engines} engine(s) ==", flush=True)
        phases[mode] = _phase(mode, a, lengths)
        _print_phase(mode, phases[mode])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    png = str(out / "demo_timeline.png")
    _plot(phases, png)
    summary = {"demo": "fleet", "engines": a.engines, "prompts": a.prompts, "n": a.n, "rounds": a.rounds,
               "max_new_tokens": a.max_new_tokens, "timeline_png": png,
               "phases": {m: {k: v for k, v in p.items() if k != "waves"} for m, p in phases.items()}}
    if len(phases) == 2:
        spec, plain = phases[modes[0]], phases["plain"]
        summary["speedup_wall"] = round(plain["rollout_s"] / spec["rollout_s"], 3)
        summary["speedup_tokens_per_s"] = round(spec["tokens_per_s"] / plain["tokens_per_s"], 3)
        summary["speedup_waves"] = round(plain["wave_s"] / spec["wave_s"], 3)
        print(f"\n{modes[0]} vs plain decoding on the same prompts, seeds and per-sample lengths: "
              f"speed-up {summary['speedup_wall']:.2f}× end to end ({spec['tokens']} vs {plain['tokens']} tokens), "
              f"{summary['speedup_waves']:.2f}× in the engine's waves (without the weight sync between rounds)")
    print(f"timeline: {png}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


def _phase(mode: str, a: argparse.Namespace, lengths: dict) -> dict:
    engine_args = ["--model", a.model, "--speculation", mode, "--max-seq-len", str(a.max_new_tokens + 256),
                   "--wave-size", "64"]  # requests; each sample is its own request
    with tempfile.TemporaryDirectory(prefix="efficientrollout-demo.") as workdir:
        t0 = time.perf_counter()
        with Fleet(a.engines, workdir=workdir, engine_args=engine_args) as fleet:
            print(f"fleet up in {time.perf_counter() - t0:.1f}s: redis {fleet.redis_url}, policy server {fleet.policy_url}", flush=True)
            report = anyio.run(_produce, fleet, a, lengths)
            report["waves"] = waves = _traces(fleet, a.rounds * a.prompts * a.n)
    steps = [s for w in waves for s in w.steps]
    drafted = sum(s.drafted for s in steps)
    report["acceptance"] = round(sum(s.accepted for s in steps) / drafted, 3) if drafted else None
    report["speculated_steps"] = round(sum(1 for s in steps if s.k > 0) / max(len(steps), 1), 3)
    report["waves_served"] = len(waves)
    report["requests_traced"] = sum(len(w.requests) for w in waves)  # each sample is a request: all, or the figures miss some
    report["wave_s"] = round(sum(w.seconds for w in waves), 2)  # generating only: no weight sync between rounds
    return report


def _requests(a: argparse.Namespace, rnd: int, version: int, lengths: dict) -> list[RolloutRequest]:
    """Each sample is its own request with its own seed and length (`lengths[(round, prompt, sample)]`)."""
    return [
        RolloutRequest(id=f"round{rnd}-prompt{i}-sample{j}", messages=[ChatMessage("user", PROMPTS[i])], min_policy_version=version,
                       sampling=SamplingParams(temperature=a.temperature, max_new_tokens=lengths[(rnd, i, j)], ignore_eos=True,
                                               seed=(a.seed * 1_000_003 + rnd * 1000 + i) * 64 + j))
        for i in range(a.prompts) for j in range(a.n)
    ]


async def _produce(fleet: Fleet, a: argparse.Namespace, lengths: dict) -> dict:
    """The producer and the trainer stand-in: rounds of rollouts, a new version after each."""
    import torch

    from ..engines.native.engine import resolve_dtype
    from ..policies import PolicyPublisher

    # weights travel in the engines' precision (what they load anyway): half the bytes of fp32 on bf16 CPUs
    publisher = PolicyPublisher(fleet.policy_url, fleet.token, dtype=resolve_dtype("auto", torch.device("cpu")))
    version, latencies, results, publish_s = 0, [], [], []
    total = a.rounds * a.prompts * a.n
    t_start = time.perf_counter()
    async with RolloutClient(fleet.redis_url) as client:
        with tqdm(total=total, desc="samples", unit="sample") as bar:
            for rnd in range(a.rounds):
                requests = _requests(a, rnd, version, lengths)
                submitted = dict.fromkeys((r.id for r in requests), time.perf_counter())
                await client.submit_many(requests)
                left = {r.id: r.sampling.n for r in requests}
                async for res in client.results(timeout=3600):
                    results.append(res)
                    left[res.request_id] -= 1
                    if left[res.request_id] == 0:
                        latencies.append(time.perf_counter() - submitted[res.request_id])
                    bar.update()
                    bar.set_postfix(round=rnd, version=res.policy_version)
                if rnd < a.rounds - 1:  # the trainer stand-in's optimizer step, then publish
                    t = time.perf_counter()
                    state = await anyio.to_thread.run_sync(_nudged_weights, a.model, rnd)
                    version = await anyio.to_thread.run_sync(publisher.publish, state)
                    publish_s.append(time.perf_counter() - t)
                    tqdm.write(f"trainer stand-in published version {version} ({publish_s[-1]:.1f}s incl. the update)")
    rollout_s = time.perf_counter() - t_start - sum(publish_s)
    ok = [r for r in results if r.finish_reason != "error"]
    tokens = sum(len(r.output_token_ids) for r in ok)
    versions: dict[str, int] = {}
    for r in ok:
        versions[str(r.policy_version)] = versions.get(str(r.policy_version), 0) + 1
    stale = sum(r.policy_version < int(re.match(r"round(\d+)-", r.request_id).group(1)) for r in ok)  # round r asks for version r
    return {"samples": len(results), "errors": len(results) - len(ok), "tokens": tokens, "rollout_s": round(rollout_s, 2),
            "tokens_per_s": round(tokens / rollout_s, 1), "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_p95_s": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 2),
            "versions_served": versions, "samples_older_than_requested": stale, "publish_s": [round(s, 2) for s in publish_s],
            "mean_output_tokens": round(tokens / max(len(ok), 1), 1)}


def _nudged_weights(model: str, step: int) -> dict:
    """Stand-in for an optimizer step: every weight moves by ~0.1% of its size (seeded)."""
    import torch

    from ..models import read_state_dict
    from ..models.checkpoint import resolve_model

    g = torch.Generator().manual_seed(step)
    return {k: v + 1e-3 * v * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in read_state_dict(resolve_model(model)).items()}


def _traces(fleet: Fleet, requests: int, wait_s: float = 10.0) -> list[WaveTrace]:
    """The waves' traces, once they cover all `requests`: an engine appends a wave's trace after
    its results went out, so the last wave's may still be on its way (up to `wait_s`)."""
    r = redis.Redis.from_url(fleet.redis_url)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            waves = [msgspec.msgpack.decode(f[b"data"], type=WaveTrace) for _, f in r.xrange(fleet.keys.trace)]
            if sum(len(w.requests) for w in waves) >= requests or time.monotonic() > deadline:
                return waves
            time.sleep(0.05)
    finally:
        r.close()


def _print_phase(mode: str, p: dict) -> None:
    print(f"{mode}: {p['samples']} samples ({p['errors']} errors), {p['tokens']} tokens in {p['rollout_s']}s = "
          f"{p['tokens_per_s']} tokens/s; request latency p50 {p['latency_p50_s']}s, p95 {p['latency_p95_s']}s; "
          f"versions served {p['versions_served']}; acceptance {p['acceptance']}, {100 * p['speculated_steps']:.0f}% of "
          f"steps speculated; {p['waves_served']} waves taking {p['wave_s']}s", flush=True)


def _plot(phases: dict[str, dict], png: str) -> None:
    from .timeline import plot_timeline

    series, markers = {}, []
    for mode, p in phases.items():
        if not p["waves"]:
            continue
        t0 = min(w.end - w.seconds for w in p["waves"])
        rows, last_version = [], 0
        for w in sorted(p["waves"], key=lambda w: w.end):
            start = w.end - w.seconds - t0
            if w.version != last_version:
                markers.append((start, f"{mode}: version {w.version}"))
            last_version = w.version
            rows += [(start + s.t, s.batch, s.k, s.seconds) for s in w.steps]
            last = w.steps[-1]
            rows.append((start + last.t + last.seconds, float("nan"), float("nan"), float("nan")))  # a gap between waves
        series[mode] = rows
    plot_timeline(series, png, "Demo rollout: batch size, draft length and step time per engine step", markers,
                  xlabel="seconds since the first wave")
