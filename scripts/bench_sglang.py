"""The long-tail wave of `bench_rollout.py` through SGLang and through our engine, one run:
SGLang plain, SGLang STANDALONE (the same checkpoint as its draft), native plain, native
adaptive. Same requests, same per-sample lengths (`ignore_eos`), so every variant generates the
same tokens; wall time, tokens/s and acceptance per variant, ratios to SGLang plain, a JSON line
last. Needs SGLang (`--sglang-python`, or EFFICIENTROLLOUT_SGLANG_PYTHON); run it with nothing
else busy on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.engines.sglang import SGLangConfig, SGLangEngine
from efficientrollout.pipeline.workloads import wave_requests
from efficientrollout.speculation import SpeculationConfig


def run(engine, requests) -> dict:
    engine.generate(requests[:2])  # warm-up: first-use costs out of the measured wave
    t0 = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - t0
    assert not [r.error for r in results if r.error], [r.error for r in results if r.error][:3]
    tokens = sum(len(r.output_token_ids) for r in results)
    drafted, accepted = sum(r.speculation.drafted for r in results), sum(r.speculation.accepted for r in results)
    return {"wall_s": round(wall, 2), "tokens": tokens, "tok_s": round(tokens / wall, 1),
            "acceptance": round(accepted / drafted, 3) if drafted else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-len", type=int, default=512, help="longest output in the wave")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sglang-python", default=os.environ.get("EFFICIENTROLLOUT_SGLANG_PYTHON"))
    ap.add_argument("--sglang-args", default=os.environ.get("EFFICIENTROLLOUT_SGLANG_ARGS", ""))
    ap.add_argument("--variants", default="sglang-plain,sglang-standalone,native-plain,native-adaptive")
    a = ap.parse_args()
    if not a.sglang_python:
        raise SystemExit("needs SGLang: --sglang-python or EFFICIENTROLLOUT_SGLANG_PYTHON")
    torch.set_grad_enabled(False)
    requests = wave_requests(a.max_len, a.seed)
    variants = {}
    for name in a.variants.split(","):
        backend, mode = name.split("-", 1)
        print(f"== {name}", flush=True)
        if backend == "sglang":
            config = EngineConfig(dtype=a.dtype, max_batch_size=64, max_seq_len=a.max_len + 128, speculation=SpeculationConfig(mode="plain"))
            engine = SGLangEngine(config, SGLangConfig(sglang_python=a.sglang_python, sglang_args=a.sglang_args,
                                                       sglang_speculation="standalone" if mode == "standalone" else "none"))
        else:
            engine = NativeEngine(EngineConfig(dtype=a.dtype, max_batch_size=64, max_seq_len=a.max_len + 128,
                                               speculation=SpeculationConfig(mode=mode)))
        try:
            variants[name] = run(engine, requests)
        finally:
            if backend == "sglang":
                engine.close()
            del engine
        print(json.dumps({name: variants[name]}), flush=True)
    base = variants.get("sglang-plain")
    for v in variants.values():
        if base:
            v["speedup_vs_sglang_plain"] = round(base["wall_s"] / v["wall_s"], 3)
    print(f"\n{'variant':<20}{'wall s':>8}{'tok/s':>8}{'accept':>8}{'vs SGLang plain':>17}")
    for name, v in variants.items():
        print(f"{name:<20}{v['wall_s']:>8}{v['tok_s']:>8}{str(v['acceptance']):>8}{str(v.get('speedup_vs_sglang_plain', '-')):>17}")
    cpu = "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx2" if torch.cpu._is_avx2_supported() else platform.machine()
    print(json.dumps({"bench": "sglang", "max_len": a.max_len, "dtype": a.dtype, "cpu": cpu,
                      "sglang_args": a.sglang_args, "variants": variants}))


if __name__ == "__main__":
    main()
