"""Forward costs that decide whether speculation pays: target step, drafter step and verify
over K+1 positions, at a few batch sizes and context lengths, in one process.

Each cell is the median of --repeats interleaved timings (target, drafter, verifies in turn, so
the machine's swings hit all of them alike); ratios are to the target step of the same batch and
context. `--drafters int8,int4` times one drafter step per kind (int4 needs CUDA or an AVX512
CPU); kernel names (`--drafters int8pack,fp8`) time those kernels. On a GPU, pair it with `scripts/make_random_checkpoint.py` for memory-bound layer shapes.
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
from efficientrollout.speculation import Drafter, SpeculationConfig
from efficientrollout.speculation.drafter import drafter_kernel
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
    ap.add_argument("--drafters", default="int8", help="comma list of int8, int4 (this device's default kernels) or kernel names: "
                    + ", ".join(DRAFTER_KERNELS))
    a = ap.parse_args()
    batches, contexts, ks = ([int(x) for x in s.split(",")] for s in (a.batches, a.contexts, a.ks))
    torch.set_grad_enabled(False)
    engine = NativeEngine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype, cuda_graphs=a.cuda_graphs, max_batch_size=max(batches),
                                       max_seq_len=max(contexts) + max(ks) + 2, speculation=SpeculationConfig(mode="plain")))
    runner = engine.runner
    kinds = a.drafters.split(",")  # int8 / int4: this device's kernel for them; else a kernel name
    drafters = {kind: Drafter(runner.decoder, kernel=drafter_kernel(kind, engine.device, engine.torch_dtype) if kind in ("int8", "int4")
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
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else engine.device.type
    print(json.dumps({"bench": "step", "model": a.model, "device": device, "cuda_graphs": a.cuda_graphs, "dtype": engine.dtype, "threads": torch.get_num_threads(),
                      "drafter_kernels": {kind: d.kernel for kind, d in drafters.items()}, "repeats": a.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
