"""Does speculation change what the policy samples? A check of losslessness at the example's scale.

`examples/grpo.py`'s adaptive-sync runs have sampled more tokens than plain-sync's in every seed
so far. Speculative sampling draws other samples than plain decoding (not the same draws), so
the two runs' policies part after the first step and their lengths differ by chance; a bias
would show here instead, where the policy is the same: the example's first batch (its prompts,
its seeds) for each of --seeds, generated plain and adaptive with free lengths on one fp32
engine (one CPU), as the example runs them. Prints per batch the tokens, the samples cut at the
limit and those ended by EOS; then the totals, as a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from efficientrollout import cpu
from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.speculation import SpeculationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from grpo import step_requests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="10,11,12,13,14,15", help="the example's --seed of each batch")
    ap.add_argument("--task", default="mixed")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--cpu", type=int, default=1)
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    torch.set_num_threads(1)
    engines = {mode: NativeEngine(EngineConfig(dtype="float32", max_batch_size=64, max_seq_len=a.max_new_tokens + 192,
                                               speculation=SpeculationConfig(mode=mode)))
               for mode in ("plain", "adaptive")}
    totals = {mode: {"samples": 0, "tokens": 0, "at_limit": 0, "stopped": 0} for mode in engines}
    for seed in (int(s) for s in a.seeds.split(",")):
        requests = [request for request, _ in step_requests(a.task, 0, 8, 8, a.max_new_tokens, seed)]
        for mode, engine in engines.items():
            lengths = [(len(r.output_token_ids), r.finish_reason) for r in engine.generate(requests)]
            row = {"samples": len(lengths), "tokens": sum(n for n, _ in lengths),
                   "at_limit": sum(n >= a.max_new_tokens for n, _ in lengths), "stopped": sum(f == "stop" for _, f in lengths)}
            print(json.dumps({"seed": seed, "mode": mode, **row}), flush=True)
            for k, v in row.items():
                totals[mode][k] += v
    print(json.dumps({"bench": "length_bias", "task": a.task, "seeds": a.seeds, "max_new_tokens": a.max_new_tokens,
                      "engine": "native float32, 1 CPU", "cpu": cpu.label(),
                      "totals": totals, "adaptive_over_plain_tokens": round(totals["adaptive"]["tokens"] / totals["plain"]["tokens"], 3)}))


if __name__ == "__main__":
    main()
