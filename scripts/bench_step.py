"""Forward costs that decide whether speculation pays: target step, drafter step and verify
over K+1 positions, at a few batch sizes and context lengths, in one process.

Each cell is the median of --repeats interleaved timings (target, drafter, verifies in turn, so
the machine's swings hit all of them alike); ratios are to the target step of the same batch and
context. `--drafters int8,int4` times one drafter step per kind (int4 needs CUDA or an AVX512
CPU); kernel names (`--drafters int8pack,fp8`) time those kernels. On a GPU, pair it with `scripts/make_random_checkpoint.py` for memory-bound layer shapes.

`--samples N` also measures what each drafter's cheapness is worth: how closely it follows the
target (acceptance), free of timing noise. The plain target samples N replies to the demo's
prompts (temperature --temperature, at most --max-new-tokens each), then every reply is fed
again, position by position, up to 12 rows at a time: each drafter reads the target's keys
and values for the reply so far and proposes the next token, then the target does (and writes
its own keys and values back), so each drafter is measured at the first draft position of a
speculative step, with its decode kernels (a forward over a whole reply would run other
kernels: FBGEMM with per-tensor activations on CPUs). Per position: sum(min(p, q)), the
chance speculative (rejection) sampling accepts that draft, how often the drafter's race picks
the target's token (the race coupling, `--coupling race`: sampling.race), and whether
greedy drafts match. A check of
the replay itself: the target's log-prob of each reply token there against the one the engine
reported when it sampled it (`target_logprob_gap`, the largest difference; ~1e-5 in fp32; in
bf16 it is bf16's own noise, 0.39 nats on SmolLM2, since the replay groups rows differently).
With the costs this gives each batch size's predicted speed-up at that acceptance, the gate's
own model: max over --ks of L / (K d + v_K), L = (1 - a^(K+1)) / (1 - a), d and v_K the drafter's
and the verify's cost relative to a target step.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.pipeline.workloads import PROMPTS
from efficientrollout.protocol import ChatMessage, RolloutRequest, SamplingParams
from efficientrollout.sampling import race, race_keys, scaled_logprobs
from efficientrollout.speculation import Drafter, SpeculationConfig
from efficientrollout.speculation.drafter import PACKED_MAX_ROWS, drafter_kernel
from efficientrollout.speculation.gate import DRAFTER_KERNELS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--contexts", default="256,1000", help="cached positions each forward attends")
    ap.add_argument("--ks", default="3,7", help="draft lengths whose verify (K+1 positions) is timed")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay steps from CUDA graphs (EngineConfig.cuda_graphs)")
    ap.add_argument("--drafters", default="int8", help="comma list of int8, int4 (this device's default kernels), exact (unquantized) or kernel names: "
                    + ", ".join(DRAFTER_KERNELS))
    ap.add_argument("--samples", type=int, default=0, help="also measure each drafter's acceptance on this many sampled replies (see above)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="... each at most this long")
    ap.add_argument("--temperature", type=float, default=1.0, help="... sampled and compared at this temperature")
    a = ap.parse_args()
    batches, contexts, ks = ([int(x) for x in s.split(",")] for s in (a.batches, a.contexts, a.ks))
    torch.set_grad_enabled(False)
    engine = NativeEngine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype, cuda_graphs=a.cuda_graphs,
                                       max_batch_size=max(*batches, ROWS if a.samples else 1),
                                       max_seq_len=max(contexts) + max(ks) + 2 + (a.max_new_tokens + 128 if a.samples else 0),
                                       speculation=SpeculationConfig(mode="plain")))
    runner = engine.runner
    kinds = a.drafters.split(",")  # int8 / int4: this device's kernel for them; else a kernel name
    drafters = {kind: Drafter(runner.decoder, kernel=drafter_kernel(kind, engine.device, engine.torch_dtype) if kind in ("int8", "int4", "exact")
                              else drafter_kernel("int8", engine.device, engine.torch_dtype, override=kind)) for kind in kinds}

    def forward(b: int, ctx: int, width: int, decoder=None):
        tokens = torch.zeros(b, width, dtype=torch.long, device=engine.device)
        positions = ctx + torch.arange(width, device=engine.device).expand(b, width)
        return lambda: runner.forward(tokens, positions, ctx + width, decoder=decoder)

    rows = []
    for b in tqdm(batches, desc="batch sizes"):
        for ctx in contexts:
            cells = {"target": forward(b, ctx, 1)}
            cells.update({f"drafter_{kind}": forward(b, ctx, 1, d.decoder) for kind, d in drafters.items()})
            cells.update({f"verify_k{k}": forward(b, ctx, k + 1) for k in ks})
            times: dict[str, list[float]] = {name: [] for name in cells}
            for fn in cells.values():
                fn()  # warm-up
            for _ in range(a.repeats):
                for name, fn in cells.items():
                    runner.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    runner.synchronize()
                    times[name].append(time.perf_counter() - t0)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            row = {"batch": b, "context": ctx, **{f"{n}_ms": round(v, 2) for n, v in ms.items()},
                   **{f"{n}_vs_target": round(v / ms["target"], 3) for n, v in ms.items() if n != "target"}}
            rows.append(row)
            print(json.dumps(row))
    quality, gap = acceptance(engine, drafters, a.samples, a.max_new_tokens, a.temperature) if a.samples else ({}, None)
    for row in rows:
        for kind, q in quality.items():
            d, v = row[f"drafter_{kind}_vs_target"], {k: row[f"verify_k{k}_vs_target"] for k in ks}
            row[f"predicted_speedup_{kind}"] = round(max(tokens_per_step(q["accept"], k) / (k * d + v[k]) for k in ks), 3)
            row[f"predicted_speedup_{kind}_race"] = round(max(tokens_per_step(q["race"], k) / (k * d + v[k]) for k in ks), 3)
            row[f"predicted_speedup_{kind}_greedy"] = round(max(tokens_per_step(q["greedy"], k) / (k * d + v[k]) for k in ks), 3)
    if quality:
        print(json.dumps({"acceptance": quality, "target_logprob_gap": gap}))
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else engine.device.type
    print(json.dumps({"bench": "step", "model": a.model, "device": device, "cuda_graphs": a.cuda_graphs, "dtype": engine.dtype, "threads": torch.get_num_threads(),
                      "drafter_kernels": {kind: d.kernel for kind, d in drafters.items()}, "repeats": a.repeats, "rows": rows,
                      **({"acceptance": quality, "target_logprob_gap": gap, "samples": a.samples, "temperature": a.temperature} if quality else {})}))


ROWS = 12  # replies fed at once: the drafters' decode kernels serve up to 12 rows (int4pack 8: acceptance())


def tokens_per_step(a: float, k: int) -> float:
    """Expected tokens a speculative step emits at per-draft acceptance a: L = (1 - a^(K+1)) / (1 - a)."""
    return k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def acceptance(engine: NativeEngine, drafters: dict, samples: int, max_new_tokens: int, temperature: float) -> tuple[dict[str, dict], float]:
    """Each drafter's mean sum(min(p, q)) and greedy agreement with the target at the first draft
    position, over `samples` replies the target samples (see the module docstring), and the
    replay's largest log-prob difference from the engine's own."""
    requests = [RolloutRequest(id=str(i), messages=[ChatMessage("user", PROMPTS[i % len(PROMPTS)])],
                               sampling=SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=i)) for i in range(samples)]
    replies = [(r.prompt_token_ids, r.output_token_ids, r.logprobs) for r in engine.generate(requests) if len(r.output_token_ids) > 1]
    runner, dev = engine.runner, engine.device
    rows = min([ROWS, *(PACKED_MAX_ROWS[d.kernel] for d in drafters.values() if d.kernel == "int4pack")])  # beyond: FBGEMM's int8
    totals = {kind: [0.0, 0, 0, 0] for kind in drafters}  # sum(min(p, q)), greedy matches, positions, race matches
    gap = 0.0
    for g in tqdm(range(0, len(replies), rows), desc="acceptance"):
        group = replies[g : g + rows]
        runner.prefill([prompt for prompt, _, _ in group], list(range(len(group))))
        for j in range(1, max(len(out) for _, out, _ in group)):
            # output token j, given the reply before it: feed token j-1 at its position (a finished
            # reply repeats its last one, which rewrites the same cache entries; not counted)
            at = [min(j, len(out) - 1) for _, out, _ in group]
            live = torch.tensor([j < len(out) for _, out, _ in group], device=dev)
            tokens = torch.tensor([[out[i - 1]] for (_, out, _), i in zip(group, at)], device=dev)
            positions = torch.tensor([[len(prompt) + i - 1] for (prompt, _, _), i in zip(group, at)], device=dev)
            kv_len = int(positions.max()) + 1
            drafts = {kind: runner.forward(tokens, positions, kv_len, decoder=d.decoder)[:, 0] for kind, d in drafters.items()}
            target = runner.forward(tokens, positions, kv_len)[:, 0]  # last: the next position reads the target's keys and values
            t = torch.full((len(group),), temperature, device=dev)  # 0: greedy, log-probs at T = 1 as the engine reports them
            logp = scaled_logprobs(target, t)
            sampled = torch.tensor([[out[i]] for (_, out, _), i in zip(group, at)], device=dev)
            reported = torch.tensor([lps[i] for (_, _, lps), i in zip(group, at)], device=dev)
            gap = max(gap, (logp.gather(-1, sampled)[:, 0] - reported).abs()[live].max().item())
            p = logp.exp()
            keys = race_keys([g + r for r in range(len(group))], positions[:, 0].tolist()).to(dev)
            picks = race(p, keys) if temperature > 0 else target.argmax(-1)
            for kind, logits in drafts.items():
                q = scaled_logprobs(logits, t).exp()
                totals[kind][0] += torch.minimum(p, q).sum(-1)[live].sum().item()
                totals[kind][1] += int((logits.argmax(-1) == target.argmax(-1))[live].sum())
                totals[kind][2] += int(live.sum())
                totals[kind][3] += int(((race(q, keys) if temperature > 0 else logits.argmax(-1)) == picks)[live].sum())
    return {kind: {"accept": round(s / n, 4), "race": round(r / n, 4), "greedy": round(m / n, 4), "positions": n}
            for kind, (s, m, n, r) in totals.items()}, gap


if __name__ == "__main__":
    main()
