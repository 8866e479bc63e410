"""Speculation on the GRPO example's own rollouts, with the sample lengths held fixed.

Under `--coupling rejection` the example's modes sample different tokens (speculative sampling
draws from the same distribution, not the same draws), so their rollout times mix speed with
luck in the lengths (under `--coupling race` they sample the same). This
takes one step's batch of `examples/grpo.py` (its prompts and seeds; the bundled model's
own weights, i.e. version 0), samples it once plain (by inverse CDF, as before the race
coupling, so that `--coupling race` and `rejection` replay the same lengths) to learn every
sample's length, then generates the same prompts with those lengths (ignore_eos) plain and
adaptive, interleaved, with one fp32 engine on one CPU as the example runs it (`--device cuda`:
on a GPU). Prints a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from efficientrollout import cpu
from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.protocol import RolloutRequest, SamplingParams
from efficientrollout.speculation import SpeculationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from grpo import step_requests  # noqa: E402


def phases(trace) -> dict[str, list]:
    """Decode steps and their seconds by running rows (1-2, 3-5, 6-12, 13+) and kind (plain or
    speculative): where the wave's time went."""
    out: dict[str, list] = {}
    for s in trace:
        rows = "1-2" if s.batch <= 2 else "3-5" if s.batch <= 5 else "6-12" if s.batch <= 12 else "13+"
        entry = out.setdefault(f"{rows} {'spec' if s.k else 'plain'}", [0, 0.0])
        entry[0] += 1
        entry[1] += s.seconds
    return {name: [n, round(seconds, 3)] for name, (n, seconds) in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="the example's --seed")
    ap.add_argument("--step", type=int, default=0, help="whose batch (prompts and seeds) to replay")
    ap.add_argument("--task", default="mixed")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved plain / adaptive pairs")
    ap.add_argument("--cpu", type=int, default=1, help="the CPU the engine runs on (the example's engine CPU)")
    ap.add_argument("--device", default="cpu", help="cpu (as the example runs it) or cuda")
    ap.add_argument("--dtype", default="float32", help="the engine's; float32 is the example's (log-prob parity with its trainer)")
    ap.add_argument("--drafter", default="int8", help="adaptive's drafter: int8, int4 or exact")
    ap.add_argument("--cuda-graphs", action="store_true", help="both engines replay their steps from CUDA graphs")
    ap.add_argument("--coupling", default="rejection", choices=["rejection", "race"], help="both engines' (SpeculationConfig.coupling)")
    a = ap.parse_args()
    if a.device == "cpu":
        os.sched_setaffinity(0, {a.cpu})
        torch.set_num_threads(1)

    requests = [request for request, _ in step_requests(a.task, a.step, a.prompts, a.group, a.max_new_tokens, a.seed)]
    prompt_of = {r.id: r.messages for r in requests}
    config = EngineConfig(device=a.device, dtype=a.dtype, max_batch_size=a.prompts * a.group, max_seq_len=a.max_new_tokens + 192, cuda_graphs=a.cuda_graphs)
    engines = {mode: NativeEngine(replace(config, speculation=SpeculationConfig(mode=mode, drafter=a.drafter, coupling=a.coupling)))
               for mode in ("plain", "adaptive")}
    # the example's requests (its seeds) drawn by inverse CDF, as before the race coupling: every
    # coupling replays the same lengths
    lengths_from = engines["plain"] if a.coupling == "rejection" else NativeEngine(
        replace(config, cuda_graphs=False, speculation=SpeculationConfig(mode="plain", coupling="rejection")))
    sampled = lengths_from.generate(requests)
    fixed = [RolloutRequest(id=f"f{j}", messages=prompt_of[r.request_id],
                            sampling=SamplingParams(temperature=1.0, max_new_tokens=len(r.output_token_ids), seed=j, ignore_eos=True))
             for j, r in enumerate(sampled)]
    lengths = sorted(len(r.output_token_ids) for r in sampled)
    print(f"seed {a.seed}, step {a.step}: {len(fixed)} samples, {sum(lengths)} tokens, longest {lengths[-8:]}", flush=True)

    rows = []
    for rep in range(a.repeats):
        row = {}
        for mode in ("plain", "adaptive") if rep % 2 == 0 else ("adaptive", "plain"):
            t0 = time.perf_counter()
            results = engines[mode].generate(fixed)
            row[f"{mode}_s"] = round(time.perf_counter() - t0, 2)
            row[f"{mode}_phases"] = phases(engines[mode].trace)
            if mode == "adaptive":
                drafted = sum(r.speculation.drafted for r in results)
                row["acceptance"] = round(sum(r.speculation.accepted for r in results) / max(drafted, 1), 3)
                trace = engines[mode].trace
                row["speculated_steps"] = round(sum(1 for s in trace if s.k > 0) / len(trace), 3)
        row["adaptive_over_plain"] = round(row["adaptive_s"] / row["plain_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"bench": "grpo_rollout", "seed": a.seed, "step": a.step, "task": a.task, "samples": len(fixed),
                      "tokens": sum(lengths), "longest": lengths[-8:], "engine": f"native {a.dtype}", "drafter": a.drafter, "coupling": a.coupling, "cuda_graphs": a.cuda_graphs,
                      "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "1 CPU",
                      "cpu": cpu.label(), "repeats": rows,
                      "adaptive_over_plain": sorted(r["adaptive_over_plain"] for r in rows)}))


if __name__ == "__main__":
    main()
