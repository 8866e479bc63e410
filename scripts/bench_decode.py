"""Decode throughput of the native engine vs transformers' generate, same model, same prompts.

For each batch size: greedy, ignore_eos, T new tokens per sample. Reports end-to-end tokens/s
(prefill included) for both, the engine's decode-only ms/step, and the ratio at batch 1 to the
memory-bandwidth floor (weight bytes / measured read bandwidth of this machine) and to the
issue's reference floor (5.8 ms: 269 MB of bf16 at 46 GB/s). JSON last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from tqdm import tqdm

from efficientrollout import cpu
from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.protocol import RolloutRequest, SamplingParams
from efficientrollout.speculation import SpeculationConfig

PROMPTS = [
    "The history of the Roman Empire", "Write a story about a dragon", "Explain photosynthesis",
    "List the prime numbers below fifty", "A recipe for bread:", "The best way to learn programming is",
    "Once upon a time", "The theory of relativity says",
]


def read_bandwidth_gbs() -> float:
    x = torch.ones(128 * 1024 * 1024 // 4 * 4)  # 512 MB
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def bench_engine(engine: NativeEngine, batch: int, tokens: int) -> dict:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    requests = [RolloutRequest(id=str(i), prompt=PROMPTS[i % len(PROMPTS)], sampling=sampling) for i in range(batch)]
    t0 = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - t0
    decode_s = max(r.timings.decode_s for r in results)
    assert all(len(r.output_token_ids) == tokens for r in results)
    return {"tok_s": batch * tokens / wall, "decode_ms_step": decode_s / (tokens - 1) * 1e3, "decode_tok_s": batch * (tokens - 1) / decode_s}


@torch.inference_mode()
def bench_transformers(model, tokenizer, batch: int, tokens: int) -> dict:
    tokenizer.padding_side = "left"
    enc = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    wall = time.perf_counter() - t0
    assert out.shape[1] - enc.input_ids.shape[1] == tokens
    return {"tok_s": batch * tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    # plain decoding: speculation is measured by bench_rollout.py
    engine = NativeEngine(EngineConfig(dtype=a.dtype, max_batch_size=max(batches), max_seq_len=256,
                                       speculation=SpeculationConfig(mode="plain")))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bench_engine(engine, 1, 4)  # warm-up
    warmup_s = time.perf_counter() - t0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=engine.dtype).eval()
    bench_transformers(hf, engine.tokenizer, 1, 4)

    rows, bandwidths = [], []
    for batch in tqdm(batches, desc="batch sizes"):
        if batch == 1:  # this shared VM's memory bandwidth swings 2x between minutes: read it around the b1 run
            bandwidths.append(read_bandwidth_gbs())
        ours, theirs = bench_engine(engine, batch, a.tokens), bench_transformers(hf, engine.tokenizer, batch, a.tokens)
        if batch == 1:
            bandwidths.append(read_bandwidth_gbs())
        rows.append({"batch": batch, "engine_tok_s": round(ours["tok_s"], 1), "engine_decode_tok_s": round(ours["decode_tok_s"], 1),
                     "engine_ms_step": round(ours["decode_ms_step"], 2), "transformers_tok_s": round(theirs["tok_s"], 1),
                     "speedup_vs_transformers": round(ours["tok_s"] / theirs["tok_s"], 2)})
        tqdm.write(json.dumps(rows[-1]))

    weight_bytes = sum(p.numel() * p.element_size() for p in engine.decoder.parameters())
    bandwidth = max(bandwidths or [read_bandwidth_gbs()])  # the faster reading: the stricter floor
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    b1 = next((r for r in rows if r["batch"] == 1), None)
    summary = {
        "bench": "decode", "model": str(engine.model_path.name), "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "native_bf16": cpu.native_bf16(), "tokens_per_sample": a.tokens,
        "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2),
        "weight_mb": round(weight_bytes / 1e6, 1), "read_bandwidth_gbs": round(bandwidth, 1), "read_bandwidth_readings_gbs": [round(x, 1) for x in bandwidths], "floor_ms_this_machine": round(floor_ms, 2),
        "rows": rows,
    }
    if b1:
        summary["b1_ratio_to_floor_this_machine"] = round(b1["engine_ms_step"] / floor_ms, 2)
        summary["b1_ratio_to_reference_floor_5.8ms"] = round(b1["engine_ms_step"] / 5.8, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
