"""Which kernel should the drafter's linears use on this device? One layer's linears, every
candidate, 1-64 rows, side by side.

Candidates: the target's own linear (the engine's `Linear`; bf16, or fp32 with --dtype
float32), the drafter's linears as `QuantLinear` runs them: torchao's int8 weight-only tensor
(`Int8Tensor`, what the CUDA drafter uses today) and int4 (torchao's tinygemm layout on CUDA,
int4pack on AVX512 CPUs), ATen's `_weight_int8pack_mm` over the same int8 weights (fused on
CPUs with AVX512 and, in recent PyTorch, on CUDA), and the 8-bit weight-and-activation kernels
(`w8a8`: int8 `_int_mm`; `fp8`: e4m3 `_scaled_mm` with row-wise scales; activations quantized
per row on the fly). On CUDA each cell is a CUDA graph of --calls calls (launch costs out, as in a captured
engine step), timed with CUDA events; on CPUs, wall time. The H100 run of bench_step showed the
int8 drafter at 1.7-2.2x the bf16 target (torchao converts the whole int8 weight to bf16 on
every call), so this says what to use instead. Default shapes: Llama-3-8B's q/o, gate/up and
down projections. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from efficientrollout import cpu
from efficientrollout.models.decoder import Linear
from efficientrollout.speculation.drafter import QuantLinear


def candidates(w: torch.Tensor, group: int) -> dict:
    """The target's linear and the drafter's int8 (torchao) and int4 linears, as the engine runs
    them on this device, and ATen's `_weight_int8pack_mm` over the same int8 weights (QuantLinear
    calls it only for a few rows on CPUs)."""
    target = Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        target.weight.copy_(w)
    target.pack()
    int8 = QuantLinear(target, "torchao")
    qdata, scale = int8.weight.qdata.contiguous(), int8.weight.scale.reshape(-1).to(w.dtype).contiguous()
    out = {"target": target, "torchao_int8": int8, "int8pack": lambda x: torch._weight_int8pack_mm(x, qdata, scale),
           "w8a8": QuantLinear(target, "w8a8")}
    if w.is_cuda:
        out["fp8"] = QuantLinear(target, "fp8")
    if w.is_cuda or cpu.avx512():
        out["int4_tinygemm" if w.is_cuda else "int4pack"] = QuantLinear(target, "int4" if w.is_cuda else "int4pack", group)
    return out


def time_ms(fn, x: torch.Tensor, calls: int, repeats: int) -> float | None:
    try:
        return _time_ms(fn, x, calls, repeats)
    except (RuntimeError, NotImplementedError) as e:  # e.g. no kernel for this device or dtype, or not capturable
        print(f"{getattr(fn, 'kernel', fn)}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def _time_ms(fn, x: torch.Tensor, calls: int, repeats: int) -> float:
    fn(x)
    if not x.is_cuda:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            times.append((time.perf_counter() - t0) / calls)
        return statistics.median(times) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,28672x4096,4096x14336", help="out x in per linear")
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--group", type=int, default=64, help="int4 group size")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    table = []
    with torch.inference_mode():
        for shape in a.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            w = (torch.randn(n, k, device=a.device) * 0.02).to(dtype)
            kernels = candidates(w, a.group)
            for rows in (int(r) for r in a.rows.split(",")):
                x = torch.randn(rows, k, device=a.device, dtype=dtype)
                ms = {name: time_ms(fn, x, a.calls, a.repeats) for name, fn in kernels.items()}
                row = {"shape": shape, "rows": rows, **{f"{name}_ms": None if v is None else round(v, 4) for name, v in ms.items()},
                       **{f"{name}_vs_target": round(v / ms["target"], 3) for name, v in ms.items() if v is not None and name != "target"}}
                row["target_GBps"] = round(w.numel() * w.element_size() / ms["target"] / 1e6, 1)
                table.append(row)
                print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(json.dumps({"bench": "linear", "device": device, "dtype": a.dtype, "torch": torch.__version__, "rows": table}))


if __name__ == "__main__":
    main()
