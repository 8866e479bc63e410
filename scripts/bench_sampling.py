"""Time one draw per row from [rows, V] probabilities: the keyed race as `sampling.race` runs it
on this device (C++ on CPUs, Triton on GPUs), the same race in PyTorch ops, and the inverse-CDF
draw; plus `sample()` (log-softmax, draw, log-probs) with each draw and in PyTorch ops
(`sample_torch`, inverse CDF; on CPUs `sample()` is one C++ pass per row). Median of --repeats,
interleaved; JSON line last.

    python scripts/bench_sampling.py --device cuda --rows 1,8,64,256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from efficientrollout.sampling import SamplingBatch, inverse_cdf, race, race_keys, race_torch, sample, sample_torch, seeded_uniform


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's")
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    results = []
    for b in (int(x) for x in a.rows.split(",")):
        logits = torch.randn(b, a.vocab, device=dev) * 3
        probs = torch.softmax(logits, -1)
        keys = race_keys(list(range(b)), [7] * b).to(dev)
        u = torch.from_numpy(seeded_uniform(list(range(b)), [7] * b)).to(dev)
        params = SamplingBatch.build([1.0] * b, [1.0] * b, [0] * b, dev)
        cells = {"race": lambda: race(probs, keys), "race_pytorch": lambda: race_torch(probs, keys),
                 "inverse_cdf": lambda: inverse_cdf(probs, u),
                 "sample_race": lambda: sample(logits, params, keys=keys), "sample_inverse_cdf": lambda: sample(logits, params, uniforms=u),
                 "sample_pytorch": lambda: sample_torch(logits, params, uniforms=u)}
        times = {name: [] for name in cells}
        for fn in cells.values():
            fn()  # compile / warm up
        for _ in range(a.repeats):
            for name, fn in cells.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        same = (race(probs, keys) == race_torch(probs, keys)).float().mean().item()
        row = {"rows": b, **{f"{n}_ms": round(statistics.median(t) * 1e3, 4) for n, t in times.items()}, "race_matches_pytorch": same}
        results.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(json.dumps({"bench": "sampling", "device": device, "vocab": a.vocab, "threads": torch.get_num_threads(), "rows": results}))


if __name__ == "__main__":
    main()
