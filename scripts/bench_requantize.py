"""The drafter's re-quantization after a weight update: torchao vs our one-pass kernel.

Every weight update re-derives the int8 drafter from the new weights (while the engine is
idle, or before the first draft of the next wave: in a synchronous RL loop, on the rollout's
critical path). This quantizes every drafter linear of the bundled model both ways, interleaved
(torchao's `Int8Tensor.from_hp(w.float(), PerRow())` and `int8_rows`, which on CPUs is our
kernel), checks that they give the same numbers, and times a whole `Drafter.requantize()`.
One engine thread on one CPU, as engines run. Prints a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from efficientrollout import cpu
from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.speculation import SpeculationConfig
from efficientrollout.speculation.drafter import int8_rows, torchao_int8_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="engine dtypes (bfloat16 needs a CPU with AVX512-BF16)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--cpu", type=int, default=1)
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    torch.set_num_threads(1)

    results = {}
    for dtype in a.dtypes.split(","):
        engine = NativeEngine(EngineConfig(device="cpu", dtype=dtype, speculation=SpeculationConfig(mode="adaptive")))
        weights = [q._source[0].weight.detach() for q in engine.drafter.linears]
        for w in weights:
            assert all(torch.equal(x, y) for x, y in zip(int8_rows(w), torchao_int8_rows(w))), "int8_rows differs from torchao"
        times: dict[str, list[float]] = {"torchao_s": [], "int8_rows_s": [], "requantize_s": []}
        for rep in range(a.repeats):
            for name, fn in (("torchao_s", torchao_int8_rows), ("int8_rows_s", int8_rows))[:: 1 if rep % 2 == 0 else -1]:
                t0 = time.perf_counter()
                for w in weights:
                    fn(w)
                times[name].append(time.perf_counter() - t0)
            times["requantize_s"].append(engine.drafter.requantize())
        row = {k: sorted(round(t, 3) for t in v) for k, v in times.items()}
        row["int8_rows_over_torchao"] = round(statistics.median(times["int8_rows_s"]) / statistics.median(times["torchao_s"]), 3)
        row["linears"] = len(weights)
        print(dtype, json.dumps(row), flush=True)
        results[dtype] = row
    print(json.dumps({"bench": "requantize", "model": "smollm2", "drafter": "int8", "threads": 1,
                      "cpu": cpu.label(), "results": results}))


if __name__ == "__main__":
    main()
