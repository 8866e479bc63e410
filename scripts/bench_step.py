"""Forward costs that decide whether speculation pays: target step, drafter step and verify
over K+1 positions, at a few batch sizes and context lengths, in one process.

Each cell is the median of --repeats interleaved timings (target, drafter, verifies in turn, so
the machine's swings hit all of them alike); ratios are to the target step of the same batch and
context. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.speculation import SpeculationConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--contexts", default="256,1000", help="cached positions each forward attends")
    ap.add_argument("--ks", default="3,7", help="draft lengths whose verify (K+1 positions) is timed")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    batches, contexts, ks = ([int(x) for x in s.split(",")] for s in (a.batches, a.contexts, a.ks))
    torch.set_grad_enabled(False)
    engine = NativeEngine(EngineConfig(dtype=a.dtype, max_batch_size=max(batches), max_seq_len=max(contexts) + max(ks) + 2,
                                       speculation=SpeculationConfig(mode="adaptive", probe=False)))
    runner, drafter = engine.runner, engine.drafter.decoder

    def forward(b: int, ctx: int, width: int, decoder=None):
        tokens = torch.zeros(b, width, dtype=torch.long, device=engine.device)
        positions = ctx + torch.arange(width, device=engine.device).expand(b, width)
        return lambda: runner.forward(tokens, positions, ctx + width, decoder=decoder)

    rows = []
    for b in tqdm(batches, desc="batch sizes"):
        for ctx in contexts:
            cells = {"target": forward(b, ctx, 1), "drafter": forward(b, ctx, 1, drafter)}
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
    print(json.dumps({"bench": "step", "device": engine.device.type, "dtype": engine.dtype, "threads": torch.get_num_threads(),
                      "drafter_kernel": engine.drafter.kernel, "repeats": a.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
