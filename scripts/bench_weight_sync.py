"""Weight sync: a trainer publishes a new version → every engine serves it.

A fleet of --engines engine processes with the bundled model (speculation on, so the drafter
is re-quantized too) sits idle; the trainer side publishes --rounds new versions with
`PolicyPublisher.publish(state_dict)` (in shards of --shard-mb), in each transport dtype in
turn (fp32 as the trainer holds them, and the engines' own dtype). For each: the publish call's
time (stream and hash, upload, server-side verify and atomic store), and the time from the start
of the publish until each engine's heartbeat in Redis reports the new version, as a trainer
waits for it (its poll, download with sha256, load in place; the drafter is re-quantized right
after, while the engine is idle, or before its first draft).
The engines' own figure for download + load comes from /metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import httpx
import torch

from efficientrollout import cpu
from efficientrollout.models import read_state_dict
from efficientrollout.models.checkpoint import resolve_model
from efficientrollout.engines.native.engine import resolve_dtype
from efficientrollout.pipeline.fleet import Fleet
from efficientrollout.policies import PolicyPublisher


def update_seconds(url: str) -> float:
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith("efficientrollout_last_weight_update_seconds"):
            return float(line.split()[-1])
    raise RuntimeError("no update metric")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--speculation", default="adaptive")
    ap.add_argument("--transport-dtypes", default="float32,auto",
                    help="compared in one run; auto: the engines' dtype (bf16 where the CPU has native bf16)")
    ap.add_argument("--dtype", default="auto", help="the engines' dtype (auto: bf16 where the CPU has native bf16, else fp32)")
    ap.add_argument("--shard-mb", type=float, default=None, help="publish in shards of this size (default: the publisher's, 1 GiB)")
    a = ap.parse_args()
    base = read_state_dict(resolve_model(a.model))
    size_mb = sum(t.numel() * t.element_size() for t in base.values()) / 1e6
    engines_dtype = resolve_dtype(a.dtype, torch.device("cpu"))
    transports = [engines_dtype if d == "auto" else getattr(torch, d) for d in a.transport_dtypes.split(",")]
    rows = []
    with Fleet(a.engines, engine_args=["--model", a.model, "--speculation", a.speculation, "--dtype", a.dtype]) as fleet:
        urls = [e.metrics for e in fleet.status()["engines"]]
        for step in range(a.rounds):
            for dtype in transports:  # interleaved: this machine's speed drifts between minutes
                shards = {} if a.shard_mb is None else {"shard_bytes": int(a.shard_mb * 1e6)}
                publisher = PolicyPublisher(fleet.policy_url, fleet.token, dtype=dtype, **shards)
                state = {k: v + 1e-3 * v * torch.randn_like(v) for k, v in base.items()}
                t0 = time.perf_counter()
                version = publisher.publish(state)
                publish_s = time.perf_counter() - t0
                served, deadline = {}, time.monotonic() + 300
                while len(served) < len(urls):  # from the heartbeats in Redis, as `Fleet.wait_for_version`
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"version {version}: served by {len(served)} of {len(urls)} engines after 300 s")
                    for e in fleet.status()["engines"]:
                        if e.metrics not in served and e.version == version:
                            served[e.metrics] = time.perf_counter() - t0
                    time.sleep(0.01)
                row = {"version": version, "transport": str(dtype).removeprefix("torch."), "shards": publisher.last_upload["shards"],
                       "publish_s": round(publish_s, 2),
                       "all_serving_s": round(max(served.values()), 2),
                       "after_publish_returned_s": round(max(served.values()) - publish_s, 2),
                       "engine_download_load_s": [round(update_seconds(u), 2) for u in urls]}
                rows.append(row)
                print(json.dumps(row), flush=True)
        for log in sorted((fleet.workdir / "logs").glob("engine*.log")):  # each update's download / load split
            print(log.stem, *(line.split("] ")[-1] for line in log.read_text().splitlines() if "now serving policy" in line), sep="\n  ")
    by = {}
    for r in rows:
        by.setdefault(r["transport"], []).append(r)
    print(json.dumps({
        "bench": "weight_sync", "engines": a.engines, "model": a.model, "weights_mb": round(size_mb, 1),
        "speculation": a.speculation, "engines_dtype": str(engines_dtype).removeprefix("torch."),
        "cpu": cpu.label(), "cpu_isa_caps": {k: os.environ[k] for k in (cpu.ISA_ENV, *cpu.TORCH_CAPS) if k in os.environ}, "rounds": rows,
        "median_by_transport": {t: {k: statistics.median(r[k] for r in rs) for k in ("publish_s", "after_publish_returned_s", "all_serving_s")}
                                for t, rs in by.items()},
        "target_s": 3.0}))


if __name__ == "__main__":
    main()
