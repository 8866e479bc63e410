"""The long-tail wave of `bench_rollout.py` through SGLang and through our engine, one run:
SGLang plain, SGLang STANDALONE (the same checkpoint as its draft), SGLang with our self-drafter
and gate (`--speculative-algorithm EFFICIENTROLLOUT`), the same with the gate held off (what a
gated-off step costs), native plain, native adaptive. Same requests, same per-sample lengths
(`ignore_eos`), so every variant generates the same number of tokens; wall time, tokens/s and
acceptance per variant, ratios to SGLang plain; for our algorithm inside SGLang the measured
draft-step / plain-step cost per batch size and the timeline picture; a JSON line last. Needs
SGLang with this package installed (`--sglang-python`, or EFFICIENTROLLOUT_SGLANG_PYTHON); run it
with nothing else busy on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from efficientrollout import cpu as isa
from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.engines.sglang import SGLangConfig, SGLangEngine
from efficientrollout.pipeline.timeline import plot_timeline
from efficientrollout.pipeline.workloads import wave_requests
from efficientrollout.speculation import SpeculationConfig


# variant → (backend, SGLang's speculation, our speculation mode)
VARIANTS = {
    "sglang-plain": ("sglang", "none", "plain"),
    "sglang-standalone": ("sglang", "standalone", "plain"),
    "sglang-ours": ("sglang", "efficientrollout", "adaptive"),
    "sglang-ours-gated-off": ("sglang", "efficientrollout", "plain"),
    "native-plain": ("native", None, "plain"),
    "native-adaptive": ("native", None, "adaptive"),
}


def run(engine, requests) -> dict:
    engine.generate(requests[:2])  # warm-up: first-use costs out of the measured wave
    t0 = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - t0
    assert not [r.error for r in results if r.error], [r.error for r in results if r.error][:3]
    tokens = sum(len(r.output_token_ids) for r in results)
    drafted, accepted = sum(r.speculation.drafted for r in results), sum(r.speculation.accepted for r in results)
    return {"wall_s": round(wall, 2), "tokens": tokens, "tok_s": round(tokens / wall, 1),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "trace": [(s.t, s.batch, s.k, s.seconds) for s in engine.trace]}


def step_costs(steps_file) -> dict:
    """Per power-of-two batch bucket, from our worker's trace inside SGLang: median plain step,
    median draft step (drafting time / K) and their ratio; steps with K > 0 / all steps."""
    rows = [json.loads(line) for line in open(steps_file) if '"k"' in line]
    out = {}
    for bucket in sorted({1 << (r["batch"].bit_length() - 1) for r in rows}):
        mine = [r for r in rows if bucket <= r["batch"] < 2 * bucket]
        plain = [r["s"] for r in mine if r["k"] == 0]
        draft = [r["draft_s"] / r["k"] for r in mine if r["k"] > 0]
        cell = {"steps": len(mine), "speculating": round(sum(r["k"] > 0 for r in mine) / len(mine), 3)}
        if plain and draft:
            p, d = statistics.median(plain), statistics.median(draft)
            cell |= {"plain_step_ms": round(p * 1e3, 2), "draft_step_ms": round(d * 1e3, 2), "draft_over_plain": round(d / p, 3)}
        out[f"{bucket}-{2 * bucket - 1}"] = cell
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-len", type=int, default=512, help="longest output in the wave")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sglang-python", default=os.environ.get("EFFICIENTROLLOUT_SGLANG_PYTHON"))
    ap.add_argument("--sglang-args", default=os.environ.get("EFFICIENTROLLOUT_SGLANG_ARGS", ""))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--png", default=None, help="timeline picture (default docs/sglang_timeline_<cpu kind>.png)")
    a = ap.parse_args()
    if not a.sglang_python:
        raise SystemExit("needs SGLang: --sglang-python or EFFICIENTROLLOUT_SGLANG_PYTHON")
    torch.set_grad_enabled(False)
    requests = wave_requests(a.max_len, a.seed)
    variants = {}
    cpu = isa.label()
    for name in a.variants.split(","):
        backend, sglang_speculation, mode = VARIANTS[name]
        print(f"== {name}", flush=True)
        config = EngineConfig(dtype=a.dtype, max_batch_size=64, max_seq_len=a.max_len + 128, speculation=SpeculationConfig(mode=mode))
        if backend == "sglang":
            engine = SGLangEngine(config, SGLangConfig(sglang_python=a.sglang_python, sglang_args=a.sglang_args,
                                                       sglang_speculation=sglang_speculation))
        else:
            engine = NativeEngine(config)
        try:
            variants[name] = run(engine, requests)
            if sglang_speculation == "efficientrollout":
                variants[name]["costs_by_batch"] = step_costs(engine.workdir / "steps.jsonl")
        finally:
            if backend == "sglang":
                engine.close()
            del engine
        print(json.dumps({name: {k: v for k, v in variants[name].items() if k != "trace"}}), flush=True)
    base = variants.get("sglang-plain")
    for v in variants.values():
        if base:
            v["speedup_vs_sglang_plain"] = round(base["wall_s"] / v["wall_s"], 3)
    print(f"\n{'variant':<24}{'wall s':>8}{'tok/s':>8}{'accept':>8}{'vs SGLang plain':>17}")
    for name, v in variants.items():
        print(f"{name:<24}{v['wall_s']:>8}{v['tok_s']:>8}{str(v['acceptance']):>8}{str(v.get('speedup_vs_sglang_plain', '-')):>17}")
    for name, v in variants.items():
        if "costs_by_batch" in v:
            print(f"{name}: draft step / plain step by batch: " +
                  ", ".join(f"{b}: {c.get('draft_over_plain', '-')} ({c['speculating']:.0%} speculating)" for b, c in v["costs_by_batch"].items()))
    png = a.png or f"docs/sglang_timeline_{cpu.replace('_', '')}.png"
    plot_timeline({n: v["trace"] for n, v in variants.items() if n in ("sglang-ours", "native-adaptive") and v["trace"]}, png,
                  "Long-tail wave: our self-drafter inside SGLang vs the native engine", xlabel="seconds since the wave started")
    for v in variants.values():
        v.pop("trace")
    print(json.dumps({"bench": "sglang", "max_len": a.max_len, "dtype": a.dtype, "cpu": cpu,
                      "sglang_args": a.sglang_args, "variants": variants}))


if __name__ == "__main__":
    main()
